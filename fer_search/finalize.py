"""Finalize: retrain the best trial and the baseline over seeds, evaluate on the test set, report."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import optuna
import torch

from fer_search.config import Config
from fer_search.data import CLASSES, FerData, SplitData, load_configured
from fer_search.errors import Crashed, UserError, first_line
from fer_search.export import attach_final_files
from fer_search.files import made_folder, sha256_json, write_file
from fer_search.metrics import classification_report
from fer_search.model import BASELINE, TrialParams
from fer_search.predict import compact_state, model_from_state, probabilities, save_model
from fer_search.processes import (
    USER_ERROR,
    ChildError,
    ended_interrupted,
    how_it_ended,
    run_child,
    signals_deferred,
    spawn_context,
    stop_on_interrupt,
    stop_processes,
)
from fer_search.progress import FinalizeFn, FinalizePlan, SeedEpoch
from fer_search.report import write_reports
from fer_search.results import (
    REPORTED_BASELINE,
    BestTrial,
    Commands,
    DataRecord,
    Finalized,
    FinalMetrics,
    Protocol,
    SeedRun,
    aggregate,
)
from fer_search.space import params_from_trial
from fer_search.storage import load_existing_study
from fer_search.study import provenance
from fer_search.tables import summary_text
from fer_search.train import TrainSettings, configure_cpu_threads, field_of, of_type, resolve_device, train_model

# The resume files' weights, part of their key: files from before model.pt stored float16 weights
# hold float32 ones, whose test metrics are not those of the weights finalize would ship.
STORED_WEIGHTS = "compact_state"
RESUME_FILE = "resume file"  # how a resume file's errors name it

Say = FinalizeFn  # finalize's notes (str) and progress events, to the CLI's display or a child's queue
RunAndState = tuple[SeedRun, dict[str, torch.Tensor]]
T = TypeVar("T")


@dataclass(frozen=True)
class SeedJob:
    """One retraining: a configuration ("best" or "baseline") at one seed."""

    kind: str
    params: TrialParams
    seed: int

    @property
    def label(self) -> str:
        return f"{self.kind} seed {self.seed}"


def finalize_study(config: Config, command: str, say: Say) -> str:
    """Retrain, evaluate on PrivateTest (and the whole test folder), write the reports to config.final_dir.

    `command` is the command line of this finalize, recorded so that the report says how to reproduce it.
    """
    started = datetime.now().astimezone()  # the report says how long finalize took
    study = load_existing_study(config.study.storage, config.study.name)
    best = best_trial_of(study)
    device = resolve_device(config.run.device)
    # Checked before any data is decoded or seed trained: a bad --out must not cost a training run.
    out = made_folder(config.final_dir, "output")
    runs_dir = made_folder(resume_dir(config), "resume")
    searched_on = study.user_attrs.get("data_path")
    if not config.data.path.exists() and searched_on and Path(searched_on).exists():
        raise UserError(
            f"{config.data.path}: no such file or folder; study {study.study_name!r} was searched on "
            f"{searched_on}: pass --data {searched_on}"
        )
    # Train and val come from the search's cache in seconds; the test split is decoded only once they match.
    check_same_data(study, load_configured(config.data), config.data.path)
    data = load_configured(config.data, with_test=True)
    epochs = config.finalize.epochs or int(study.user_attrs.get("epochs", config.run.epochs))
    seeds = [config.run.seed + i for i in range(config.finalize.seeds)]
    if best.params == BASELINE and config.finalize.baseline:
        say("the best trial is the baseline: each seed is trained once and reported for both")
    jobs = seed_jobs(best.params, seeds, config.finalize.baseline)
    runs = dict(zip(jobs, retrain(jobs, config, data, epochs, device, runs_dir, say)))
    best_runs = [runs[SeedJob("best", best.params, seed)] for seed in seeds]
    baseline_runs = baseline_runs_of(runs, best.params, seeds) if config.finalize.baseline else []
    shipped, shipped_state = max(best_runs, key=lambda rs: (rs[0].val_acc, -rs[0].seed))
    meta = {
        "study": study.study_name,
        "trial": best.number,
        "seed": shipped.seed,
        "best_epoch": shipped.best_epoch,
        "fingerprints": data.fingerprints,
    }
    save_model(out / "model.pt", shipped_state, best.params, CLASSES, meta)
    metrics = FinalMetrics(
        shipped_seed=shipped.seed,
        epochs=epochs,
        seeds=seeds,
        best_trial=best,
        best=aggregate([r for r, _ in best_runs]),
        baseline=aggregate([r for r, _ in baseline_runs]) if baseline_runs else None,
        baseline_reported=REPORTED_BASELINE,
        protocol=Protocol.of(data.val_is_public_test),
        data=DataRecord(str(config.data.path), data.fingerprints),
        commands=Commands(run=study.user_attrs.get("command"), finalize=command),
        **provenance(),
    )
    write_file(out / "metrics.json", metrics.to_json().encode())
    baseline_same_seed = next((r for r, _ in baseline_runs if r.seed == shipped.seed), None)
    test = _test_split(data)
    finalized = Finalized(metrics, shipped, baseline_same_seed, test.x[:, 0].numpy(), test.y.numpy(), CLASSES, study)
    written = write_reports(out, finalized, finalize_started=started)
    attach_final_files(study, config.study.artifacts, out)  # for optuna-dashboard; a failure only warns
    return summary_text(metrics, out, [out / "model.pt", out / "metrics.json", *written])


def resume_dir(config: Config) -> Path:
    """Finished seeds of an interrupted finalize: kept with the study, not in the folder users take away."""
    return config.study.dir / config.study.name / "finalize-runs"


def best_trial_of(study: optuna.Study) -> BestTrial:
    try:
        trial = study.best_trial
    except ValueError:
        raise UserError(f"study {study.study_name!r} has no complete trial yet: run `fer-search run` first") from None
    assert trial.value is not None  # the best trial is a complete one
    return BestTrial(trial.number, trial.value, params_from_trial(trial.user_attrs))


def _test_split(data: FerData) -> SplitData:
    """The test split, which finalize always loads (with_test=True)."""
    assert data.test is not None
    return data.test


def check_same_data(study: optuna.Study, data: FerData, path: Path) -> None:
    """The retrained model must see the data its trial was searched on."""
    stored = study.user_attrs.get("fingerprints", {})
    changed = [s for s in ("train", "val") if stored.get(s) != data.fingerprints[s]]
    if changed:
        raise UserError(
            f"data at {path} differs from the data study {study.study_name!r} was searched on "
            f"({', '.join(changed)} split fingerprint); pass the study's data with --data"
        )


def seed_jobs(best: TrialParams, seeds: list[int], baseline: bool) -> list[SeedJob]:
    """The retrainings: the best trial's seeds, then the baseline's, unless the best trial is the baseline
    (trial 0 won), whose seeds then serve both."""
    jobs = [SeedJob("best", best, seed) for seed in seeds]
    if baseline and best != BASELINE:
        jobs += [SeedJob("baseline", BASELINE, seed) for seed in seeds]
    return jobs


def baseline_runs_of(runs: dict[SeedJob, RunAndState], best: TrialParams, seeds: list[int]) -> list[RunAndState]:
    """The baseline's runs: its own, or the best trial's relabelled where the best trial is the baseline."""
    if best != BASELINE:
        return [runs[SeedJob("baseline", BASELINE, seed)] for seed in seeds]
    copies = (runs[SeedJob("best", best, seed)] for seed in seeds)
    return [(dataclasses.replace(run, kind="baseline"), state) for run, state in copies]


def retrain(
    jobs: list[SeedJob], config: Config, data: FerData, epochs: int, device: torch.device, runs_dir: Path, say: Say
) -> list[RunAndState]:
    """Each job's run and weights, in order: reused from an interrupted finalize, else trained and evaluated,
    here (finalize.jobs = 1) or in finalize.jobs processes at once."""

    def finished(job: SeedJob) -> tuple[Path, RunAndState | None]:
        path, key = run_file(runs_dir, job, epochs, data.fingerprints)
        return path, _load_doc(path, key, job, say, _finished_run)

    found: dict[SeedJob, RunAndState] = {}
    for job in jobs:
        path, cached = finished(job)
        if cached is not None:
            say(f"{job.label}: reusing the finished run in {path}")
            found[job] = cached
    todo = [job for job in jobs if job not in found]
    say(FinalizePlan(len(todo) * epochs))
    if config.finalize.jobs == 1:
        configure_cpu_threads(1)
        for job in todo:
            found[job] = seed_run(job, epochs, data, device, runs_dir, say)
    elif todo:
        train_in_processes(todo, config, epochs, runs_dir, say)
        for job in todo:  # each process left its run in its resume file
            path, cached = finished(job)
            if cached is None:
                raise Crashed(f"{job.label}: its process ended without writing {path}")
            found[job] = cached
    return [found[job] for job in jobs]


def run_file(runs_dir: Path, job: SeedJob, epochs: int, fingerprints: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """Where a job's finished run is kept, and the key that file must hold to be reused."""
    key = {"params": job.params.to_dict(), "epochs": epochs, "fingerprints": fingerprints, "weights": STORED_WEIGHTS}
    # Named by its key too: the folder is the study's, shared by finalizes with other --epochs or --out.
    return runs_dir / f"{job.kind}-seed{job.seed}-{sha256_json(key)[:16]}.pt", key


