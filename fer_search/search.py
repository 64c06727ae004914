"""The search: study setup (baseline first), the objective, the worker loop, workers, status."""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import multiprocessing
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from fer_search.config import Config, PrunerConfig
from fer_search.data import FerData, load_configured
from fer_search.errors import UserError, configure_logging, first_line, logging_to
from fer_search.files import seed_of
from fer_search.model import BASELINE, TrialParams
from fer_search.space import optuna_params, suggest_params
from fer_search.storage import Heartbeat, open_artifact_store, opened_storage
from fer_search.train import (DivergedError, EpochRecord, TrainSettings, configure_cpu_threads, resolve_device,
                              train_model)

log = logging.getLogger("fer_search")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# User attribute: the number of the trial whose objective started (set first thing in it).
STARTED = "started_as"


@dataclass(frozen=True)
class Progress:
    """One event for the live display: a trial's epoch ended, or the trial ended."""

    worker: int
    trial: int
    epoch: int
    epochs: int
    val_acc: float
    best: float | None
    state: str = "RUNNING"  # or the finished trial's state name


# Gets each Progress event, and the log lines to show above the live progress lines (str).
ProgressFn = Callable[[Progress | str], None]


@dataclass(frozen=True)
class RunOutcome:
    """How `run` ended: the study's status document, and whether --timeout stopped it short."""

    timed_out: bool
    status: dict[str, Any]


# --- study setup --------------------------------------------------------------------------

def study_record(config: Config, data: FerData) -> dict[str, Any]:
    """What a study is created with, compared on every later `run` (DESIGN.md, "Reproducibility")."""
    return {"fingerprints": data.fingerprints, "space": config.space.to_dict(), "epochs": config.run.epochs}


def provenance() -> dict[str, Any]:
    commit, dirty = None, None
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                                        text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                         "fer-search": package_version("fer-search"), "sqlalchemy": package_version("sqlalchemy")},
            "git": {"commit": commit, "dirty": dirty}}


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_study(config: Config, storage: optuna.storages.BaseStorage, record: dict[str, Any],
                 sampler: optuna.samplers.BaseSampler | None = None,
                 pruner: optuna.pruners.BasePruner | None = None, command: str | None = None) -> optuna.Study:
    """Create the study (baseline enqueued, then `ready`), or join it and check it matches.

    Only the process whose create_study succeeded sets the study up: enqueue_trial's
    skip_if_exists is not atomic across processes, so two workers starting together could
    both enqueue the baseline. A joiner waits for `ready` and, if its creator died, finishes.
    """
    name = config.study.name
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    sampler=sampler, pruner=pruner, load_if_exists=False)
        _set_up(study, config, record, command)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    # Joiners of a creator that died time out at random moments, so the first to finish the setup
    # is usually seen by the others (whose check for a baseline comes after), not raced by them.
    if not _wait_until_ready(study, config.run.ready_timeout_s * (1 + random.random())):
        log.warning("study %s was never marked ready by its creator; finishing its setup", name)
        _set_up(study, config, record, command)
    check_study_matches(study, record, config.run.ignore_mismatch)
    return study


def _set_up(study: optuna.Study, config: Config, record: dict[str, Any], command: str | None) -> None:
    made_by = {"data_path": str(config.data.path), **({"command": command} if command else {})}
    for key, value in {**record, **provenance(), **made_by}.items():
        study.set_user_attr(key, value)
    if not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        params = optuna_params(BASELINE, config.space)
        if params is None:
            study.set_user_attr("baseline_excluded", True)
        else:
            study.enqueue_trial(params, user_attrs={"baseline": True})
    study.set_user_attr("ready", True)


