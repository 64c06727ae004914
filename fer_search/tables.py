"""Finalize's plain text: the printed summary, recalls_precisions.txt, epoch_accs.json, and the number formats."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fer_search.figures import best_is_baseline, best_name, shown_runs
from fer_search.metrics import ClassificationReport
from fer_search.progress import percent
from fer_search.results import Aggregate, FinalMetrics, SeedRun, Splits


def summary_text(metrics: FinalMetrics, out: Path, files: list[Path]) -> str:
    """What finalize prints: each configuration's test accuracies over seeds, the shipped seed, the files written."""
    best = metrics.best_trial
    return "\n".join(
        [
            f"{best_name(metrics)} (val {percent(best.value)}): {_accuracies_text(metrics.best)}",
            f"baseline: {_baseline_summary(metrics)}",
            f"shipped seed {metrics.shipped_seed}; wrote {len(files)} files to {out}",
        ]
    )


def _baseline_summary(metrics: FinalMetrics) -> str:
    if metrics.baseline is None:
        return "not retrained (--no-baseline)"
    if best_is_baseline(metrics):
        return "the best trial is the baseline configuration: the same runs as above (each seed trained once)"
    return _accuracies_text(metrics.baseline)


def _accuracies_text(agg: Aggregate) -> str:
    seeds = len(agg.per_seed)
    return (
        f"private_test {_mean_std(agg, _test_accuracy, percent)}, "
        f"test_all {_mean_std(agg, _test_all_accuracy, percent)} ({seeds} seed{'' if seeds == 1 else 's'})"
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
    """Aligned per-expression tables for the shipped model (and the baseline), then the means over seeds."""
    protocol = metrics.protocol
    lines = [
        f"Per-expression results on {protocol.test} (trained on {protocol.train}, "
        f"epoch and shipped seed chosen on {protocol.val})",
        "",
    ]
    for run in shown_runs(shipped, baseline):
        what = (
            f"Best trial #{metrics.best_trial.number}, shipped seed"
            if run.kind == "best"
            else "Baseline (the documented configuration, retrained here), seed"
        )
        lines += [
            f"{what} {run.seed} (weights of epoch {run.best_epoch})",
            *_class_table_lines(run.private_test, classes),
            "",
        ]
    if metrics.baseline is None:
        lines += ["Baseline: not retrained (finalize ran with --no-baseline)", ""]
    elif best_is_baseline(metrics):
        lines += [same_runs_text(metrics), ""]
    lines += _seed_summary_lines(metrics)
    return "\n".join(lines) + "\n"


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
        ["", f"{protocol.test} accuracy", f"{protocol.test} macro-F1", "test_all accuracy *"],
        *summary_rows(metrics),
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        f"Summary over seeds {seeds_text(metrics)} ({spread_text(metrics)})",
        *("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table),
        f"  * test_all = {protocol.test_all}",
    ]


def retrained(metrics: FinalMetrics) -> list[tuple[str, str, Aggregate]]:
    """(kind, name, aggregate over seeds) for the best trial and, when retrained apart, the baseline."""
    rows = [("best", best_name(metrics), metrics.best)]
    if metrics.baseline is not None and not best_is_baseline(metrics):
        rows.append(("baseline", "baseline", metrics.baseline))
    return rows


def summary_rows(metrics: FinalMetrics) -> list[list[str]]:
    """Per configuration: test accuracy, test macro-F1, test_all accuracy, each mean ± std over seeds."""
    return [
        [
            name,
            _mean_std(agg, _test_accuracy, percent),
            _mean_std(agg, _test_macro_f1, three_places),
            _mean_std(agg, _test_all_accuracy, percent),
        ]
        for _, name, agg in retrained(metrics)
    ]


def _test_accuracy(splits: Splits) -> float:
    return splits.private_test.accuracy


def _test_macro_f1(splits: Splits) -> float:
    return splits.private_test.macro_f1


def _test_all_accuracy(splits: Splits) -> float:
    return splits.test_all.accuracy


def seeds_text(metrics: FinalMetrics) -> str:
    return ", ".join(str(s) for s in metrics.seeds)


def spread_text(metrics: FinalMetrics) -> str:
    seeds = metrics.seeds
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]} only, no spread"


def _mean_std(agg: Aggregate, figure: Callable[[Splits], float], fmt: Callable[[float], str]) -> str:
    mean = fmt(figure(agg.mean))
    return mean if agg.std is None else f"{mean} ± {fmt(figure(agg.std))}"


def three_places(value: float) -> str:
    return f"{value:.3f}"
