"""tables: finalize's printed summary and its text files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from finalizing import Finalized, baseline_won, fake_inputs, runs_aggregate, toy_study

from fer_search.results import Aggregate
from fer_search.tables import recalls_precisions_text, summary_rows, summary_text


@pytest.fixture(scope="module")
def inputs() -> Finalized:
    return fake_inputs(toy_study(n_complete=6, n_pruned=2))


@pytest.fixture(scope="module")
def ensembled() -> Finalized:
    """A finalize that shipped the seeds' flip-averaged ensemble, and finalized the search's best as it is."""
    return fake_inputs(toy_study(n_complete=6, n_pruned=2), ensemble=True, reranked=False)


def accuracy_over_seeds(agg: Aggregate) -> str:
    """The test accuracy's mean ± std over seeds, as the summary and the tables write it."""
    assert agg.std is not None
    return f"{agg.mean.private_test.accuracy:.2%} ± {agg.std.private_test.accuracy:.2%}"


def test_summary_gives_the_re_ranking_each_way_of_predicting_and_what_is_shipped(
    inputs: Finalized, tmp_path: Path
) -> None:
    m = inputs.metrics
    assert m.baseline is not None and m.baseline_flipped is not None and m.ensemble is not None
    files = [tmp_path / "model.pt", tmp_path / "metrics.json"]
    lines = summary_text(m, tmp_path, files).splitlines()
    assert lines == [
        "best trial #3: re-ranked from the top 3: search 65.43%, retrained mean 63.50% ± 0.42% (seeds 0, 1)",
        f"best trial #3, private_test: single model {accuracy_over_seeds(m.best)}, "
        f"flip averaged {accuracy_over_seeds(m.best_flipped)} (3 seeds)",
        f"best trial #3, private_test: ensemble (seeds 0, 1, 2) {m.ensemble.plain.private_test.accuracy:.2%}, "
        f"flip averaged {m.ensemble.flipped.private_test.accuracy:.2%}",
        f"baseline, private_test: single model {accuracy_over_seeds(m.baseline)}, "
        f"flip averaged {accuracy_over_seeds(m.baseline_flipped)} (3 seeds)",
        f"model.pt: best trial #3, seed {inputs.shipped.seed}, flip averaged, "
        f"private_test {m.shipped.private_test.accuracy:.2%}; wrote 2 files to {tmp_path}",
    ]
    # A single shipped model is one seed flip averaged: its figures are that seed's, flip averaged.
    assert m.shipped.private_test == m.best_flipped.per_seed[str(inputs.shipped.seed)].private_test


def test_summary_of_a_shipped_ensemble_not_re_ranked(ensembled: Finalized, tmp_path: Path) -> None:
    m = ensembled.metrics
    assert m.ensemble is not None
    lines = summary_text(m, tmp_path, []).splitlines()
    assert lines[0] == "best trial #3: search 65.43% (the search's best, not re-ranked)"
    assert lines[-1] == (
        f"model.pt: best trial #3, ensemble of seeds 0, 1, 2, flip averaged, "
        f"private_test {m.ensemble.flipped.private_test.accuracy:.2%}; wrote 0 files to {tmp_path}"
    )


def test_summary_of_one_seed_without_baseline(inputs: Finalized, tmp_path: Path) -> None:
    one = runs_aggregate([inputs.shipped])
    m = dataclasses.replace(
        inputs.metrics,
        seeds=[inputs.shipped.seed],
        best=one,
        best_flipped=one,
        ensemble=None,
        baseline=None,
        baseline_flipped=None,
        shipped=dataclasses.replace(inputs.metrics.shipped, flip=False),
    )
    lines = summary_text(m, tmp_path, []).splitlines()
    accuracy = f"{inputs.shipped.private_test.accuracy:.2%}"
    assert lines[1:] == [
        f"best trial #3, private_test: single model {accuracy}, flip averaged {accuracy} (1 seed)",
        "baseline: not retrained (--no-baseline)",
        f"model.pt: best trial #3, seed {inputs.shipped.seed}, without flip averaging, "
        f"private_test {m.shipped.private_test.accuracy:.2%}; wrote 0 files to {tmp_path}",
    ]


def test_summary_says_when_the_best_trial_is_the_baseline(inputs: Finalized, tmp_path: Path) -> None:
    lines = summary_text(baseline_won(inputs).metrics, tmp_path, []).splitlines()
    assert lines[0] == "best trial #0 = baseline: search 61.12% (the search's best, not re-ranked)"
    assert lines[1].startswith("best trial #0 = baseline, private_test: single model ")
    assert lines[3] == (
        "baseline: the best trial is the baseline configuration: the same runs as above (each seed trained once)"
    )
    assert lines[4].startswith(f"model.pt: best trial #0 = baseline, seed {inputs.shipped.seed}, flip averaged")


