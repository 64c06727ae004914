"""Replays a study's recorded learning curves under other pruner settings: epochs each would train.

    python benchmarks/pruner_replay.py --storage sqlite:///KEEP/b.db [--study fer2013]

Feeds the study's finished trials, in their order, to a fresh in-memory study per pruner setting
(Optuna's own pruner objects), reporting each trial's recorded validation accuracies epoch by
epoch until the pruner stops it. A trial the original study pruned has no curve past its pruning
epoch: if a setting lets it go further, what it would have trained is unknown, so the replay
gives two figures, counting such a trial as stopped there (low) or as trained to the end
(high). It also says whether the study's best trial, and how many of its five best, survive. The
sampler is not replayed: a study run with another pruner would have drawn other trials after its
first prunings.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

SETTINGS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median startup 5, warm-up 5": lambda e: optuna.pruners.MedianPruner(5, 5),
    "median startup 5, warm-up 3": lambda e: optuna.pruners.MedianPruner(5, 3),
    "median startup 5, warm-up 2": lambda e: optuna.pruners.MedianPruner(5, 2),
    "percentile 25 (top quarter kept), startup 5, warm-up 5": lambda e: optuna.pruners.PercentilePruner(25, 5, 5),
    "percentile 25, startup 5, warm-up 3": lambda e: optuna.pruners.PercentilePruner(25, 5, 3),
    "percentile 33, startup 5, warm-up 3 (the default)": lambda e: optuna.pruners.PercentilePruner(33, 5, 3),
    "hyperband min 2, factor 3": lambda e: optuna.pruners.HyperbandPruner(2, e, 3),
    "hyperband min 1, factor 3": lambda e: optuna.pruners.HyperbandPruner(1, e, 3),
}


def replay(
    trials: list[FrozenTrial], pruner: optuna.pruners.BasePruner, epochs: int, name: str
) -> tuple[int, int, set[int]]:
    """(epochs trained counting unknown tails as stopped, the same counting them as trained, survivors)."""
    # The original's name: Hyperband assigns trials to brackets by a hash of study name and number.
    study = optuna.create_study(
        study_name=name, direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(0)
    )
    low = high = 0
    survivors = set()
    for recorded in trials:
        curve = sorted(recorded.intermediate_values.items())
        trial = study.ask()
        stopped = None
        for step, value in curve:
            trial.report(value, step)
            if trial.should_prune():
                stopped = step
                break
        if stopped is not None:
            study.tell(trial, state=TrialState.PRUNED)
            low, high = low + stopped, high + stopped
            continue
        study.tell(trial, max(v for _, v in curve))
        low += len(curve)
        high += epochs if recorded.state == TrialState.PRUNED else len(curve)
        survivors.add(recorded.number)
    return low, high, survivors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", default="fer2013")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    epochs = int(study.user_attrs["epochs"])
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    best = study.best_trial.number
    top5 = {t.number for t in sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[:5]}
    recorded = sum(len(t.intermediate_values) for t in trials)
    print(
        f"study={args.study} trials={len(trials)} epochs={epochs} best_trial={best} "
        f"recorded_epochs={recorded} unpruned_epochs={len(trials) * epochs}"
    )
    for name, make in SETTINGS.items():
        low, high, survivors = replay(trials, make(epochs), epochs, args.study)
        share = f"{low / (len(trials) * epochs):.2f}-{high / (len(trials) * epochs):.2f}"
        print(
            f"{name}: epochs {low}-{high} (share of unpruned {share}); {len(survivors)} run to the end; "
            f"best trial {'kept' if best in survivors else 'PRUNED'}; {len(top5 & survivors)} of the top 5 kept"
        )


if __name__ == "__main__":
    main()
