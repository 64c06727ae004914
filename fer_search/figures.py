"""Finalize's figures as PNG bytes: confusion matrix, training curves, misclassified faces, Optuna's plots."""

from __future__ import annotations

import io
import math
import textwrap
import warnings

import matplotlib
import numpy as np
import optuna
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fer_search.metrics import ClassificationReport
from fer_search.results import Finalized, SeedRun

DPI = 110
GRID_COLUMNS, GRID_ROWS = 6, 6  # misclassified faces shown
MIN_TRIALS_FOR_IMPORTANCES = 2  # below this Optuna cannot compare trials at all
# Optuna's importances (PedANOVA) contrast the best 10% of complete trials with all of them: below 10
# that best tenth is a single trial, and a history of so few points shows no trend either.
FEW_COMPLETE_TRIALS = 10
MAX_WARNINGS_SHOWN = 3  # of Optuna's distinct warnings on one figure (PedANOVA warns once per parameter)
NAMES = {"best": "best trial", "baseline": "baseline"}  # by SeedRun.kind
COLORS = {"best": "tab:blue", "baseline": "tab:orange"}


def report_figures(f: Finalized) -> dict[str, bytes]:
    """Every figure of the reports, by file name."""
    protocol, shipped = f.metrics.protocol, f.shipped
    shipped_label = f"shipped model (best trial #{f.metrics.best_trial.number}, seed {shipped.seed})"
    return {
        "confusion.png": confusion_png(shipped.private_test, f.classes, shipped_label, protocol.test),
        "performance.png": performance_png(shipped, f.baseline, shipped_label, protocol.val),
        "misclassified.png": misclassified_png(
            f.test_images, f.test_labels, shipped, f.classes, shipped_label, protocol.test
        ),
        "search_history.png": search_history_png(f.study, protocol.val),
        "param_importances.png": param_importances_png(f.study, protocol.val),
    }


def shown_runs(shipped: SeedRun, baseline: SeedRun | None) -> list[SeedRun]:
    """The runs every per-run table and figure shows: the shipped one, and the baseline's of its seed."""
    return [shipped] if baseline is None else [shipped, baseline]


def run_label(run: SeedRun) -> str:
    return f"{NAMES[run.kind]} (seed {run.seed})"


def confusion_png(report: ClassificationReport, classes: tuple[str, ...], model_label: str, split: str) -> bytes:
    """Counts beside the row-normalised matrix (its diagonal is each class's recall)."""
    counts = np.asarray(report.confusion)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    count_ax, norm_ax = fig.subplots(1, 2)
    _confusion_panel(fig, count_ax, counts, classes, "d", "counts")
    _confusion_panel(fig, norm_ax, normalised, classes, ".2f", "row-normalised (diagonal = recall)")
    fig.suptitle(f"Confusion matrix of the {model_label} on {split} ({report.n} images)", fontsize=13)
    return _png(fig)


def _confusion_panel(
    fig: Figure, ax: Axes, matrix: np.ndarray, classes: tuple[str, ...], spec: str, title: str
) -> None:
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.85)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=35, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    dark = matrix.max() / 2  # white text on the darker cells
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            format(value, spec),
            ha="center",
            va="center",
            fontsize=9,
            color="white" if value > dark else "black",
        )


