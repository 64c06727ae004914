"""The decoded-split cache: an array file per content fingerprint, an index file per source stamp."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fer_search.errors import UserError
from fer_search.files import sha256_json, write_atomically
from fer_search.sources import CLASSES, SIZE, Arrays, Source

# Bump when the cache file's layout or the decoding changes: old entries then miss and are rebuilt.
_CACHE_VERSION = 2  # 2: 16-bit gray PNGs scaled to 8 bits, no longer clipped


def index_key(source: Source) -> str:
    """The key a source's index file is named by: its stamp under this cache version."""
    return sha256_json([source.layout, _CACHE_VERSION, *source.stamp])


def cached_arrays(cache_dir: Path, key: str) -> Arrays | None:
    """The arrays the index maps `key` to, or None when absent, stale or damaged (then they are decoded again)."""
    fingerprint = _indexed_fingerprint(cache_dir, key)
    return read_arrays(cache_dir, fingerprint) if fingerprint is not None else None


def store_arrays(cache_dir: Path, key: str, arrays: Arrays) -> None:
    """Files decoded arrays under their fingerprint, then points the index entry of `key` at them."""
    _write_arrays(cache_dir, arrays)
    index_entry = json.dumps({"fingerprint": arrays.fingerprint}).encode()
    _write_cache_file(_index_path(cache_dir, key), lambda file: file.write(index_entry))


def read_arrays(cache_dir: Path, fingerprint: str) -> Arrays | None:
    """The cached arrays of a fingerprint, or None when missing or corrupt (then they are rebuilt)."""
    try:
        with np.load(_arrays_path(cache_dir, fingerprint), allow_pickle=False) as file:
            stored = {key: file[key] for key in ("version", "fingerprint", "x", "y", "names", "converted")}
    # The cache is disposable: whatever a damaged file raises means "decode again".
    except Exception:
        return None
    arrays = Arrays(stored["x"], stored["y"], stored["names"], stored["converted"], str(stored["fingerprint"]))
    return arrays if _is_consistent(arrays, fingerprint) and stored["version"] == _CACHE_VERSION else None


def _index_path(cache_dir: Path, key: str) -> Path:
    """One small file per index key, so workers filling the cache together never lose an entry."""
    return cache_dir / f"index-{key}.json"


def _arrays_path(cache_dir: Path, fingerprint: str) -> Path:
    """The array file of a content fingerprint."""
    return cache_dir / f"{fingerprint}.npz"


def _indexed_fingerprint(cache_dir: Path, key: str) -> str | None:
    """The content fingerprint the index maps this key to, or None when absent or unreadable."""
    try:
        fingerprint = json.loads(_index_path(cache_dir, key).read_bytes())["fingerprint"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    is_sha256 = isinstance(fingerprint, str) and len(fingerprint) == 64 and set(fingerprint) <= set("0123456789abcdef")
    return fingerprint if is_sha256 else None


def _is_consistent(arrays: Arrays, fingerprint: str) -> bool:
    """Whether cached arrays have the shapes and types a split needs and the fingerprint they are filed under."""
    n = len(arrays.y)
    return (
        arrays.fingerprint == fingerprint
        and arrays.x.dtype == np.uint8
        and arrays.x.shape == (n, SIZE, SIZE)
        and arrays.y.dtype == np.int64
        and arrays.y.shape == (n,)
        and bool(((arrays.y >= 0) & (arrays.y < len(CLASSES))).all())
        and arrays.names.shape == (n,)
        and arrays.names.dtype.kind == "U"
        and arrays.converted.dtype == np.bool_
        and arrays.converted.shape == (n,)
    )


def _write_arrays(cache_dir: Path, arrays: Arrays) -> None:
    """Stores decoded arrays under their fingerprint (uncompressed: loading is the hot path)."""

    def write(file: BinaryIO) -> None:
        np.savez(
            file,
            version=np.array(_CACHE_VERSION),
            fingerprint=np.array(arrays.fingerprint),
            x=arrays.x,
            y=arrays.y,
            names=arrays.names,
            converted=arrays.converted,
        )

    _write_cache_file(_arrays_path(cache_dir, arrays.fingerprint), write)


def _write_cache_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes one cache file atomically; a cache that cannot be written is the user's to fix."""
    try:
        write_atomically(path, write)
    except OSError as error:
        raise UserError(f"{path.parent}: cannot write the data cache ({error.strerror})") from None
