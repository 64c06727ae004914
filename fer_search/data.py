"""Reads FER2013 (image folders or fer2013.csv) into cached uint8 tensors per split."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fer_search.config import DataConfig
from fer_search.errors import UserError
from fer_search.files import content_fingerprint, made_folder, sha256_json, write_atomically

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SIZE = 48
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PUBLIC_PREFIX = "PublicTest_"
PRIVATE_PREFIX = "PrivateTest_"
CSV_NAME = "fer2013.csv"
CSV_USAGES = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}

# Bump when the cache file's layout or the decoding changes: old entries then miss and are rebuilt.
_CACHE_VERSION = 1
# Files per decoding task: large enough to amortise the pool, small enough to spread over cores.
_CHUNK = 512


@dataclass(frozen=True)
class SplitData:
    """One split in canonical order (sorted by name), ready to move to the training device."""

    x: torch.Tensor  # uint8, (N, 1, 48, 48), CPU
    y: torch.Tensor  # int64, (N,)
    names: tuple[str, ...]  # path relative to the split's folder, or "row:<i>" (i-th row of the split) for CSV
    fingerprint: str  # sha256 hex of the content, canonical order
    converted: int  # images that were not 48x48 grayscale and were converted


@dataclass(frozen=True)
class FerData:
    """Train and validation splits, and the test split only when asked for (finalize, data check)."""

    train: SplitData
    val: SplitData
    test: SplitData | None
    # False where the source has no PublicTest names and val was carved out of train (then test is all of test/).
    val_is_public_test: bool = True

    @property
    def fingerprints(self) -> dict[str, str]:
        """Content fingerprint per loaded split: recorded in a study to detect changed data."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {role: split.fingerprint for role, split in splits.items() if split is not None}


@dataclass(frozen=True)
class _Arrays:
    """A decoded split as numpy arrays: what the cache file holds."""

    x: np.ndarray  # uint8 (N, 48, 48)
    y: np.ndarray  # int64 (N,)
    names: np.ndarray  # str (N,)
    converted: np.ndarray  # bool (N,)
    fingerprint: str


@dataclass(frozen=True)
class _Source:
    """One split as found on disk before any image is read: a cheap index key and how to decode it."""

    index_key: str
    decode: Callable[[], _Arrays]


@dataclass(frozen=True)
class _Plan:
    """Where each split comes from; val None means carve it out of train."""

    train: _Source
    val: _Source | None
    test: _Source | None


class _Listed(NamedTuple):
    """An image file found in a class folder, not yet read."""

    name: str  # relative to the split folder, '/'-separated
    label: int
    entry: os.DirEntry[str]


def load_data(
    path: Path, cache_dir: Path, *, with_test: bool = False, val_fraction: float = 0.1, split_seed: int = 0
) -> FerData:
    """FER2013 at `path` (image folders, a folder holding fer2013.csv, or the CSV itself), via the cache.

    Without `with_test` no PrivateTest image is read: the test folder is only listed.
    """
    plan = _plan(Path(path), with_test)
    cache_dir = made_folder(Path(cache_dir), "cache")
    train = _cached_arrays(plan.train, cache_dir)
    if plan.val is None:
        train_split, val_split = _carve_val(train, val_fraction, split_seed)
    else:
        train_split, val_split = _split_data(train), _split_data(_cached_arrays(plan.val, cache_dir))
    test_split = _split_data(_cached_arrays(plan.test, cache_dir)) if plan.test is not None else None
    return FerData(train=train_split, val=val_split, test=test_split, val_is_public_test=plan.val is not None)


def load_configured(config: DataConfig, *, with_test: bool = False) -> FerData:
    """load_data with the [data] settings of search.toml: the one way `run` and `finalize` read a data set."""
    return load_data(config.path, config.cache_dir, with_test=with_test, val_fraction=config.val_fraction,
                     split_seed=config.split_seed)


