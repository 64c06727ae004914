"""What finalize measured: typed records of the seed runs and metrics.json, written and read by the same code."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from fer_search.metrics import ClassificationReport
from fer_search.model import TrialParams


@dataclass(frozen=True)
class SeedRun:
    """One retrained seed of one configuration, evaluated on the test splits; a resume file holds its JSON."""

    kind: str  # "best" or "baseline"
    seed: int
    best_epoch: int  # epoch whose weights are kept (best validation accuracy)
    val_acc: float  # validation accuracy at best_epoch
    history: list[dict[str, Any]]  # per epoch: epoch, train/val loss and acc, lr, seconds, images_per_s
    private_test: ClassificationReport  # on the test split
    test_all: ClassificationReport  # on every test image (PublicTest + PrivateTest)
    test_pred: list[int]  # predicted class per test image, in the test split's order
    test_conf: list[float]  # softmax probability of the predicted class

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SeedRun:
        run: SeedRun = _decoded(cls, json.loads(text))
        return run


@dataclass(frozen=True)
class Protocol:
    """The split each role was played by, as the reports name it."""

    train: str
    val: str  # chose the epoch, the shipped seed and the trial
    test: str  # held out
    test_all: str  # every test image

    @classmethod
    def of(cls, val_is_public_test: bool) -> Protocol:
        if val_is_public_test:
            return cls(
                "Training", "PublicTest", "PrivateTest", "PublicTest + PrivateTest (includes the validation split)"
            )
        return cls("Training", "10% of train", "test/", "test/ (same as test)")


@dataclass(frozen=True)
class BestTrial:
    """The study's best trial, as the search scored it."""

    number: int
    value: float  # its validation accuracy during the search
    params: TrialParams


@dataclass(frozen=True)
class ClassStats:
    """A statistic over seeds of one class's figures (support is the same for every seed)."""

    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class SplitStats:
    """A statistic over seeds of each figure of a ClassificationReport, elementwise for the confusion matrix."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassStats]
    confusion: list[list[float]]


@dataclass(frozen=True)
class Splits:
    """One statistic over seeds on each test split."""

    private_test: SplitStats
    test_all: SplitStats


@dataclass(frozen=True)
class SeedFigures:
    """What metrics.json keeps of one seed's run."""

    val_acc: float
    best_epoch: int
    private_test: ClassificationReport
    test_all: ClassificationReport


@dataclass(frozen=True)
class Aggregate:
    """One configuration over its seeds."""

    per_seed: dict[str, SeedFigures]  # keyed by the seed as text, as JSON keys are
    mean: Splits
    std: Splits | None  # ddof 1; None for a single seed


@dataclass(frozen=True)
class Scored:
    """One model (a seed, or an ensemble of seeds) predicting one way, on validation and the test splits."""

    val_acc: float  # float32 on the CPU, on the weights model.pt stores, as predict computes
    private_test: ClassificationReport
    test_all: ClassificationReport


@dataclass(frozen=True)
class Shipped:
    """What model.pt holds, and the figures `predict` reproduces on its images."""

    trial: int
    seeds: list[int]  # one seed, or every seed with --ensemble
    flip: bool  # each face's logits averaged with its mirror image's
    ensemble: bool  # the seeds' probabilities averaged
    val_acc: float
    private_test: ClassificationReport
    test_all: ClassificationReport


@dataclass(frozen=True)
class FlipChoice:
    """Whether the shipped model averages each face with its mirror image, and the validation figures behind it."""

    mode: str  # auto (decided on validation), on, off
    used: bool
    decided_on: str  # what val_acc and val_acc_flipped are of: the seeds' mean, or the ensemble
    val_acc: float  # without flip
    val_acc_flipped: float


@dataclass(frozen=True)
class Candidate:
    """One of the top trials re-ranked: its search score and its retrainings' validation accuracies."""

    number: int
    value: float  # validation accuracy during the search
    params: TrialParams
    val_accs: dict[str, float]  # by selection seed as text: the retraining's best-epoch validation accuracy
    mean: float
    std: float | None  # ddof 1; None for one selection seed


@dataclass(frozen=True)
class Selection:
    """The re-ranking of the top trials by retrained mean validation accuracy (finalize --top-k)."""

    top_k: int
    seeds: list[int]
    candidates: list[Candidate]  # by search score, best first
    chosen: int  # the trial number with the best mean: the one finalized
    overstated_by: float  # the chosen trial's search score minus its retrained mean (a fraction, not points)