def test_summary_rows_are_single_flip_averaged_and_ensembled_with_the_shipped_one_marked(inputs: Finalized) -> None:
    m = inputs.metrics
    assert m.ensemble is not None and m.baseline_flipped is not None
    rows = summary_rows(m)
    assert [(row.name, row.shipped) for row in rows] == [
        ("best trial #3, single model", ""),
        ("best trial #3, single model, flip averaged", f"shipped: model.pt is seed {inputs.shipped.seed}"),
        ("best trial #3, ensemble of seeds 0, 1, 2", ""),
        ("best trial #3, ensemble of seeds 0, 1, 2, flip averaged", ""),
        ("baseline, single model", ""),
        ("baseline, single model, flip averaged", ""),
    ]
    flipped_vals = [f.val_acc for f in m.best_flipped.per_seed.values()]
    assert rows[1].numbers[0].startswith(f"{sum(flipped_vals) / 3:.2%} ± ")  # the seeds' flip-averaged val_acc
    assert rows[1].numbers[1] == accuracy_over_seeds(m.best_flipped)
    assert rows[3].numbers == [
        f"{m.ensemble.flipped.val_acc:.2%}",
        f"{m.ensemble.flipped.private_test.accuracy:.2%}",
        f"{m.ensemble.flipped.private_test.macro_f1:.3f}",
        f"{m.ensemble.flipped.test_all.accuracy:.2%}",
    ]
    assert rows[5].numbers[1] == accuracy_over_seeds(m.baseline_flipped)


def test_the_shipped_ensemble_row_is_marked(ensembled: Finalized) -> None:
    marked = [row.name for row in summary_rows(ensembled.metrics) if row.shipped]
    assert marked == ["best trial #3, ensemble of seeds 0, 1, 2, flip averaged"]
    unflipped = dataclasses.replace(ensembled.metrics.shipped, flip=False)
    rows = summary_rows(dataclasses.replace(ensembled.metrics, shipped=unflipped))
    assert [(row.name, row.shipped) for row in rows if row.shipped] == [
        ("best trial #3, ensemble of seeds 0, 1, 2", "shipped: model.pt")
    ]


def test_recalls_precisions_say_what_the_shipped_model_is(inputs: Finalized, ensembled: Finalized) -> None:
    text = recalls_precisions_text(inputs.metrics, inputs.shipped, inputs.baseline, inputs.classes)
    assert text.startswith(
        "Per-expression results on PrivateTest (trained on Training; PublicTest chose each run's epoch, "
        "the re-ranked trial, whether to flip and the shipped seed)\n"
    )
    seed = inputs.shipped.seed
    assert (
        f"Shipped model (model.pt): best trial #3, seed {seed}, flip averaged "
        f"(weights of epoch {inputs.shipped.best_epoch})\n" in text
    )
    assert f"  accuracy {inputs.metrics.shipped.private_test.accuracy:.2%}, " in text
    assert f"Baseline (the documented configuration, retrained here): seed {seed}, single model" in text
    summary = text[text.index("Summary over seeds") :].splitlines()
    assert summary[0] == "Summary over seeds 0, 1, 2 (single models: mean ± std over 3 seeds)"
    heading = "PublicTest accuracy  PrivateTest accuracy  PrivateTest macro-F1  test_all accuracy *  model.pt"
    assert summary[1].strip() == heading
    assert [line.split("  ")[1] for line in summary[2:-1]] == [row.name for row in summary_rows(inputs.metrics)]
    assert summary[3].endswith(f"shipped: model.pt is seed {seed}")

    text = recalls_precisions_text(ensembled.metrics, ensembled.shipped, ensembled.baseline, ensembled.classes)
    epochs = ", ".join(str(ensembled.metrics.best.per_seed[s].best_epoch) for s in ("0", "1", "2"))
    assert (
        "Shipped model (model.pt): best trial #3, ensemble of seeds 0, 1, 2, flip averaged "
        f"(weights of epochs {epochs})\n" in text
    )
    assert "PublicTest chose each run's epoch, the trial and whether to flip)" in text  # no seed chosen
    assert f"  accuracy {ensembled.metrics.shipped.private_test.accuracy:.2%}, " in text


def test_recalls_precisions_give_the_baselines_runs_once_where_they_are_the_best_trials(inputs: Finalized) -> None:
    won = baseline_won(inputs)
    text = recalls_precisions_text(won.metrics, won.shipped, None, won.classes)
    assert "The best trial found (#0) is the baseline configuration" in text
    assert "Baseline (the documented configuration" not in text and "not retrained" not in text
    summary = text[text.index("Summary over seeds") :].splitlines()
    assert [line.split("  ")[1] for line in summary[2:-1]] == [
        "best trial #0 = baseline, single model",
        "best trial #0 = baseline, single model, flip averaged",
        "best trial #0 = baseline, ensemble of seeds 0, 1, 2",
        "best trial #0 = baseline, ensemble of seeds 0, 1, 2, flip averaged",
    ]