def check_data(path: Path, cache_dir: Path, *, val_fraction: float = 0.1, split_seed: int = 0) -> dict[str, Any]:
    """The `data check --json` document: per split totals, per-class counts and fingerprints."""
    data = load_data(path, cache_dir, with_test=True, val_fraction=val_fraction, split_seed=split_seed)
    splits = {"train": data.train, "val": data.val, "test": data.test}
    return {
        "fingerprint": sha256_json(data.fingerprints),
        "splits": {role: _split_summary(split) for role, split in splits.items() if split is not None},
        "converted": sum(split.converted for split in splits.values() if split is not None),
    }


def decode_image(raw: bytes, name: str) -> tuple[np.ndarray, bool]:
    """The image in `raw` as uint8 (48, 48) grayscale, and whether it had to be converted to that."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            converted = image.mode != "L" or image.size != (SIZE, SIZE)
            gray = image.convert("L") if image.mode != "L" else image
            if gray.size != (SIZE, SIZE):
                gray = gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            return np.array(gray, dtype=np.uint8), converted
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image (unknown or unsupported format)") from None
    # PIL raises many types for damaged files (OSError for truncation, SyntaxError, ValueError, ...);
    # the reason is folded onto one line because the CLI prints errors as one line.
    except Exception as error:
        raise UserError(f"{name}: damaged image ({' '.join(str(error).split())})") from None


def _plan(path: Path, with_test: bool) -> _Plan:
    """The sources of each split, found by the layout at `path`."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        return _csv_plan(path, with_test)
    if (path / "train").is_dir():
        return _folder_plan(path, with_test)
    if (path / CSV_NAME).is_file():
        return _csv_plan(path / CSV_NAME, with_test)
    raise UserError(f"{path}: holds neither train/<class>/ image folders nor {CSV_NAME}")


def _folder_plan(root: Path, with_test: bool) -> _Plan:
    """Sources of the image-folder layout; the split is recovered from PublicTest_/PrivateTest_ names."""
    train = _listed_images(root / "train")
    if not train:
        raise UserError(f"{root / 'train'}: no images found (expected train/<class>/*.jpg, *.jpeg or *.png)")
    test_dir = root / "test"
    test = _listed_images(test_dir) if test_dir.is_dir() else []
    public = [f for f in test if f.entry.name.startswith(PUBLIC_PREFIX)]
    private = [f for f in test if f.entry.name.startswith(PRIVATE_PREFIX)]
    if not public and not private:
        if with_test and not test:
            raise UserError(f"{test_dir}: no test images found (expected test/<class>/*.jpg, *.jpeg or *.png)")
        test_source = _folder_source(test_dir, test) if with_test else None
        return _Plan(_folder_source(root / "train", train), None, test_source)
    other = next((f for f in test if not f.entry.name.startswith((PUBLIC_PREFIX, PRIVATE_PREFIX))), None)
    if other is not None:
        raise UserError(f"{other.entry.path}: test/ mixes {PUBLIC_PREFIX}/{PRIVATE_PREFIX} names with other names")
    if not public:
        raise UserError(f"{test_dir}: no {PUBLIC_PREFIX}* images found to validate on")
    if with_test and not private:
        raise UserError(f"{test_dir}: no {PRIVATE_PREFIX}* images found to test on")
    return _Plan(
        _folder_source(root / "train", train),
        _folder_source(test_dir, public),
        _folder_source(test_dir, private) if with_test else None,
    )


def _listed_images(split_dir: Path) -> list[_Listed]:
    """Image files of split_dir's class folders, sorted by name; opens no image file."""
    listed: list[_Listed] = []
    for folder in _scandir(split_dir):
        # Hidden entries are tool droppings (.DS_Store, .ipynb_checkpoints), not classes or images.
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        label = _class_label(folder)
        listed += [
            _Listed(f"{folder.name}/{entry.name}", label, entry)
            for entry in _scandir(Path(folder.path))
            if not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()
        ]
    return sorted(listed, key=lambda f: f.name)


def _class_label(folder: os.DirEntry[str]) -> int:
    """The canonical label of a class folder, matched by name regardless of case."""
    try:
        return CLASSES.index(folder.name.lower())
    except ValueError:
        expected = ", ".join(CLASSES)
        raise UserError(f"{folder.path}: unknown class folder {folder.name!r} (expected {expected})") from None


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of a folder; an unreadable one is the user's to fix."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise UserError(f"{folder}: cannot list ({error.strerror})") from None


