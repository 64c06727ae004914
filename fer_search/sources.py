"""Where each split comes from (image folders or fer2013.csv) and how its images are decoded."""

from __future__ import annotations

import csv
import errno
import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from fer_search.errors import UserError
from fer_search.files import content_fingerprint

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SIZE = 48
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PUBLIC_PREFIX = "PublicTest_"
PRIVATE_PREFIX = "PrivateTest_"
CSV_NAME = "fer2013.csv"
CSV_USAGES = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}

# The formats FER2013 ships in and faces are photographed in, told by their signatures; anything else (GIF, BMP,
# WEBP, or PostScript named .jpg that Pillow would hand to Ghostscript) is refused before any decoder sees it.
_IMAGE_CLASSES: dict[bytes, type[ImageFile.ImageFile]] = {
    b"\xff\xd8\xff": JpegImagePlugin.JpegImageFile,
    b"\x89PNG\r\n\x1a\n": PngImagePlugin.PngImageFile,
}
# Far below Pillow's decompression-bomb threshold (~89 M pixels), yet a 12-MP phone photo for `predict` passes.
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE

# Files per decoding task: large enough to amortise the pool, small enough to spread over cores.
_CHUNK = 512


@dataclass(frozen=True)
class Arrays:
    """A decoded split as numpy arrays: what the cache file holds."""

    x: np.ndarray  # uint8 (N, 48, 48)
    y: np.ndarray  # int64 (N,)
    names: np.ndarray  # str (N,)
    converted: np.ndarray  # bool (N,)
    fingerprint: str


@dataclass(frozen=True)
class Source:
    """One split as found on disk before any image is read: a cheap stand-in for its content and how to decode it."""

    layout: str  # "folder" or "csv"
    stamp: tuple[Any, ...]  # JSON-able; changes whenever the content may have (names, sizes, mtimes)
    decode: Callable[[], Arrays]


@dataclass(frozen=True)
class Plan:
    """Where each split comes from; val None means carve it out of train."""

    train: Source
    val: Source | None
    test: Source | None


class _Listed(NamedTuple):
    """An image file found in a class folder, not yet read."""

    name: str  # relative to the split folder, '/'-separated
    label: int
    entry: os.DirEntry[str]


def decode_image(raw: bytes, name: str) -> tuple[np.ndarray, bool]:
    """The image in `raw` as uint8 (48, 48) grayscale, and whether it had to be converted to that."""
    with _opened_image(raw, name) as image:
        try:
            image.load()
            converted = image.mode != "L" or image.size != (SIZE, SIZE)
            gray = _gray(image)
            if gray.size != (SIZE, SIZE):
                gray = gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            return np.array(gray, dtype=np.uint8), converted
        except Exception as error:
            raise UserError(_damaged(name, error)) from None


def _gray(image: Image.Image) -> Image.Image:
    """`image` in 8-bit gray; 16-bit gray (a PNG's I;16, or I) scaled down by hand, as Pillow's convert("L")
    clips it at 255 and turns a face white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))
    return image.convert("L") if image.mode != "L" else image


def _opened_image(raw: bytes, name: str) -> ImageFile.ImageFile:
    """The JPEG or PNG image in `raw` with only its header read, refused when larger than MAX_PIXELS."""
    # The format's own class rather than Image.open: Image.open runs Pillow's bomb check first (a warning past
    # ~89 M pixels, an error past ~179 M), before the far lower limit here could name the size.
    image_class = _image_class(raw, name)
    try:
        image = image_class(io.BytesIO(raw))
    except Exception as error:
        raise UserError(_damaged(name, error)) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise UserError(
            f"{_shown(name)}: {width}x{height} pixels, more than the {MAX_PIXELS} ({MAX_SIDE}x{MAX_SIDE}) accepted"
            " (scale it down)"
        )
    return image


def _image_class(raw: bytes, name: str) -> type[ImageFile.ImageFile]:
    """The Pillow class that reads the accepted format `raw` starts with; UserError naming `name` for any other."""
    image_class = next((cls for signature, cls in _IMAGE_CLASSES.items() if raw.startswith(signature)), None)
    if image_class is None:
        raise UserError(f"{_shown(name)}: not a JPEG or PNG image (the only formats accepted)")
    return image_class


def _damaged(name: str, error: Exception) -> str:
    """The one-line message for an image Pillow failed on."""
    # PIL raises many types for damaged files (OSError for truncation, SyntaxError, ValueError, ...);
    # the reason is folded onto one line because the CLI prints errors as one line.
    return f"{_shown(name)}: damaged image ({' '.join(str(error).split())})"


def _shown(path: str) -> str:
    """A path as it can be printed: bytes that are not UTF-8 (surrogates in `path`) escaped as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def plan_sources(path: Path, with_test: bool) -> Plan:
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


def _folder_plan(root: Path, with_test: bool) -> Plan:
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
        test_source = _folder_source(test) if with_test else None
        return Plan(_folder_source(train), None, test_source)
    other = next((f for f in test if not f.entry.name.startswith((PUBLIC_PREFIX, PRIVATE_PREFIX))), None)
    if other is not None:
        raise UserError(f"{other.entry.path}: test/ mixes {PUBLIC_PREFIX}/{PRIVATE_PREFIX} names with other names")
    if not public:
        raise UserError(f"{test_dir}: no {PUBLIC_PREFIX}* images found to validate on")
    if with_test and not private:
        raise UserError(f"{test_dir}: no {PRIVATE_PREFIX}* images found to test on")
    return Plan(_folder_source(train), _folder_source(public), _folder_source(private) if with_test else None)


