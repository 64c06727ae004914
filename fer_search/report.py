"""Finalize's self-contained HTML page, and writing every report file (text from tables.py); prints nothing."""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path
from typing import Any

import optuna

from fer_search.figures import report_figures, run_label, shown_runs
from fer_search.files import write_file
from fer_search.metrics import ClassScores
from fer_search.model import BASELINE, TrialParams
from fer_search.results import BestTrial, Finalized, FinalMetrics, SeedRun
from fer_search.tables import (
    epoch_accs_json,
    percent,
    recalls_precisions_text,
    retrained,
    seeds_text,
    spread_text,
    summary_rows,
    three_places,
)


def write_reports(out: Path, f: Finalized) -> list[Path]:
    """Write the reports into `out`, each atomically; the paths written, report.html last."""
    figures = report_figures(f)
    files = {
        "epoch_accs.json": epoch_accs_json(f.shipped, f.baseline).encode(),
        "recalls_precisions.txt": recalls_precisions_text(f.metrics, f.shipped, f.baseline, f.classes).encode(),
        **figures,
        "report.html": report_html(f.metrics, f.shipped, f.baseline, f.classes, f.study, figures).encode(),
    }
    for name, content in files.items():  # write_file creates `out`
        write_file(out / name, content)
    return [out / name for name in files]


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


def report_html(
    metrics: FinalMetrics,
    shipped: SeedRun,
    baseline: SeedRun | None,
    classes: tuple[str, ...],
    study: optuna.Study,
    figures: dict[str, bytes],
) -> str:
    """One page, every figure inlined: opens offline and can be mailed as it is."""
    protocol, best = metrics.protocol, metrics.best_trial
    test = protocol.test
    sections = [
        f"<h1>{_e(f'FER2013 expression recognition: final report for study {study.study_name}')}</h1>",
        _p(
            f"Trained on {protocol.train}; {protocol.val} chose the epoch, the shipped seed and the trial; "
            f"{protocol.test} is the held-out test split."
        ),
        "<h2>Headline</h2>",
        _headline_html(metrics),
        "<h2>Per-seed results</h2>",
        _per_seed_html(metrics),
        _figure_html(
            figures,
            "performance.png",
            "Training and validation curves of the shipped seed"
            + ("" if baseline is None else " and the baseline's run of the same seed"),
        ),
        f"<h2>{_e(f'Per-expression results on {test}')}</h2>",
        _per_class_html(shipped, baseline, classes),
        _figure_html(figures, "confusion.png", f"Confusion matrix of the shipped model on {test}"),
        _figure_html(figures, "misclassified.png", f"The shipped model's most confident mistakes on {test}"),
        "<h2>Configurations</h2>",
        _p(
            f"Best trial #{best.number}: {protocol.val} accuracy {percent(best.value)} during the search. "
            + _baseline_trial_text(study, protocol.val)
        ),
        _params_html(best.params),
        "<h2>Search</h2>",
        _search_html(study, best),
        _figure_html(figures, "search_history.png", "Optuna's optimization history (complete trials only)"),
        _figure_html(figures, "param_importances.png", "Optuna's parameter importances"),
        "<h2>Reproduce</h2>",
        _reproduce_html(metrics),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(f'fer-search report: {study.study_name}')}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _headline_html(metrics: FinalMetrics) -> str:
    protocol = metrics.protocol
    header = [
        "",
        f"{protocol.test} accuracy ({spread_text(metrics)})",
        f"{protocol.test} macro-F1",
        f"test_all accuracy: {protocol.test_all}",
    ]
    retrained = "The best trial and the baseline were" if metrics.baseline is not None else "The best trial was"
    parts = [
        _p(f"{retrained} retrained here under the same protocol, with seeds {seeds_text(metrics)}."),
        _table(header, summary_rows(metrics), "headline"),
    ]
    if metrics.baseline is None:
        parts.append(_p("The baseline was not retrained (finalize ran with --no-baseline)."))
    if protocol.val in protocol.test_all:
        parts.append(
            _p(
                f"test_all includes the validation split ({protocol.val}), which chose the epoch and "
                f"the shipped seed: it is not a held-out figure.",
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


def _per_seed_html(metrics: FinalMetrics) -> str:
    protocol = metrics.protocol
    header = [
        "configuration",
        "seed",
        "kept epoch",
        f"{protocol.val} accuracy",
        f"{protocol.test} accuracy",
        f"{protocol.test} macro-F1",
        "test_all accuracy",
    ]
    rows = []
    for kind, name, agg in retrained(metrics):
        for seed, r in agg.per_seed.items():
            shipped = " (shipped)" if kind == "best" and int(seed) == metrics.shipped_seed else ""
            rows.append(
                [
                    name + shipped,
                    seed,
                    str(r.best_epoch),
                    percent(r.val_acc),
                    percent(r.private_test.accuracy),
                    three_places(r.private_test.macro_f1),
                    percent(r.test_all.accuracy),
                ]
            )
    return _table(header, rows)


def _per_class_html(shipped: SeedRun, baseline: SeedRun | None, classes: tuple[str, ...]) -> str:
    runs = shown_runs(shipped, baseline)
    header = [
        "expression",
        *(f"{run_label(run)} {m}" for run in runs for m in ("precision", "recall", "F1")),
        "support",
    ]
    rows = [
        [
            c,
            *(three_places(v) for run in runs for v in _scores(run.private_test.per_class[c])),
            str(shipped.private_test.per_class[c].support),
        ]
        for c in classes
    ]
    return _table(header, rows)


def _scores(scores: ClassScores) -> tuple[float, float, float]:
    return scores.precision, scores.recall, scores.f1


def _baseline_trial_text(study: optuna.Study, val_split: str) -> str:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    if baseline is None or baseline.value is None:  # a complete trial has its value: None only to the type checker
        return "The baseline has no complete trial in this study."
    return f"Baseline: trial #{baseline.number}, {val_split} accuracy {percent(baseline.value)} during the search."


def _params_html(best: TrialParams) -> str:
    baseline = BASELINE.to_dict()
    rows = [[k, _param(v), _param(baseline[k])] for k, v in best.to_dict().items()]
    return _table(["parameter", "best trial", "baseline (documented configuration)"], rows)


def _param(value: Any) -> str:
    if value is None:
        return "— (unused)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _search_html(study: optuna.Study, best: BestTrial) -> str:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    rows = [[state.name, str(states[state.name])] for state in optuna.trial.TrialState]
    return _p(f"{len(trials)} trials; best value {best.value:.4f} (trial #{best.number}).") + _table(
        ["state", "trials"], rows
    )


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


def _figure_html(figures: dict[str, bytes], name: str, caption: str) -> str:
    data = base64.b64encode(figures[name]).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
        f"<figcaption>{_e(f'{name}: {caption}')}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{_e(css_class)}"' if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str, css_class: str = "") -> str:
    attr = f' class="{_e(css_class)}"' if css_class else ""
    return f"<p{attr}>{_e(text)}</p>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