def _folder_source(split_dir: Path, files: Sequence[_Listed]) -> _Source:
    """A split made of image files, keyed by their relative names, sizes and mtimes."""
    index = [[f.name, *_size_and_mtime(f.entry)] for f in files]
    return _Source(sha256_json(["folder", _CACHE_VERSION, index]), lambda: _decoded_files(files))


def _size_and_mtime(entry: os.DirEntry[str]) -> tuple[int, int]:
    """(size, mtime_ns) of a listed file: the cheap stand-in for its content in the cache index."""
    try:
        stat = entry.stat()
    except OSError as error:
        raise UserError(f"{entry.path}: cannot read ({error.strerror})") from None
    return stat.st_size, stat.st_mtime_ns


def _decoded_files(files: Sequence[_Listed]) -> _Arrays:
    """Reads and decodes every file; the pool mostly overlaps file reads, PIL decodes these fast."""
    chunks = [files[i : i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor() as pool:
        decoded = [item for chunk in pool.map(_decoded_chunk, chunks) for item in chunk]
    return _Arrays(
        x=np.stack([image for _, image, _ in decoded]),
        y=np.array([f.label for f in files], dtype=np.int64),
        names=np.array([f.name for f in files], dtype=str),
        converted=np.array([converted for _, _, converted in decoded], dtype=bool),
        fingerprint=content_fingerprint((f.name, raw) for f, (raw, _, _) in zip(files, decoded)),
    )


def _decoded_chunk(files: Sequence[_Listed]) -> list[tuple[bytes, np.ndarray, bool]]:
    """(raw bytes, image, converted?) per file: the bytes are kept for the fingerprint."""
    decoded = []
    for f in files:
        raw = _read_file(f.entry.path)
        decoded.append((raw, *decode_image(raw, f.entry.path)))
    return decoded


def _read_file(path: str) -> bytes:
    """The bytes of one image file; the only place the loader reads an image."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None


def _csv_plan(csv_path: Path, with_test: bool) -> _Plan:
    """Sources of fer2013.csv, keyed by the file's size and mtime and the split's Usage."""
    roles = ("train", "val", "test") if with_test else ("train", "val")
    try:
        stat = csv_path.stat()
    except OSError as error:
        raise UserError(f"{csv_path}: cannot read ({error.strerror})") from None
    table = _CsvTable(csv_path, tuple(CSV_USAGES[role] for role in roles))
    sources = {
        role: _Source(
            sha256_json(["csv", _CACHE_VERSION, CSV_USAGES[role], stat.st_size, stat.st_mtime_ns]),
            lambda usage=CSV_USAGES[role]: _decoded_rows(table, usage),
        )
        for role in roles
    }
    return _Plan(sources["train"], sources["val"], sources.get("test"))


class _CsvRows(NamedTuple):
    """The rows of one Usage: 1-based line numbers in the file, emotion and pixel strings as written."""

    lines: list[int]
    emotions: list[str]
    pixels: list[str]


@dataclass
class _CsvTable:
    """fer2013.csv, parsed on first use and only once, keeping the rows of the wanted usages only."""

    path: Path
    usages: tuple[str, ...]

    @cached_property
    def rows(self) -> dict[str, _CsvRows]:
        """Rows per wanted Usage; rows of other usages are skipped unchecked (PrivateTest is the lockbox)."""
        rows = {usage: _CsvRows([], [], []) for usage in self.usages}
        try:
            with open(self.path, newline="", encoding="utf-8") as file:
                reader = csv.reader(file)
                columns = _csv_columns(self.path, next(reader, []))
                for row in reader:
                    if not row:
                        continue
                    emotion, pixels, usage = _csv_fields(f"{self.path}: line {reader.line_num}", row, columns)
                    if usage in rows:
                        rows[usage].lines.append(reader.line_num)
                        rows[usage].emotions.append(emotion)
                        rows[usage].pixels.append(pixels)
        except (UnicodeDecodeError, csv.Error) as error:
            raise UserError(f"{self.path}: not a readable CSV file ({error})") from None
        except OSError as error:
            raise UserError(f"{self.path}: cannot read ({error.strerror})") from None
        return rows


def _csv_columns(path: Path, header: list[str]) -> dict[str, int]:
    """Column index by name from the header, which must name emotion, pixels and Usage."""
    columns = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in ("emotion", "pixels", "Usage") if name not in columns]
    if missing:
        raise UserError(f"{path}: line 1: header lacks {', '.join(missing)} (expected emotion,pixels,Usage)")
    return columns


def _csv_fields(where: str, row: list[str], columns: dict[str, int]) -> tuple[str, str, str]:
    """(emotion, pixels, Usage) of a CSV row, stripped; the Usage must be one FER2013 knows."""
    if len(row) != len(columns):
        raise UserError(f"{where}: {len(row)} fields, expected {len(columns)} (emotion,pixels,Usage)")
    emotion, pixels, usage = (row[columns[name]].strip() for name in ("emotion", "pixels", "Usage"))
    if usage not in CSV_USAGES.values():
        raise UserError(f"{where}: Usage {usage!r} is not one of {', '.join(CSV_USAGES.values())}")
    return emotion, pixels, usage


def _decoded_rows(table: _CsvTable, usage: str) -> _Arrays:
    """The rows of one Usage as images; their names are their positions within the split."""
    rows = table.rows[usage]
    if not rows.lines:
        raise UserError(f"{table.path}: no {usage} rows")
    names = [f"row:{i}" for i in range(len(rows.lines))]
    return _Arrays(
        x=np.stack([_csv_image(table.path, line, pixels) for line, pixels in zip(rows.lines, rows.pixels)]),
        y=np.array([_csv_label(table.path, n, e) for n, e in zip(rows.lines, rows.emotions)], dtype=np.int64),
        names=np.array(names, dtype=str),
        converted=np.zeros(len(names), dtype=bool),
        fingerprint=content_fingerprint(
            (name, f"{e},{p}".encode()) for name, e, p in zip(names, rows.emotions, rows.pixels)
        ),
    )


def _csv_label(path: Path, line: int, emotion: str) -> int:
    """The label of a CSV row, which must be one of 0-6."""
    if emotion not in {str(label) for label in range(len(CLASSES))}:
        raise UserError(f"{path}: line {line}: emotion {emotion!r} is not a label 0-{len(CLASSES) - 1}")
    return int(emotion)


def _csv_image(path: Path, line: int, pixels: str) -> np.ndarray:
    """The (48, 48) image of a CSV row: 2304 space-separated integers 0-255."""
    values = pixels.split()
    if len(values) != SIZE * SIZE:
        raise UserError(f"{path}: line {line}: {len(values)} pixel values, expected {SIZE * SIZE}")
    try:
        image = np.array(values, dtype=np.int64)
    except ValueError:
        image = None
    if image is None or not ((image >= 0) & (image <= 255)).all():
        bad = next(v for v in values if not (v.isascii() and v.isdigit() and int(v) <= 255))
        raise UserError(f"{path}: line {line}: pixel value {bad!r} is not an integer 0-255")
    return image.astype(np.uint8).reshape(SIZE, SIZE)


def _cached_arrays(source: _Source, cache_dir: Path) -> _Arrays:
    """The source's arrays from the cache, or decoded now and cached for the next load."""
    fingerprint = _indexed_fingerprint(cache_dir, source.index_key)
    cached = _read_arrays(cache_dir, fingerprint) if fingerprint is not None else None
    if cached is not None:
        return cached
    arrays = source.decode()
    _write_arrays(cache_dir, arrays)
    index_entry = json.dumps({"fingerprint": arrays.fingerprint}).encode()
    _write_cache_file(_index_path(cache_dir, source.index_key), lambda file: file.write(index_entry))
    return arrays


def _index_path(cache_dir: Path, index_key: str) -> Path:
    """One small file per index key, so workers filling the cache together never lose an entry."""
    return cache_dir / f"index-{index_key}.json"


def _arrays_path(cache_dir: Path, fingerprint: str) -> Path:
    """The array file of a content fingerprint."""
    return cache_dir / f"{fingerprint}.npz"


def _indexed_fingerprint(cache_dir: Path, index_key: str) -> str | None:
    """The content fingerprint the index maps this key to, or None when absent or unreadable."""
    try:
        fingerprint = json.loads(_index_path(cache_dir, index_key).read_bytes())["fingerprint"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    is_sha256 = isinstance(fingerprint, str) and len(fingerprint) == 64 and set(fingerprint) <= set("0123456789abcdef")
    return fingerprint if is_sha256 else None


def _read_arrays(cache_dir: Path, fingerprint: str) -> _Arrays | None:
    """The cached arrays of a fingerprint, or None when missing or corrupt (then they are rebuilt)."""
    try:
        with np.load(_arrays_path(cache_dir, fingerprint), allow_pickle=False) as file:
            stored = {key: file[key] for key in ("version", "fingerprint", "x", "y", "names", "converted")}
    # The cache is disposable: whatever a damaged file raises means "decode again".
    except Exception:
        return None
    arrays = _Arrays(stored["x"], stored["y"], stored["names"], stored["converted"], str(stored["fingerprint"]))
    return arrays if _is_consistent(arrays, fingerprint) and stored["version"] == _CACHE_VERSION else None


def _is_consistent(arrays: _Arrays, fingerprint: str) -> bool:
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


def _write_arrays(cache_dir: Path, arrays: _Arrays) -> None:
    """Stores decoded arrays under their fingerprint (uncompressed: loading is the hot path)."""
    fields = {
        "version": np.array(_CACHE_VERSION),
        "fingerprint": np.array(arrays.fingerprint),
        "x": arrays.x,
        "y": arrays.y,
        "names": arrays.names,
        "converted": arrays.converted,
    }
    _write_cache_file(_arrays_path(cache_dir, arrays.fingerprint), lambda file: np.savez(file, **fields))


def _write_cache_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    try:
        write_atomically(path, write)
    except OSError as error:
        raise UserError(f"{path.parent}: cannot write the data cache ({error.strerror})") from None


def _carve_val(source: _Arrays, val_fraction: float, split_seed: int) -> tuple[SplitData, SplitData]:
    """(train, val): a stratified, seeded `val_fraction` of the source moved to val."""
    rng = np.random.default_rng(split_seed)
    is_val = np.zeros(len(source.y), dtype=bool)
    for label in range(len(CLASSES)):
        members = np.flatnonzero(source.y == label)
        is_val[rng.permutation(members)[: _val_count(len(members), val_fraction)]] = True
    # Both halves are derived from the one cached source, so their fingerprints are too.
    derivation = ["carved", source.fingerprint, val_fraction, split_seed]
    return (
        _split_data(source, ~is_val, sha256_json([*derivation, "train"])),
        _split_data(source, is_val, sha256_json([*derivation, "val"])),
    )


def _val_count(members: int, val_fraction: float) -> int:
    """How many of a class go to val: the rounded fraction, but at least one and never the whole class."""
    if members < 2:
        return 0
    return min(members - 1, max(1, round(members * val_fraction)))


def _split_data(arrays: _Arrays, keep: np.ndarray | None = None, fingerprint: str | None = None) -> SplitData:
    """The tensors of a split: all of `arrays`, or the rows selected by the boolean mask `keep`."""
    x, y, names, converted = arrays.x, arrays.y, arrays.names, arrays.converted
    if keep is not None:
        x, y, names, converted = x[keep], y[keep], names[keep], converted[keep]
    return SplitData(
        x=torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1),
        y=torch.from_numpy(np.ascontiguousarray(y)),
        names=tuple(names.tolist()),
        fingerprint=fingerprint if fingerprint is not None else arrays.fingerprint,
        converted=int(converted.sum()),
    )


def _split_summary(split: SplitData) -> dict[str, Any]:
    """A split's entry in the `data check` document."""
    counts = torch.bincount(split.y, minlength=len(CLASSES)).tolist()
    return {"total": len(split.y), "per_class": dict(zip(CLASSES, counts)), "fingerprint": split.fingerprint}
