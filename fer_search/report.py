"""Finalize's self-contained HTML page, and writing every report file (text from tables.py); prints nothing."""

from __future__ import annotations

import base64
import html
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from fer_search.figures import (
    FIGURE_NAMES,
    Plot,
    best_is_baseline,
    compared_baseline,
    curves_label,
    report_figures,
    run_label,
    seeds_list,
    shipped_name,
    shown_runs,
)
from fer_search.files import write_file
from fer_search.metrics import ClassScores
from fer_search.model import BASELINE, TrialParams
from fer_search.progress import duration_text, percent
from fer_search.results import Finalized, FinalMetrics, Selection
from fer_search.status import full_params, trial_seconds
from fer_search.tables import (
    chosen_candidate,
    chosen_on_val_text,
    epoch_accs_json,
    recalls_precisions_text,
    retrained,
    same_runs_text,
    spread_text,
    summary_header,
    summary_rows,
    three_places,
    value_std,
)

TOP_TRIALS = 10  # complete trials listed, best first
TIME = "%Y-%m-%d %H:%M"


def write_reports(out: Path, f: Finalized, finalize_started: datetime | None = None) -> list[Path]:
    """Write the reports into `out`, each atomically; the paths written, report.html last.

    `finalize_started`, when given, is when this finalize began: the page gives its duration."""
    figures = report_figures(f)
    pngs = {name: plot.png for name, plot in figures.items() if plot.png is not None}
    text = recalls_precisions_text(f.metrics, f.shipped, compared_baseline(f), f.classes)
    files = {
        "epoch_accs.json": epoch_accs_json(f.shipped, f.baseline).encode(),
        "recalls_precisions.txt": text.encode(),
        **pngs,
        "report.html": report_html(f, figures, datetime.now().astimezone(), finalize_started).encode(),
    }
    for name, content in files.items():  # write_file creates `out`
        write_file(out / name, content)
    for name in FIGURE_NAMES:
        if name not in pngs:  # a figure an earlier finalize drew, which this study's page leaves out
            (out / name).unlink(missing_ok=True)
    return [out / name for name in files]


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
.headline td { font-size: 1.25em; }
table.trials { font-size: 0.8em; display: block; overflow-x: auto; }
table.trials th, table.trials td { padding: 0.2em 0.3em; } table.trials td { white-space: nowrap; }
.note { color: #555; font-size: 0.95em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


@dataclass(frozen=True)
class Num:
    """A table cell holding a number: right-aligned, where text is left-aligned, so that digits line up."""

    text: str


Cell = str | Num


def report_html(f: Finalized, figures: dict[str, Plot], written_at: datetime, finalize_started: datetime | None) -> str:
    """One page, every figure inlined: opens offline and can be mailed as it is."""
    metrics, study, baseline = f.metrics, f.study, compared_baseline(f)
    protocol, best = metrics.protocol, metrics.best_trial
    test = protocol.test
    sections = [
        f"<h1>{_e(f'FER2013 expression recognition: final report for study {study.study_name}')}</h1>",
        _p(
            f"Trained on {protocol.train}; {protocol.val} chose {chosen_on_val_text(metrics)}; "
            f"{protocol.test} is the held-out test split."
        ),
        _p(_when_text(study, written_at, finalize_started)),
        "<h2>Headline</h2>",
        _headline_html(metrics),
        "<h2>Re-ranking</h2>",
        _reranking_html(metrics),
        "<h2>Per-seed results</h2>",
        _per_seed_html(metrics),
        _figure_html(
            figures,
            "performance.png",
            f"Training and validation curves of the {curves_label(f)}"
            + ("" if baseline is None else " (solid) and of the baseline's run of the same seed (dashed)"),
        ),
        f"<h2>{_e(f'Per-expression results on {test}')}</h2>",
        _per_class_html(f),
        _figure_html(figures, "confusion.png", f"Confusion matrix of the shipped model on {test}"),
        _figure_html(figures, "misclassified.png", f"The shipped model's most confident mistakes on {test}"),
        "<h2>Configurations</h2>",
        _p(
            f"Finalized trial #{best.number}: {protocol.val} accuracy {percent(best.value)} during the search. "
            + _baseline_trial_text(study, protocol.val)
            + (" The best trial has the baseline's configuration." if best_is_baseline(metrics) else "")
        ),
        _params_html(best.number, best.params),
        "<h2>Search</h2>",
        _search_html(study, metrics),
        f"<h3>{_e(f'The best complete trials by {protocol.val} accuracy')}</h3>",
        _top_trials_html(study, protocol.val),
        _figure_html(figures, "search_history.png", "Optuna's optimization history (complete trials only)"),
        _figure_html(figures, "param_importances.png", "Optuna's parameter importances"),
        "<h2>Reproduce</h2>",
        _reproduce_html(metrics),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(f'fer-search report: {study.study_name}')}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )


