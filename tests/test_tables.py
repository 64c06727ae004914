"""tables: finalize's printed summary and its text files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from finalizing import Finalized, baseline_won, fake_inputs, toy_study

from fer_search.results import aggregate
from fer_search.tables import recalls_precisions_text, summary_text


@pytest.fixture(scope="module")
def inputs() -> Finalized:
    return fake_inputs(toy_study(n_complete=6, n_pruned=2))


def test_summary_gives_each_configuration_over_seeds_in_percent(inputs: Finalized, tmp_path: Path) -> None:
    m = inputs.metrics
    files = [tmp_path / "model.pt", tmp_path / "metrics.json"]
    lines = summary_text(m, tmp_path, files).splitlines()
    best = m.best
    assert best.std is not None
    assert lines[0] == (
        f"best trial #3 (val 65.43%): private_test {best.mean.private_test.accuracy:.2%} ± "
        f"{best.std.private_test.accuracy:.2%}, test_all {best.mean.test_all.accuracy:.2%} ± "
        f"{best.std.test_all.accuracy:.2%} (3 seeds)"
    )
    assert lines[1].startswith("baseline: private_test ") and lines[1].endswith("% (3 seeds)")
    assert lines[2] == f"shipped seed {m.shipped_seed}; wrote 2 files to {tmp_path}"


def test_summary_of_one_seed_without_baseline(inputs: Finalized, tmp_path: Path) -> None:
    m = dataclasses.replace(inputs.metrics, best=aggregate([inputs.shipped]), baseline=None)
    lines = summary_text(m, tmp_path, []).splitlines()
    assert lines[0] == (
        f"best trial #3 (val 65.43%): private_test {inputs.shipped.private_test.accuracy:.2%}, "
        f"test_all {inputs.shipped.test_all.accuracy:.2%} (1 seed)"
    )
    assert lines[1] == "baseline: not retrained (--no-baseline)"


def test_summary_says_when_the_best_trial_is_the_baseline(inputs: Finalized, tmp_path: Path) -> None:
    lines = summary_text(baseline_won(inputs).metrics, tmp_path, []).splitlines()
    assert lines[0].startswith("best trial #0 = baseline (val 61.12%): private_test ")
    assert lines[1] == (
        "baseline: the best trial is the baseline configuration: the same runs as above (each seed trained once)"
    )


def test_recalls_precisions_give_the_baselines_runs_once_where_they_are_the_best_trials(inputs: Finalized) -> None:
    won = baseline_won(inputs)
    text = recalls_precisions_text(won.metrics, won.shipped, None, won.classes)
    assert "The best trial found (#0) is the baseline configuration" in text
    assert "Baseline (the documented configuration" not in text and "not retrained" not in text
    summary = text[text.index("Summary over seeds") :].splitlines()
    assert [line.split("  ")[1] for line in summary[2:-1]] == ["best trial #0 = baseline"]
