"""The search: study setup (baseline first), the objective, the worker loop, workers, status."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from fer_search.config import Config, PrunerConfig
from fer_search.data import FerData, load_data
from fer_search.errors import UserError
from fer_search.space import BASELINE, TrialParams, optuna_params, suggest_params
from fer_search.storage import Heartbeat, open_artifact_store, opened_storage
from fer_search.train import (DivergedError, EpochRecord, TrainSettings, configure_cpu_threads, resolve_device,
                              train_model)

log = logging.getLogger("fer_search")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class RunOutcome:
    timed_out: bool


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
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                         "fer-search": v("fer-search"), "sqlalchemy": v("sqlalchemy")},
            "git": {"commit": commit, "dirty": dirty}}


def ensure_study(config: Config, storage: optuna.storages.BaseStorage, record: dict[str, Any],
                 sampler: optuna.samplers.BaseSampler | None = None,
                 pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study (baseline enqueued, then `ready`), or join it and check it matches.

    Only the process whose create_study succeeded sets the study up: enqueue_trial's
    skip_if_exists is not atomic across processes, so two workers starting together could
    both enqueue the baseline. A joiner waits for `ready` and, if its creator died, finishes.
    """
    name = config.study.name
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    sampler=sampler, pruner=pruner, load_if_exists=False)
        _set_up(study, config, record)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if not _wait_until_ready(study, config.run.ready_timeout_s):
        log.warning("study %s was never marked ready by its creator; finishing its setup", name)
        _set_up(study, config, record)
    check_study_matches(study, record, config.run.ignore_mismatch)
    return study


def _set_up(study: optuna.Study, config: Config, record: dict[str, Any]) -> None:
    for key, value in {**record, **provenance()}.items():
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
    fixed_choices = [k for k in changed_keys if _categorical(stored["space"].get(k)) and _categorical(current["space"][k])]
    if fixed_choices:  # Optuna stores a parameter's distribution once; its choices cannot change
        raise UserError(f"study {study.study_name!r}: the choices of {', '.join('space.' + k for k in fixed_choices)} "
                        "changed, which an Optuna study cannot follow; use --study NAME for a new study")
    if changes and not ignore:
        raise UserError(f"study {study.study_name!r} was created with different {'; '.join(changes)}: "
                        "pass --ignore-mismatch to continue it anyway, or --study NAME for a new study")
    if changes:
        log.warning("continuing study %s despite changed %s", study.study_name, "; ".join(changes))


def _categorical(spec: Any) -> bool:
    """A space value searched as a categorical (a list of more than one choice)."""
    return isinstance(spec, list) and len(spec) > 1


def make_sampler(base_seed: int, worker_index: int) -> optuna.samplers.TPESampler:
    """TPE seeded per worker so that no two workers, here or on other hosts, draw in lock-step.

    Optuna 5's TPE defaults are multivariate with constant liar; group=True models the
    conditional parameters (dropout rates that exist only for some patterns) separately.
    """
    key = f"{base_seed}/{socket.gethostname()}/{worker_index}".encode()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
    return optuna.samplers.TPESampler(seed=seed, group=True)


def make_pruner(config: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    pruner: optuna.pruners.BasePruner
    if config.kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=config.startup_trials,
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
    return int.from_bytes(hashlib.sha256(f"{base_seed}/trial/{number}".encode()).digest()[:4], "little")


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

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        params = suggest_params(trial, self.config.space)
        seed = int(trial.user_attrs.get("seed", trial_seed(self.config.run.seed, trial.number)))
        for key, value in {"seed": seed, "trial_params": params.to_dict(), "device": str(self.device)}.items():
            trial.set_user_attr(key, value)
        resume = self._latest_checkpoint(trial, params)
        if resume is not None:
            trial.set_user_attr("resumed_at_epoch", len(resume["history"]) + 1)
            for r in resume["history"]:  # its curve is the one it trained (DESIGN.md)
                trial.report(r["val_acc"], r["epoch"])
        state = _TrialState(trial, self, params, time.monotonic())
        settings = TrainSettings(epochs=self.config.run.epochs, seed=seed, device=self.device)
        try:
            result = train_model(params, self.data, settings, on_epoch=state.on_epoch, resume=resume)
        except DivergedError as e:
            trial.set_user_attr("fail_reason", f"diverged: {e}")
            raise optuna.TrialPruned(str(e)) from None
        except torch.cuda.OutOfMemoryError as e:
            trial.set_user_attr("fail_reason", f"out of GPU memory: {str(e).splitlines()[0]}")
            raise
        finally:
            state.record_attrs()
        trial.set_user_attr("best_epoch", result.best_epoch)
        return result.best_val_acc

    def _latest_checkpoint(self, trial: optuna.Trial, params: TrialParams) -> dict[str, Any] | None:
        """The newest loadable checkpoint among the trials this one retries; None = epoch 1."""
        trials = {t.number: t for t in trial.study.get_trials(deepcopy=False)}
        me = trials[trial.number]
        chain = [me] + [trials[n] for n in reversed(RetryHeartbeatStaleTrialCallback.retry_history(me)) if n in trials]
        for artifact_id in dict.fromkeys(t.user_attrs.get("checkpoint") for t in chain):
            if artifact_id is None:
                continue
            try:
                with self.store.open_reader(artifact_id) as f:
                    ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            except Exception as e:  # missing or truncated: start over, never crash (DESIGN.md)
                log.warning("trial %d: checkpoint %s unusable (%s); trying an older one", trial.number, artifact_id,
                            type(e).__name__)
                continue
            if ckpt.get("trial_params") == params.to_dict() and ckpt.get("epochs") == self.config.run.epochs:
                log.info("trial %d resumes from epoch %d", trial.number, len(ckpt["history"]))
                return ckpt
        if me.user_attrs.get("checkpoint") is not None:
            log.warning("trial %d: no usable checkpoint, starting from epoch 1", trial.number)
        return None


class _TrialState:
    """Per-trial bookkeeping behind the epoch callback."""

    def __init__(self, trial: optuna.Trial, objective: Objective, params: TrialParams, started: float) -> None:
        self.trial, self.objective, self.params, self.started = trial, objective, params, started
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
        store = self.objective.store
        if self.artifact_id is None:  # first save: register the artifact so the dashboard lists it
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"checkpoint-trial{self.trial.number}.pt"
                path.write_bytes(buffer.getvalue())
                self.artifact_id = upload_artifact(artifact_store=store, file_path=str(path),
                                                   study_or_trial=self.trial)
            self.trial.set_user_attr("checkpoint", self.artifact_id)
        else:  # keep only the latest
            store.write(self.artifact_id, buffer)
        self.trial.set_user_attr("checkpoint_epoch", epoch)  # set once the file holds that epoch
        self.last_checkpoint = time.monotonic()

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
               progress: ProgressFn | None = None) -> RunOutcome:
    """Take trials until the study holds config.run.trials finished ones (DESIGN.md, --trials)."""
    quiet_optuna()
    configure_cpu_threads(local_workers)
    device = worker_device(config.run.device, worker_index)
    data = load_data(config.data.path, config.data.cache_dir, val_fraction=config.data.val_fraction,
                     split_seed=config.data.split_seed)
    run = config.run
    heartbeat = Heartbeat(run.heartbeat_interval, run.grace_period, run.max_retry)
    with opened_storage(config.study.storage, heartbeat) as storage:
        study = ensure_study(config, storage, study_record(config, data), make_sampler(run.seed, worker_index),
                             make_pruner(config.pruner, run.epochs))
        return _take_trials(study, Objective(config, data, device, worker_index, progress), progress)


