"""The records of finalize: metrics.json and resume-file JSON written and read back, aggregates over seeds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from finalizing import BEST_PARAMS, fake_metrics, fake_run, runs_aggregate
from numpy.typing import NDArray

from fer_search.data import CLASSES
from fer_search.metrics import ClassificationReport, ClassScores, classification_report
from fer_search.model import BASELINE
from fer_search.results import (
    Aggregate,
    Candidate,
    Commands,
    Ensemble,
    FinalMetrics,
    Protocol,
    Scored,
    SeedRun,
)

METRICS_KEYS = [
    "shipped",
    "epochs",
    "seeds",
    "best_trial",
    "selection",
    "flip",
    "best",
    "best_flipped",
    "ensemble",
    "baseline",
    "baseline_flipped",
    "baseline_reported",
    "protocol",
    "data",
    "commands",
    "versions",
    "git",
]


@pytest.fixture(scope="module")
def labels() -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The test split's labels, and PublicTest's."""
    rng = np.random.default_rng(3)
    return rng.integers(0, len(CLASSES), 60), rng.integers(0, len(CLASSES), 40)


@pytest.fixture(scope="module")
def runs(labels: tuple[NDArray[np.int64], NDArray[np.int64]]) -> list[SeedRun]:
    return [fake_run(kind, seed, *labels) for kind in ("best", "baseline") for seed in (0, 1, 2)]


def run_with(seed: int, y_true: list[int], y_pred: list[int]) -> SeedRun:
    """A run whose test splits are both the report of `y_pred` on three classes."""
    report = classification_report(np.array(y_true), np.array(y_pred), ("a", "b", "c"))
    return SeedRun(
        kind="best",
        seed=seed,
        best_epoch=1,
        val_acc=0.5,
        history=[],
        private_test=report,
        test_all=report,
        test_pred=y_pred,
        test_conf=[1.0] * len(y_pred),
    )


def test_a_seed_run_comes_back_from_its_json_typed(runs: list[SeedRun]) -> None:
    run = runs[0]
    back = SeedRun.from_json(run.to_json())
    assert back == run
    assert isinstance(back.private_test, ClassificationReport)
    assert isinstance(back.test_all.per_class["happy"], ClassScores)
    # Resume files written before the records existed hold the same JSON.
    assert SeedRun.from_json(json.dumps(dataclasses.asdict(run))) == run
    assert (
        json.loads(run.to_json())["private_test"]["per_class"]["happy"]["support"]
        == run.private_test.per_class["happy"].support
    )


def test_metrics_json_has_its_keys_in_order_and_comes_back(labels: tuple[NDArray[np.int64], NDArray[np.int64]]) -> None:
    metrics = fake_metrics(*labels, Commands(run="fer-search run", finalize="fer-search finalize"))
    text = metrics.to_json()
    doc = json.loads(text)
    assert list(doc) == METRICS_KEYS
    assert text.startswith('{\n  "shipped": {')  # indented as metrics.json always was
    assert list(doc["shipped"]) == ["trial", "seeds", "flip", "ensemble", "val_acc", "private_test", "test_all"]
    assert list(doc["best_trial"]) == ["number", "value", "params"] and doc["best_trial"]["params"] == {
        **BASELINE.to_dict(),
        "lr": 0.0021,
        "dropout_pattern": "none",
        "dropout_high": None,
        "dropout_low": None,
        "dropout_head": None,
    }
    assert list(doc["selection"]) == ["top_k", "seeds", "candidates", "chosen", "overstated_by"]
    assert [c["number"] for c in doc["selection"]["candidates"]] == [7, 3, 2] and doc["selection"]["chosen"] == 3
    assert list(doc["selection"]["candidates"][1]) == ["number", "value", "params", "val_accs", "mean", "std"]
    assert list(doc["flip"]) == ["mode", "used", "decided_on", "val_acc", "val_acc_flipped"]
    for key in ("best", "best_flipped", "baseline", "baseline_flipped"):
        assert list(doc[key]) == ["per_seed", "mean", "std"] and list(doc[key]["per_seed"]) == ["0", "1", "2"]
    assert list(doc["best"]["per_seed"]["1"]) == ["val_acc", "best_epoch", "private_test", "test_all"]
    assert list(doc["best"]["mean"]) == ["private_test", "test_all"]
    assert list(doc["best"]["std"]["test_all"]) == ["accuracy", "macro_f1", "per_class", "confusion"]
    assert list(doc["best"]["mean"]["private_test"]["per_class"]["sad"]) == ["precision", "recall", "f1"]
    assert list(doc["ensemble"]) == ["seeds", "plain", "flipped"]
    assert list(doc["ensemble"]["flipped"]) == ["val_acc", "private_test", "test_all"]
    assert doc["baseline_reported"] == {
        "accuracy": 0.61356,
        "note": "reported by the documented project, on its own split",
    }
    assert doc["protocol"] == {
        "train": "Training",
        "val": "PublicTest",
        "test": "PrivateTest",
        "test_all": "PublicTest + PrivateTest (includes the validation split)",
    }
    assert list(doc["data"]) == ["path", "fingerprints"] and list(doc["commands"]) == ["run", "finalize"]
    back = FinalMetrics.from_json(text)
    assert back == metrics and back.to_json() == text
    assert isinstance(back.best.per_seed["2"].private_test, ClassificationReport)
    assert isinstance(back.ensemble, Ensemble) and isinstance(back.ensemble.flipped, Scored)
    assert back.selection is not None and isinstance(back.selection.candidates[0], Candidate)
    assert back.best_trial.params == BEST_PARAMS and back.selection.candidates[1].params == BEST_PARAMS


