"""Where splits come from: image folders and fer2013.csv, decoding, bad input named, the PrivateTest lockbox."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_tiny_fer
from PIL import EpsImagePlugin, Image, PngImagePlugin

from fer_search import sources
from fer_search.cli import main
from fer_search.data import SplitData, check_data, load_data
from fer_search.errors import UserError
from fer_search.sources import CLASSES, decode_image


def small_fer(root: Path) -> Path:
    """A minimal image-folder set (2 train, 1 PublicTest, 1 PrivateTest per class) for bad-input cases."""
    return write_tiny_fer(root, per_class=(2, 1, 1))


def first_file(root: Path, pattern: str) -> Path:
    """The first file (sorted) under root matching a glob pattern."""
    return sorted(root.glob(pattern))[0]


def write_csv_like(image_root: Path, csv_path: Path) -> Path:
    """fer2013.csv holding the same images as an image-folder set (decoded pixels, Usage from the name)."""
    usage_by_prefix = {"Training_": "Training", "PublicTest_": "PublicTest", "PrivateTest_": "PrivateTest"}
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["emotion", "pixels", "Usage"])
        for path in sorted(image_root.glob("*/*/*.jpg")):
            usage = next(u for prefix, u in usage_by_prefix.items() if path.name.startswith(prefix))
            pixels = np.asarray(Image.open(path)).ravel()
            writer.writerow([CLASSES.index(path.parent.name), " ".join(map(str, pixels)), usage])
    return csv_path


def csv_text(header: str, rows: list[tuple[object, str, str]]) -> str:
    """CSV text with one line per (emotion, pixels, Usage) row."""
    return header + "\n" + "".join(f"{e},{p},{u}\n" for e, p, u in rows)


def valid_pixels(value: int = 7) -> str:
    """A well-formed pixels field."""
    return " ".join([str(value)] * 2304)


def sorted_images(split: SplitData) -> list[bytes]:
    """A split's images as bytes, sorted: its content regardless of order and names."""
    return sorted(image.numpy().tobytes() for image in split.x)


def test_same_file_name_in_two_class_folders_stays_distinct(tmp_path: Path, cache_dir: Path) -> None:
    root = small_fer(tmp_path / "fer")
    duplicate = first_file(root, "train/neutral/*.jpg")
    shutil.copyfile(duplicate, root / "train" / "surprise" / duplicate.name)
    train = load_data(root, cache_dir).train
    assert f"neutral/{duplicate.name}" in train.names and f"surprise/{duplicate.name}" in train.names
    assert len(train.names) == 15


def test_csv_layout_gives_the_same_splits_as_image_folders(tiny_fer: Path, tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "csv").mkdir()
    csv_path = write_csv_like(tiny_fer, tmp_path / "csv" / "fer2013.csv")
    folders = load_data(tiny_fer, tmp_path / "folder-cache", with_test=True)
    for source in (csv_path, csv_path.parent):  # the file itself, or the folder holding it
        rows = load_data(source, cache_dir, with_test=True)
        for a, b in ((folders.train, rows.train), (folders.val, rows.val), (folders.test, rows.test)):
            assert b is not None
            assert torch.bincount(a.y, minlength=7).tolist() == torch.bincount(b.y, minlength=7).tolist()
            assert sorted_images(a) == sorted_images(b)
            assert b.names[:2] == ("row:0", "row:1")
        assert rows.val_is_public_test
    summary = {role: split["per_class"] for role, split in check_data(csv_path, cache_dir)["splits"].items()}
    assert summary == {role: split["per_class"] for role, split in check_data(tiny_fer, cache_dir)["splits"].items()}


def test_converted_images_are_counted(tmp_path: Path, cache_dir: Path) -> None:
    root = small_fer(tmp_path / "fer")
    colour = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(colour).save(first_file(root, "train/fear/*.jpg"), "JPEG", quality=95)
    Image.fromarray(colour[:48, :48, 0]).save(root / "train" / "fear" / "Training_gray.png")  # 48x48 gray: as is
    report = check_data(root, cache_dir)
    assert report["converted"] == 1
    assert report["splits"]["train"]["total"] == 15
    assert load_data(root, cache_dir).train.converted == 1


def test_decode_image_converts_as_pil_does() -> None:
    colour = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    encoded = image_bytes(colour, "PNG")
    pixels, converted = decode_image(encoded, "face.png")
    expected = np.asarray(colour.convert("L").resize((48, 48), Image.Resampling.BILINEAR))
    assert converted and pixels.dtype == np.uint8 and pixels.shape == (48, 48)
    assert np.array_equal(pixels, expected)
    gray = np.random.default_rng(3).integers(0, 256, (48, 48), dtype=np.uint8)
    pixels, converted = decode_image(image_bytes(Image.fromarray(gray), "PNG"), "gray.png")
    assert not converted and np.array_equal(pixels, gray)


