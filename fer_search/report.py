"""Finalize's human-readable outputs: figures, text, one self-contained HTML page; prints nothing."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fer_search.files import write_file
from fer_search.model import BASELINE

DPI = 110
GRID_COLUMNS, GRID_ROWS = 6, 6  # misclassified faces shown
MIN_TRIALS_FOR_IMPORTANCES = 2  # below this Optuna cannot compare trials at all
# Optuna's importances (PedANOVA) contrast the best 10% of complete trials with all of them: below 10
# that best tenth is a single trial, and a history of so few points shows no trend either.
FEW_COMPLETE_TRIALS = 10
MAX_WARNINGS_SHOWN = 3  # of Optuna's distinct warnings on one figure (PedANOVA warns once per parameter)
NAMES = {"best": "best trial", "baseline": "baseline"}  # by SeedRun.kind
COLORS = {"best": "tab:blue", "baseline": "tab:orange"}


@dataclass(frozen=True)
class SeedRun:
    """One retrained seed of one configuration, evaluated on the test splits."""

    kind: str  # "best" or "baseline"
    seed: int
    best_epoch: int  # epoch whose weights are kept (best validation accuracy)
    val_acc: float  # validation accuracy at best_epoch
    history: list[dict[str, Any]]  # per epoch: epoch, train/val loss and acc, lr, seconds, images_per_s
    private_test: dict[str, Any]  # metrics.classification_report on the test split
    test_all: dict[str, Any]  # the same on every test image (PublicTest + PrivateTest)
    test_pred: list[int]  # predicted class per test image, in the test split's order
    test_conf: list[float]  # softmax probability of the predicted class


def write_reports(out: Path, metrics: dict[str, Any], shipped: SeedRun, baseline: SeedRun | None,
                  test_images: np.ndarray, test_labels: np.ndarray, classes: tuple[str, ...],
                  study: optuna.Study) -> list[Path]:
    """Write the reports into `out`, each atomically; the paths written, report.html last."""
    protocol = metrics["protocol"]
    shipped_label = f"shipped model (best trial #{metrics['best_trial']['number']}, seed {shipped.seed})"
    figures = {
        "confusion.png": confusion_png(shipped.private_test, classes, shipped_label, protocol["test"]),
        "performance.png": performance_png(shipped, baseline, shipped_label, protocol["val"]),
        "misclassified.png": misclassified_png(test_images, test_labels, shipped, classes, shipped_label,
                                               protocol["test"]),
        "search_history.png": search_history_png(study, protocol["val"]),
        "param_importances.png": param_importances_png(study, protocol["val"]),
    }
    files = {
        "epoch_accs.json": epoch_accs_json(shipped, baseline).encode(),
        "recalls_precisions.txt": recalls_precisions_text(metrics, shipped, baseline, classes).encode(),
        **figures,
        "report.html": report_html(metrics, shipped, baseline, classes, study, figures).encode(),
    }
    for name, content in files.items():  # write_file creates `out`
        write_file(out / name, content)
    return [out / name for name in files]


# --- text -----------------------------------------------------------------------------------------------------

def epoch_accs_json(shipped: SeedRun, baseline: SeedRun | None) -> str:
    return json.dumps({"best": shipped.history, "baseline": baseline.history if baseline else None}, indent=2)


def recalls_precisions_text(metrics: dict[str, Any], shipped: SeedRun, baseline: SeedRun | None,
                            classes: tuple[str, ...]) -> str:
    """Aligned per-expression tables for the shipped model (and the baseline), then the means over seeds."""
    protocol = metrics["protocol"]
    lines = [f"Per-expression results on {protocol['test']} (trained on {protocol['train']}, "
             f"epoch and shipped seed chosen on {protocol['val']})", ""]
    for run in _runs(shipped, baseline):
        what = (f"Best trial #{metrics['best_trial']['number']}, shipped seed" if run.kind == "best"
                else "Baseline (the documented configuration, retrained here), seed")
        lines += [f"{what} {run.seed} (weights of epoch {run.best_epoch})",
                  *_class_table_lines(run.private_test, classes), ""]
    if baseline is None:
        lines += ["Baseline: not retrained (finalize ran with --no-baseline)", ""]
    lines += _seed_summary_lines(metrics)
    return "\n".join(lines) + "\n"


def _runs(shipped: SeedRun, baseline: SeedRun | None) -> list[SeedRun]:
    """The runs every per-run table and figure shows: the shipped one, and the baseline's of its seed."""
    return [shipped] if baseline is None else [shipped, baseline]