def _when_text(study: optuna.Study, written_at: datetime, finalize_started: datetime | None) -> str:
    """When the page was written, when the search ran and how long it took, how long finalize took."""
    parts = [f"Report written {written_at.strftime(TIME + ' %Z')}."]
    spans = [span for t in study.get_trials(deepcopy=False) if (span := _trial_span(t)) is not None]
    if spans:
        first, last = min(start for start, _ in spans), max(end for _, end in spans)
        training = sum((end - start).total_seconds() for start, end in spans)
        parts.append(
            f"The search ran from {first.strftime(TIME)} to {last.strftime(TIME)} (its workers' clocks): "
            f"{duration_text((last - first).total_seconds())} wall clock; its {len(spans)} finished trials took "
            f"{duration_text(training)} in all."
        )
    if finalize_started is not None:
        parts.append(f"Finalize took {duration_text((written_at - finalize_started.astimezone()).total_seconds())}.")
    return " ".join(parts)


def _trial_span(trial: FrozenTrial) -> tuple[datetime, datetime] | None:
    """When a finished trial started and ended; None for one that has not ended."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return trial.datetime_start, trial.datetime_complete


def _headline_html(metrics: FinalMetrics) -> str:
    protocol = metrics.protocol
    rows: list[list[Cell]] = [[row.name, *(Num(n) for n in row.numbers), row.shipped] for row in summary_rows(metrics)]
    flip = "flip averaged: each face's logits averaged with its mirror image's"
    ensemble = "" if metrics.ensemble is None else "; ensemble: one model averaging the seeds' probabilities"
    parts = [
        _p(_retrained_text(metrics)),
        _p(f"Single model: each seed's model alone, {spread_text(metrics)}{ensemble}; {flip}."),
        _table(summary_header(metrics), rows, "headline"),
        _p(_shipped_text(metrics)),
        _p(_flip_text(metrics)),
    ]
    if protocol.val in protocol.test_all:
        parts.append(
            _p(
                f"test_all includes the validation split ({protocol.val}), which chose "
                f"{chosen_on_val_text(metrics)}: it is not a held-out figure.",
                "note",
            )
        )
    reported = metrics.baseline_reported
    parts.append(
        _p(
            f"{reported.accuracy:.3%}: {reported.note}. Not comparable with the figures "
            f"above; the baseline retrained here is the fair comparison.",
            "note",
        )
    )
    return "\n".join(parts)


def _retrained_text(metrics: FinalMetrics) -> str:
    """What was retrained, with which seeds; plainly, where the best trial and the baseline are one configuration."""
    seeds = seeds_list(metrics.seeds)
    if metrics.baseline is None:
        return (
            f"The best trial was retrained here with seeds {seeds}. "
            f"The baseline was not retrained (finalize ran with --no-baseline)."
        )
    if best_is_baseline(metrics):
        return f"The best trial was retrained here with seeds {seeds}. {same_runs_text(metrics)}"
    return f"The best trial and the baseline were retrained here under the same protocol, with seeds {seeds}."


def _shipped_text(metrics: FinalMetrics) -> str:
    """What model.pt is and its own figures: those `fer-search predict` reproduces on the test images."""
    shipped, protocol = metrics.shipped, metrics.protocol
    what = (
        "the marked row"
        if shipped.ensemble
        else f"of the seeds of the marked row (whose figures are their mean), the one of best {protocol.val} accuracy"
    )
    return (
        f"model.pt: {shipped_name(metrics)}: {what}. Its own figures: {protocol.test} accuracy "
        f"{percent(shipped.private_test.accuracy)} (what `fer-search predict` reproduces on the {protocol.test} "
        f"images), macro-F1 {three_places(shipped.private_test.macro_f1)}, test_all accuracy "
        f"{percent(shipped.test_all.accuracy)}, {protocol.val} accuracy {percent(shipped.val_acc)}."
    )


def _flip_text(metrics: FinalMetrics) -> str:
    """How flip averaging was decided, and the validation accuracies without and with it."""
    flip, val = metrics.flip, metrics.protocol.val
    what = "Flip averaging (each face's logits averaged with its mirror image's)"
    scores = f"{flip.decided_on} scores {percent(flip.val_acc)} without it and {percent(flip.val_acc_flipped)} with it"
    if flip.mode == "auto":
        verdict = "model.pt flip averages" if flip.used else "model.pt does not flip average"
        return f"{what} was decided on {val} (--flip auto): {scores}, so {verdict}."
    return f"{what} is {flip.mode} as finalize was told (--flip {flip.mode}), not decided on {val}; there {scores}."


def _reranking_html(metrics: FinalMetrics) -> str:
    """How the finalized trial was chosen among the search's top trials; a sentence where it was not re-ranked."""
    selection = metrics.selection
    if selection is None:
        return _p(
            f"The search's best trial #{metrics.best_trial.number} was finalized as it is, not re-ranked "
            f"(finalize --top-k 1, or the study has a single complete configuration)."
        )
    protocol = metrics.protocol
    seeds = selection.seeds
    chosen = chosen_candidate(selection)
    header = [
        "trial",
        f"search score ({protocol.val} accuracy during the search)",
        *(f"seed {seed}: retrained {protocol.val} accuracy" for seed in seeds),
        "retrained mean ± std" if len(seeds) > 1 else "retrained",
    ]
    rows: list[list[Cell]] = [
        [
            f"#{c.number}"
            + (" (baseline)" if c.params == BASELINE else "")
            + (" (finalized)" if c.number == chosen.number else ""),
            Num(percent(c.value)),
            *(Num(percent(c.val_accs[str(seed)])) for seed in seeds),
            Num(value_std(c.mean, c.std, percent)),
        ]
        for c in selection.candidates
    ]
    intro = (
        f"The search's top {len(selection.candidates)} trials (--top-k {selection.top_k}), in the search's order, "
        f"were each retrained with seeds {seeds_list(seeds)} and scored on {protocol.val}; the best retrained mean "
        f"is finalized. A search score is the best of many noisy runs, so it tends to overstate its trial; a "
        f"retrained mean is picked among {len(selection.candidates)} only, so it is far less biased."
    )
    return _p(intro) + _table(header, rows) + _p(_overstated_text(selection))


