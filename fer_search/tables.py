"""Finalize's plain text: the printed summary, recalls_precisions.txt, epoch_accs.json, and the number formats."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fer_search.figures import best_is_baseline, best_name, seeds_list, shipped_name, shown_runs
from fer_search.metrics import ClassificationReport
from fer_search.progress import percent
from fer_search.results import Aggregate, Candidate, FinalMetrics, Scored, SeedRun, Selection, Splits


def summary_text(metrics: FinalMetrics, out: Path, files: list[Path]) -> str:
    """What finalize prints: the trial finalized and how it was chosen, its test accuracies single, flip averaged
    and ensembled, the baseline's, what model.pt is, the files written."""
    lines = [f"{best_name(metrics)}: {_chosen_summary(metrics)}"]
    for kind, name, plain, flipped in retrained(metrics):
        seeds = len(plain.per_seed)
        lines.append(
            f"{name}, private_test: single model {_mean_std(plain, _test_accuracy, percent)}, flip averaged "
            f"{_mean_std(flipped, _test_accuracy, percent)} ({seeds} seed{'' if seeds == 1 else 's'})"
        )
        if kind == "best" and metrics.ensemble is not None:
            ensemble = metrics.ensemble
            lines.append(
                f"{name}, private_test: ensemble (seeds {seeds_list(ensemble.seeds)}) "
                f"{percent(ensemble.plain.private_test.accuracy)}, "
                f"flip averaged {percent(ensemble.flipped.private_test.accuracy)}"
            )
    if metrics.baseline is None:
        lines.append("baseline: not retrained (--no-baseline)")
    elif best_is_baseline(metrics):
        lines.append(
            "baseline: the best trial is the baseline configuration: the same runs as above (each seed trained once)"
        )
    lines.append(
        f"model.pt: {shipped_name(metrics)}, private_test {percent(metrics.shipped.private_test.accuracy)}; "
        f"wrote {len(files)} files to {out}"
    )
    return "\n".join(lines)


def _chosen_summary(metrics: FinalMetrics) -> str:
    """How the finalized trial was chosen: the search's best as it is, or the re-ranking's choice."""
    selection = metrics.selection
    if selection is None:
        return f"search {percent(metrics.best_trial.value)} (the search's best, not re-ranked)"
    chosen = chosen_candidate(selection)
    return (
        f"re-ranked from the top {len(selection.candidates)}: search {percent(chosen.value)}, retrained mean "
        f"{value_std(chosen.mean, chosen.std, percent)} (seeds {seeds_list(selection.seeds)})"
    )


def same_runs_text(metrics: FinalMetrics) -> str:
    """What a reader must be told where the best trial is the baseline, lest two identical rows puzzle them."""
    return (
        f"The best trial found (#{metrics.best_trial.number}) is the baseline configuration: finalize trained "
        f"each seed once, so the best trial's runs are the baseline's, shown once."
    )


def epoch_accs_json(shipped: SeedRun, baseline: SeedRun | None) -> str:
    return json.dumps({"best": shipped.history, "baseline": baseline.history if baseline else None}, indent=2)


def recalls_precisions_text(
    metrics: FinalMetrics, shipped: SeedRun, baseline: SeedRun | None, classes: tuple[str, ...]
) -> str:
    """Aligned per-expression tables for the shipped model (and the baseline), then the headline's rows."""
    protocol = metrics.protocol
    lines = [
        f"Per-expression results on {protocol.test} (trained on {protocol.train}; {protocol.val} chose "
        f"{chosen_on_val_text(metrics)})",
        "",
    ]
    for run in shown_runs(shipped, baseline):
        what = (
            f"Shipped model (model.pt): {shipped_name(metrics)} ({_kept_epochs_text(metrics, run)})"
            if run.kind == "best"
            else f"Baseline (the documented configuration, retrained here): seed {run.seed}, single model, "
            f"without flip averaging (weights of epoch {run.best_epoch})"
        )
        lines += [what, *_class_table_lines(run.private_test, classes), ""]
    if metrics.baseline is None:
        lines += ["Baseline: not retrained (finalize ran with --no-baseline)", ""]
    elif best_is_baseline(metrics):
        lines += [same_runs_text(metrics), ""]
    lines += _seed_summary_lines(metrics)
    return "\n".join(lines) + "\n"


def chosen_on_val_text(metrics: FinalMetrics) -> str:
    """What the validation split chose, as the reports list it."""
    chosen = ["each run's epoch", "the re-ranked trial" if metrics.selection is not None else "the trial"]
    if metrics.flip.mode == "auto":
        chosen.append("whether to flip")
    if not metrics.shipped.ensemble:
        chosen.append("the shipped seed")
    return ", ".join(chosen[:-1]) + f" and {chosen[-1]}"


def _kept_epochs_text(metrics: FinalMetrics, shipped: SeedRun) -> str:
    """The epochs whose weights model.pt holds: the shipped seed's, or each ensembled seed's."""
    if not metrics.shipped.ensemble:
        return f"weights of epoch {shipped.best_epoch}"
    epochs = [metrics.best.per_seed[str(seed)].best_epoch for seed in metrics.shipped.seeds]
    return f"weights of epochs {seeds_list(epochs)}"


