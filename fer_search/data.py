"""Loading FER2013: each split as tensors, read through the cache, val carved out of train where need be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fer_search.cache import cached_arrays, index_key, store_arrays
from fer_search.config import DataConfig
from fer_search.files import made_folder, sha256_json
from fer_search.sources import CLASSES, SIZE, Arrays, Source, plan_sources

__all__ = ["CLASSES", "SIZE", "FerData", "SplitData", "check_data", "load_configured", "load_data"]


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


def load_data(
    path: Path, cache_dir: Path, *, with_test: bool = False, val_fraction: float = 0.1, split_seed: int = 0
) -> FerData:
    """FER2013 at `path` (image folders, a folder holding fer2013.csv, or the CSV itself), via the cache.

    Without `with_test` no PrivateTest image is read: the test folder is only listed.
    """
    plan = plan_sources(Path(path), with_test)
    cache_dir = made_folder(Path(cache_dir), "cache")
    train = _arrays(plan.train, cache_dir)
    if plan.val is None:
        train_split, val_split = _carve_val(train, val_fraction, split_seed)
    else:
        train_split, val_split = _split_data(train), _split_data(_arrays(plan.val, cache_dir))
    test_split = _split_data(_arrays(plan.test, cache_dir)) if plan.test is not None else None
    return FerData(train=train_split, val=val_split, test=test_split, val_is_public_test=plan.val is not None)


def load_configured(config: DataConfig, *, with_test: bool = False) -> FerData:
    """load_data with the [data] settings of search.toml: the one way `run` and `finalize` read a data set."""
    return load_data(
        config.path,
        config.cache_dir,
        with_test=with_test,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
    )


def check_data(path: Path, cache_dir: Path, *, val_fraction: float = 0.1, split_seed: int = 0) -> dict[str, Any]:
    """The `data check --json` document: per split totals, per-class counts and fingerprints."""
    data = load_data(path, cache_dir, with_test=True, val_fraction=val_fraction, split_seed=split_seed)
    splits = {"train": data.train, "val": data.val, "test": data.test}
    return {
        "fingerprint": sha256_json(data.fingerprints),
        "splits": {role: _split_summary(split) for role, split in splits.items() if split is not None},
        "converted": sum(split.converted for split in splits.values() if split is not None),
    }


def _arrays(source: Source, cache_dir: Path) -> Arrays:
    """The source's arrays from the cache, or decoded now (the only place images are decoded) and cached."""
    key = index_key(source)
    cached = cached_arrays(cache_dir, key)
    if cached is not None:
        return cached
    arrays = source.decode()
    store_arrays(cache_dir, key, arrays)
    return arrays


def _carve_val(source: Arrays, val_fraction: float, split_seed: int) -> tuple[SplitData, SplitData]:
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


def _split_data(arrays: Arrays, keep: np.ndarray | None = None, fingerprint: str | None = None) -> SplitData:
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
    per_class = dict(zip(CLASSES, counts, strict=True))
    return {"total": len(split.y), "per_class": per_class, "fingerprint": split.fingerprint}
