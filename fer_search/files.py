"""Files that nothing may lose or mix up: atomic writes, folders made or explained, content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from fer_search.errors import UserError


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes through a temporary name and renames, so that no reader (another worker, a user, a
    process killed mid-write) ever sees half a file. Raises OSError."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temp, "wb") as file:
            write(file)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_file(path: Path, content: bytes) -> None:
    """Write a file users keep (model, metrics, reports) atomically, its folder created; UserError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(content))
    except OSError as error:
        raise UserError(f"{path}: cannot write ({error.strerror or type(error).__name__})") from None


def made_folder(path: Path, what: str) -> Path:
    """`path`, created if need be; UserError naming it when it cannot be created or written to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path}: cannot create the {what} folder ({error.strerror or type(error).__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write to the {what} folder (permission denied)")
    return path


def sha256_json(value: Any) -> str:
    """sha256 hex of a JSON-able value in a canonical spelling."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_fingerprint(items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 hex over (name, content) pairs in the given (canonical) order, length-prefixed so unambiguous."""
    digest = hashlib.sha256()
    for name, content in items:
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded + len(content).to_bytes(8, "little"))
        digest.update(content)
    return digest.hexdigest()


def seed_of(key: str) -> int:
    """A 32-bit seed derived from a text: the same on every machine and in every process."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