def _class_table_lines(report: ClassificationReport, classes: tuple[str, ...]) -> list[str]:
    width = max(len("expression"), *(len(c) for c in classes))
    lines = [f"  {'expression':<{width}}  precision  recall     F1  support"]
    for c in classes:
        m = report.per_class[c]
        lines.append(f"  {c:<{width}}  {m.precision:9.3f}  {m.recall:6.3f}  {m.f1:5.3f}  {m.support:7d}")
    lines.append(f"  accuracy {report.accuracy:.2%}, macro-F1 {report.macro_f1:.3f} ({report.n} images)")
    return lines


def _seed_summary_lines(metrics: FinalMetrics) -> list[str]:
    protocol = metrics.protocol
    table = [
        summary_header(metrics, test_all_note=" *"),
        *([row.name, *row.numbers, row.shipped] for row in summary_rows(metrics)),
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        f"Summary over seeds {seeds_list(metrics.seeds)} (single models: {spread_text(metrics)})",
        *("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table),
        f"  * test_all = {protocol.test_all}",
    ]


def retrained(metrics: FinalMetrics) -> list[tuple[str, str, Aggregate, Aggregate]]:
    """(kind, name, single models, flip averaged) over seeds, for the best trial and, when retrained apart, the
    baseline."""
    rows = [("best", best_name(metrics), metrics.best, metrics.best_flipped)]
    if metrics.baseline is not None and not best_is_baseline(metrics):
        assert metrics.baseline_flipped is not None  # finalize flips every configuration it retrains
        rows.append(("baseline", "baseline", metrics.baseline, metrics.baseline_flipped))
    return rows


@dataclass(frozen=True)
class SummaryRow:
    """One model of the headline: the trial finalized or the baseline, single (over seeds) or the seeds'
    ensemble, predicting plainly or flip averaged."""

    name: str
    numbers: list[str]  # validation accuracy, test accuracy, test macro-F1, test_all accuracy
    shipped: str  # what model.pt is of this row, on the row it is; else empty


def summary_header(metrics: FinalMetrics, test_all_note: str = "") -> list[str]:
    """The headings of summary_rows' columns: the name, the numbers, the shipped mark."""
    protocol = metrics.protocol
    return [
        "",
        f"{protocol.val} accuracy",
        f"{protocol.test} accuracy",
        f"{protocol.test} macro-F1",
        f"test_all accuracy{test_all_note}",
        "model.pt",
    ]


FLIPPED = {False: "", True: ", flip averaged"}  # by whether a row's model averages each face with its mirror image


def summary_rows(metrics: FinalMetrics) -> list[SummaryRow]:
    """Each configuration single (mean ± std over seeds) and flip averaged, the best trial's ensemble (when there
    are several seeds) plain and flip averaged, the row model.pt is (one seed of, for a single model) marked."""
    shipped = metrics.shipped
    rows = []
    for kind, name, plain, flipped in retrained(metrics):
        for agg, flip in ((plain, False), (flipped, True)):
            mark = kind == "best" and not shipped.ensemble and shipped.flip == flip
            rows.append(
                SummaryRow(
                    f"{name}, single model{FLIPPED[flip]}",
                    _aggregate_numbers(agg),
                    f"shipped: model.pt is seed {shipped.seeds[0]}" if mark else "",
                )
            )
        if kind == "best" and metrics.ensemble is not None:
            ensemble = metrics.ensemble
            for scored, flip in ((ensemble.plain, False), (ensemble.flipped, True)):
                mark = shipped.ensemble and shipped.flip == flip
                rows.append(
                    SummaryRow(
                        f"{name}, ensemble of seeds {seeds_list(ensemble.seeds)}{FLIPPED[flip]}",
                        _scored_numbers(scored),
                        "shipped: model.pt" if mark else "",
                    )
                )
    return rows


def _aggregate_numbers(agg: Aggregate) -> list[str]:
    val_accs = [r.val_acc for r in agg.per_seed.values()]
    return [
        value_std(statistics.fmean(val_accs), statistics.stdev(val_accs) if len(val_accs) > 1 else None, percent),
        _mean_std(agg, _test_accuracy, percent),
        _mean_std(agg, _test_macro_f1, three_places),
        _mean_std(agg, _test_all_accuracy, percent),
    ]


def _scored_numbers(scored: Scored) -> list[str]:
    return [
        percent(scored.val_acc),
        percent(scored.private_test.accuracy),
        three_places(scored.private_test.macro_f1),
        percent(scored.test_all.accuracy),
    ]


def chosen_candidate(selection: Selection) -> Candidate:
    """The re-ranking's candidate that was finalized."""
    return next(c for c in selection.candidates if c.number == selection.chosen)


def _test_accuracy(splits: Splits) -> float:
    return splits.private_test.accuracy


def _test_macro_f1(splits: Splits) -> float:
    return splits.private_test.macro_f1


def _test_all_accuracy(splits: Splits) -> float:
    return splits.test_all.accuracy


def spread_text(metrics: FinalMetrics) -> str:
    seeds = metrics.seeds
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]} only, no spread"


def _mean_std(agg: Aggregate, figure: Callable[[Splits], float], fmt: Callable[[float], str]) -> str:
    return value_std(figure(agg.mean), None if agg.std is None else figure(agg.std), fmt)


def value_std(value: float, std: float | None, fmt: Callable[[float], str]) -> str:
    """A mean and its standard deviation, as the reports write them: 48.68% ± 0.35%; the value alone without one."""
    return fmt(value) if std is None else f"{fmt(value)} ± {fmt(std)}"


def three_places(value: float) -> str:
    return f"{value:.3f}"