def test_metrics_of_a_shipped_ensemble_come_back(labels: tuple[NDArray[np.int64], NDArray[np.int64]]) -> None:
    metrics = fake_metrics(
        *labels, Commands(run="fer-search run", finalize="fer-search finalize --ensemble"), ensemble=True
    )
    assert metrics.shipped.ensemble and metrics.shipped.seeds == [0, 1, 2]
    text = metrics.to_json()
    back = FinalMetrics.from_json(text)
    assert back == metrics and back.to_json() == text


def test_metrics_of_one_seed_without_baseline_re_ranking_or_run_command_come_back(
    labels: tuple[NDArray[np.int64], NDArray[np.int64]],
) -> None:
    commands = Commands(run=None, finalize="fer-search finalize --no-baseline --seeds 1 --top-k 1")
    metrics = fake_metrics(*labels, commands, seeds=[0], baseline=False, reranked=False)
    text = metrics.to_json()
    doc = json.loads(text)
    assert doc["baseline"] is None and doc["baseline_flipped"] is None and doc["commands"]["run"] is None
    assert doc["selection"] is None and doc["ensemble"] is None
    assert doc["best"]["std"] is None and doc["best_flipped"]["std"] is None
    back = FinalMetrics.from_json(text)
    assert back == metrics and back.to_json() == text


def test_protocol_without_public_test_names() -> None:
    assert Protocol.of(val_is_public_test=False) == Protocol(
        train="Training", val="10% of train", test="test/", test_all="test/ (same as test)"
    )


def test_aggregate_mean_and_sample_std_over_seeds() -> None:
    # Accuracies 2/4, 3/4, 4/4; class a's recall 1/2, 1, 1; the confusion counts differ in two cells.
    seeds = [
        run_with(0, [0, 0, 1, 2], [0, 1, 1, 0]),
        run_with(1, [0, 0, 1, 2], [0, 0, 1, 0]),
        run_with(2, [0, 0, 1, 2], [0, 0, 1, 2]),
    ]
    agg = runs_aggregate(seeds)
    assert list(agg.per_seed) == ["0", "1", "2"] and agg.per_seed["1"].private_test == seeds[1].private_test
    assert agg.mean.private_test.accuracy == pytest.approx(0.75)
    assert agg.std is not None and agg.std.test_all.accuracy == pytest.approx(0.25)  # ddof 1: sqrt(0.125 / 2)
    assert agg.mean.private_test.per_class["a"].recall == pytest.approx(5 / 6)
    assert agg.std.private_test.per_class["a"].recall == pytest.approx(np.std([0.5, 1, 1], ddof=1))
    assert np.allclose(agg.mean.private_test.confusion, [[5 / 3, 1 / 3, 0], [0, 1, 0], [2 / 3, 0, 1 / 3]])
    confusions = [s.private_test.confusion for s in seeds]
    assert np.allclose(agg.std.private_test.confusion, np.std(confusions, axis=0, ddof=1))
    assert type(agg.mean.private_test.accuracy) is float  # plain JSON numbers, not numpy's


def test_one_seed_has_a_mean_and_no_std() -> None:
    run = run_with(4, [0, 1, 2], [0, 1, 1])
    agg = runs_aggregate([run])
    assert agg == Aggregate(per_seed={"4": agg.per_seed["4"]}, mean=agg.mean, std=None)
    assert agg.mean.private_test.accuracy == run.private_test.accuracy == pytest.approx(2 / 3)
    assert agg.mean.test_all.confusion == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
