"""The search: workers take trials until the study holds enough, surviving dead workers, Ctrl-C and stale trials."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from fer_search.config import Config
from fer_search.data import load_configured
from fer_search.errors import Crashed, UserError, first_line, log_level, logging_to
from fer_search.fuse import SHARED_FIELDS, Member, fuse_key, train_fused
from fer_search.model import TrialParams
from fer_search.objective import (
    FAIL_REASON,
    STARTED,
    Objective,
    OutOfMemory,
    TrialRun,
    is_out_of_memory,
    record_error,
)
from fer_search.processes import (
    ChildError,
    ended_interrupted,
    how_it_ended,
    interrupts_deferred,
    raise_if_interrupted,
    run_child,
    signals_deferred,
    signals_held,
    spawn_context,
    stopped_on_leaving_early,
)
from fer_search.progress import Progress, ProgressFn, StudyCount, accuracy_text, duration_text, params_text
from fer_search.status import best_trial, count_trials, full_params, retried_from, study_status, trial_seconds
from fer_search.storage import Heartbeat, LoggedRetry, TrialClaim, disk_full_error, opened_storage, stale_retry
from fer_search.study import ensure_study, make_pruner, make_sampler, quiet_optuna, study_record
from fer_search.train import TrainResult, configure_cpu_threads, resolve_device

log = logging.getLogger("fer_search")


@dataclass(frozen=True)
class RunOutcome:
    """How `run` ended: the study's status document, and whether --timeout stopped it short."""

    timed_out: bool
    status: dict[str, Any]


def worker_device(name: str, worker_index: int) -> torch.device:
    """Spread local workers over the GPUs; with one GPU they share it."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker_index % torch.cuda.device_count())
    return device


def run_worker(
    config: Config,
    worker_index: int = 0,
    local_workers: int = 1,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> RunOutcome:
    """Take trials until the study holds config.run.trials finished ones, counted over all workers."""
    quiet_optuna()
    configure_cpu_threads(local_workers)
    device = worker_device(config.run.device, worker_index)
    data = load_configured(config.data)  # train and val: the search never sees the test set
    run = config.run
    heartbeat = Heartbeat(run.heartbeat_interval, run.grace_period, run.max_retry)
    with opened_storage(config.study.storage, heartbeat) as storage:
        study = ensure_study(
            config,
            storage,
            study_record(config, data.fingerprints),
            make_pruner(config.pruner, run.epochs),
            command,
        )
        # Once the study is there: its trials, the baseline and other workers' included, seed the sampler.
        study.sampler = make_sampler(run.seed, worker_index, len(study.get_trials(deepcopy=False)))
        retry = stale_retry(storage)
        if progress is not None:
            progress(StudyCount(count_trials(study).finished, run.trials))
        objective = Objective(config, data, device, worker_index, progress)
        return _take_trials(study, objective, progress, retry, TrialClaim(storage, study.study_name))


def _take_trials(
    study: optuna.Study,
    objective: Objective,
    progress: ProgressFn | None,
    retry: LoggedRetry | None,
    claim: TrialClaim,
) -> RunOutcome:
    run = objective.config.run
    deadline = time.monotonic() + run.timeout if run.timeout else None
    orphans = OrphanWatch(run.grace_period, retry)
    try:
        while True:
            try:
                claim.take()  # from the count to the trial's start: what this worker counted, it takes
                # Failing a dead worker's trial and queueing its retry take two writes: under the claim, no
                # worker counts in between, when it would see room for a fresh trial and leave the retry waiting.
                fail_dead_trials(study, orphans)
                counts = count_trials(study)
                # A queued trial (a retry, a Ctrl-C's requeue) runs even once the study holds enough: it is a
                # trial somebody started, and a study must never end with one left waiting.
                if counts.finished >= run.trials and not counts.waiting:
                    return RunOutcome(timed_out=False, status=study_status(study))
                if deadline is not None and time.monotonic() >= deadline:
                    return RunOutcome(timed_out=True, status=study_status(study))
                if not counts.waiting and counts.finished + counts.running >= run.trials:
                    claim.release()
                    time.sleep(run.wait_poll_s)  # others are finishing the last trials; wait to retry the dead
                    continue
                if run.fuse > 1:
                    # Room left in --trials, or the queued trials (a fused group's requeued members fuse again).
                    size = min(run.fuse, max(1, run.trials - counts.finished - counts.running, counts.waiting))
                    _take_fused(study, objective, size, progress, claim.release)
                    continue
                try:
                    study.optimize(
                        _stopping_past_optuna(objective, claim.release),
                        n_trials=1,
                        catch=(OutOfMemory,),
                        gc_after_trial=False,
                    )
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
                    # Optuna's tell refuses (ValueError) the trial another worker failed as stale
                    # while this one trained it: its heartbeats had not reached the storage for a
                    # grace period. That worker queued a retry, which resumes from the checkpoint.
                    if not (objective.failed_elsewhere or isinstance(e, optuna.exceptions.UpdateFinishedTrialError)):
                        raise
                    for number in objective.current:
                        log.warning("trial %d was failed as stale by another worker; its retry takes over", number)
            finally:
                claim.release()
            ended, objective.current = objective.current, []  # ended: Ctrl-C must not requeue it
            for number in ended:
                _tell_end(study, objective, trial_numbered(study, number), progress)
    except (KeyboardInterrupt, _Stopped) as e:
        cause = e.cause if isinstance(e, _Stopped) else e
        with signals_held():  # a second Ctrl-C or SIGTERM must not cut the saving short
            queued = [requeue_interrupted(study, number) for number in objective.current]
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        raise UserError(_full_disk_message(cause, objective.current, all(queued), run.grace_period)) from None
    except Exception as e:
        full = disk_full_error(e)
        if full is None:
            raise
        raise UserError(_full_disk_message(full, [], False, run.grace_period)) from None


class _Stopped(BaseException):
    """Ctrl-C, SIGTERM or a full disk during a trial, carried past Optuna, which fails a trial whose
    objective raises an Exception or a KeyboardInterrupt.

    Why: a failed trial lives on only if its copy can be queued, and the storage may refuse that (a
    full disk, a lost connection): the trial would be lost. Left RUNNING, it is queued again first and
    failed after (requeue_interrupted); if the storage refuses, it stays RUNNING, its heartbeat stops
    with this process, and the next run fails it as stale and retries it from its checkpoint.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(first_line(cause))
        self.cause = cause


