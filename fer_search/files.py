"""Files that nothing may lose or mix up: atomic writes, folders made or explained, content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from fer_search.errors import UserError


def _process_namespace() -> str:
    """This host's name and its process-id namespace (containers of one host may share a name and a volume)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS): one namespace per host
        namespace = "0"
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{socket.gethostname()}_{namespace}")


# A temporary file names its writer (the process-id namespace, and the process in it), so that the
# temporaries of writers killed mid-write can be told from those of live ones, here or on another
# machine or container sharing the folder.
_HOST = _process_namespace()
_TEMPORARY = re.compile(r"\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp")
FOREIGN_TEMPORARY_AGE_S = 24 * 3600  # no write takes a day: another host's temporary this old is dead


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes through a temporary name and renames, so that no reader (another worker, a user, a
    process killed mid-write) ever sees half a file. Raises OSError."""
    temp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "wb") as file:
            write(file)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_file(path: Path, content: bytes) -> None:
    """Write a file users keep (model, metrics, reports, an export) atomically, its folder created;
    UserError naming it.

    A symbolic link is written through, to the file it names, and a FIFO or a device (`--out /dev/stdout`,
    however stdout is redirected) is written into: the rename of an atomic write would replace the link
    or the device with a plain file.
    """
    folder = path.parent
    try:
        mode = _mode_if_any(path)
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            path.write_bytes(content)
            return
        target = path.resolve()
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda f: f.write(content))
    except OSError as error:
        raise UserError(f"{path}: cannot write ({_reason(error, folder)})") from None


def _mode_if_any(path: Path) -> int | None:
    """The mode of what `path` names, through symbolic links; None where nothing is. A loop of links
    raises OSError here on every Python (Path.resolve returns it unchanged from 3.13 on)."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None


def made_folder(path: Path, what: str) -> Path:
    """`path`, created if need be and cleared of dead writers' temporaries; UserError naming it when it
    cannot be created or written to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{path}: cannot create the {what} folder ({_reason(error, path)})") from None
    if not may_write(path):
        raise UserError(f"{path}: cannot write to the {what} folder (permission denied)")
    remove_dead_temporaries(path)
    return path


def _reason(error: OSError, folder: Path) -> str:
    """Why `folder` could not be made or written in: a file standing where it or a parent should be, else
    what the system said ("File exists" alone would not say which)."""
    for place in (folder, *folder.parents):
        if os.path.exists(place):  # os.path's tests never raise, here in an error's explanation
            if not os.path.isdir(place):
                return f"{place} is a file, not a folder"
            break
    return error.strerror or type(error).__name__


def may_write(folder: Path) -> bool:
    """Whether this process may create files in `folder`."""
    return os.access(folder, os.W_OK | os.X_OK)


def remove_dead_temporaries(folder: Path) -> None:
    """Removes the temporary files that writers killed mid-write (kill -9, a lost machine) left in `folder`.

    Why by hand: a killed process runs no clean-up, so its leftovers are found afterwards, by whoever
    next writes there. A temporary of this host whose process is gone is dead; another host's, once old.
    """
    now = time.time()
    for entry in folder.glob(".*.tmp"):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None:
            continue  # not one of ours
        try:
            old = now - entry.stat().st_mtime > FOREIGN_TEMPORARY_AGE_S
            if old or (match["host"] == _HOST and not _running(int(match["pid"]))):
                entry.unlink()
        except OSError:
            continue  # gone meanwhile (its writer renamed it, or another process removed it)


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


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
