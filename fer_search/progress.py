"""How a running search or finalize shows itself: its events, its log lines' words, progress bars on a terminal."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger("fer_search")


@dataclass(frozen=True)
class Progress:
    """One trial's news for the live display: it started (epoch = the epochs it resumes after), an epoch
    ended, or it ended (state = its final state's name)."""

    worker: int
    trial: int
    epoch: int
    epochs: int
    val_acc: float
    best: float | None
    state: str = "RUNNING"  # STARTED, RUNNING, or COMPLETE, PRUNED, FAIL


@dataclass(frozen=True)
class StudyCount:
    """How many of the study's trials are finished, of the `trials` wanted: sent as a worker joins and as trials end."""

    finished: int
    trials: int


@dataclass(frozen=True)
class FinalizePlan:
    """How many epochs finalize has left to train from now on, over a phase's seed runs: sent before the
    first of the re-ranking's and before the first of the final seeds'; one bar and ETA count them all."""

    epochs: int


@dataclass(frozen=True)
class SeedEpoch:
    """One epoch of a finalize seed run ended."""

    label: str
    epoch: int
    epochs: int
    val_acc: float


# Gets each event, and the log lines to show above the live progress bars (str).
ProgressFn = Callable[[Progress | StudyCount | str], None]
FinalizeFn = Callable[[FinalizePlan | SeedEpoch | str], None]


def duration_text(seconds: float) -> str:
    """A duration as people read it, in the log lines and the report: 42 s, 12 min 05 s, 3 h 07 min."""
    whole = max(0, round(seconds))  # workers' clocks may disagree: never a negative time
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def percent(fraction: float) -> str:
    """An accuracy as the reports and the CLI print it: 48.68%."""
    return f"{fraction:.2%}"


def accuracy_text(value: float | None) -> str:
    """percent(value); '-' when there is none yet."""
    return "-" if value is None or math.isnan(value) else percent(value)


def count_text(n: int, noun: str) -> str:
    """`n` and the noun, plural unless n is 1: "1 trial", "2 trials"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def params_text(params: Mapping[str, Any]) -> str:
    """A trial's parameters on one line; the dropout rates a pattern leaves unused (None) are left out."""
    return " ".join(f"{k}={_short(v)}" for k, v in params.items() if v is not None)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cpu_estimate_text(epoch_s: float, epochs: int, trials_left: int, workers: int, largest: float) -> str:
    """What a first epoch on the CPU says of the study's length, at its pace and at the space's largest model's.

    `largest`: how many times this trial's compute (model.forward_flops) the largest model the space
    can draw takes (space.largest_model). An epoch's time on the CPU grows less than its compute (on
    2 cores the default space's largest model, 14.2x the baseline's compute, trained 63 images/s to
    its 577: 9.1x slower), so that figure is a bound, not a forecast.
    """
    rounds = epochs * math.ceil(trials_left / workers)
    # Under 1.05 the trial is as large as the space allows (its head alone may differ): "1.0x" says nothing.
    at_largest = (
        f" and up to {duration_text(epoch_s * largest * rounds)} if each drew the space's largest model, "
        f"{largest:.1f}x this one's compute"
        if largest >= 1.05
        else ""
    )
    return (
        f"on the CPU an epoch took {duration_text(epoch_s)}: the {count_text(trials_left, 'trial')} left, at up to "
        f"{epochs} epochs each over {count_text(workers, 'worker')} here, would take {duration_text(epoch_s * rounds)} "
        f"at this trial's pace{at_largest}; pruning stops most trials early, often halving that, and a GPU is many "
        "times faster"
    )


class Eta:
    """Time left for `total` units of work, at the pace of those done since it started."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.clock = total, 0, clock
        self.started = clock()

    def step(self) -> None:
        self.done += 1

    def seconds_left(self) -> float | None:
        """None before the first unit is done: there is no pace yet."""
        if not self.done:
            return None
        return (self.clock() - self.started) / self.done * max(0, self.total - self.done)


def bar_of(file: TextIO, position: int, desc: str, total: int, unit: str, initial: int = 0) -> tqdm:
    """A bar that says what is done of what, the time spent and the time left, and vanishes when closed."""
    # smoothing=0: the ETA from the average pace since the start, not from the last step alone
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=f" {unit}",
        position=position,
        leave=False,
        file=file,
        smoothing=0,
        dynamic_ncols=True,
        bar_format="{desc} |{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]",
    )


class SearchBars:
    """On a terminal: a bar for the study (trials finished, with its ETA) and one per local worker (its
    trial's epochs, with the trial's ETA); log lines are printed above them."""

    def __init__(self, file: TextIO = sys.stderr) -> None:
        self.file = file
        self.study: tqdm | None = None
        self.workers: dict[int, tqdm] = {}
        self.trials: dict[int, list[int]] = {}  # by worker: the trials its bar shows

    def __call__(self, event: Progress | StudyCount | str) -> None:
        if isinstance(event, str):
            tqdm.write(event, file=self.file)
        elif isinstance(event, StudyCount):
            self._count(event)
        else:
            self._trial(event)

    def _count(self, event: StudyCount) -> None:
        if self.study is None:
            # initial: the trials finished before this run, which tell nothing of its pace
            self.study = bar_of(self.file, 0, "study", event.trials, "trials", initial=event.finished)
        self.study.total = max(event.trials, event.finished)
        self.study.n = event.finished
        self.study.refresh()

    def _trial(self, event: Progress) -> None:
        bar = self.workers.get(event.worker)
        if bar is None:
            bar = self.workers[event.worker] = bar_of(
                self.file, 1 + event.worker, f"w{event.worker}", event.epochs, "epochs"
            )
        trials = self.trials.setdefault(event.worker, [])  # several at once when fused (run --fuse)
        if event.state == "STARTED":
            if not trials:
                bar.reset(total=event.epochs)
                bar.initial = bar.n = event.epoch  # a resumed trial's earlier epochs tell nothing of its pace
            trials.append(event.trial)
            bar.set_postfix_str(f"best {accuracy_text(event.best)}")
        elif event.state == "RUNNING":
            bar.n = event.epoch
            bar.set_postfix_str(f"val {accuracy_text(event.val_acc)} best {accuracy_text(event.best)}")
        elif event.trial in trials:
            trials.remove(event.trial)
        if trials:
            bar.set_description(f"w{event.worker} trial{'s' if len(trials) > 1 else ''} {','.join(map(str, trials))}")
        else:
            bar.set_description(f"w{event.worker} waiting for a trial")

    def close(self) -> None:
        for bar in [*self.workers.values(), *([self.study] if self.study else [])]:
            bar.close()


class FinalizeProgress:
    """finalize's progress: its notes as log lines; on a terminal a bar over all epochs left to train, with
    the ETA, elsewhere a log line per epoch that ends with the ETA."""

    def __init__(self, bar: bool, file: TextIO = sys.stderr) -> None:
        self.file = file
        self.use_bar = bar
        self.bar: tqdm | None = None
        self.eta: Eta | None = None

    def __call__(self, event: FinalizePlan | SeedEpoch | str) -> None:
        if isinstance(event, str):
            log.info(event)  # to stderr with its time, or on a terminal through write_line above the bar
        elif isinstance(event, FinalizePlan):
            if self.bar is not None:  # a later phase: its epochs come after those done
                self.bar.total = self.bar.n + event.epochs
                self.bar.refresh()
            elif self.eta is not None:
                self.eta.total = self.eta.done + event.epochs
            elif self.use_bar:  # the bar keeps its own time
                self.bar = bar_of(self.file, 0, "finalize", event.epochs, "epochs")
            else:
                self.eta = Eta(event.epochs)
        else:
            self._epoch(event)

    def write_line(self, line: str) -> None:
        """Print a log line above the bar (on a terminal, the log's lines come here: see errors.logging_to)."""
        tqdm.write(line, file=self.file)

    def _epoch(self, event: SeedEpoch) -> None:
        text = f"{event.label}: epoch {event.epoch}/{event.epochs} val_acc {accuracy_text(event.val_acc)}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text)
            log.debug(text)  # -v: every epoch above the bar too
            return
        if self.eta is None:  # no plan told (a caller that skips it): the epoch alone
            log.info("%s", text)
            return
        self.eta.step()
        left = self.eta.seconds_left()
        done = f"; finalize {self.eta.done}/{self.eta.total} epochs"
        log.info("%s%s%s", text, done, "" if left is None else f", about {duration_text(left)} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