def seed_run(job: SeedJob, epochs: int, data: FerData, device: torch.device, runs_dir: Path, say: Say) -> RunAndState:
    """Train one seed, evaluate on the test splits the weights model.pt would store, keep both in the resume file."""
    path, key = run_file(runs_dir, job, epochs, data.fingerprints)
    trained_path = path.with_suffix(".trained.pt")
    trained = _load_doc(trained_path, key, job, say, _trained_fields)
    if trained is None:
        trained = _trained_seed(job, epochs, data, device, say)
        # Kept before the evaluation: the float32 CPU pass over the test splits can take as long as a
        # GPU training, and an interruption there must not cost the training.
        _save_doc(trained_path, {"key": key, **trained})
    else:
        say(f"{job.label}: trained by an interrupted finalize; evaluating it")
    run = _evaluated_run(job, trained, data)
    _save_doc(path, {"key": key, "run": run.to_json(), "state": trained["state"]})
    trained_path.unlink(missing_ok=True)
    return run, trained["state"]


def _trained_seed(job: SeedJob, epochs: int, data: FerData, device: torch.device, say: Say) -> dict[str, Any]:
    """The seed's weights as model.pt stores them (rounded), its best epoch, validation accuracy and history."""

    def on_epoch(record: Any, _checkpoint: Any) -> None:
        say(SeedEpoch(job.label, record.epoch, epochs, record.val_acc))

    result = train_model(
        job.params, data, TrainSettings(epochs=epochs, seed=job.seed, device=device), on_epoch=on_epoch
    )
    return {
        "state": compact_state(result.best_state),
        "best_epoch": result.best_epoch,
        "val_acc": result.best_val_acc,
        "history": json.dumps([dataclasses.asdict(r) for r in result.history]),
    }


