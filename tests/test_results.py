"""The records of finalize: metrics.json and resume-file JSON written and read back, aggregates over seeds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from finalizing import BEST_PARAMS, fake_metrics, fake_run

from fer_search.data import CLASSES
from fer_search.metrics import ClassificationReport, ClassScores, classification_report
from fer_search.model import BASELINE
from fer_search.results import (
    Aggregate,
    Commands,
    FinalMetrics,
    Protocol,
    SeedRun,
    aggregate,
)

METRICS_KEYS = [
    "shipped_seed",
    "epochs",
    "seeds",
    "best_trial",
    "best",
    "baseline",
    "baseline_reported",
    "protocol",
    "data",
    "commands",
    "versions",
    "git",
]


@pytest.fixture(scope="module")
def runs() -> list[SeedRun]:
    rng = np.random.default_rng(3)
    labels, public = rng.integers(0, len(CLASSES), 60), rng.integers(0, len(CLASSES), 40)
    return [fake_run(kind, seed, labels, public) for kind in ("best", "baseline") for seed in (0, 1, 2)]


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


def test_metrics_json_has_its_keys_in_order_and_comes_back(runs: list[SeedRun]) -> None:
    metrics = fake_metrics(runs[:3], runs[3:], Commands(run="fer-search run", finalize="fer-search finalize"))
    text = metrics.to_json()
    doc = json.loads(text)
    assert list(doc) == METRICS_KEYS
    assert text.startswith('{\n  "shipped_seed": ')  # indented as metrics.json always was
    assert list(doc["best_trial"]) == ["number", "value", "params"] and doc["best_trial"]["params"] == {
        **BASELINE.to_dict(),
        "lr": 0.0021,
        "dropout_pattern": "none",
        "dropout_high": None,
        "dropout_low": None,
        "dropout_head": None,
    }
    assert list(doc["best"]) == ["per_seed", "mean", "std"] and list(doc["best"]["per_seed"]) == ["0", "1", "2"]
    assert list(doc["best"]["per_seed"]["1"]) == ["val_acc", "best_epoch", "private_test", "test_all"]
    assert list(doc["best"]["mean"]) == ["private_test", "test_all"]
    assert list(doc["best"]["std"]["test_all"]) == ["accuracy", "macro_f1", "per_class", "confusion"]
    assert list(doc["best"]["mean"]["private_test"]["per_class"]["sad"]) == ["precision", "recall", "f1"]
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
    assert back.best_trial.params == BEST_PARAMS


def test_metrics_without_baseline_or_run_command_come_back(runs: list[SeedRun]) -> None:
    metrics = fake_metrics(runs[:1], None, Commands(run=None, finalize="fer-search finalize --no-baseline"))
    doc = json.loads(metrics.to_json())
    assert doc["baseline"] is None and doc["best"]["std"] is None and doc["commands"]["run"] is None
    assert FinalMetrics.from_json(metrics.to_json()) == metrics


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
    agg = aggregate(seeds)
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
    agg = aggregate([run])
    assert agg == Aggregate(per_seed={"4": agg.per_seed["4"]}, mean=agg.mean, std=None)
    assert agg.mean.private_test.accuracy == run.private_test.accuracy == pytest.approx(2 / 3)
    assert agg.mean.test_all.confusion == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
