"""Loading FER2013: splits in canonical class order, val carved out of train, the data check document, the real set."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_fer

from fer_search.data import CLASSES, check_data, load_data

# From the real set's README, by class name (its table lists the folders alphabetically).
REAL_COUNTS = {  # class: (train, PublicTest, PrivateTest)
    "angry": (3995, 467, 491),
    "disgust": (436, 56, 55),
    "fear": (4097, 496, 528),
    "happy": (7215, 895, 879),
    "neutral": (4965, 607, 626),
    "sad": (4830, 653, 594),
    "surprise": (3171, 415, 416),
}


def test_image_folders_give_the_named_splits_in_canonical_class_order(tiny_fer: Path, cache_dir: Path) -> None:
    fer = load_data(tiny_fer, cache_dir)
    assert fer.test is None and set(fer.fingerprints) == {"train", "val"}
    assert fer.val_is_public_test
    assert cache_dir.is_dir()
    full = load_data(tiny_fer, cache_dir, with_test=True)
    expected = ((full.train, 112, "Training_"), (full.val, 28, "PublicTest_"), (full.test, 28, "PrivateTest_"))
    for split, total, prefix in expected:
        assert split is not None
        assert split.x.shape == (total, 1, 48, 48) and split.x.dtype == torch.uint8 and split.x.device.type == "cpu"
        assert split.y.shape == (total,) and split.y.dtype == torch.int64
        assert torch.bincount(split.y, minlength=7).tolist() == [total // 7] * 7
        assert list(split.names) == sorted(split.names)
        assert all(name.split("/")[1].startswith(prefix) for name in split.names)
        assert [CLASSES.index(name.split("/")[0]) for name in split.names] == split.y.tolist()
        assert split.converted == 0
    assert CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert len(set(full.fingerprints.values())) == 3


def test_without_split_names_val_is_a_stratified_seeded_fraction_of_train(tmp_path: Path, cache_dir: Path) -> None:
    root = write_tiny_fer(tmp_path / "fer", per_class=(20, 4, 4), names=False)
    fer = load_data(root, cache_dir, with_test=True, val_fraction=0.1, split_seed=0)
    assert fer.test is not None and not fer.val_is_public_test
    assert torch.bincount(fer.val.y, minlength=7).tolist() == [2] * 7
    assert torch.bincount(fer.train.y, minlength=7).tolist() == [18] * 7
    assert torch.bincount(fer.test.y, minlength=7).tolist() == [8] * 7
    all_train = sorted(p.relative_to(root / "train").as_posix() for p in root.glob("train/*/*.jpg"))
    assert sorted(fer.train.names + fer.val.names) == all_train
    assert not set(fer.train.names) & set(fer.val.names)
    assert fer.fingerprints["train"] != fer.fingerprints["val"]

    again = load_data(root, cache_dir, val_fraction=0.1, split_seed=0)
    assert again.val.names == fer.val.names
    assert again.fingerprints == {role: fer.fingerprints[role] for role in ("train", "val")}
    other_seed = load_data(root, cache_dir, val_fraction=0.1, split_seed=1)
    assert other_seed.val.names != fer.val.names
    assert other_seed.fingerprints["train"] != fer.fingerprints["train"]
    assert other_seed.fingerprints["val"] != fer.fingerprints["val"]
    larger = load_data(root, cache_dir, val_fraction=0.2, split_seed=0)
    assert torch.bincount(larger.val.y, minlength=7).tolist() == [4] * 7
    assert larger.fingerprints["val"] != fer.fingerprints["val"]


def test_check_data_document(tiny_fer: Path, cache_dir: Path) -> None:
    report = json.loads(json.dumps(check_data(tiny_fer, cache_dir)))
    assert set(report) == {"fingerprint", "splits", "converted"}
    assert list(report["splits"]) == ["train", "val", "test"]
    assert report["converted"] == 0
    assert re.fullmatch(r"[0-9a-f]{64}", report["fingerprint"])
    for role, total in (("train", 112), ("val", 28), ("test", 28)):
        split = report["splits"][role]
        assert set(split) == {"total", "per_class", "fingerprint"}
        assert split["total"] == total
        assert list(split["per_class"]) == list(CLASSES)
        assert split["per_class"] == dict.fromkeys(CLASSES, total // 7)
        assert re.fullmatch(r"[0-9a-f]{64}", split["fingerprint"])
    assert report == check_data(tiny_fer, cache_dir)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the real set per session: it is decoded once (tens of seconds)."""
    return tmp_path_factory.mktemp("real_cache")


@pytest.mark.realdata
def test_real_data_counts_and_cached_load_time(fer_root: Path, real_cache: Path) -> None:
    started = time.perf_counter()
    report = check_data(fer_root, real_cache)
    first = time.perf_counter() - started
    for index, role in enumerate(("train", "val", "test")):
        split = report["splits"][role]
        assert split["per_class"] == {name: REAL_COUNTS[name][index] for name in CLASSES}
    assert [report["splits"][role]["total"] for role in ("train", "val", "test")] == [28709, 3589, 3589]
    assert report["converted"] == 0

    started = time.perf_counter()
    fer = load_data(fer_root, real_cache)
    second = time.perf_counter() - started
    print(f"real FER2013: first load (decode, test included) {first:.2f} s, cached run load {second:.2f} s")
    assert fer.fingerprints == {role: report["splits"][role]["fingerprint"] for role in ("train", "val")}
    # The two file names the public download has in two class folders each stay distinct.
    assert {"neutral/Training_52789098.jpg", "surprise/Training_52789098.jpg"} <= set(fer.train.names)
    assert second < 4.0  # a sanity bound: speed targets live in benchmarks (BENCHMARKS.md: 0.5 s)