def _evaluated_run(job: SeedJob, trained: dict[str, Any], data: FerData) -> SeedRun:
    """The trained seed evaluated on the test splits as predict evaluates (float32 on the CPU), on
    exactly the rounded weights, so that the metrics are those of the shipped file."""
    model = model_from_state(job.params, trained["state"], len(CLASSES))
    test = _test_split(data)
    private_probs = probabilities(model, test.x)
    private_pred = private_probs.argmax(1)
    all_pred, all_y = private_pred, test.y
    if data.val_is_public_test:  # Public + Private: PrivateTest's predictions are at hand (the CPU pass is slow)
        all_pred = torch.cat([probabilities(model, data.val.x).argmax(1), all_pred])
        all_y = torch.cat([data.val.y, test.y])
    return SeedRun(
        kind=job.kind,
        seed=job.seed,
        best_epoch=trained["best_epoch"],
        val_acc=trained["val_acc"],
        history=json.loads(trained["history"]),
        private_test=classification_report(test.y.numpy(), private_pred.numpy(), CLASSES),
        test_all=classification_report(all_y.numpy(), all_pred.numpy(), CLASSES),
        test_pred=private_pred.tolist(),
        test_conf=private_probs.max(1).values.tolist(),
    )


def _save_doc(path: Path, doc: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    write_file(path, buffer.getvalue())


def _load_doc(
    path: Path, key: dict[str, Any], job: SeedJob, say: Say, read: Callable[[dict[str, Any], SeedJob], T]
) -> T | None:
    """What `read` takes from `job`'s resume file; None where there is none or it is unusable (said), to retrain it."""
    if not path.is_file():
        return None
    try:
        doc = of_type(torch.load(path, map_location="cpu", weights_only=True), dict, RESUME_FILE)
        if doc.get("key") != key:
            raise ValueError("written for another run")
        return read(doc, job)
    except Exception as e:  # damaged, foreign or misfit: retrained, never fatal
        say(f"{job.label}: cannot reuse {path} ({type(e).__name__}: {first_line(e)}); training it again")
        return None


def _finished_run(doc: dict[str, Any], job: SeedJob) -> RunAndState:
    """The run and weights of a finished resume file; raises where they are not `job`'s."""
    run = SeedRun.from_json(field_of(doc, "run", str, RESUME_FILE))
    if (run.kind, run.seed) != (job.kind, job.seed):
        raise ValueError(f"it holds the run of {run.kind} seed {run.seed}")
    return run, _fitting_state(doc, job)


def _trained_fields(doc: dict[str, Any], job: SeedJob) -> dict[str, Any]:
    """A trained, not yet evaluated, resume file's fields as _evaluated_run takes them; raises where they do not fit."""
    field_of(doc, "best_epoch", int, RESUME_FILE)
    field_of(doc, "val_acc", float, RESUME_FILE)
    if not isinstance(json.loads(field_of(doc, "history", str, RESUME_FILE)), list):
        raise ValueError("its history is no list of epochs")
    _fitting_state(doc, job)
    return doc


def _fitting_state(doc: dict[str, Any], job: SeedJob) -> dict[str, torch.Tensor]:
    """A resume file's weights, where they load into `job`'s model as the evaluation and model.pt load them."""
    state: dict[str, torch.Tensor] = field_of(doc, "state", dict, RESUME_FILE)
    model_from_state(job.params, state, len(CLASSES))
    return state


# --- finalize.jobs > 1: seed runs in processes of their own ---------------------------------


def train_in_processes(jobs: list[SeedJob], config: Config, epochs: int, runs_dir: Path, say: Say) -> None:
    """Train `jobs` in config.finalize.jobs processes at once, sharing the device; each writes its resume file.

    Their progress lines come to `say`. A user error in one becomes a UserError here, a crash a
    Crashed, after the others are stopped; Ctrl-C or SIGTERM stops them all, and finished seeds stay
    in their resume files.
    """
    ctx = spawn_context()
    queue = ctx.SimpleQueue()
    waiting = list(jobs)
    running: dict[SeedJob, Any] = {}
    failures: dict[str, str] = {}
    try:
        while waiting or running:
            while waiting and len(running) < config.finalize.jobs:
                job = waiting.pop(0)
                running[job] = ctx.Process(target=_seed_process, args=(config, job, epochs, runs_dir, queue))
                with signals_deferred():  # it imports torch with Ctrl-C held back, until run_child
                    running[job].start()
            ended = [job for job, p in running.items() if not p.is_alive()]
            _drain(queue, say, failures)  # after is_alive: an ended process's messages are all in the pipe by now
            for job in ended:
                code = running.pop(job).exitcode
                interrupted = ended_interrupted([code])
                if interrupted is not None:
                    raise interrupted
                if code == USER_ERROR:
                    raise UserError(f"{job.label}: {failures.get(job.label, 'failed')}")
                if code != 0:
                    reason = failures.get(job.label)
                    told = f"{reason} (its traceback is above)" if reason else f"its process {how_it_ended(code)}"
                    raise Crashed(f"{job.label}: {told}")
            time.sleep(0.1)
    except KeyboardInterrupt as e:
        stop_on_interrupt(list(running.values()), lambda: _drain(queue, say, {}), e)
        raise
    except BaseException:
        stop_processes(list(running.values()), lambda: _drain(queue, say, {}), grace_s=0.0)
        raise


def _drain(queue: Any, say: Say, failures: dict[str, str]) -> None:
    while not queue.empty():
        message = queue.get()
        if isinstance(message, ChildError):
            failures[message.label] = message.message
        else:
            say(message)


def _seed_process(config: Config, job: SeedJob, epochs: int, runs_dir: Path, queue: Any) -> None:
    """Entry point of one seed run's process; exit codes follow the CLI's (2 bad input, 130 Ctrl-C, 143 SIGTERM)."""

    def work() -> None:
        configure_cpu_threads(config.finalize.jobs)  # the cores are shared among the processes
        data = load_configured(config.data, with_test=True)  # from the cache the parent has warmed
        seed_run(job, epochs, data, resolve_device(config.run.device), runs_dir, queue.put)

    run_child(job.label, queue, work)