def _stopping_past_optuna(objective: Objective, asked: Callable[[], None]) -> Callable[[optuna.Trial], float]:
    """The objective, calling `asked` first (Optuna has asked for its trial), and raising _Stopped in
    place of an interrupt or a full disk."""

    def run(trial: optuna.Trial) -> float:
        try:
            asked()  # inside: Optuna fails the trial of an interrupt that escapes, with no copy queued yet
            return objective(trial)
        except KeyboardInterrupt as e:
            raise _Stopped(e) from None
        except Exception as e:
            full = disk_full_error(e)
            if full is None:
                raise
            raise _Stopped(full) from None

    return run


def _full_disk_message(full: BaseException, numbers: list[int], queued: bool, grace_period: int) -> str:
    then = "free some space, then run the same command again"
    if numbers:
        trials = f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
        then += (
            f": it resumes {trials}, queued again"
            if queued
            else f": it retries {trials} once the trial's heartbeat is {grace_period} s old"
        )
    return f"cannot write ({first_line(full)}): is the disk full? {then}"


def _take_fused(
    study: optuna.Study, objective: Objective, size: int, progress: ProgressFn | None, asked: Callable[[], None]
) -> None:
    """Take up to `size` trials that share the first one's architecture (fuse.SHARED_FIELDS) and train them as one
    batched model, each reported, pruned, checkpointed and told on its own; tell each as it ends.
    `asked` is called once all are taken."""
    beats: dict[int, Any] = {}  # trial number -> its heartbeat thread, which Optuna's optimize would run
    runs: list[TrialRun] = []
    try:
        for _ in range(size):
            with _sampling_like(study, runs[0].params if runs else None):
                trial = study.ask()
                objective.current.append(trial.number)
                beats[trial.number] = get_heartbeat_thread(trial._trial_id, study._storage)
                beats[trial.number].__enter__()
                runs.append(objective.start(trial))
        asked()
        groups: dict[tuple[Any, ...], list[TrialRun]] = {}
        for r in runs:  # a queued trial (a retry, a requeue) taken on the way may have another architecture
            groups.setdefault(fuse_key(r.params), []).append(r)
        for group in groups.values():
            _train_group(study, objective, group, beats, progress)
    except BaseException as e:
        for r in runs:
            if r.trial.number in objective.current:
                with contextlib.suppress(Exception):  # the storage may be what failed: the trial is saved anyway
                    r.record_attrs()
        full = disk_full_error(e) if isinstance(e, Exception) else None
        if full is not None:
            raise _Stopped(full) from None  # as _stopping_past_optuna: the trials are queued again
        raise
    finally:
        for beat in beats.values():
            beat.__exit__(None, None, None)