def test_a_16_bit_gray_png_decodes_as_its_8_bit_twin() -> None:
    """Pillow's convert("L") clips 16-bit values at 255: a face would turn white, and predict would answer for it."""
    gray = np.random.default_rng(4).integers(0, 256, (48, 48), dtype=np.uint8)
    wide = Image.fromarray(gray.astype(np.uint16) * 257)  # the same face, each value spread over 16 bits
    pixels, converted = decode_image(image_bytes(wide, "PNG"), "face16.png")
    assert converted and np.array_equal(pixels, gray)


def image_bytes(image: Image.Image, format: str) -> bytes:
    """An image encoded in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def truncate(path: Path) -> str:
    """Cuts an image file in half; returns what the error must name."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


def write_text_as_image(path: Path) -> str:
    """Writes text under an image's name; returns what the error must name."""
    path.write_text("not a face, just text\n")
    return str(path)


POSTSCRIPT = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 48 48
%%EndComments
0 0 moveto 48 48 lineto stroke
showpage
%%EOF
"""


def postscript_saved_as_jpg(root: Path) -> str:
    path = first_file(root, "train/happy/*.jpg")
    path.write_bytes(POSTSCRIPT)
    return f"{path}: not a JPEG or PNG image"


def gif_saved_as_png(root: Path) -> str:
    path = root / "train" / "fear" / "Training_gif.png"
    path.write_bytes(image_bytes(Image.new("L", (48, 48)), "GIF"))
    return f"{path}: not a JPEG or PNG image"


def non_utf8_file_name(root: Path) -> str:
    folder = root / "train" / "happy"
    shutil.copyfile(first_file(folder, "*.jpg"), os.fsencode(folder) + b"/bad\xff.jpg")
    return f"{folder}/bad\\xff.jpg: name is not valid UTF-8 (rename it)"


def non_utf8_class_folder(root: Path) -> str:
    os.mkdir(os.fsencode(root / "train") + b"/happ\xff")
    return f"{root / 'train'}/happ\\xff: name is not valid UTF-8 (rename it)"


def symlink_loop_image(root: Path) -> str:
    link = root / "train" / "happy" / "loop.jpg"
    os.symlink("loop.jpg", link)
    return f"{link}: symbolic link loop (remove the link"


def symlink_loop_class_folder(root: Path) -> str:
    link = root / "train" / "sad"
    shutil.rmtree(link)
    os.symlink("sad", link)
    return f"{link}: symbolic link loop (remove the link"


def truncated_train_image(root: Path) -> str:
    return truncate(first_file(root, "train/sad/*.jpg"))


def truncated_public_image(root: Path) -> str:
    return truncate(first_file(root, "test/sad/PublicTest_*.jpg"))


def text_saved_as_jpg(root: Path) -> str:
    return write_text_as_image(first_file(root, "train/happy/*.jpg"))


def text_saved_as_jpeg(root: Path) -> str:
    return write_text_as_image(root / "train" / "angry" / "notes.jpeg")


def unknown_class_folder(root: Path) -> str:
    (root / "train" / "contempt").mkdir()
    return str(root / "train" / "contempt")


def no_train_images(root: Path) -> str:
    for path in root.glob("train/*/*"):
        path.unlink()
    return str(root / "train")


def unnamed_file_among_split_names(root: Path) -> str:
    renamed = first_file(root, "test/fear/PublicTest_*.jpg").rename(root / "test" / "fear" / "face.jpg")
    return str(renamed)


def no_public_test_images(root: Path) -> str:
    for path in root.glob("test/*/PublicTest_*"):
        path.unlink()
    return f"{root / 'test'}: no PublicTest_"


def no_such_path(root: Path) -> str:
    shutil.rmtree(root)
    return str(root)


@pytest.mark.parametrize(
    "damage",
    [
        truncated_train_image,
        truncated_public_image,
        text_saved_as_jpg,
        text_saved_as_jpeg,
        unknown_class_folder,
        no_train_images,
        unnamed_file_among_split_names,
        no_public_test_images,
        no_such_path,
        postscript_saved_as_jpg,
        gif_saved_as_png,
        non_utf8_file_name,
        non_utf8_class_folder,
        symlink_loop_image,
        symlink_loop_class_folder,
    ],
)
def test_bad_image_folders_are_named(damage: Callable[[Path], str], tmp_path: Path, cache_dir: Path) -> None:
    root = small_fer(tmp_path / "fer")
    named = damage(root)
    with pytest.raises(UserError, match=re.escape(named)) as error:
        load_data(root, cache_dir)
    assert "\n" not in str(error.value)
    assert_data_check_exits_2(root, named, tmp_path)


def assert_data_check_exits_2(path: Path, named: str, tmp_path: Path) -> None:
    """What a user sees: `fer-search data check` says it in one line and exits 2."""
    config = tmp_path / "search.toml"
    config.write_text(f'[data]\ncache_dir = "{tmp_path / "cli-cache"}"\n')
    result = CliRunner().invoke(main, ["data", "check", str(path), "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and named in result.output and "Traceback" not in result.output


def test_decode_image_names_what_it_cannot_decode() -> None:
    for raw in (b"", b"plain text", image_bytes(Image.new("L", (48, 48)), "JPEG")[:100]):
        with pytest.raises(UserError, match="upload/face.jpg"):
            decode_image(raw, "upload/face.jpg")


def test_postscript_named_jpg_is_refused_before_any_plugin_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: ran.append("open") or real_open(self))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append("ghostscript"))
    with pytest.raises(UserError, match=re.escape("upload/x.jpg: not a JPEG or PNG image")) as error:
        decode_image(POSTSCRIPT, "upload/x.jpg")
    assert "\n" not in str(error.value)
    assert ran == []


@pytest.mark.parametrize("format", ["GIF", "BMP", "WEBP"])
def test_other_formats_named_png_are_refused(format: str) -> None:
    with pytest.raises(UserError, match=re.escape("face.png: not a JPEG or PNG image (the only formats accepted)")):
        decode_image(image_bytes(Image.new("RGB", (48, 48), (200, 10, 10)), format), "face.png")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit gray, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (4097, 4096)])
def test_a_png_header_claiming_too_many_pixels_is_refused_unloaded(
    width: int, height: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[object] = []
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loaded.append(self))
    limit = "more than the 16777216 (4096x4096) accepted"
    with pytest.raises(UserError, match=re.escape(f"big.png: {width}x{height} pixels, {limit}")) as error:
        decode_image(png_header(width, height), "big.png")
    assert "\n" not in str(error.value)
    assert loaded == []


def test_a_12_megapixel_photo_still_decodes() -> None:
    colour = Image.new("RGB", (4000, 3000), (90, 160, 30))
    pixels, converted = decode_image(image_bytes(colour, "JPEG"), "phone.jpg")
    assert converted and pixels.shape == (48, 48)
    assert abs(pixels.mean() - colour.convert("L").getpixel((0, 0))) <= 2  # JPEG is lossy


def test_predict_refuses_postscript_named_jpg(finalized: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(POSTSCRIPT)
    model = finalized / "studies" / "fer2013" / "final" / "model.pt"
    result = CliRunner().invoke(main, ["predict", "--model", str(model), str(image)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output == f"error: {image}: not a JPEG or PNG image (the only formats accepted)\n"


@pytest.mark.parametrize(
    ("row", "named"),
    [
        ((3, " ".join(["7"] * 2303), "Training"), "line 3: 2303 pixel values"),
        ((3, valid_pixels()[:-1] + "x", "Training"), "line 3: pixel value 'x'"),
        ((3, valid_pixels()[:-1] + "256", "Training"), "line 3: pixel value '256'"),
        ((7, valid_pixels(), "Training"), "line 3: emotion '7'"),
        (("-1", valid_pixels(), "PublicTest"), "line 3: emotion '-1'"),
        ((3, valid_pixels(), "Validation"), "line 3: Usage 'Validation'"),
    ],
    ids=["pixel-count", "non-numeric-pixel", "pixel-range", "label-7", "label-negative", "usage"],
)
def test_bad_csv_rows_are_named_by_line(
    row: tuple[object, str, str], named: str, tmp_path: Path, cache_dir: Path
) -> None:
    good = [(0, valid_pixels(), "Training"), (1, valid_pixels(), "PublicTest")]
    csv_path = tmp_path / "fer2013.csv"
    csv_path.write_text(csv_text("emotion,pixels,Usage", [good[0], row, good[1]]))
    with pytest.raises(UserError, match=re.escape(f"{csv_path}: {named}")):
        load_data(tmp_path, cache_dir)
    assert_data_check_exits_2(tmp_path, f"{csv_path}: {named}", tmp_path)


def test_csv_without_a_needed_column_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    csv_path = tmp_path / "fer2013.csv"
    csv_path.write_text("emotion,pixels\n0," + valid_pixels() + "\n")
    with pytest.raises(UserError, match=re.escape(f"{csv_path}: line 1: header lacks Usage")):
        load_data(csv_path, cache_dir)


def test_run_never_reads_a_private_test_file(tiny_fer: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real_read = sources._read_file
    monkeypatch.setattr(sources, "_read_file", lambda path: read.append(path) or real_read(path))
    load_data(tiny_fer, cache_dir)
    assert any("PublicTest_" in path for path in read)
    assert not any("PrivateTest_" in path for path in read)


def test_private_test_garbage_breaks_only_the_test_load(tiny_fer: Path, tmp_path: Path, cache_dir: Path) -> None:
    root = shutil.copytree(tiny_fer, tmp_path / "fer")
    for path in root.glob("test/*/PrivateTest_*.jpg"):
        path.write_bytes(b"\x00garbage")
    assert load_data(root, cache_dir).test is None
    with pytest.raises(UserError, match=r"/test/\w+/PrivateTest_\d+\.jpg: not a JPEG or PNG image"):
        load_data(root, cache_dir, with_test=True)
