"""What studies hold, at a glance: the `status` and `studies` documents. Imports no torch, so both start fast."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def study_status(study: optuna.Study, now: datetime | None = None) -> dict[str, Any]:
    """The `status --json` document: trials by state, the best trial, the baseline, training time
    (`seconds`, the running trials' time so far, `running_seconds`, included) as of `now` (default: now)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=_value, default=None)
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    finished_baselines = [t for t in baselines if t.state in FINISHED]
    baseline = (finished_baselines or baselines)[-1] if baselines else None
    seconds = sum(s for t in trials if (s := trial_seconds(t)) is not None)
    running = running_seconds(trials, datetime.now() if now is None else now)
    return {
        "study": study.study_name,
        "trials": counts,
        "best": None if best is None else {"number": best.number, "value": best.value, "params": full_params(best)},
        "baseline": None
        if baseline is None
        else {"number": baseline.number, "value": baseline.value, "state": baseline.state.name},
        "seconds": round(seconds + running, 3),
        "running_seconds": round(running, 3),
        "baseline_excluded": bool(study.user_attrs.get("baseline_excluded", False)),
    }


def running_seconds(trials: list[FrozenTrial], now: datetime) -> float:
    """The running trials' time so far.

    Optuna stamps datetime_start with the worker's naive local datetime.now(), so `now` must be a
    naive local time too. A worker whose clock (or time zone) is ahead of ours would give a
    negative time: it counts as none.
    """
    return sum(
        max(0.0, (now - t.datetime_start).total_seconds())
        for t in trials
        if t.state == TrialState.RUNNING and t.datetime_start
    )


def studies_status(storage: BaseStorage) -> list[dict[str, Any]]:
    """The `studies --json` document: every study's status document, in the storage's order (oldest first).

    Each study is loaded in full rather than read from get_all_study_summaries: the summaries hold
    no counts by state, no baseline and no training time, which need every trial anyway.
    """
    now = datetime.now()  # one moment for every study
    docs = []
    for name in optuna.study.get_all_study_names(storage):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # deleted (optuna-dashboard can) since it was listed
            continue
        docs.append(study_status(study, now))
    return docs


def retried_from(trial: FrozenTrial) -> int | None:
    """The trial this one took over, or None for a fresh trial.

    A stale trial's retry names it last in Optuna's `retry_history` system attribute, a Ctrl-C's
    requeue in the user attribute `resumed_from`. The history comes first: a retry copies its
    trial's user attributes, an older `resumed_from` among them.
    """
    history = trial.system_attrs.get("retry_history")
    if isinstance(history, list) and history:
        return int(history[-1])
    resumed = trial.user_attrs.get("resumed_from")
    return resumed if isinstance(resumed, int) else None


def _value(trial: FrozenTrial) -> float:
    return trial.value if trial.value is not None else -math.inf  # a COMPLETE trial always has one


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; None before the first trial completes."""
    try:
        return study.best_trial
    except ValueError:
        return None


def best_value(study: optuna.Study) -> float | None:
    """The best complete trial's value; None before the first trial completes."""
    best = best_trial(study)
    return None if best is None else best.value


def trial_seconds(trial: FrozenTrial) -> float | None:
    """How long a trial ran, by its storage's timestamps; None for one that has not ended (or never started)."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def full_params(trial: FrozenTrial) -> dict[str, Any]:
    """The trial's TrialParams as recorded by its worker (fixed values included), else Optuna's params."""
    recorded = trial.user_attrs.get("trial_params")
    return recorded if isinstance(recorded, dict) else dict(trial.params)


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