def _overstated_text(selection: Selection) -> str:
    """How far the chosen trial's search score was from its retrained mean, and whether it is the search's best."""
    chosen, first = chosen_candidate(selection), selection.candidates[0]
    how = "overstated" if selection.overstated_by >= 0 else "understated"
    text = (
        f"The search score of trial #{chosen.number} {how} its retrained mean by "
        f"{abs(selection.overstated_by) * 100:.2f} points."
    )
    if chosen.number == first.number:
        return text + f" Trial #{chosen.number} is also the search's best."
    return text + (
        f" Trial #{chosen.number} is not the search's best: trial #{first.number} scored "
        f"{percent(first.value)} in the search, but {percent(first.mean)} on average retrained."
    )


def _per_seed_html(metrics: FinalMetrics) -> str:
    protocol = metrics.protocol
    header = [
        "configuration",
        "seed",
        "kept epoch",
        f"{protocol.val} accuracy",
        f"{protocol.test} accuracy",
        f"{protocol.test} accuracy, flip averaged",
        f"{protocol.test} macro-F1",
        "test_all accuracy",
    ]
    shipped = metrics.shipped
    mark = " (in the shipped ensemble)" if shipped.ensemble else " (shipped)"
    rows: list[list[Cell]] = []
    for kind, name, plain, flipped in retrained(metrics):
        for seed, r in plain.per_seed.items():
            rows.append(
                [
                    name + (mark if kind == "best" and int(seed) in shipped.seeds else ""),
                    Num(seed),
                    Num(str(r.best_epoch)),
                    Num(percent(r.val_acc)),
                    Num(percent(r.private_test.accuracy)),
                    Num(percent(flipped.per_seed[seed].private_test.accuracy)),
                    Num(three_places(r.private_test.macro_f1)),
                    Num(percent(r.test_all.accuracy)),
                ]
            )
    return _table(header, rows)


