"""Helpers of the finalize tests (test_results, test_tables, test_figures, test_report): fake seed runs,
metrics and a toy study, consistent with each other."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import optuna

from fer_search.data import CLASSES
from fer_search.metrics import classification_report
from fer_search.model import BASELINE, used_dropouts
from fer_search.results import (
    REPORTED_BASELINE,
    BestTrial,
    Commands,
    DataRecord,
    Finalized,
    FinalMetrics,
    Protocol,
    SeedRun,
    aggregate,
)

EPOCHS = 8
ALL_REPORT_FILES = (  # what write_reports writes, in its order: report.html last
    "epoch_accs.json",
    "recalls_precisions.txt",
    "confusion.png",
    "performance.png",
    "misclassified.png",
    "search_history.png",
    "param_importances.png",
    "report.html",
)
# What it writes for a study of fewer than 10 complete trials, as every finalize test's: their
# parameter importances cannot be estimated, and the page says so instead of drawing them.
REPORT_FILES = tuple(name for name in ALL_REPORT_FILES if name != "param_importances.png")
SEEDS = [0, 1, 2]
N_TEST, N_PUBLIC = 150, 100
STUDY_NAME = "fer<2013>&co"  # must come out escaped in the page
COMMAND = "fer-search finalize --study 'fer<2013>&co' --seeds 3"
RUN_COMMAND = "fer-search run --trials 8 --study 'fer<2013>&co'"

DROPOUTS = ("dropout_high", "dropout_low", "dropout_head")
BEST_PARAMS = dataclasses.replace(
    BASELINE, lr=0.0021, dropout_pattern="none", dropout_high=None, dropout_low=None, dropout_head=None
)


def fake_run(kind: str, seed: int, labels: np.ndarray, public_labels: np.ndarray) -> SeedRun:
    """A run whose reports, predictions and history agree with each other."""
    rng = np.random.default_rng([seed, kind == "best"])

    def predict(y: np.ndarray) -> np.ndarray:
        return np.where(rng.random(y.size) < 0.6, y, rng.integers(0, len(CLASSES), y.size))

    pred, public_pred = predict(labels), predict(public_labels)
    val_acc = np.sort(rng.uniform(0.3, 0.65, EPOCHS))
    history = [
        {
            "epoch": e + 1,
            "train_loss": 1.8 - 0.1 * e,
            "train_acc": 0.3 + 0.04 * e,
            "val_loss": 1.7 - 0.08 * e,
            "val_acc": float(val_acc[e]),
            "lr": 1e-3,
            "seconds": 2.0,
            "images_per_s": 9000.0,
        }
        for e in range(EPOCHS)
    ]
    return SeedRun(
        kind=kind,
        seed=seed,
        best_epoch=EPOCHS,
        val_acc=float(val_acc[-1]),
        history=history,
        private_test=classification_report(labels, pred, CLASSES),
        test_all=classification_report(
            np.concatenate([public_labels, labels]), np.concatenate([public_pred, pred]), CLASSES
        ),
        test_pred=pred.tolist(),
        test_conf=rng.uniform(0.2, 1.0, labels.size).tolist(),
    )


def fake_metrics(best: list[SeedRun], baseline: list[SeedRun] | None, commands: Commands) -> FinalMetrics:
    """metrics.json of a finalize that retrained `best` (and `baseline`) on FER2013's PublicTest protocol."""
    shipped = max(best, key=lambda r: r.val_acc)
    return FinalMetrics(
        shipped_seed=shipped.seed,
        epochs=EPOCHS,
        seeds=[r.seed for r in best],
        best_trial=BestTrial(number=3, value=0.6543, params=BEST_PARAMS),
        best=aggregate(best),
        baseline=aggregate(baseline) if baseline else None,
        baseline_reported=REPORTED_BASELINE,
        protocol=Protocol.of(val_is_public_test=True),
        data=DataRecord(path="fer2013", fingerprints={"train": "aaa111", "val": "bbb222", "test": "ccc333"}),
        commands=commands,
        versions={"python": "3.11.7", "optuna": "5.0.0", "fer-search": None},
        git={"commit": "0123abc", "dirty": False},
    )


def toy_study(n_complete: int, n_pruned: int = 1, name: str = STUDY_NAME) -> optuna.Study:
    """An in-memory study with a couple of parameters and intermediate values, some trials pruned, and the
    user attributes the objective sets."""
    study = optuna.create_study(direction="maximize", study_name=name, sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
        pattern = trial.suggest_categorical("dropout_pattern", ["none", "head", "interlaced"])
        value = 0.5 + 20 * lr + (0.05 if pattern == "interlaced" else 0.0)
        if trial.number == n_pruned:
            trial.set_user_attr("baseline", True)
        trial.set_user_attr("trial_params", trial_params(lr, pattern))
        for epoch in range(1, 4):
            trial.report(value * epoch / 3, epoch)
        trial.set_user_attr("epochs_run", 3)
        if trial.number < n_pruned:
            raise optuna.TrialPruned()
        trial.set_user_attr("best_epoch", 3)
        return value

    study.optimize(objective, n_trials=n_pruned + n_complete)
    return study


def trial_params(lr: float, pattern: str) -> dict[str, Any]:
    """The whole configuration a trial records: the baseline's, but for its lr and dropout pattern."""
    dropouts = {name: getattr(BASELINE, name) if name in used_dropouts(pattern) else None for name in DROPOUTS}
    return dataclasses.replace(BASELINE, lr=lr, dropout_pattern=pattern, **dropouts).to_dict()


def fake_inputs(study: optuna.Study) -> Finalized:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, len(CLASSES), N_TEST)
    public = rng.integers(0, len(CLASSES), N_PUBLIC)
    images = rng.integers(0, 256, (N_TEST, 48, 48), dtype=np.uint8)
    best = [fake_run("best", s, labels, public) for s in SEEDS]
    baseline = [fake_run("baseline", s, labels, public) for s in SEEDS]
    metrics = fake_metrics(best, baseline, Commands(run=RUN_COMMAND, finalize=COMMAND))
    shipped = next(r for r in best if r.seed == metrics.shipped_seed)
    baseline_same_seed = next(r for r in baseline if r.seed == shipped.seed)
    return Finalized(metrics, shipped, baseline_same_seed, images, labels, CLASSES, study)


def baseline_won(inputs: Finalized) -> Finalized:
    """`inputs` as finalize gives them where the best trial is the baseline: one set of runs, reported for both."""
    metrics = dataclasses.replace(
        inputs.metrics, best_trial=BestTrial(number=0, value=0.6112, params=BASELINE), baseline=inputs.metrics.best
    )
    return dataclasses.replace(inputs, metrics=metrics, baseline=dataclasses.replace(inputs.shipped, kind="baseline"))