def _wait_until_ready(study: optuna.Study, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not study.user_attrs.get("ready"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def check_study_matches(study: optuna.Study, record: dict[str, Any], ignore: bool) -> None:
    """UserError naming what differs from the study's creation, unless ignored."""
    stored = study.user_attrs
    current = json.loads(json.dumps(record))  # tuples -> lists, as the storage returns them
    changes = []
    for split, fp in current["fingerprints"].items():
        if stored.get("fingerprints", {}).get(split) != fp:
            changes.append(f"data ({split} split fingerprint)")
    changed_keys = [k for k, v in current["space"].items() if stored.get("space", {}).get(k) != v]
    if changed_keys:
        changes.append(f"search space ({', '.join('space.' + k for k in changed_keys)})")
    if stored.get("epochs") != current["epochs"]:
        changes.append(f"epochs ({stored.get('epochs')} -> {current['epochs']})")
    # Optuna stores a parameter's distribution once: its choices, or a range's log scale, cannot change.
    stored_space = stored.get("space", {})
    fixed = [k for k in changed_keys if _incompatible(stored_space.get(k), current["space"][k])]
    if fixed:
        raise UserError(f"study {study.study_name!r}: the choices or log scale of "
                        f"{', '.join('space.' + k for k in fixed)} changed, which an Optuna study cannot follow; "
                        "use --study NAME for a new study")
    if changes and not ignore:
        raise UserError(f"study {study.study_name!r} was created with different {'; '.join(changes)}: "
                        "pass --ignore-mismatch to continue it anyway, or --study NAME for a new study")
    if changes:
        log.warning("continuing study %s despite changed %s", study.study_name, "; ".join(changes))


def _incompatible(stored: Any, current: Any) -> bool:
    """Two searched specs of one parameter that Optuna cannot hold in one study: categoricals (lists
    of more than one choice) with other choices, or ranges ({low, high, log}) with another log scale."""
    if all(isinstance(spec, list) and len(spec) > 1 for spec in (stored, current)):
        return stored != current
    if all(isinstance(spec, dict) for spec in (stored, current)):
        return stored.get("log") != current.get("log")
    return False


def make_sampler(base_seed: int, worker_index: int) -> optuna.samplers.TPESampler:
    """TPE seeded per worker so that no two workers, here or on other hosts, draw in lock-step.

    Optuna 5's TPE defaults are multivariate with constant liar; group=True models the
    conditional parameters (dropout rates that exist only for some patterns) separately.
    """
    return optuna.samplers.TPESampler(seed=seed_of(f"{base_seed}/{socket.gethostname()}/{worker_index}"), group=True)


def make_pruner(config: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    pruner: optuna.pruners.BasePruner
    if config.kind in ("percentile", "median"):  # the median is the 50th percentile
        pruner = optuna.pruners.PercentilePruner(50.0 if config.kind == "median" else config.percentile,
                                                 n_startup_trials=config.startup_trials,
                                                 n_warmup_steps=config.warmup_epochs)
    elif config.kind == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=config.min_epochs, max_resource=epochs,
                                                reduction_factor=config.reduction_factor)
    else:
        return optuna.pruners.NopPruner()
    if config.patience > 0:
        pruner = optuna.pruners.PatientPruner(pruner, patience=config.patience, min_delta=config.min_delta)
    return pruner


# --- the objective ------------------------------------------------------------------------

def trial_seed(base_seed: int, number: int) -> int:
    return seed_of(f"{base_seed}/trial/{number}")


class OutOfMemory(RuntimeError):
    """A trial ran out of (GPU) memory: it fails, and its worker goes on to the next trial."""


class Objective:
    """Train one trial: report every epoch's validation accuracy, checkpoint, prune."""

    def __init__(self, config: Config, data: FerData, device: torch.device, worker: int,
                 progress: ProgressFn | None) -> None:
        self.config = config
        self.data = data
        self.device = device
        self.worker = worker
        self.progress = progress
        self.store = open_artifact_store(config.study.artifacts)
        self.current: int | None = None  # the running trial's number, for Ctrl-C
        self.failed_elsewhere = False  # the storage refused an update: another worker failed the trial

    def __call__(self, trial: optuna.Trial) -> float:
        self.current, self.failed_elsewhere = trial.number, False
        try:
            return self._train(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.failed_elsewhere = True
            raise

    def _train(self, trial: optuna.Trial) -> float:
        # First of all: retries copy user attributes, so a RUNNING trial whose STARTED is not its
        # own number never got here (its worker died between ask and objective; see OrphanWatch).
        trial.set_user_attr(STARTED, trial.number)
        params = suggest_params(trial, self.config.space)
        seed = int(trial.user_attrs.get("seed", trial_seed(self.config.run.seed, trial.number)))
        for key, value in {"seed": seed, "trial_params": params.to_dict(), "device": str(self.device)}.items():
            trial.set_user_attr(key, value)
        inherited = inherited_checkpoints(trial)
        resume = self._latest_checkpoint(trial, params, inherited)
        trial.set_user_attr("resumed_at_epoch", 1 if resume is None else len(resume["history"]) + 1)
        for r in resume["history"] if resume is not None else []:  # its curve is the one it trained (DESIGN.md)
            trial.report(r["val_acc"], r["epoch"])
        state = _TrialState(trial, self, params, time.monotonic(), inherited)
        settings = TrainSettings(epochs=self.config.run.epochs, seed=seed, device=self.device)
        try:
            result = train_model(params, self.data, settings, on_epoch=state.on_epoch, resume=resume)
        except DivergedError as e:
            trial.set_user_attr("fail_reason", f"diverged: {e}")
            state.drop_checkpoint()
            raise optuna.TrialPruned(str(e)) from None
        except optuna.TrialPruned:
            state.drop_checkpoint()
            raise
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            trial.set_user_attr("fail_reason", f"out of memory: {first_line(e)}")
            state.drop_checkpoint()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the memory back to the trials sharing this GPU
            raise OutOfMemory(first_line(e)) from None
        finally:
            state.record_attrs()
        state.drop_checkpoint()
        trial.set_user_attr("best_epoch", result.best_epoch)
        return result.best_val_acc

    def _latest_checkpoint(self, trial: optuna.Trial, params: TrialParams,
                           inherited: list[str]) -> dict[str, Any] | None:
        """The newest loadable checkpoint among `inherited` (newest first); None = epoch 1."""
        for artifact_id in inherited:
            try:
                with self.store.open_reader(artifact_id) as f:
                    ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            except Exception as e:  # missing or truncated: start over, never crash (DESIGN.md)
                log.warning("trial %d: checkpoint %s unusable (%s); trying an older one", trial.number, artifact_id,
                            type(e).__name__)
                continue
            if (ckpt.get("trial_params") == params.to_dict() and ckpt.get("epochs") == self.config.run.epochs
                    and ckpt.get("device_type") == self.device.type):  # RNG states differ between devices
                log.info("trial %d resumes from epoch %d", trial.number, len(ckpt["history"]))
                return ckpt
        if inherited:
            log.warning("trial %d: no usable checkpoint, starting from epoch 1", trial.number)
        return None


def inherited_checkpoints(trial: optuna.Trial) -> list[str]:
    """Artifact ids of the checkpoints a trial may resume from, newest first: the one its user
    attributes point at (a Ctrl-C requeue or a retry copies them), then those of the trials it retries."""
    trials = {t.number: t for t in trial.study.get_trials(deepcopy=False)}
    me = trials[trial.number]
    chain = [me] + [trials[n] for n in reversed(RetryHeartbeatStaleTrialCallback.retry_history(me)) if n in trials]
    return [a for a in dict.fromkeys(t.user_attrs.get("checkpoint") for t in chain) if a is not None]


class _TrialState:
    """Per-trial bookkeeping behind the epoch callback."""

    def __init__(self, trial: optuna.Trial, objective: Objective, params: TrialParams, started: float,
                 inherited: list[str]) -> None:
        self.trial, self.objective, self.params, self.started = trial, objective, params, started
        self.inherited = inherited  # checkpoints of the trials this one continues
        self.records: list[EpochRecord] = []
        self.artifact_id: str | None = None
        self.last_checkpoint = started
        self.best_before = _best_value(trial.study)

    def on_epoch(self, record: EpochRecord, checkpoint: Callable[[], dict[str, Any]]) -> None:
        self.records.append(record)
        trial, config = self.trial, self.objective.config
        # Checkpoint before reporting, so that whoever sees an epoch in the study (a rescuing
        # worker, the dashboard, a test) never finds an older checkpoint than it expects.
        if record.epoch < config.run.epochs and time.monotonic() - self.last_checkpoint >= config.run.checkpoint_every_s:
            self._save(checkpoint(), record.epoch)
        trial.report(record.val_acc, record.epoch)
        if self.objective.progress:
            self.objective.progress(Progress(self.objective.worker, trial.number, record.epoch, config.run.epochs,
                                             record.val_acc, self.best_before))
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")

    def _save(self, ckpt: dict[str, Any], epoch: int) -> None:
        ckpt = {**ckpt, "trial_params": self.params.to_dict(), "epochs": self.objective.config.run.epochs}
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        buffer.seek(0)
        if self.artifact_id is None:
            # A plain entry of the artifact store, not an uploaded artifact: it is the trial's
            # private state, removed when the trial ends, and an uploaded artifact's record
            # cannot be taken off a finished trial (the dashboard would list a dead link).
            self.artifact_id = str(uuid.uuid4())
        try:
            self.objective.store.write(self.artifact_id, buffer)  # keeps only the latest
        except OSError as e:  # a full disk costs the trial its resumability, not its life
            log.warning("trial %d: cannot write its checkpoint (%s); training on without one",
                        self.trial.number, first_line(e))
            return
        if self.trial.user_attrs.get("checkpoint") != self.artifact_id:
            self.trial.set_user_attr("checkpoint", self.artifact_id)
        self.trial.set_user_attr("checkpoint_epoch", epoch)  # set once the file holds that epoch
        self.last_checkpoint = time.monotonic()
        self._remove(self.inherited)  # older than this trial's own, which a requeue or retry now finds
        self.inherited = []

    def drop_checkpoint(self) -> None:
        """Remove the checkpoints of a trial that ended for good (finished, pruned, out of memory):
        nothing will resume it, and a study of many trials would otherwise fill the disk."""
        self._remove([*self.inherited, *([self.artifact_id] if self.artifact_id else [])])
        if self.trial.user_attrs.get("checkpoint") is not None:
            self.trial.set_user_attr("checkpoint", None)
            self.trial.set_user_attr("checkpoint_epoch", None)

    def _remove(self, artifact_ids: list[str]) -> None:
        for artifact_id in artifact_ids:
            try:
                self.objective.store.remove(artifact_id)
            except (ArtifactNotFound, OSError):
                pass  # already gone (another worker's copy of the chain): nothing to free

    def record_attrs(self) -> None:
        seconds = time.monotonic() - self.started
        rates = [r.images_per_s for r in self.records]
        self.trial.set_user_attr("epochs_run", self.records[-1].epoch if self.records else 0)
        self.trial.set_user_attr("seconds", round(seconds, 3))
        if rates:
            self.trial.set_user_attr("images_per_s", round(sum(rates) / len(rates), 1))


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None


# --- the worker loop ----------------------------------------------------------------------

def worker_device(name: str, worker_index: int) -> torch.device:
    """Spread local workers over the GPUs; with one GPU they share it."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", worker_index % torch.cuda.device_count())
    return device


def run_worker(config: Config, worker_index: int = 0, local_workers: int = 1,
               progress: ProgressFn | None = None, command: str | None = None) -> RunOutcome:
    """Take trials until the study holds config.run.trials finished ones (DESIGN.md, --trials)."""
    quiet_optuna()
    configure_cpu_threads(local_workers)
    device = worker_device(config.run.device, worker_index)
    data = load_configured(config.data)  # train and val: the search never sees the test set
    run = config.run
    heartbeat = Heartbeat(run.heartbeat_interval, run.grace_period, run.max_retry)
    with opened_storage(config.study.storage, heartbeat) as storage:
        study = ensure_study(config, storage, study_record(config, data), make_sampler(run.seed, worker_index),
                             make_pruner(config.pruner, run.epochs), command)
        retry = storage.get_heartbeat_stale_trial_callback()
        return _take_trials(study, Objective(config, data, device, worker_index, progress), progress, retry)


def _take_trials(study: optuna.Study, objective: Objective, progress: ProgressFn | None,
                 retry: Callable[[optuna.Study, FrozenTrial], None] | None) -> RunOutcome:
    run = objective.config.run
    deadline = time.monotonic() + run.timeout if run.timeout else None
    orphans = OrphanWatch(run.grace_period, retry)
    try:
        while True:
            fail_stale_trials(study)
            orphans.fail_and_retry(study)
            finished, running = count_finished_running(study)
            if finished >= run.trials:
                return RunOutcome(timed_out=False, status=study_status(study))
            if deadline is not None and time.monotonic() >= deadline:
                return RunOutcome(timed_out=True, status=study_status(study))
            if finished + running >= run.trials:
                time.sleep(run.wait_poll_s)  # others are finishing the last trials; wait to retry the dead
                continue
            try:
                study.optimize(objective, n_trials=1, catch=(OutOfMemory,), gc_after_trial=False)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
                # Optuna's tell refuses (ValueError) the trial another worker failed as stale
                # while this one trained it: its heartbeats had not reached the storage for a
                # grace period. That worker queued a retry, which resumes from the checkpoint.
                if not (objective.failed_elsewhere or isinstance(e, optuna.exceptions.UpdateFinishedTrialError)):
                    raise
                log.warning("trial %s was failed as stale by another worker; its retry takes over", objective.current)
            number, objective.current = objective.current, None  # ended: Ctrl-C must not requeue it
            _report_end(study, objective, number, progress)
    except KeyboardInterrupt:
        requeue_interrupted(study, objective.current)
        raise


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

    def __init__(self, grace_period: int, retry: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        self.grace_period, self.retry = grace_period, retry
        self.first_seen: dict[int, float] = {}  # trial number -> time.monotonic() when first seen unstarted

    def fail_and_retry(self, study: optuna.Study) -> None:
        now = time.monotonic()
        unstarted = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if t.user_attrs.get(STARTED) != t.number]
        self.first_seen = {n: self.first_seen.get(n, now) for n in unstarted}
        for number in [n for n, seen in self.first_seen.items() if now - seen >= self.grace_period]:
            try:
                study.tell(number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker was first
            log.warning("trial %d never started (its worker died before training it); retrying it", number)
            if self.retry is not None:
                self.retry(study, trial_numbered(study, number))


def is_out_of_memory(error: RuntimeError) -> bool:
    """CUDA's own out-of-memory error, or cuDNN's and cuBLAS's failed allocations."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        marker in str(error) for marker in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED"))


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and flags the heartbeat/retry API as experimental; the live
    progress line and the final summary say what a user needs."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def count_finished_running(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def _report_end(study: optuna.Study, objective: Objective, number: int | None, progress: ProgressFn | None) -> None:
    if progress is None or number is None:
        return
    t = trial_numbered(study, number)
    progress(Progress(objective.worker, t.number, t.user_attrs.get("epochs_run", 0), objective.config.run.epochs,
                      t.value if t.value is not None else float("nan"), _best_value(study), t.state.name))


def requeue_interrupted(study: optuna.Study, number: int | None) -> None:
    """Ctrl-C failed the running trial (Optuna's rule); enqueue it again so the next run resumes it."""
    if number is None:
        return
    trial = trial_numbered(study, number)
    if trial.state != TrialState.FAIL:
        return
    study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "resumed_from": number})


@dataclass(frozen=True)
class WorkerError:
    """A local worker's user error, sent to the parent, which tells it once."""

    worker: int
    message: str


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
        ensure_study(config, storage, study_record(config, data), command=command)
    ctx = multiprocessing.get_context("spawn")  # processes, not threads: the GIL; spawn: CUDA-safe
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker_process, args=(config, i, k, queue, progress is not None), daemon=False)
             for i in range(k)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs) or not queue.empty():
            while not queue.empty():
                event = queue.get()
                if isinstance(event, WorkerError):
                    _interrupt(procs, queue, grace_s=0)  # they requeue their trials; the user fixes and reruns
                    raise UserError(f"worker {event.worker}: {event.message}")
                if progress is not None:
                    progress(event)
            time.sleep(0.2)
    except KeyboardInterrupt:
        # From a terminal every worker got the Ctrl-C too; forward it to those that did not
        # (a signal sent to this process alone), after giving the others time to requeue.
        _interrupt(procs, queue, grace_s=2)
        raise
    codes = [p.exitcode for p in procs]
    if any(c == 130 for c in codes):
        raise KeyboardInterrupt
    if any(codes):
        raise RuntimeError(f"workers crashed with exit codes {codes}; their tracebacks are above")
    with opened_storage(config.study.storage) as storage:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
        # A worker returns early only at the timeout, so fewer finished trials mean it was reached.
        return RunOutcome(timed_out=count_finished_running(study)[0] < config.run.trials, status=study_status(study))