@contextlib.contextmanager
def _sampling_like(study: optuna.Study, lead: TrialParams | None) -> Iterator[None]:
    """Within: the study's sampler fixes `lead`'s shared fields (fuse.SHARED_FIELDS), where given.

    Around both ask and the suggestions: Optuna's sampler draws a trial's parameters as they are suggested.
    """
    sampler = study.sampler
    if lead is not None:
        fixed = {name: getattr(lead, name) for name in SHARED_FIELDS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
    try:
        with warnings.catch_warnings():
            # Optuna warns that ask, unlike optimize, runs no heartbeat: _take_fused runs each trial's.
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            yield
    finally:
        study.sampler = sampler


def _train_group(
    study: optuna.Study,
    objective: Objective,
    group: list[TrialRun],
    beats: dict[int, Any],
    progress: ProgressFn | None,
) -> None:
    """Train one fused group, telling each member's trial as it ends."""
    members = [Member(r.params, r.settings.seed, r.on_epoch, r.resume) for r in group]
    ended: set[int] = set()
    try:
        for index, outcome in train_fused(members, objective.data, objective.config.run.epochs, objective.device):
            _tell_member(study, objective, group[index], outcome, beats, progress)
            ended.add(index)
    except RuntimeError as e:  # the shared step ran out of memory: every member left fails, as a trial alone would
        if not is_out_of_memory(e):
            raise
        for index in sorted(set(range(len(group))) - ended):
            _tell_member(study, objective, group[index], e, beats, progress)


def _tell_member(
    study: optuna.Study,
    objective: Objective,
    run: TrialRun,
    outcome: TrainResult | Exception,
    beats: dict[int, Any],
    progress: ProgressFn | None,
) -> None:
    """What study.optimize does once a trial's objective returns: tell the trial, then say how it ended."""
    number = run.trial.number
    beats.pop(number).__exit__(None, None, None)
    value: float | None = None
    state: TrialState | None = TrialState.COMPLETE
    try:
        value = run.end(outcome)
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except OutOfMemory:
        state = TrialState.FAIL
    except optuna.exceptions.UpdateFinishedTrialError:
        state = None
    except Exception as e:
        full = disk_full_error(e)
        if full is not None:
            raise _Stopped(full) from None
        record_error(run.trial, e)
        objective.current.remove(number)
        study.tell(run.trial, state=TrialState.FAIL)  # a bug: failed, and the worker ends with its traceback
        raise
    try:
        if state is not None:
            study.tell(run.trial, value, state=state)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        state = None
    if state is None:
        log.warning("trial %d was failed as stale by another worker; its retry takes over", number)
    objective.current.remove(number)
    _tell_end(study, objective, trial_numbered(study, number), progress)


def trial_numbered(study: optuna.Study, number: int) -> FrozenTrial:
    """A study's trial by number (Optuna numbers a study's trials 0, 1, ... in its list's order)."""
    return study.get_trials(deepcopy=False)[number]


class OrphanWatch:
    """Fails, and retries, the RUNNING trials whose worker died between taking them and starting them.

    Why by hand: Optuna's stale check needs a heartbeat, which a trial records only once it
    runs; a worker killed (or interrupted) in between would leave a trial RUNNING forever,
    holding the study open and losing a queued retry. Each worker times such a trial on its own
    clock from when it first saw it, since the workers' clocks may disagree.
    """

    def __init__(self, grace_period: int, retry: LoggedRetry | None) -> None:
        self.grace_period, self.retry = grace_period, retry
        self.first_seen: dict[int, float] = {}  # trial number -> time.monotonic() when first seen unstarted

    def fail_and_retry(self, study: optuna.Study) -> None:
        now = time.monotonic()
        unstarted = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(STARTED) != t.number
        ]
        self.first_seen = {n: self.first_seen.get(n, now) for n in unstarted}
        for number in [n for n, seen in self.first_seen.items() if now - seen >= self.grace_period]:
            try:
                study.tell(number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker was first
            log.warning("trial %d never started: its worker died before training it", number)
            if self.retry is not None:
                self.retry(study, trial_numbered(study, number))


def fail_dead_trials(study: optuna.Study, orphans: OrphanWatch) -> None:
    """Fail the trials whose worker is gone (stale, or never started) and queue their retries."""
    # A Ctrl-C between the two writes would leave a trial failed and its retry never queued: its
    # checkpoint would never be resumed. The interrupt waits until both are written; a kill -9 cannot
    # be made to wait, and the next worker to look queues what it lost.
    with interrupts_deferred():
        fail_stale_trials(study)
        orphans.fail_and_retry(study)
        if orphans.retry is not None:
            queue_lost_retries(study, orphans.retry)


def queue_lost_retries(study: optuna.Study, retry: LoggedRetry) -> None:
    """Queue the retry of each failed trial that is owed one and has none: its worker died, and the worker that
    failed it was killed before it queued the retry (the two are separate writes).

    Such a trial is known by what it lacks. A trial its own worker failed says why (objective.FAIL_REASON: out of
    memory, an error), and every trial queued again is named by its copy (status.retried_from): a retry's
    `retry_history`, a Ctrl-C's requeue (queued before its trial is failed). Called under the claim, so no
    other worker is between the two writes (MySQL, which has no claim, may queue a retry twice).
    """
    trials = study.get_trials(deepcopy=False)
    continued = {retried_from(t) for t in trials}
    for trial in trials:
        lost = trial.state == TrialState.FAIL and FAIL_REASON not in trial.user_attrs
        if lost and trial.number not in continued and retry.queues(trial):
            log.warning("trial %d was failed without its retry: the worker failing it was killed first", trial.number)
            retry(study, trial)


def _tell_end(study: optuna.Study, objective: Objective, trial: FrozenTrial, progress: ProgressFn | None) -> None:
    """The ended trial's log line, and its events for the live display."""
    best = best_trial(study)
    log.info("%s", ended_text(trial, objective.worker, objective.config.run.epochs, best))
    if progress is None:
        return
    value = trial.value if trial.value is not None else float("nan")
    epochs = trial.user_attrs.get("epochs_run", 0)
    progress(
        Progress(
            objective.worker,
            trial.number,
            epochs,
            objective.config.run.epochs,
            value,
            None if best is None else best.value,
            trial.state.name,
        )
    )
    progress(StudyCount(count_trials(study).finished, objective.config.run.trials))


def ended_text(trial: FrozenTrial, worker: int, epochs: int, best: FrozenTrial | None) -> str:
    """A trial's last log line: how it ended, its value, the study's best so far, its duration and parameters."""
    run = trial.user_attrs.get("epochs_run", 0)
    if trial.state == TrialState.COMPLETE:
        how = f"complete: val_acc {accuracy_text(trial.value)} at epoch {trial.user_attrs.get('best_epoch')}"
    elif trial.state == TrialState.PRUNED:
        how = f"pruned after epoch {run} of {epochs}: val_acc {accuracy_text(trial.value)}"
    else:
        how = f"failed after {run} epochs: {trial.user_attrs.get(FAIL_REASON, 'see the lines above')}"
    seconds = trial_seconds(trial)
    took = "-" if seconds is None else duration_text(seconds)
    so_far = "no trial complete yet" if best is None else f"{accuracy_text(best.value)} (trial {best.number})"
    params = params_text(full_params(trial))
    who = f"baseline, worker {worker}" if trial.user_attrs.get("baseline") else f"worker {worker}"
    return f"trial {trial.number} ({who}) {how}; best so far {so_far}; took {took}; {params}"


def requeue_interrupted(study: optuna.Study, number: int | None) -> bool:
    """Queue the interrupted trial again, so that the next run resumes it, then fail it; whether it was queued.

    In that order: should the storage refuse the second write, the trial is still RUNNING, and a later
    run fails it as stale and retries it; its copy then runs twice rather than never.
    """
    if number is None:
        return False
    try:
        trial = trial_numbered(study, number)
        if trial.state not in (TrialState.RUNNING, TrialState.FAIL):
            return False  # it ended (finished, pruned) before the interrupt reached it
        study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "resumed_from": number})
        if trial.state == TrialState.RUNNING:
            study.tell(number, state=TrialState.FAIL)
        log.info("trial %d interrupted: queued again, to continue from its last checkpoint", number)
    except Exception as e:  # the storage refused (a full disk, a lost connection): never a traceback here
        log.warning("trial %d could not be queued again (%s); a later run retries it as stale", number, first_line(e))
        return False
    return True