def _class_table_lines(report: dict[str, Any], classes: tuple[str, ...]) -> list[str]:
    width = max(len("expression"), *(len(c) for c in classes))
    lines = [f"  {'expression':<{width}}  precision  recall     F1  support"]
    for c in classes:
        m = report["per_class"][c]
        lines.append(f"  {c:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append(f"  accuracy {report['accuracy']:.2%}, macro-F1 {report['macro_f1']:.3f} ({report['n']} images)")
    return lines


def _seed_summary_lines(metrics: dict[str, Any]) -> list[str]:
    protocol = metrics["protocol"]
    table = [["", f"{protocol['test']} accuracy", f"{protocol['test']} macro-F1", "test_all accuracy *"],
             *_summary_rows(metrics)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [f"Summary over seeds {_seeds_text(metrics)} ({_spread_text(metrics)})",
            *("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table),
            f"  * test_all = {protocol['test_all']}"]


def _retrained(metrics: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, name, aggregate over seeds) for the best trial and, when retrained, the baseline."""
    rows = [("best", f"best trial #{metrics['best_trial']['number']}", metrics["best"])]
    if metrics["baseline"] is not None:
        rows.append(("baseline", "baseline", metrics["baseline"]))
    return rows


def _summary_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Per configuration: test accuracy, test macro-F1, test_all accuracy, each mean ± std over seeds."""
    columns = (("private_test", "accuracy"), ("private_test", "macro_f1"), ("test_all", "accuracy"))
    return [[name, *(_mean_std(agg, split, key) for split, key in columns)] for _, name, agg in _retrained(metrics)]


def _seeds_text(metrics: dict[str, Any]) -> str:
    return ", ".join(str(s) for s in metrics["seeds"])


def _spread_text(metrics: dict[str, Any]) -> str:
    seeds = metrics["seeds"]
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]} only, no spread"


def _mean_std(agg: dict[str, Any], split: str, key: str) -> str:
    fmt = _percent if key == "accuracy" else "{:.3f}".format
    mean = fmt(agg["mean"][split][key])
    return mean if agg["std"] is None else f"{mean} ± {fmt(agg['std'][split][key])}"


def _percent(fraction: float) -> str:
    return f"{fraction:.2%}"


# --- figures --------------------------------------------------------------------------------------------------

def confusion_png(report: dict[str, Any], classes: tuple[str, ...], model_label: str, split: str) -> bytes:
    """Counts beside the row-normalised matrix (its diagonal is each class's recall)."""
    counts = np.asarray(report["confusion"])
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    count_ax, norm_ax = fig.subplots(1, 2)
    _confusion_panel(fig, count_ax, counts, classes, "d", "counts")
    _confusion_panel(fig, norm_ax, normalised, classes, ".2f", "row-normalised (diagonal = recall)")
    fig.suptitle(f"Confusion matrix of the {model_label} on {split} ({report['n']} images)", fontsize=13)
    return _png(fig)


def _confusion_panel(fig: Figure, ax: Axes, matrix: np.ndarray, classes: tuple[str, ...], spec: str,
                     title: str) -> None:
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.85)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=35, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    dark = matrix.max() / 2  # white text on the darker cells
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, format(value, spec), ha="center", va="center", fontsize=9,
                color="white" if value > dark else "black")


