"""tables: finalize's printed summary and its text files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from finalizing import Finalized, fake_inputs, toy_study

from fer_search.results import aggregate
from fer_search.tables import summary_text


@pytest.fixture(scope="module")
def inputs() -> Finalized:
    return fake_inputs(toy_study(n_complete=6, n_pruned=2))


def test_summary_gives_each_configuration_over_seeds(inputs: Finalized, tmp_path: Path) -> None:
    m = inputs.metrics
    files = [tmp_path / "model.pt", tmp_path / "metrics.json"]
    lines = summary_text(m, tmp_path, files).splitlines()
    best = m.best
    assert best.std is not None
    assert lines[0] == (
        f"best trial 3 (val 0.6543): private_test {best.mean.private_test.accuracy:.4f} ± "
        f"{best.std.private_test.accuracy:.4f}, test_all {best.mean.test_all.accuracy:.4f} ± "
        f"{best.std.test_all.accuracy:.4f} (3 seeds)"
    )
    assert lines[1].startswith("baseline: private_test ") and lines[1].endswith(" (3 seeds)")
    assert lines[2] == f"shipped seed {m.shipped_seed}; wrote 2 files to {tmp_path}"


def test_summary_of_one_seed_without_baseline(inputs: Finalized, tmp_path: Path) -> None:
    m = dataclasses.replace(inputs.metrics, best=aggregate([inputs.shipped]), baseline=None)
    lines = summary_text(m, tmp_path, []).splitlines()
    assert lines[0] == (
        f"best trial 3 (val 0.6543): private_test {inputs.shipped.private_test.accuracy:.4f}, "
        f"test_all {inputs.shipped.test_all.accuracy:.4f} (1 seed)"
    )
    assert lines[1] == "baseline: not retrained (--no-baseline)"
