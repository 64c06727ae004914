"""Finalize's figures as PNG bytes (confusion, curves, misclassified faces, Optuna's plots), each with its note."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fer_search.metrics import ClassificationReport
from fer_search.model import BASELINE
from fer_search.progress import count_text
from fer_search.results import Finalized, FinalMetrics, SeedRun

DPI = 110
GRID_COLUMNS, GRID_ROWS = 6, 6  # misclassified faces shown
# Optuna's importances (PedANOVA) contrast the best 10% of complete trials with all of them: below 10
# that best tenth is a single trial, and a history of so few points shows no trend either.
FEW_COMPLETE_TRIALS = 10
MAX_WARNINGS_SHOWN = 3  # of Optuna's distinct warnings in one note (PedANOVA warns once per parameter)
NAMES = {"best": "best trial", "baseline": "baseline"}  # by SeedRun.kind
SPLIT_COLORS = {"train": "tab:blue", "val": "tab:orange"}
# The colour says the split, the line the run: the best trial's bold, solid and on top, so that the
# baseline's, thin, dashed and light, never hides it.
RUN_STYLES: dict[str, dict[str, Any]] = {
    "best": {"linestyle": "-", "linewidth": 2.2, "alpha": 1.0, "zorder": 3},
    "baseline": {"linestyle": "--", "linewidth": 1.2, "alpha": 0.55, "zorder": 2},
}
FIGURE_NAMES = ("confusion.png", "performance.png", "misclassified.png", "search_history.png", "param_importances.png")


@dataclass(frozen=True)
class Plot:
    """One figure of the reports, and the sentence the page gives with it."""

    png: bytes | None  # None where nothing meaningful can be drawn: the note says why
    note: str | None = None  # below the figure, what to know reading it; or in its place


def report_figures(f: Finalized) -> dict[str, Plot]:
    """Every figure of the reports, by file name (FIGURE_NAMES, in order)."""
    protocol, shipped = f.metrics.protocol, f.shipped
    shipped_label = f"shipped model ({shipped_name(f.metrics)})"
    return {
        "confusion.png": Plot(confusion_png(shipped.private_test, f.classes, shipped_label, protocol.test)),
        "performance.png": Plot(performance_png(shipped, compared_baseline(f), curves_label(f), protocol.val)),
        "misclassified.png": misclassified_plot(
            f.test_images, f.test_labels, shipped, f.classes, shipped_label, protocol.test
        ),
        "search_history.png": search_history_plot(f.study, protocol.val),
        "param_importances.png": param_importances_plot(f.study, protocol.val),
    }


def best_is_baseline(metrics: FinalMetrics) -> bool:
    """Whether the best trial has the baseline's configuration: finalize then trained each seed once, for both."""
    return metrics.baseline is not None and metrics.best_trial.params == BASELINE


def best_name(metrics: FinalMetrics) -> str:
    """The best trial as every report names it, saying so where it is the baseline."""
    same = " = baseline" if best_is_baseline(metrics) else ""
    return f"best trial #{metrics.best_trial.number}{same}"


def seeds_list(seeds: Iterable[int | str]) -> str:
    """Seeds as the reports list them: 0, 1, 2."""
    return ", ".join(str(s) for s in seeds)


def shipped_name(metrics: FinalMetrics) -> str:
    """What model.pt holds, as every report names it: the trial, its seed or ensemble of seeds, whether it flips."""
    shipped = metrics.shipped
    members = f"ensemble of seeds {seeds_list(shipped.seeds)}" if shipped.ensemble else f"seed {shipped.seeds[0]}"
    return f"{best_name(metrics)}, {members}, " + ("flip averaged" if shipped.flip else "without flip averaging")


def curves_label(f: Finalized) -> str:
    """Whose training the curves show: the shipped seed's, or the ensemble's member of best validation accuracy."""
    seed = f"{best_name(f.metrics)}, seed {f.shipped.seed}"
    if f.metrics.shipped.ensemble:
        return f"shipped ensemble's member of best {f.metrics.protocol.val} accuracy ({seed})"
    return f"shipped model ({seed})"


def compared_baseline(f: Finalized) -> SeedRun | None:
    """The baseline's run shown beside the shipped one; None without one, or where it is the shipped run itself."""
    return None if best_is_baseline(f.metrics) else f.baseline


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
    """Accuracy and loss per epoch of each run, training and validation, the kept epoch marked."""
    runs = shown_runs(shipped, baseline)
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("acc", "loss")):
        name = "accuracy" if metric == "acc" else "loss"
        for run in runs:
            _plot_curves(ax, run, metric, val_split)
        ax.set(xlabel="epoch", ylabel=name, title=f"{name}: training (blue), validation on {val_split} (orange)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole; a 2-epoch run got 1.2, 1.4, ...
        ax.grid(alpha=0.3)
    # One legend for both panels, below them rather than over the curves: a column per run.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(runs), fontsize=9)
    beside = "" if baseline is None else " (solid), and the baseline's run of the same seed (dashed)"
    fig.suptitle(f"Training curves of the {model_label}{beside}", fontsize=12)
    return _png(fig)


def _plot_curves(ax: Axes, run: SeedRun, metric: str, val_split: str) -> None:
    label, style = run_label(run), RUN_STYLES[run.kind]
    epochs = [h["epoch"] for h in run.history]
    for split, name in (("train", "training"), ("val", f"validation on {val_split}")):
        values = [h[f"{split}_{metric}"] for h in run.history]
        ax.plot(epochs, values, color=SPLIT_COLORS[split], label=f"{label}: {name}", **style)
    kept = {**style, "linestyle": ":"}
    ax.axvline(run.best_epoch, color="0.2", label=f"{label}: kept epoch {run.best_epoch}", **kept)


def misclassified_plot(
    images: np.ndarray, labels: np.ndarray, run: SeedRun, classes: tuple[str, ...], model_label: str, split: str
) -> Plot:
    """The most confident mistakes first, each titled true -> predicted (confidence)."""
    pred, conf, labels = np.asarray(run.test_pred), np.asarray(run.test_conf), np.asarray(labels)
    wrong = np.flatnonzero(pred != labels)
    if wrong.size == 0:
        return Plot(None, f"No misclassified faces to show: the {model_label} classified all {labels.size} correctly.")
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
        f"Misclassified {split} faces of the {model_label}: the {shown.size} most confident of {wrong.size} "
        f"mistakes ({wrong.size / labels.size:.1%} of {labels.size})\ntrue → predicted (confidence)",
        fontsize=12,
    )
    return Plot(_png(fig))