def performance_png(shipped: SeedRun, baseline: SeedRun | None, model_label: str, val_split: str) -> bytes:
    """Accuracy and loss per epoch, training solid and validation dashed, the kept epoch marked."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("acc", "loss")):
        name = "accuracy" if metric == "acc" else "loss"
        for run in _runs(shipped, baseline):
            _plot_curves(ax, run, metric)
        ax.set(xlabel="epoch", ylabel=name, title=f"{name}: training (solid), validation on {val_split} (dashed)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole; a 2-epoch run got 1.2, 1.4, ...
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    beside = "" if baseline is None else " and the baseline"
    fig.suptitle(f"Training curves of the {model_label}{beside}; dotted line: epoch whose weights are kept",
                 fontsize=12)
    return _png(fig)


def _plot_curves(ax: Axes, run: SeedRun, metric: str) -> None:
    label, color = _run_label(run), COLORS[run.kind]
    epochs = [h["epoch"] for h in run.history]
    ax.plot(epochs, [h[f"train_{metric}"] for h in run.history], color=color, label=f"{label} training")
    ax.plot(epochs, [h[f"val_{metric}"] for h in run.history], color=color, linestyle="--",
            label=f"{label} validation")
    ax.axvline(run.best_epoch, color=color, linestyle=":", label=f"{label} kept epoch {run.best_epoch}")


def _run_label(run: SeedRun) -> str:
    return f"{NAMES[run.kind]} (seed {run.seed})"


def misclassified_png(images: np.ndarray, labels: np.ndarray, run: SeedRun, classes: tuple[str, ...],
                      model_label: str, split: str) -> bytes:
    """The most confident mistakes first, each titled true -> predicted (confidence)."""
    pred, conf, labels = np.asarray(run.test_pred), np.asarray(run.test_conf), np.asarray(labels)
    wrong = np.flatnonzero(pred != labels)
    title = f"Misclassified {split} faces of the {model_label}"
    if wrong.size == 0:
        return _note_png(title, f"the model classified all {labels.size} {split} faces correctly")
    shown = wrong[np.argsort(-conf[wrong], kind="stable")][:GRID_COLUMNS * GRID_ROWS]
    rows = math.ceil(shown.size / GRID_COLUMNS)
    fig = Figure(figsize=(GRID_COLUMNS * 1.75, rows * 1.9 + 0.7), layout="constrained")
    axes = fig.subplots(rows, GRID_COLUMNS, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{classes[labels[i]]} → {classes[pred[i]]} ({conf[i]:.0%})", fontsize=9)
    fig.suptitle(f"{title}: the {shown.size} most confident of {wrong.size} mistakes "
                 f"({wrong.size / labels.size:.1%} of {labels.size})\ntrue → predicted (confidence)", fontsize=12)
    return _png(fig)


def search_history_png(study: optuna.Study, val_split: str) -> bytes:
    complete, total = _count_complete(study), len(study.get_trials(deepcopy=False))
    title = f"Search history: best {val_split} accuracy of each complete trial ({complete} of {_count(total, 'trial')})"
    if complete == 0:
        return _note_png(title, f"the search history needs at least 1 complete trial; this study has 0 "
                                f"(of {_count(total, 'trial')})")
    return _optuna_png("plot_optimization_history", study, f"{val_split} accuracy", title)


def param_importances_png(study: optuna.Study, val_split: str) -> bytes:
    complete = _count_complete(study)
    title = f"Parameter importances for {val_split} accuracy ({_count(complete, 'complete trial')})"
    if complete < MIN_TRIALS_FOR_IMPORTANCES:
        return _note_png(title, f"parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCES} complete trials; "
                                f"this study has {complete}")
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
    return (f"Only {_count(complete, 'complete trial')} (fewer than {FEW_COMPLETE_TRIALS}): too few to read a trend "
            f"or to trust the importances. Pruned trials ({pruned} here) are not shown, and the importances "
            f"do not count them.")


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
                ax.get_figure().text(0.5, 0, textwrap.fill(note, 100), ha="center", va="top", fontsize=10,
                                     bbox={"facecolor": "white", "edgecolor": "0.6"})
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


# --- html -----------------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.headline td { font-size: 1.25em; }
.note { color: #555; font-size: 0.95em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def report_html(metrics: dict[str, Any], shipped: SeedRun, baseline: SeedRun | None, classes: tuple[str, ...],
                study: optuna.Study, figures: dict[str, bytes]) -> str:
    """One page, every figure inlined: opens offline and can be mailed as it is."""
    protocol = metrics["protocol"]
    best = metrics["best_trial"]
    test = protocol["test"]
    sections = [
        f"<h1>{_e(f'FER2013 expression recognition: final report for study {study.study_name}')}</h1>",
        _p(f"Trained on {protocol['train']}; {protocol['val']} chose the epoch, the shipped seed and the trial; "
           f"{protocol['test']} is the held-out test split."),
        "<h2>Headline</h2>", _headline_html(metrics),
        "<h2>Per-seed results</h2>", _per_seed_html(metrics),
        _figure_html(figures, "performance.png", "Training and validation curves of the shipped seed"
                     + ("" if baseline is None else " and the baseline's run of the same seed")),
        f"<h2>{_e(f'Per-expression results on {test}')}</h2>", _per_class_html(shipped, baseline, classes),
        _figure_html(figures, "confusion.png", f"Confusion matrix of the shipped model on {test}"),
        _figure_html(figures, "misclassified.png", f"The shipped model's most confident mistakes on {test}"),
        "<h2>Configurations</h2>",
        _p(f"Best trial #{best['number']}: {protocol['val']} accuracy {_percent(best['value'])} during the search. "
           + _baseline_trial_text(study, protocol["val"])),
        _params_html(best["params"]),
        "<h2>Search</h2>", _search_html(study, best),
        _figure_html(figures, "search_history.png", "Optuna's optimization history (complete trials only)"),
        _figure_html(figures, "param_importances.png", "Optuna's parameter importances"),
        "<h2>Reproduce</h2>", _reproduce_html(metrics),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(f'fer-search report: {study.study_name}')}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _headline_html(metrics: dict[str, Any]) -> str:
    protocol = metrics["protocol"]
    header = ["", f"{protocol['test']} accuracy ({_spread_text(metrics)})", f"{protocol['test']} macro-F1",
              f"test_all accuracy: {protocol['test_all']}"]
    retrained = "The best trial and the baseline were" if metrics["baseline"] is not None else "The best trial was"
    parts = [_p(f"{retrained} retrained here under the same protocol, with seeds {_seeds_text(metrics)}."),
             _table(header, _summary_rows(metrics), "headline")]
    if metrics["baseline"] is None:
        parts.append(_p("The baseline was not retrained (finalize ran with --no-baseline)."))
    if protocol["val"] in protocol["test_all"]:
        parts.append(_p(f"test_all includes the validation split ({protocol['val']}), which chose the epoch and "
                        f"the shipped seed: it is not a held-out figure.", "note"))
    reported = metrics["baseline_reported"]
    parts.append(_p(f"{reported['accuracy']:.3%}: {reported['note']}. Not comparable with the figures "
                    f"above; the baseline retrained here is the fair comparison.", "note"))
    return "\n".join(parts)


def _per_seed_html(metrics: dict[str, Any]) -> str:
    protocol = metrics["protocol"]
    header = ["configuration", "seed", "kept epoch", f"{protocol['val']} accuracy", f"{protocol['test']} accuracy",
              f"{protocol['test']} macro-F1", "test_all accuracy"]
    rows = []
    for kind, name, agg in _retrained(metrics):
        for seed, r in agg["per_seed"].items():
            shipped = " (shipped)" if kind == "best" and int(seed) == metrics["shipped_seed"] else ""
            rows.append([name + shipped, seed, str(r["best_epoch"]), _percent(r["val_acc"]),
                         _percent(r["private_test"]["accuracy"]), f"{r['private_test']['macro_f1']:.3f}",
                         _percent(r["test_all"]["accuracy"])])
    return _table(header, rows)


def _per_class_html(shipped: SeedRun, baseline: SeedRun | None, classes: tuple[str, ...]) -> str:
    runs = _runs(shipped, baseline)
    header = ["expression", *(f"{_run_label(run)} {m}" for run in runs for m in ("precision", "recall", "F1")),
              "support"]
    rows = [[c, *(f"{run.private_test['per_class'][c][m]:.3f}" for run in runs for m in ("precision", "recall", "f1")),
             str(shipped.private_test["per_class"][c]["support"])] for c in classes]
    return _table(header, rows)


def _baseline_trial_text(study: optuna.Study, val_split: str) -> str:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    if baseline is None:
        return "The baseline has no complete trial in this study."
    return f"Baseline: trial #{baseline.number}, {val_split} accuracy {_percent(baseline.value)} during the search."


def _params_html(best_params: dict[str, Any]) -> str:
    baseline = BASELINE.to_dict()
    names = [*baseline, *(k for k in best_params if k not in baseline)]
    rows = [[k, _param(best_params.get(k)), _param(baseline.get(k))] for k in names]
    return _table(["parameter", "best trial", "baseline (documented configuration)"], rows)


def _param(value: Any) -> str:
    if value is None:
        return "— (unused)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _search_html(study: optuna.Study, best: dict[str, Any]) -> str:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    rows = [[state.name, str(states[state.name])] for state in optuna.trial.TrialState]
    return (_p(f"{len(trials)} trials; best value {best['value']:.4f} (trial #{best['number']}).")
            + _table(["state", "trials"], rows))


def _reproduce_html(metrics: dict[str, Any]) -> str:
    git = metrics.get("git") or {}
    provenance = [[f"version of {name}", str(v)] for name, v in metrics["versions"].items()]
    provenance += [[f"git {k}", str(v)] for k, v in git.items()]
    provenance += [[f"data fingerprint ({split})", str(v)] for split, v in metrics["data"]["fingerprints"].items()]
    commands = metrics["commands"]
    listing = "\n".join([
        "# the search: the command that created the study",
        commands["run"] or "# (not recorded: the study was created before fer-search recorded its command)",
        "# this report",
        commands["finalize"],
    ])
    return _p("Commands:") + f"<pre>{_e(listing)}</pre>" + _table(["", "value"], provenance)


def _figure_html(figures: dict[str, bytes], name: str, caption: str) -> str:
    data = base64.b64encode(figures[name]).decode("ascii")
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{_e(caption)}\">"
            f"<figcaption>{_e(f'{name}: {caption}')}</figcaption></figure>")


def _table(header: list[str], rows: list[list[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f" class=\"{_e(css_class)}\"" if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str, css_class: str = "") -> str:
    attr = f" class=\"{_e(css_class)}\"" if css_class else ""
    return f"<p{attr}>{_e(text)}</p>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