def run_search(config: Config, progress: ProgressFn | None = None, command: str | None = None) -> RunOutcome:
    """`fer-search run`: one worker here, or --workers K processes against the same storage.

    `command` (the command line) is recorded in a study this call creates.
    """
    k = config.run.workers
    if k == 1:
        return run_worker(config, 0, 1, progress, command)
    # Check the device, decode the data and create the study once, before the workers start,
    # so that a mistake is told once and the workers find the cache warm and the study ready.
    quiet_optuna()
    resolve_device(config.run.device)
    data = load_configured(config.data)  # train and val: the search never sees the test set
    with opened_storage(config.study.storage) as storage:
        ensure_study(config, storage, study_record(config, data.fingerprints), command=command)
    ctx = spawn_context()
    queue = ctx.SimpleQueue()
    procs: list[Any] = []  # the started ones
    with stopped_on_leaving_early(procs, _discarding(queue)):
        for i in range(k):
            p = ctx.Process(
                target=_worker_process,
                args=(config, i, k, queue, progress is not None, log_level()),
                name=f"worker {i}",
            )
            with signals_deferred():  # it imports torch with Ctrl-C held back, until run_child
                p.start()
                procs.append(p)
        while any(p.is_alive() for p in procs) or not queue.empty():
            while not queue.empty():
                event = queue.get()
                if isinstance(event, ChildError):
                    if event.user_error:  # the others requeue their trials; the user fixes and reruns
                        raise UserError(f"{event.label}: {event.message}")
                    continue  # a crash: its traceback is on stderr, its exit code ends the run below
                if progress is not None:
                    progress(event)
            raise_if_interrupted()
            time.sleep(0.2)
    codes = [p.exitcode for p in procs]
    interrupted = ended_interrupted(codes)
    if interrupted is not None:
        raise interrupted
    if any(codes):
        raise Crashed("; ".join(f"worker {i} {how_it_ended(code)}" for i, code in enumerate(codes) if code))
    with opened_storage(config.study.storage) as storage:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
        # A worker returns early only at the timeout, so fewer finished trials mean it was reached.
        return RunOutcome(timed_out=count_trials(study).finished < config.run.trials, status=study_status(study))


def _discarding(queue: Any) -> Callable[[], None]:
    """A function that empties the workers' queue, whose messages nobody shows once they are being stopped."""

    def discard() -> None:
        while not queue.empty():
            queue.get()

    return discard


def _worker_process(config: Config, index: int, k: int, queue: Any, live: bool, level: int) -> None:
    """Entry point of a local worker process; exit codes follow the CLI's (2 bad input, 130 Ctrl-C, 143 SIGTERM)."""

    def work() -> None:
        with logging_to(queue.put if live else None):  # live, the parent prints the log lines above its progress lines
            run_worker(config, index, k, queue.put if live else None)

    run_child(f"worker {index}", queue, work, level)