def performance_png(shipped: SeedRun, baseline: SeedRun | None, model_label: str, val_split: str) -> bytes:
    """Accuracy and loss per epoch, training solid and validation dashed, the kept epoch marked."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("acc", "loss")):
        name = "accuracy" if metric == "acc" else "loss"
        for run in shown_runs(shipped, baseline):
            _plot_curves(ax, run, metric)
        ax.set(xlabel="epoch", ylabel=name, title=f"{name}: training (solid), validation on {val_split} (dashed)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole; a 2-epoch run got 1.2, 1.4, ...
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    beside = "" if baseline is None else " and the baseline"
    fig.suptitle(
        f"Training curves of the {model_label}{beside}; dotted line: epoch whose weights are kept", fontsize=12
    )
    return _png(fig)


def _plot_curves(ax: Axes, run: SeedRun, metric: str) -> None:
    label, color = run_label(run), COLORS[run.kind]
    epochs = [h["epoch"] for h in run.history]
    ax.plot(epochs, [h[f"train_{metric}"] for h in run.history], color=color, label=f"{label} training")
    ax.plot(epochs, [h[f"val_{metric}"] for h in run.history], color=color, linestyle="--", label=f"{label} validation")
    ax.axvline(run.best_epoch, color=color, linestyle=":", label=f"{label} kept epoch {run.best_epoch}")


def misclassified_png(
    images: np.ndarray, labels: np.ndarray, run: SeedRun, classes: tuple[str, ...], model_label: str, split: str
) -> bytes:
    """The most confident mistakes first, each titled true -> predicted (confidence)."""
    pred, conf, labels = np.asarray(run.test_pred), np.asarray(run.test_conf), np.asarray(labels)
    wrong = np.flatnonzero(pred != labels)
    title = f"Misclassified {split} faces of the {model_label}"
    if wrong.size == 0:
        return _note_png(title, f"the model classified all {labels.size} {split} faces correctly")
    shown = wrong[np.argsort(-conf[wrong], kind="stable")][: GRID_COLUMNS * GRID_ROWS]
    rows = math.ceil(shown.size / GRID_COLUMNS)
    fig = Figure(figsize=(GRID_COLUMNS * 1.75, rows * 1.9 + 0.7), layout="constrained")
    axes = fig.subplots(rows, GRID_COLUMNS, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{classes[labels[i]]} → {classes[pred[i]]} ({conf[i]:.0%})", fontsize=9)
    fig.suptitle(
        f"{title}: the {shown.size} most confident of {wrong.size} mistakes "
        f"({wrong.size / labels.size:.1%} of {labels.size})\ntrue → predicted (confidence)",
        fontsize=12,
    )
    return _png(fig)


def search_history_png(study: optuna.Study, val_split: str) -> bytes:
    complete, total = _count_complete(study), len(study.get_trials(deepcopy=False))
    title = f"Search history: best {val_split} accuracy of each complete trial ({complete} of {_count(total, 'trial')})"
    if complete == 0:
        return _note_png(
            title, f"the search history needs at least 1 complete trial; this study has 0 (of {_count(total, 'trial')})"
        )
    return _optuna_png("plot_optimization_history", study, f"{val_split} accuracy", title)


def param_importances_png(study: optuna.Study, val_split: str) -> bytes:
    complete = _count_complete(study)
    title = f"Parameter importances for {val_split} accuracy ({_count(complete, 'complete trial')})"
    if complete < MIN_TRIALS_FOR_IMPORTANCES:
        return _note_png(
            title,
            f"parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCES} complete trials; "
            f"this study has {complete}",
        )
    return _optuna_png("plot_param_importances", study, f"{val_split} accuracy", title)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _count_complete(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _few_trials_note(study: optuna.Study) -> str | None:
    """What a reader of either Optuna plot must know when it rests on few trials; None when it does not."""
    complete = _count_complete(study)
    if complete >= FEW_COMPLETE_TRIALS:
        return None
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.get_trials(deepcopy=False))
    return (
        f"Only {_count(complete, 'complete trial')} (fewer than {FEW_COMPLETE_TRIALS}): too few to read a trend "
        f"or to trust the importances. Pruned trials ({pruned} here) are not shown, and the importances "
        f"do not count them."
    )


def _optuna_png(plot_name: str, study: optuna.Study, target_name: str, title: str) -> bytes:
    """One of Optuna's matplotlib plots, retitled, its warnings drawn below it, its global side effects contained."""
    matplotlib.use("Agg")  # Optuna draws through pyplot, which must never look for a display
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    # The plots switch pyplot to the ggplot style for good: keep that inside this block, and save in it,
    # since savefig reads the style too. Their UserWarnings (PedANOVA's "may be inaccurate" on few trials)
    # are recorded, not printed: the figure says what they mean.
    with matplotlib.rc_context(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = getattr(optuna_plots, plot_name)(study, target_name=target_name)
        except ValueError as error:  # Optuna's answer to a study it cannot plot (e.g. multi-objective)
            return _note_png(title, f"Optuna could not draw this plot: {error}")
        try:
            ax.set_title("", loc="left")  # Optuna titles some plots on the left, others in the centre
            ax.set_title(title, fontsize=10)
            note = _few_trials_note(study) or _warnings_note([w for w in caught if issubclass(w.category, UserWarning)])
            if note is not None:
                # Below the figure, never over the bars or points; bbox_inches="tight" makes room for it.
                ax.get_figure().text(
                    0.5,
                    0,
                    textwrap.fill(note, 100),
                    ha="center",
                    va="top",
                    fontsize=10,
                    bbox={"facecolor": "white", "edgecolor": "0.6"},
                )
            return _png(ax.get_figure())
        finally:
            plt.close(ax.get_figure())


def _warnings_note(caught: list[warnings.WarningMessage]) -> str | None:
    """Optuna's own warnings, each once, for a study with trials enough that the few-trials note does not apply."""
    messages = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    if not messages:
        return None
    more = f" (and {len(messages) - MAX_WARNINGS_SHOWN} more)" if len(messages) > MAX_WARNINGS_SHOWN else ""
    return "Optuna warns: " + " ".join(messages[:MAX_WARNINGS_SHOWN]) + more


def _note_png(title: str, note: str) -> bytes:
    """A figure that says why there is no plot, so the report never lacks a file."""
    fig = Figure(figsize=(8, 3), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, textwrap.fill(note, 90), ha="center", va="center", fontsize=12, transform=ax.transAxes)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()
