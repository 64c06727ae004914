"""One trial: train it, report each epoch, checkpoint it, prune it, resume it from the checkpoint it inherits."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import uuid
from collections.abc import Callable

import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RetryHeartbeatStaleTrialCallback

from fer_search.config import Config
from fer_search.data import FerData
from fer_search.errors import first_line
from fer_search.files import seed_of
from fer_search.model import TrialParams, forward_flops
from fer_search.progress import Progress, ProgressFn, accuracy_text, cpu_estimate_text, duration_text, params_text
from fer_search.space import largest_model, suggest_params
from fer_search.status import best_value, count_trials, retried_from
from fer_search.storage import disk_full_error, open_artifact_store
from fer_search.train import Checkpoint, DivergedError, EpochRecord, TrainResult, TrainSettings, train_model

log = logging.getLogger("fer_search")
# User attribute: the number of the trial whose objective started (set first thing in it).
STARTED = "started_as"
# User attribute: why the objective itself ended its trial (out of memory, diverged, an error); such a trial gets
# no retry. A failed trial without one failed as its worker died (search.queue_lost_retries).
FAIL_REASON = "fail_reason"


def trial_seed(base_seed: int, number: int) -> int:
    return seed_of(f"{base_seed}/trial/{number}")


class OutOfMemory(RuntimeError):
    """A trial ran out of (GPU) memory: it fails, and its worker goes on to the next trial."""


class Objective:
    """Train one trial: report every epoch's validation accuracy, checkpoint, prune."""

    def __init__(
        self, config: Config, data: FerData, device: torch.device, worker: int, progress: ProgressFn | None
    ) -> None:
        self.config = config
        self.data = data
        self.device = device
        self.worker = worker
        self.progress = progress
        self.store = open_artifact_store(config.study.artifacts)
        self.current: list[int] = []  # the running trials' numbers (several when fused), for Ctrl-C
        self.estimated = worker != 0  # worker 0 alone says what the first epoch on a CPU tells of the study's length
        self.failed_elsewhere = False  # the storage refused an update: another worker failed the trial

    def __call__(self, trial: optuna.Trial) -> float:
        self.current, self.failed_elsewhere = [trial.number], False
        try:
            run = self.start(trial)
            try:
                outcome: TrainResult | Exception = train_model(
                    run.params, self.data, run.settings, on_epoch=run.on_epoch, resume=run.resume
                )
            except Exception as e:
                outcome = e
            except BaseException:  # an interrupt: the trial is queued again with what it did so far
                run.record_attrs()
                raise
            return run.end(outcome)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.failed_elsewhere = True
            raise
        except (optuna.TrialPruned, OutOfMemory):
            raise
        except Exception as e:
            record_error(trial, e)  # before Optuna fails the trial
            raise

    def start(self, trial: optuna.Trial) -> TrialRun:
        """Take `trial` on: its parameters, seed and attributes, the checkpoint it resumes from, its first log line."""
        # First of all: retries copy user attributes, so a RUNNING trial whose STARTED is not its
        # own number never got here (its worker died between ask and objective; see OrphanWatch).
        trial.set_user_attr(STARTED, trial.number)
        params = suggest_params(trial, self.config.space)
        seed = int(trial.user_attrs.get("seed", trial_seed(self.config.run.seed, trial.number)))
        for key, value in {"seed": seed, "trial_params": params.to_dict(), "device": str(self.device)}.items():
            trial.set_user_attr(key, value)
        inherited = inherited_checkpoints(trial)
        resume = self._latest_checkpoint(trial, params, inherited)
        done = 0 if resume is None else len(resume.history)
        trial.set_user_attr("resumed_at_epoch", done + 1)
        self._tell_start(trial, params, done)
        for r in resume.history if resume is not None else ():  # its curve is the one it trained, resumed or not
            trial.report(r.val_acc, r.epoch)
        settings = TrainSettings(epochs=self.config.run.epochs, seed=seed, device=self.device)
        return TrialRun(trial, self, params, settings, resume, inherited)

    def _tell_start(self, trial: optuna.Trial, params: TrialParams, epochs_done: int) -> None:
        """The trial's first log line, and its bar's start on a terminal."""
        continued = retried_from(trial.storage.get_trial(trial._trial_id))  # a live Trial has no system attrs
        how = "started" if continued is None else f"continues trial {continued}"
        at = f" at epoch {epochs_done + 1}" if epochs_done else ""
        log.info(
            "trial %d%s %s%s on %s (worker %d): %s",
            trial.number,
            " (baseline)" if trial.user_attrs.get("baseline") else "",
            how,
            at,
            self.device,
            self.worker,
            params_text(params.to_dict()),
        )
        if self.progress:
            self.progress(
                Progress(
                    self.worker,
                    trial.number,
                    epochs_done,
                    self.config.run.epochs,
                    float("nan"),
                    best_value(trial.study),
                    "STARTED",
                )
            )

    def estimate_study(self, trial: optuna.Trial, params: TrialParams, epoch_s: float) -> None:
        """Once, on the CPU: how long the study may take, at the pace of this first epoch and at the largest model's."""
        if self.estimated or self.device.type != "cpu":
            return
        self.estimated = True
        run = self.config.run
        left = max(1, run.trials - count_trials(trial.study).finished)
        largest = forward_flops(largest_model(params, self.config.space)) / forward_flops(params)
        log.info("%s", cpu_estimate_text(epoch_s, run.epochs, left, run.workers, largest))

    def _latest_checkpoint(self, trial: optuna.Trial, params: TrialParams, inherited: list[str]) -> Checkpoint | None:
        """The newest loadable checkpoint among `inherited` (newest first); None = epoch 1."""
        for artifact_id in inherited:
            try:
                with self.store.open_reader(artifact_id) as f:
                    ckpt = Checkpoint.from_bytes(f.read())
                resumes = ckpt.resumes(params, self.config.run.epochs, self.device)
            except Exception as e:  # missing, truncated, foreign or misfit: an older one, or start over; never crash
                log.warning(
                    "trial %d: checkpoint %s unusable (%s: %s); trying an older one",
                    trial.number,
                    artifact_id,
                    type(e).__name__,
                    first_line(e),
                )
                continue
            if resumes:
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