def _take_trials(study: optuna.Study, objective: Objective, progress: ProgressFn | None) -> RunOutcome:
    run = objective.config.run
    deadline = time.monotonic() + run.timeout if run.timeout else None
    try:
        while True:
            fail_stale_trials(study)
            finished, running = count_finished_running(study)
            if finished >= run.trials:
                return RunOutcome(timed_out=False)
            if deadline is not None and time.monotonic() >= deadline:
                return RunOutcome(timed_out=True)
            if finished + running >= run.trials:
                time.sleep(run.wait_poll_s)  # others are finishing the last trials; wait to retry the dead
                continue
            study.optimize(objective, n_trials=1, catch=(torch.cuda.OutOfMemoryError,), gc_after_trial=False)
            _report_end(study, objective, progress)
    except KeyboardInterrupt:
        requeue_interrupted(study, objective.current)
        raise


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and flags the heartbeat/retry API as experimental; the live
    progress line and the final summary say what a user needs."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def count_finished_running(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def _report_end(study: optuna.Study, objective: Objective, progress: ProgressFn | None) -> None:
    if progress is None or objective.current is None:
        return
    t = study.get_trials(deepcopy=False)[objective.current]
    progress(Progress(objective.worker, t.number, t.user_attrs.get("epochs_run", 0), objective.config.run.epochs,
                      t.value if t.value is not None else float("nan"), _best_value(study), t.state.name))


def requeue_interrupted(study: optuna.Study, number: int | None) -> None:
    """Ctrl-C failed the running trial (Optuna's rule); enqueue it again so the next run resumes it."""
    if number is None:
        return
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != TrialState.FAIL:
        return
    study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "resumed_from": number})


def run_search(config: Config, progress: ProgressFn | None = None) -> RunOutcome:
    """`fer-search run`: one worker here, or --workers K processes against the same storage."""
    k = config.run.workers
    if k == 1:
        return run_worker(config, 0, 1, progress)
    # Decode the data and create the study once, before the workers start, so that they all
    # find the cache warm and the study ready.
    data = load_data(config.data.path, config.data.cache_dir, val_fraction=config.data.val_fraction,
                     split_seed=config.data.split_seed)
    with opened_storage(config.study.storage) as storage:
        ensure_study(config, storage, study_record(config, data))
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
                if progress is not None and isinstance(event, Progress):
                    progress(event)
            time.sleep(0.2)
    except KeyboardInterrupt:
        # From a terminal every worker got the Ctrl-C too; forward it to those that did not
        # (a signal sent to this process alone), after giving the others time to requeue.
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join()
        raise
    codes = [p.exitcode for p in procs]
    if any(c == 130 for c in codes):
        raise KeyboardInterrupt
    if 2 in codes:
        raise UserError(f"workers exited with codes {codes}; their messages are above")
    if any(codes):
        raise RuntimeError(f"workers crashed with exit codes {codes}; their tracebacks are above")
    with opened_storage(config.study.storage) as storage:
        study = optuna.load_study(study_name=config.study.name, storage=storage)
        # A worker returns early only at the timeout, so fewer finished trials mean it was reached.
        return RunOutcome(timed_out=count_finished_running(study)[0] < config.run.trials)


def _worker_process(config: Config, index: int, k: int, queue: Any, live: bool) -> None:
    """Entry point of a local worker process; exit codes follow the CLI's (2 bad input, 130 Ctrl-C)."""
    try:
        run_worker(config, index, k, queue.put if live else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
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