def search_history_plot(study: optuna.Study, val_split: str) -> Plot:
    """Optuna's optimization history, on whole trial numbers."""
    complete, total = _count_complete(study), len(study.get_trials(deepcopy=False))
    if complete == 0:
        return Plot(None, f"The search history is left out: no complete trial yet (of {count_text(total, 'trial')}).")
    target = f"{val_split} accuracy"
    return _optuna_plot(
        lambda plots: _whole_trials(plots.plot_optimization_history(study, target_name=target)),
        study,
        f"Search history: best {target} of each complete trial ({complete} of {count_text(total, 'trial')})",
        "The search history is left out: Optuna could not draw it",
    )


def _whole_trials(ax: Axes) -> Axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are numbered: no tick at trial 0.5
    return ax


def param_importances_plot(study: optuna.Study, val_split: str) -> Plot:
    """Optuna's parameter importances; where they would mean nothing, the sentence that says why instead."""
    reason = _no_importances_reason(study, val_split)
    if reason is not None:
        return Plot(None, f"Parameter importances are left out: {reason}.")
    target = f"{val_split} accuracy"
    return _optuna_plot(
        # No target: Optuna then takes the study's direction (with one, its evaluator favours low values),
        # and labels the bars with the study's metric name (val_acc) rather than target_name.
        lambda plots: plots.plot_param_importances(study, target_name=target),
        study,
        f"Parameter importances for {target} ({count_text(_count_complete(study), 'complete trial')})",
        "Parameter importances are left out: Optuna could not draw them",
    )


def _no_importances_reason(study: optuna.Study, val_split: str) -> str | None:
    """Why Optuna's importances of `study` cannot be estimated; None where they can."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < FEW_COMPLETE_TRIALS:
        return (
            f"they need at least {FEW_COMPLETE_TRIALS} complete trials (Optuna's estimate contrasts the best tenth "
            f"of them with all of them) and this study has {len(complete)}"
        )
    if len({tuple(t.values) for t in complete}) == 1:
        return (
            f"every complete trial scored the same {val_split} accuracy ({complete[0].values[0]:.2%}), "
            f"so no parameter explains a difference"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plot drawn next gives the same warnings, and the page says them
            importances = optuna.importance.get_param_importances(study)
    except ValueError as error:  # Optuna's answer to a study it cannot assess (e.g. multi-objective)
        return f"Optuna could not estimate them ({error})"
    if len(set(importances.values())) <= 1:
        return (
            f"Optuna's estimate gives each of the {count_text(len(importances), 'parameter')} the same importance: "
            f"none explains the differences between trials"
        )
    return None


def _count_complete(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _few_trials_note(study: optuna.Study) -> str | None:
    """What a reader of the search history must know when it rests on few trials; None when it does not."""
    complete = _count_complete(study)
    if complete >= FEW_COMPLETE_TRIALS:
        return None
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.get_trials(deepcopy=False))
    return (
        f"Only {count_text(complete, 'complete trial')} (fewer than {FEW_COMPLETE_TRIALS}): too few to read a trend. "
        f"Pruned trials ({pruned} here) are not shown."
    )


def _optuna_plot(draw: Callable[[ModuleType], Axes], study: optuna.Study, title: str, failed: str) -> Plot:
    """What `draw` draws with Optuna's matplotlib plots, retitled, its warnings as the note (`failed` and Optuna's
    error where it cannot draw), its side effects on matplotlib contained."""
    matplotlib.use("Agg")  # Optuna draws through pyplot, which must never look for a display
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    # The plots switch pyplot to the ggplot style for good: keep that inside this block, and save in it,
    # since savefig reads the style too. Their UserWarnings (PedANOVA's "may be inaccurate") are
    # recorded, not printed: the page says them.
    with matplotlib.rc_context(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = draw(optuna_plots)
        except ValueError as error:  # Optuna's answer to a study it cannot plot (e.g. multi-objective)
            return Plot(None, f"{failed} ({error}).")
        fig = ax.get_figure(root=True)
        assert fig is not None  # Optuna draws its axes in a pyplot figure
        try:
            ax.set_title("", loc="left")  # Optuna titles some plots on the left, others in the centre
            ax.set_title(title, fontsize=10)
            note = _few_trials_note(study) or _warnings_note([w for w in caught if issubclass(w.category, UserWarning)])
            return Plot(_png(fig), note)
        finally:
            plt.close(fig)


def _warnings_note(caught: list[warnings.WarningMessage]) -> str | None:
    """Optuna's own warnings, each once, for a study with trials enough that the few-trials note does not apply."""
    messages = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    if not messages:
        return None
    more = f" (and {len(messages) - MAX_WARNINGS_SHOWN} more)" if len(messages) > MAX_WARNINGS_SHOWN else ""
    return "Optuna warns: " + " ".join(messages[:MAX_WARNINGS_SHOWN]) + more


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()