class TrialRun:
    """One trial being trained: what it trains, and the bookkeeping behind its epoch callback and its end."""

    def __init__(
        self,
        trial: optuna.Trial,
        objective: Objective,
        params: TrialParams,
        settings: TrainSettings,
        resume: Checkpoint | None,
        inherited: list[str],
    ) -> None:
        self.trial, self.objective, self.params, self.settings, self.resume = trial, objective, params, settings, resume
        self.started = time.monotonic()
        self.inherited = inherited  # checkpoints of the trials this one continues
        self.records: list[EpochRecord] = []
        self.artifact_id: str | None = None
        self.last_checkpoint = self.started
        self.best_before = best_value(trial.study)

    def on_epoch(self, record: EpochRecord, checkpoint: Callable[[], Checkpoint]) -> None:
        self.records.append(record)
        trial, config = self.trial, self.objective.config
        # Checkpoint before reporting, so that whoever sees an epoch in the study (a rescuing
        # worker, the dashboard, a test) never finds an older checkpoint than it expects.
        if (
            record.epoch < config.run.epochs
            and time.monotonic() - self.last_checkpoint >= config.run.checkpoint_every_s
        ):
            self._save(checkpoint(), record.epoch)
        trial.report(record.val_acc, record.epoch)
        log.debug(
            "trial %d (worker %d) epoch %d/%d: val_acc %s in %s",
            trial.number,
            self.objective.worker,
            record.epoch,
            config.run.epochs,
            accuracy_text(record.val_acc),
            duration_text(record.seconds),
        )
        self.objective.estimate_study(trial, self.params, record.seconds)
        if self.objective.progress:
            self.objective.progress(
                Progress(
                    self.objective.worker,
                    trial.number,
                    record.epoch,
                    config.run.epochs,
                    record.val_acc,
                    self.best_before,
                )
            )
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")

    def _save(self, ckpt: Checkpoint, epoch: int) -> None:
        # A trial failed elsewhere has a retry that resumes from, then removes, the checkpoint the trial names:
        # a file written now would outlive both, or change under the retry.
        _check_still_running(self.trial)
        buffer = io.BytesIO(ckpt.to_bytes())
        if self.artifact_id is None:
            # A plain entry of the artifact store, not an uploaded artifact: it is the trial's
            # private state, removed when the trial ends, and an uploaded artifact's record
            # cannot be taken off a finished trial (the dashboard would list a dead link).
            self.artifact_id = str(uuid.uuid4())
        try:
            self.objective.store.write(self.artifact_id, buffer)  # keeps only the latest
        except OSError as e:  # a full disk costs the trial its resumability, not its life
            log.warning(
                "trial %d: cannot write its checkpoint (%s); training on without one", self.trial.number, first_line(e)
            )
            return
        try:
            if self.trial.user_attrs.get("checkpoint") != self.artifact_id:
                self.trial.set_user_attr("checkpoint", self.artifact_id)
            self.trial.set_user_attr("checkpoint_epoch", epoch)  # set once the file holds that epoch
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed elsewhere since the check. A file the trial names now holds a later epoch of the same
            # training, which its retry resumes from and removes; a file it does not name would never be removed.
            if self.trial.user_attrs.get("checkpoint") != self.artifact_id:
                self._remove([self.artifact_id])
            raise
        self.last_checkpoint = time.monotonic()
        self._remove(self.inherited)  # older than this trial's own, which a requeue or retry now finds
        self.inherited = []

    def end(self, outcome: TrainResult | Exception) -> float:
        """The trial's value, or raises what Optuna should record: TrialPruned (a divergence too), OutOfMemory, or
        the error itself. Its checkpoints go unless it may be resumed; its attributes are recorded either way."""
        try:
            if isinstance(outcome, Exception):
                raise outcome
            self.drop_checkpoint()
            self.trial.set_user_attr("best_epoch", outcome.best_epoch)
            return outcome.best_val_acc
        except DivergedError as e:
            self.trial.set_user_attr(FAIL_REASON, f"diverged: {e}")
            self.drop_checkpoint()
            raise optuna.TrialPruned(str(e)) from None
        except optuna.TrialPruned:
            self.drop_checkpoint()
            raise
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            self.trial.set_user_attr(FAIL_REASON, f"out of memory: {first_line(e)}")
            self.drop_checkpoint()
            if self.settings.device.type == "cuda":
                torch.cuda.empty_cache()  # give the memory back to the trials sharing this GPU
            raise OutOfMemory(first_line(e)) from None
        finally:
            self.record_attrs()

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


def record_error(trial: optuna.Trial, error: Exception) -> None:
    """Record in `fail_reason` the error (a bug) that is about to fail `trial`; a full disk is no such error,
    as its trial is queued again (and its copy, which keeps its user attributes, must not say it failed)."""
    if disk_full_error(error) is not None:
        return
    with contextlib.suppress(Exception):  # the storage may be what failed: the trial is then retried as stale
        trial.set_user_attr(FAIL_REASON, f"error: {type(error).__name__}: {first_line(error)}")


def _check_still_running(trial: optuna.Trial) -> None:
    """Raises UpdateFinishedTrialError, as an update would, where another worker has failed `trial` (as stale)."""
    # Optuna has no public read of a live Trial's state. Its storage's get_trial reads this one trial (never from
    # the cache while it runs), where study.get_trials would read every unfinished trial of the study.
    storage = trial.storage
    storage.check_trial_is_updatable(trial._trial_id, storage.get_trial(trial._trial_id).state)


def is_out_of_memory(error: RuntimeError) -> bool:
    """CUDA's own out-of-memory error, or cuDNN's and cuBLAS's failed allocations."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        marker in str(error) for marker in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")
    )