def _listed_images(split_dir: Path) -> list[_Listed]:
    """Image files of split_dir's class folders, sorted by name; opens no image file."""
    listed: list[_Listed] = []
    for folder in _scandir(split_dir):
        # Hidden entries are tool droppings (.DS_Store, .ipynb_checkpoints), not classes or images.
        if folder.name.startswith(".") or not _is_followed(folder, folder.is_dir):
            continue
        label = _class_label(folder)
        listed += [
            _Listed(f"{folder.name}/{_utf8_name(entry)}", label, entry)
            for entry in _scandir(Path(folder.path))
            if not entry.name.startswith(".")
            and entry.name.lower().endswith(IMAGE_SUFFIXES)
            and _is_followed(entry, entry.is_file)
        ]
    return sorted(listed, key=lambda f: f.name)


def _is_followed(entry: os.DirEntry[str], is_kind: Callable[[], bool]) -> bool:
    """entry.is_dir or entry.is_file, links followed; a link that cannot be followed is the user's to fix."""
    # os.DirEntry answers False for a dangling link but raises for a loop (ELOOP) or an unreadable target.
    try:
        return is_kind()
    except OSError as error:
        is_loop = error.errno == errno.ELOOP
        problem = "symbolic link loop (remove the link)" if is_loop else f"cannot read ({error.strerror})"
        raise UserError(f"{_shown(entry.path)}: {problem}") from None


def _utf8_name(entry: os.DirEntry[str]) -> str:
    """The entry's name, which must be valid UTF-8."""
    # Refused rather than escaped: the relative names go into content fingerprints, the cache index and reports,
    # which must mean the same on every machine, and an escaped name could collide with a real one.
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{_shown(entry.path)}: name is not valid UTF-8 (rename it)") from None
    return entry.name


def _class_label(folder: os.DirEntry[str]) -> int:
    """The canonical label of a class folder, matched by name regardless of case."""
    try:
        return CLASSES.index(_utf8_name(folder).lower())
    except ValueError:
        expected = ", ".join(CLASSES)
        raise UserError(f"{_shown(folder.path)}: unknown class folder {folder.name!r} (expected {expected})") from None


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of a folder; an unreadable one is the user's to fix."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise UserError(f"{_shown(str(folder))}: cannot list ({error.strerror})") from None


def _folder_source(files: Sequence[_Listed]) -> Source:
    """A split made of image files, stamped with their relative names, sizes and mtimes."""
    index = [[f.name, *_size_and_mtime(f.entry)] for f in files]
    return Source("folder", (index,), partial(_decoded_files, files))


def _size_and_mtime(file: os.DirEntry[str] | Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file: the cheap stand-in for its content in the cache index."""
    try:
        stat = file.stat()
    except OSError as error:
        raise UserError(f"{os.fspath(file)}: cannot read ({error.strerror})") from None
    return stat.st_size, stat.st_mtime_ns


def _decoded_files(files: Sequence[_Listed]) -> Arrays:
    """Reads and decodes every file; the pool mostly overlaps file reads, PIL decodes these fast."""
    chunks = [files[i : i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor() as pool:
        decoded = [item for chunk in pool.map(_decoded_chunk, chunks) for item in chunk]
    return Arrays(
        x=np.stack([image for _, image, _ in decoded]),
        y=np.array([f.label for f in files], dtype=np.int64),
        names=np.array([f.name for f in files], dtype=str),
        converted=np.array([converted for _, _, converted in decoded], dtype=bool),
        fingerprint=content_fingerprint((f.name, raw) for f, (raw, _, _) in zip(files, decoded, strict=True)),
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


def _csv_plan(csv_path: Path, with_test: bool) -> Plan:
    """Sources of fer2013.csv, stamped with the split's Usage and the file's size and mtime."""
    roles = ("train", "val", "test") if with_test else ("train", "val")
    size, mtime = _size_and_mtime(csv_path)
    table = _CsvTable(csv_path, tuple(CSV_USAGES[role] for role in roles))
    sources = {
        role: Source("csv", (CSV_USAGES[role], size, mtime), partial(_decoded_rows, table, CSV_USAGES[role]))
        for role in roles
    }
    return Plan(sources["train"], sources["val"], sources.get("test"))


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


def _decoded_rows(table: _CsvTable, usage: str) -> Arrays:
    """The rows of one Usage as images; their names are their positions within the split."""
    rows = table.rows[usage]
    if not rows.lines:
        raise UserError(f"{table.path}: no {usage} rows")
    names = [f"row:{i}" for i in range(len(rows.lines))]
    # Every row's pixels are checked before any row's label: the first error named stays the same.
    images = [_csv_image(table.path, line, pixels) for line, pixels in zip(rows.lines, rows.pixels, strict=True)]
    labels = [_csv_label(table.path, line, emotion) for line, emotion in zip(rows.lines, rows.emotions, strict=True)]
    return Arrays(
        x=np.stack(images),
        y=np.array(labels, dtype=np.int64),
        names=np.array(names, dtype=str),
        converted=np.zeros(len(names), dtype=bool),
        fingerprint=content_fingerprint(
            (name, f"{e},{p}".encode()) for name, e, p in zip(names, rows.emotions, rows.pixels, strict=True)
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