def _per_class_html(f: Finalized) -> str:
    baseline = compared_baseline(f)
    runs = shown_runs(f.shipped, baseline)
    header = [
        "expression",
        *(
            f"{'model.pt' if run.kind == 'best' else run_label(run)} {m}"
            for run in runs
            for m in ("precision", "recall", "F1")
        ),
        "support",
    ]
    rows = [
        [
            c,
            *(three_places(v) for run in runs for v in _scores(run.private_test.per_class[c])),
            str(f.shipped.private_test.per_class[c].support),
        ]
        for c in f.classes
    ]
    beside = (
        ""
        if baseline is None
        else f"; beside it the baseline's run of seed {baseline.seed}, a single model without flip averaging"
    )
    intro = _p(f"model.pt: {shipped_name(f.metrics)}{beside}.")
    return intro + _table(header, [_label_and_numbers(row) for row in rows])


def _scores(scores: ClassScores) -> tuple[float, float, float]:
    return scores.precision, scores.recall, scores.f1


def _baseline_trial_text(study: optuna.Study, val_split: str) -> str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    if baseline is None or baseline.value is None:  # a complete trial has its value: None only to the type checker
        return "The baseline has no complete trial in this study."
    return f"Baseline: trial #{baseline.number}, {val_split} accuracy {percent(baseline.value)} during the search."


def _params_html(number: int, best: TrialParams) -> str:
    baseline = BASELINE.to_dict()
    rows = [[k, _param(v), _param(baseline[k])] for k, v in best.to_dict().items()]
    return _table(["parameter", f"trial #{number} (finalized)", "baseline (documented configuration)"], rows)


def _param(value: Any, unused: str = "— (unused)") -> Cell:
    """A parameter's value as a cell: numbers right-aligned, words (choices, `unused`) left."""
    if value is None:
        return unused
    if isinstance(value, float):
        return Num(f"{value:.3g}")  # the exact values are in metrics.json and the study
    if isinstance(value, int) and not isinstance(value, bool):
        return Num(str(value))
    return str(value)


def _search_html(study: optuna.Study, metrics: FinalMetrics) -> str:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    rows: list[list[Cell]] = [[state.name, Num(str(states[state.name]))] for state in TrialState]
    # The search's best is the re-ranking's first candidate, which need not be the trial finalized.
    best = metrics.best_trial if metrics.selection is None else metrics.selection.candidates[0]
    return _p(f"{len(trials)} trials; best value {percent(best.value)} (trial #{best.number}).") + _table(
        ["state", "trials"], rows
    )