def _interrupt(procs: list[Any], queue: Any, grace_s: float) -> None:
    """Ctrl-C to the local workers still running after `grace_s` seconds, then wait for all to end."""
    def discard() -> None:
        while not queue.empty():
            queue.get()

    stop_processes(procs, discard, grace_s)


def stop_processes(procs: list[Any], drain: Callable[[], None], grace_s: float) -> None:
    """SIGINT (a Ctrl-C) to the processes still running after `grace_s` seconds, then wait for all to end.

    `drain` empties their message queue meanwhile: a process blocked on a full pipe would never end.
    """
    deadline = time.monotonic() + grace_s
    signalled = False
    while any(p.is_alive() for p in procs):
        drain()
        if not signalled and time.monotonic() >= deadline:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)
            signalled = True
        time.sleep(0.05)
    for p in procs:
        p.join()


def _worker_process(config: Config, index: int, k: int, queue: Any, live: bool) -> None:
    """Entry point of a local worker process; exit codes follow the CLI's (2 bad input, 130 Ctrl-C)."""
    configure_logging()
    try:
        # Live, the parent prints the log lines above its progress lines.
        with logging_to(queue.put if live else None):
            run_worker(config, index, k, queue.put if live else None)
    except UserError as e:
        queue.put(WorkerError(index, str(e)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


# --- status -------------------------------------------------------------------------------

def study_status(study: optuna.Study) -> dict[str, Any]:
    """The `status --json` document (DESIGN.md)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value, default=None)
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    finished_baselines = [t for t in baselines if t.state in FINISHED]
    baseline = (finished_baselines or baselines or [None])[-1]
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds()
                  for t in trials if t.datetime_complete and t.datetime_start)
    return {
        "study": study.study_name,
        "trials": counts,
        "best": None if best is None else {"number": best.number, "value": best.value,
                                           "params": best.user_attrs.get("trial_params", best.params)},
        "baseline": None if baseline is None else {"number": baseline.number, "value": baseline.value,
                                                   "state": baseline.state.name},
        "seconds": round(seconds, 3),
    }
