"""The decoded-split cache: hits skip decoding, changed files miss, damage is rebuilt, keys and versions."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_search import cache, sources
from fer_search.cache import cached_arrays, index_key, read_arrays, store_arrays
from fer_search.data import load_data
from fer_search.errors import UserError
from fer_search.files import sha256_json
from fer_search.sources import Arrays, Source

KEY = "k" * 64  # stands in for an index_key(source): the cache files any key it is given
FINGERPRINT = "ab" * 32


def tiny_arrays(fingerprint: str = FINGERPRINT) -> Arrays:
    """Two decoded 48x48 images filed under `fingerprint`."""
    return Arrays(
        x=np.arange(2 * 48 * 48, dtype=np.int64).astype(np.uint8).reshape(2, 48, 48),
        y=np.array([0, 6], dtype=np.int64),
        names=np.array(["angry/a.jpg", "neutral/b.jpg"], dtype=str),
        converted=np.array([False, True]),
        fingerprint=fingerprint,
    )


def never_decoded() -> Arrays:
    """A decode that the tests of keys never call."""
    raise AssertionError("the cache decoded a source")


def test_second_load_comes_from_the_cache(tiny_fer: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_data(tiny_fer, cache_dir, with_test=True)

    def no_decoding(raw: bytes, name: str) -> tuple[np.ndarray, bool]:
        raise AssertionError(f"decoded {name} although it is cached")

    monkeypatch.setattr(sources, "decode_image", no_decoding)
    second = load_data(tiny_fer, cache_dir, with_test=True)
    assert second.fingerprints == first.fingerprints
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.names == b.names
    # Only finished files: temporary names were renamed into place.
    assert all(p.name.startswith("index-") or p.suffix == ".npz" for p in cache_dir.iterdir())


def test_fingerprints_depend_on_content_only(tiny_fer: Path, tmp_path: Path) -> None:
    reference = load_data(tiny_fer, tmp_path / "cache-a", with_test=True).fingerprints
    assert load_data(tiny_fer, tmp_path / "cache-b", with_test=True).fingerprints == reference
    # Copied without mtimes, to another absolute location: the cache index differs, the content does not.
    moved = shutil.copytree(tiny_fer, tmp_path / "elsewhere" / "fer", copy_function=shutil.copyfile)
    assert load_data(moved, tmp_path / "cache-c", with_test=True).fingerprints == reference
    assert load_data(moved, tmp_path / "cache-a", with_test=True).fingerprints == reference


def test_changing_one_image_changes_its_split_fingerprint_only(tiny_fer: Path, tmp_path: Path, cache_dir: Path) -> None:
    root = shutil.copytree(tiny_fer, tmp_path / "fer")
    before = load_data(root, cache_dir).fingerprints
    changed = sorted(root.glob("train/happy/*.jpg"))[0]
    image = np.asarray(Image.open(changed)).copy()
    image[0, 0] ^= 0xFF
    Image.fromarray(image).save(changed, "JPEG", quality=90)
    after = load_data(root, cache_dir).fingerprints
    assert after["train"] != before["train"]
    assert after["val"] == before["val"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_cache_is_rebuilt(damage: str, tiny_fer: Path, cache_dir: Path) -> None:
    reference = load_data(tiny_fer, cache_dir, with_test=True)
    for path in cache_dir.iterdir():
        content = path.read_bytes()
        path.write_bytes({"garbage": b"\x00" * 64, "truncated": content[: len(content) // 2], "empty": b""}[damage])
    rebuilt = load_data(tiny_fer, cache_dir, with_test=True)
    assert rebuilt.fingerprints == reference.fingerprints
    assert torch.equal(rebuilt.train.x, reference.train.x)
    # Rebuilt files are whole again: a third load finds them without decoding.
    assert load_data(tiny_fer, cache_dir, with_test=True).fingerprints == reference.fingerprints
    assert all(read_arrays(cache_dir, fp) is not None for fp in reference.fingerprints.values())


def test_stored_arrays_are_found_under_their_key_only(cache_dir: Path) -> None:
    cache_dir.mkdir()
    stored = tiny_arrays()
    store_arrays(cache_dir, KEY, stored)
    found = cached_arrays(cache_dir, KEY)
    assert found is not None and found.fingerprint == stored.fingerprint
    for field in ("x", "y", "names", "converted"):
        assert np.array_equal(getattr(found, field), getattr(stored, field))
        assert getattr(found, field).dtype == getattr(stored, field).dtype
    assert cached_arrays(cache_dir, "j" * 64) is None


def test_keys_name_the_layout_stamp_and_cache_version(monkeypatch: pytest.MonkeyPatch) -> None:
    csv_source = Source("csv", ("Training", 1234, 5678), never_decoded)
    # Existing caches are named by this spelling: changing it silently re-decodes every user's data.
    assert index_key(csv_source) == sha256_json(["csv", 2, "Training", 1234, 5678])
    assert index_key(Source("csv", ("PublicTest", 1234, 5678), never_decoded)) != index_key(csv_source)
    monkeypatch.setattr(cache, "_CACHE_VERSION", 3)
    assert index_key(csv_source) == sha256_json(["csv", 3, "Training", 1234, 5678])


def test_arrays_of_another_cache_version_miss(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir.mkdir()
    store_arrays(cache_dir, KEY, tiny_arrays())
    monkeypatch.setattr(cache, "_CACHE_VERSION", cache._CACHE_VERSION + 1)
    assert read_arrays(cache_dir, FINGERPRINT) is None


def test_arrays_filed_under_another_fingerprint_miss(cache_dir: Path) -> None:
    cache_dir.mkdir()
    store_arrays(cache_dir, KEY, tiny_arrays())
    shutil.copyfile(cache_dir / f"{FINGERPRINT}.npz", cache_dir / f"{'cd' * 32}.npz")
    (cache_dir / f"index-{KEY}.json").write_text('{"fingerprint": "' + "cd" * 32 + '"}')
    assert read_arrays(cache_dir, FINGERPRINT) is not None
    assert cached_arrays(cache_dir, KEY) is None


@pytest.mark.parametrize("entry", ['{"fingerprint": 7}', f'{{"content": "{FINGERPRINT}"}}', "[]", "{"])
def test_a_bad_index_entry_misses(entry: str, cache_dir: Path) -> None:
    cache_dir.mkdir()
    store_arrays(cache_dir, KEY, tiny_arrays())
    (cache_dir / f"index-{KEY}.json").write_text(entry)
    assert cached_arrays(cache_dir, KEY) is None


def test_an_index_entry_is_followed_to_a_sha256_name_only(tmp_path: Path, cache_dir: Path) -> None:
    cache_dir.mkdir()
    (tmp_path / "elsewhere").mkdir()
    # Whole and consistent arrays, but outside the cache: only a sha256 hex name may be looked up.
    outside = "../elsewhere/" + "a" * 51  # 64 characters, as a fingerprint has
    store_arrays(cache_dir, KEY, tiny_arrays(outside))
    assert (tmp_path / "elsewhere" / f"{'a' * 51}.npz").is_file()
    assert cached_arrays(cache_dir, KEY) is None


def test_a_cache_that_cannot_be_written_is_named(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir.mkdir()

    def disk_full(path: Path, write: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "write_atomically", disk_full)
    named = f"{cache_dir}: cannot write the data cache (No space left on device)"
    with pytest.raises(UserError, match=re.escape(named)):
        store_arrays(cache_dir, KEY, tiny_arrays())
