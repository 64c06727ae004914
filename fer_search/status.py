"""What a study holds, at a glance: the `status` document. Imports no torch, so `status` starts fast."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def study_status(study: optuna.Study) -> dict[str, Any]:
    """The `status --json` document: trials by state, the best trial, the baseline, training time."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=_value, default=None)
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    finished_baselines = [t for t in baselines if t.state in FINISHED]
    baseline = (finished_baselines or baselines)[-1] if baselines else None
    seconds = sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_complete and t.datetime_start
    )
    return {
        "study": study.study_name,
        "trials": counts,
        "best": None
        if best is None
        else {"number": best.number, "value": best.value, "params": best.user_attrs.get("trial_params", best.params)},
        "baseline": None
        if baseline is None
        else {"number": baseline.number, "value": baseline.value, "state": baseline.state.name},
        "seconds": round(seconds, 3),
    }


def _value(trial: FrozenTrial) -> float:
    return trial.value if trial.value is not None else -math.inf  # a COMPLETE trial always has one


def best_value(study: optuna.Study) -> float | None:
    """The best complete trial's value; None before the first trial completes."""
    try:
        return study.best_value
    except ValueError:
        return None


@dataclass(frozen=True)
class TrialCounts:
    """What a worker weighs before taking a trial: finished ones count towards --trials."""

    finished: int
    running: int
    waiting: int


def count_trials(study: optuna.Study) -> TrialCounts:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return TrialCounts(
        sum(s in FINISHED for s in states), states.count(TrialState.RUNNING), states.count(TrialState.WAITING)
    )