@dataclass(frozen=True)
class Ensemble:
    """The seeds' averaged probabilities, without and with flip averaging."""

    seeds: list[int]
    plain: Scored
    flipped: Scored


@dataclass(frozen=True)
class ReportedBaseline:
    accuracy: float
    note: str


# The documented project's figure, measured on a split that is not this test folder.
REPORTED_BASELINE = ReportedBaseline(0.61356, "reported by the documented project, on its own split")


@dataclass(frozen=True)
class DataRecord:
    path: str
    fingerprints: dict[str, str]  # by split


@dataclass(frozen=True)
class Commands:
    run: str | None  # None for a study created before `run` recorded its command line
    finalize: str


@dataclass(frozen=True)
class FinalMetrics:
    """metrics.json: its keys, in its order, are these fields."""

    shipped: Shipped
    epochs: int
    seeds: list[int]
    best_trial: BestTrial  # the configuration finalized: the search's best, or the re-ranking's choice
    selection: Selection | None  # None with --top-k 1, or a single candidate
    flip: FlipChoice
    # Single models, without and with flip averaging; every val_acc as predict computes (float32 on the CPU,
    # rounded weights), which may differ a face or two from the training's (SeedRun.val_acc, unrounded).
    best: Aggregate
    best_flipped: Aggregate
    ensemble: Ensemble | None  # None for one seed
    baseline: Aggregate | None  # None when finalize ran with --no-baseline
    baseline_flipped: Aggregate | None
    baseline_reported: ReportedBaseline
    protocol: Protocol
    data: DataRecord
    commands: Commands
    versions: dict[str, str | None]  # by package; None where it is not installed
    git: dict[str, Any]  # commit and dirty, None outside a git checkout

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FinalMetrics:
        metrics: FinalMetrics = _decoded(cls, json.loads(text))
        return metrics


def aggregate(per_seed: dict[str, SeedFigures]) -> Aggregate:
    """`per_seed`, and its mean / standard deviation (ddof 1; None for one seed) over seeds."""
    runs = list(per_seed.values())
    std = _splits(runs, lambda v: np.std(v, axis=0, ddof=1)) if len(runs) > 1 else None
    return Aggregate(per_seed, _splits(runs, lambda v: np.mean(v, axis=0)), std)


def _splits(runs: list[SeedFigures], stat: Callable[[np.ndarray], np.ndarray]) -> Splits:
    return Splits(
        private_test=_over_seeds([r.private_test for r in runs], stat),
        test_all=_over_seeds([r.test_all for r in runs], stat),
    )


def _over_seeds(reports: list[ClassificationReport], stat: Callable[[np.ndarray], np.ndarray]) -> SplitStats:
    """`stat` over the seeds' axis 0 of each figure of the reports (support and n are the same for all)."""

    def over(values: list[Any]) -> Any:
        return np.asarray(stat(np.asarray(values, dtype=float))).tolist()

    return SplitStats(
        accuracy=over([r.accuracy for r in reports]),
        macro_f1=over([r.macro_f1 for r in reports]),
        per_class={
            c: ClassStats(
                *(over([getattr(r.per_class[c], f.name) for r in reports]) for f in dataclasses.fields(ClassStats))
            )
            for c in reports[0].per_class
        },
        confusion=over([r.confusion for r in reports]),
    )


def _decoded(kind: Any, value: Any) -> Any:
    """`value`, as json.loads read it from what dataclasses.asdict gave, rebuilt as the annotation `kind`."""
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _decoded(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)})
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType):  # X | None
        return None if value is None else _decoded(next(a for a in args if a is not type(None)), value)
    if typing.get_origin(kind) is dict:
        return {key: _decoded(args[1], v) for key, v in value.items()}
    if typing.get_origin(kind) is list:
        return [_decoded(args[0], v) for v in value]
    return value  # str, int, float, bool, Any: as JSON has them


@dataclass(frozen=True)
class Finalized:
    """What the reports show: the metrics, the shipped run and the baseline's of its seed, the test split, the study."""

    metrics: FinalMetrics
    # The shipped model's figures, predictions and confidences (flip averaged, ensembled, as shipped) with
    # the training history and best epoch of its seed: for an ensemble, its member of best validation accuracy.
    shipped: SeedRun
    baseline: (
        SeedRun | None
    )  # the baseline's run of that seed, as it predicts alone and unflipped; None with --no-baseline
    test_images: np.ndarray  # uint8 (N, 48, 48), in the test split's order
    test_labels: np.ndarray
    classes: tuple[str, ...]
    study: optuna.Study
