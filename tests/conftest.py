"""Shared fixtures: a tiny learnable FER2013 in the image-folder layout, cache folders, the real data set,
a PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy
from pgserver import PgServer, Unavailable, start_server, unavailable
from PIL import Image

from fer_search.data import CLASSES

# The class folders as the public download names them (alphabetical, unlike the label order).
FOLDER_CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def tiny_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy 48x48 face stand-in whose bright bar says its class: rows for 0-2, columns for 3-5, diagonal for 6."""
    image = rng.normal(70.0, 20.0, (48, 48))
    band = slice(6 + 14 * (label % 3), 14 + 14 * (label % 3))
    if label < 3:
        image[band, :] += 140
    elif label < 6:
        image[:, band] += 140
    else:
        rows, cols = np.indices((48, 48))
        image[np.abs(rows - cols) < 5] += 140
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tiny_fer(root: Path, per_class: tuple[int, int, int] = (16, 4, 4), names: bool = True, seed: int = 0) -> Path:
    """Writes train/<class>/Training_<id>.jpg and test/<class>/PublicTest_<id>.jpg, PrivateTest_<id>.jpg
    (per class: train, public, private counts) as 48x48 grayscale JPEGs; without `names` the test
    files are plain <id>.jpg. Returns root."""
    rng = np.random.default_rng(seed)
    n_train, n_public, n_private = per_class
    prefixes = ("PublicTest_", "PrivateTest_") if names else ("", "")
    image_id = 1000
    for folder in FOLDER_CLASSES:
        label = CLASSES.index(folder)
        groups = [("train", "Training_", n_train), ("test", prefixes[0], n_public), ("test", prefixes[1], n_private)]
        for split, prefix, count in groups:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                image_id += 1
                path = root / split / folder / f"{prefix}{image_id}.jpg"
                Image.fromarray(tiny_image(label, rng)).save(path, "JPEG", quality=95)
    return root


@pytest.fixture(scope="session")
def tiny_fer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image-folder FER2013 (16 train, 4 PublicTest, 4 PrivateTest per class); do not modify it."""
    return write_tiny_fer(tmp_path_factory.mktemp("tiny_fer"))


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> PgServer:
    """A throwaway PostgreSQL cluster for the whole session, stopped whatever happens."""
    try:
        server = start_server()
    except Unavailable as e:
        unavailable(str(e))
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A fresh data cache folder, not yet created."""
    return tmp_path / "cache"


@pytest.fixture
def fer_root() -> Path:
    """The real FER2013 (read-only, never copied); tests using it are marked realdata."""
    if "FER2013_ROOT" not in os.environ:
        pytest.skip("FER2013_ROOT not set")
    return Path(os.environ["FER2013_ROOT"])


@pytest.fixture(scope="session")
def finalized(tmp_path_factory: pytest.TempPathFactory, tiny_fer: Path) -> Path:
    """A folder holding search.toml and a tiny study, searched (3 trials) and finalized (2 seeds, 2 epochs)."""
    from click.testing import CliRunner

    from fer_search.cli import main

    folder = tmp_path_factory.mktemp("finalized")
    (folder / "search.toml").write_text(f'[data]\npath = "{tiny_fer}"\n')
    for args in (["run", "--trials", "3", "--epochs", "2"], ["finalize", "--seeds", "2"]):
        result = CliRunner().invoke(
            main, [*args, "--config", str(folder / "search.toml"), "--device", "cpu"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
    return folder


def killed_mid_write(path: Path) -> Path:
    """The temporary file a process killed (kill -9) in the middle of write_atomically(path, ...) left behind."""
    writer = (
        "import sys, time\nfrom pathlib import Path\nfrom fer_search.files import write_atomically\n"
        "def write(file):\n    file.write(b'half a checkpoint'); file.flush(); print('writing', flush=True)\n"
        "    time.sleep(120)\n"
        "write_atomically(Path(sys.argv[1]), write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [temporary] = path.parent.glob(f".{path.name}.*.tmp")
    return temporary


@pytest.fixture
def make_unwritable() -> Iterator[Callable[[Path], None]]:
    """Makes a folder one this process may read but not write to, even as root (immutable); skips where it cannot."""
    undo: list[list[str]] = []

    def lock(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            undo.append(["chmod", "755", str(folder)])
        elif (
            shutil.which("chattr")
            and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        ):
            undo.append(["chattr", "-i", str(folder)])
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder this user may not write to")

    try:
        yield lock
    finally:
        for command in undo:
            subprocess.run(command, check=True)


def ctrl_c_after(engine: Any, statement: str) -> list[str]:
    """Send this process one SIGINT right after `engine` runs its first statement that starts with `statement`:
    inside SQLAlchemy, where a signal that came while waiting for the database lands. Returns the statement
    it followed, in a list filled once it is sent."""
    sent: list[str] = []

    def interrupt(_conn: Any, _cursor: Any, executed: str, *_: Any) -> None:
        if executed.startswith(statement) and not sent:
            sent.append(executed)
            os.kill(os.getpid(), signal.SIGINT)

    sqlalchemy.event.listen(engine, "after_cursor_execute", interrupt)
    return sent