def _top_trials_html(study: optuna.Study, val_split: str) -> str:
    """The best complete trials: accuracy, epochs, duration, and the parameters in which they differ."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return _p("No trial has completed.")
    top = sorted(complete, key=lambda t: (-_objective(t), t.number))[:TOP_TRIALS]
    params = [full_params(t) for t in top]
    names = list(dict.fromkeys(name for p in params for name in p))
    differing = [n for n in names if len({repr(p.get(n)) for p in params}) > 1]
    # A zero-width space after each underscore lets a long parameter name wrap there, not widen the table.
    header = ["trial", f"{val_split} accuracy", "best epoch", "epochs run", "minutes"]
    header += [n.replace("_", "_\u200b") for n in differing]
    rows = [
        [
            f"#{t.number}" + (" (baseline)" if t.user_attrs.get("baseline") else ""),
            Num(percent(_objective(t))),
            _attr_cell(t, "best_epoch"),
            _attr_cell(t, "epochs_run"),
            _minutes_cell(t),
            *(_param(p.get(n), unused="—") for n in differing),
        ]
        for t, p in zip(top, params)
    ]
    same = [f"{n} {_cell_text(_param(params[0].get(n)))}" for n in names if n not in differing]
    intro = f"The {len(top)} best of {len(complete)} complete trials, and the parameters in which they differ."
    note = "— marks a parameter the trial does not use." + (f" Same in all of them: {', '.join(same)}." if same else "")
    return _p(intro) + _table(header, rows, "trials") + _p(note, "note")


def _objective(trial: FrozenTrial) -> float:
    """A complete trial's validation accuracy (the first objective of a study with more than one)."""
    return trial.values[0]


def _attr_cell(trial: FrozenTrial, name: str) -> Cell:
    value = trial.user_attrs.get(name)
    return "—" if value is None else Num(str(value))


def _minutes_cell(trial: FrozenTrial) -> Cell:
    """How long the trial ran, in minutes: one unit down the column, so that trials compare at a glance."""
    seconds = trial_seconds(trial)
    return "—" if seconds is None else Num(f"{seconds / 60:.1f}")


def _reproduce_html(metrics: FinalMetrics) -> str:
    provenance = [[f"version of {name}", str(v)] for name, v in metrics.versions.items()]
    provenance += [[f"git {k}", str(v)] for k, v in metrics.git.items()]
    provenance += [[f"data fingerprint ({split})", str(v)] for split, v in metrics.data.fingerprints.items()]
    listing = "\n".join(
        [
            "# the search: the command that created the study",
            metrics.commands.run or "# (not recorded: the study was created before fer-search recorded its command)",
            "# this report",
            metrics.commands.finalize,
        ]
    )
    return _p("Commands:") + f"<pre>{_e(listing)}</pre>" + _table(["", "value"], provenance)


def _figure_html(figures: dict[str, Plot], name: str, caption: str) -> str:
    """The figure inlined with its caption, and its note below; only the note where there is no figure."""
    plot = figures[name]
    note = "" if plot.note is None else _p(plot.note, "note")
    if plot.png is None:
        return note
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
        f"<figcaption>{_e(f'{name}: {caption}')}</figcaption></figure>" + note
    )


def _label_and_numbers(row: list[str]) -> list[Cell]:
    return [row[0], *(Num(c) for c in row[1:])]


def _table(header: list[str], rows: list[list[Cell]] | list[list[str]], css_class: str = "") -> str:
    """Text cells left-aligned, Num cells right-aligned, as is the heading of a column of numbers."""
    numeric = [bool(rows) and all(isinstance(row[i], Num) for row in rows) for i in range(len(header))]
    head = "".join(f"<th{_num_class(n)}>{_e(h)}</th>" for h, n in zip(header, numeric))
    body = "".join(
        "<tr>" + "".join(f"<td{_num_class(isinstance(c, Num))}>{_e(_cell_text(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    attr = f' class="{_e(css_class)}"' if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num_class(numeric: bool) -> str:
    return ' class="num"' if numeric else ""


def _cell_text(cell: Cell) -> str:
    return cell.text if isinstance(cell, Num) else cell


def _p(text: str, css_class: str = "") -> str:
    attr = f' class="{_e(css_class)}"' if css_class else ""
    return f"<p{attr}>{_e(text)}</p>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
