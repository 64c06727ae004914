"""Finalize: retrain the best trial and the baseline over seeds, evaluate on the test set, report."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from fer_search.config import Config
from fer_search.data import CLASSES, FerData, load_configured
from fer_search.errors import UserError, configure_logging, first_line
from fer_search.metrics import classification_report
from fer_search.files import made_folder, sha256_json, write_file
from fer_search.predict import compact_state, model_from_state, probabilities, save_model
from fer_search.report import SeedRun, write_reports
from fer_search.search import provenance, stop_processes
from fer_search.model import BASELINE, TrialParams
from fer_search.space import params_from_trial
from fer_search.storage import load_existing_study
from fer_search.train import TrainSettings, configure_cpu_threads, resolve_device, train_model

REPORTED_BASELINE = 0.61356  # the documented project's figure, measured on a split that is not this test folder

# The resume files' weights, part of their key: files from before model.pt stored float16 weights
# hold float32 ones, whose test metrics are not those of the weights finalize would ship.
STORED_WEIGHTS = "compact_state"

Say = Callable[[str], None]
RunAndState = tuple[SeedRun, dict[str, torch.Tensor]]


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
    study = load_existing_study(config.study.storage, config.study.name)
    best = best_complete_trial(study)
    device = resolve_device(config.run.device)
    # Checked before any data is decoded or seed trained: a bad --out must not cost a training run.
    out = made_folder(config.final_dir, "output")
    runs_dir = made_folder(resume_dir(config), "resume")
    searched_on = study.user_attrs.get("data_path")
    if not config.data.path.exists() and searched_on and Path(searched_on).exists():
        raise UserError(f"{config.data.path}: no such file or folder; study {study.study_name!r} was searched on "
                        f"{searched_on}: pass --data {searched_on}")
    # Train and val come from the search's cache in seconds; the test split is decoded only once they match.
    check_same_data(study, load_configured(config.data), config.data.path)
    data = load_configured(config.data, with_test=True)
    epochs = config.finalize.epochs or int(study.user_attrs.get("epochs", config.run.epochs))
    seeds = [config.run.seed + i for i in range(config.finalize.seeds)]
    best_params = params_from_trial(best.user_attrs)
    if best_params == BASELINE and config.finalize.baseline:
        say("the best trial is the baseline: each seed is trained once and reported for both")
    jobs = seed_jobs(best_params, seeds, config.finalize.baseline)
    runs = dict(zip(jobs, retrain(jobs, config, data, epochs, device, runs_dir, say)))
    best_runs = [runs[SeedJob("best", best_params, seed)] for seed in seeds]
    baseline_runs = baseline_runs_of(runs, best_params, seeds) if config.finalize.baseline else []
    shipped, shipped_state = max(best_runs, key=lambda rs: (rs[0].val_acc, -rs[0].seed))
    meta = {"study": study.study_name, "trial": best.number, "seed": shipped.seed, "best_epoch": shipped.best_epoch,
            "fingerprints": data.fingerprints}
    save_model(out / "model.pt", shipped_state, best_params, CLASSES, meta)
    metrics = {
        "shipped_seed": shipped.seed, "epochs": epochs, "seeds": seeds,
        "best_trial": {"number": best.number, "value": best.value, "params": best_params.to_dict()},
        "best": aggregate([r for r, _ in best_runs]),
        "baseline": aggregate([r for r, _ in baseline_runs]) if baseline_runs else None,
        "baseline_reported": {"accuracy": REPORTED_BASELINE, "note": "reported by the documented project, on its own split"},
        "protocol": {"train": "Training", "val": "PublicTest" if data.val_is_public_test else "10% of train",
                     "test": "PrivateTest" if data.val_is_public_test else "test/",
                     "test_all": "PublicTest + PrivateTest (includes the validation split)" if data.val_is_public_test
                     else "test/ (same as test)"},
        "data": {"path": str(config.data.path), "fingerprints": data.fingerprints},
        # "run" is None for a study created before `run` recorded its command line.
        "commands": {"run": study.user_attrs.get("command"), "finalize": command},
        **provenance(),
    }
    write_file(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    baseline_same_seed = next((r for r, _ in baseline_runs if r.seed == shipped.seed), None)
    written = write_reports(out, metrics, shipped, baseline_same_seed, data.test.x[:, 0].numpy(),
                            data.test.y.numpy(), CLASSES, study)
    return summary_text(metrics, out, [out / "model.pt", out / "metrics.json", *written])


def resume_dir(config: Config) -> Path:
    """Finished seeds of an interrupted finalize: kept with the study, not in the folder users take away."""
    return config.study.dir / config.study.name / "finalize-runs"


def best_complete_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study {study.study_name!r} has no complete trial yet: run `fer-search run` first") from None


def check_same_data(study: optuna.Study, data: FerData, path: Path) -> None:
    """The retrained model must see the data its trial was searched on."""
    stored = study.user_attrs.get("fingerprints", {})
    changed = [s for s in ("train", "val") if stored.get(s) != data.fingerprints[s]]
    if changed:
        raise UserError(f"data at {path} differs from the data study {study.study_name!r} was searched on "
                        f"({', '.join(changed)} split fingerprint); pass the study's data with --data")


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


def retrain(jobs: list[SeedJob], config: Config, data: FerData, epochs: int, device: torch.device, runs_dir: Path,
            say: Say) -> list[RunAndState]:
    """Each job's run and weights, in order: reused from an interrupted finalize, else trained and evaluated,
    here (finalize.jobs = 1) or in finalize.jobs processes at once."""
    def finished(job: SeedJob) -> tuple[Path, RunAndState | None]:
        path, key = run_file(runs_dir, job, epochs, data.fingerprints)
        return path, _load_run(path, key)

    found: dict[SeedJob, RunAndState] = {}
    for job in jobs:
        path, cached = finished(job)
        if cached is not None:
            say(f"{job.label}: reusing the finished run in {path}")
            found[job] = cached
    todo = [job for job in jobs if job not in found]
    if config.finalize.jobs == 1:
        configure_cpu_threads(1)
        for job in todo:
            found[job] = seed_run(job, epochs, data, device, runs_dir, say)
    elif todo:
        train_in_processes(todo, config, epochs, runs_dir, say)
        for job in todo:  # each process left its run in its resume file
            path, cached = finished(job)
            if cached is None:
                raise RuntimeError(f"{job.label}: its process ended without writing {path}")
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
    trained = _load_doc(trained_path, key)
    if trained is None:
        trained = _trained_seed(job, epochs, data, device, say)
        # Kept before the evaluation: the float32 CPU pass over the test splits can take as long as a
        # GPU training, and an interruption there must not cost the training.
        _save_doc(trained_path, {"key": key, **trained})
    else:
        say(f"{job.label}: trained by an interrupted finalize; evaluating it")
    run = _evaluated_run(job, trained, data)
    _save_doc(path, {"key": key, "run": json.dumps(dataclasses.asdict(run)), "state": trained["state"]})
    trained_path.unlink(missing_ok=True)
    return run, trained["state"]


def _trained_seed(job: SeedJob, epochs: int, data: FerData, device: torch.device, say: Say) -> dict[str, Any]:
    """The seed's weights as model.pt stores them (rounded), its best epoch, validation accuracy and history."""
    def on_epoch(record: Any, _checkpoint: Any) -> None:
        say(f"{job.label}: epoch {record.epoch}/{epochs} val_acc {record.val_acc:.4f}")

    result = train_model(job.params, data, TrainSettings(epochs=epochs, seed=job.seed, device=device),
                         on_epoch=on_epoch)
    return {"state": compact_state(result.best_state), "best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
            "history": json.dumps([dataclasses.asdict(r) for r in result.history])}


def _evaluated_run(job: SeedJob, trained: dict[str, Any], data: FerData) -> SeedRun:
    """The trained seed evaluated on the test splits as predict evaluates (float32 on the CPU), on
    exactly the rounded weights, so that the metrics are those of the shipped file."""
    model = model_from_state(job.params, trained["state"], len(CLASSES))
    private_probs = probabilities(model, data.test.x)
    all_pred, all_y = private_probs.argmax(1), data.test.y
    if data.val_is_public_test:  # Public + Private: PrivateTest's predictions are at hand (the CPU pass is slow)
        all_pred = torch.cat([probabilities(model, data.val.x).argmax(1), all_pred])
        all_y = torch.cat([data.val.y, data.test.y])
    return SeedRun(
        kind=job.kind, seed=job.seed, best_epoch=trained["best_epoch"], val_acc=trained["val_acc"],
        history=json.loads(trained["history"]),
        private_test=classification_report(data.test.y.numpy(), private_probs.argmax(1).numpy(), CLASSES),
        test_all=classification_report(all_y.numpy(), all_pred.numpy(), CLASSES),
        test_pred=private_probs.argmax(1).tolist(), test_conf=private_probs.max(1).values.tolist(),
    )


def _save_doc(path: Path, doc: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    write_file(path, buffer.getvalue())


def _load_run(path: Path, key: dict[str, Any]) -> RunAndState | None:
    doc = _load_doc(path, key)
    return None if doc is None else (SeedRun(**json.loads(doc["run"])), doc["state"])


def _load_doc(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A resume file's document, where it exists, is readable and was written for `key`."""
    if not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file is retrained, never fatal
        return None
    return doc if isinstance(doc, dict) and doc.get("key") == key else None


# --- finalize.jobs > 1: seed runs in processes of their own ---------------------------------

INTERRUPTED = 130  # a seed process's exit code after Ctrl-C, as the CLI's


@dataclass(frozen=True)
class _Failed:
    """A seed process's error, sent to the parent, which tells it once."""

    label: str
    message: str


def train_in_processes(jobs: list[SeedJob], config: Config, epochs: int, runs_dir: Path, say: Say) -> None:
    """Train `jobs` in config.finalize.jobs processes at once, sharing the device; each writes its resume file.

    Their progress lines come to `say`. A user error in one becomes a UserError here, a crash a
    RuntimeError, after the others are stopped; Ctrl-C stops them all, and finished seeds stay in
    their resume files.
    """
    ctx = multiprocessing.get_context("spawn")  # processes, not threads: the GIL; spawn: CUDA-safe
    queue = ctx.SimpleQueue()
    waiting = list(jobs)
    running: dict[SeedJob, Any] = {}
    failures: dict[str, str] = {}
    try:
        while waiting or running:
            while waiting and len(running) < config.finalize.jobs:
                job = waiting.pop(0)
                running[job] = ctx.Process(target=_seed_process, args=(config, job, epochs, runs_dir, queue))
                running[job].start()
            ended = [job for job, p in running.items() if not p.is_alive()]
            _drain(queue, say, failures)  # after is_alive: an ended process's messages are all in the pipe by now
            for job in ended:
                code = running.pop(job).exitcode
                if code == INTERRUPTED:
                    raise KeyboardInterrupt
                if code == 2:
                    raise UserError(f"{job.label}: {failures.get(job.label, 'failed')}")
                if code != 0:
                    reason = failures.get(job.label, f"its process ended with exit code {code}")
                    raise RuntimeError(f"{job.label}: {reason} (its traceback is above)")
            time.sleep(0.1)
    except KeyboardInterrupt:
        # From a terminal every process got the Ctrl-C; give them a moment to end before telling those that did not.
        _stop(list(running.values()), queue, say, grace_s=2.0)
        raise
    except BaseException:
        _stop(list(running.values()), queue, say, grace_s=0.0)
        raise


def _drain(queue: Any, say: Say, failures: dict[str, str]) -> None:
    while not queue.empty():
        message = queue.get()
        if isinstance(message, _Failed):
            failures[message.label] = message.message
        else:
            say(message)


def _stop(procs: list[Any], queue: Any, say: Say, grace_s: float) -> None:
    """Ctrl-C to the processes still running after `grace_s` seconds (their last lines still told), then wait."""
    stop_processes(procs, lambda: _drain(queue, say, {}), grace_s)


def _seed_process(config: Config, job: SeedJob, epochs: int, runs_dir: Path, queue: Any) -> None:
    """Entry point of one seed run's process; exit codes follow the CLI's (2 bad input, 130 Ctrl-C)."""
    configure_logging()
    try:
        configure_cpu_threads(config.finalize.jobs)  # the cores are shared among the processes
        data = load_configured(config.data, with_test=True)  # from the cache the parent has warmed
        seed_run(job, epochs, data, resolve_device(config.run.device), runs_dir, queue.put)
    except UserError as e:
        queue.put(_Failed(job.label, str(e)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    except Exception as e:
        queue.put(_Failed(job.label, f"{type(e).__name__}: {first_line(e)}"))
        raise  # its traceback on stderr, exit 1


def aggregate(runs: list[SeedRun]) -> dict[str, Any]:
    """Per seed, and mean / standard deviation (ddof 1; None for one seed) over seeds, elementwise for matrices."""
    per_seed = {str(r.seed): {"val_acc": r.val_acc, "best_epoch": r.best_epoch,
                              "private_test": r.private_test, "test_all": r.test_all} for r in runs}
    mean = {split: _over_seeds([getattr(r, split) for r in runs], lambda v: np.mean(v, axis=0))
            for split in ("private_test", "test_all")}
    std = None
    if len(runs) > 1:
        std = {split: _over_seeds([getattr(r, split) for r in runs], lambda v: np.std(v, axis=0, ddof=1))
               for split in ("private_test", "test_all")}
    return {"per_seed": per_seed, "mean": mean, "std": std}


def _over_seeds(reports: list[dict[str, Any]], stat: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """`stat` over the seeds' axis 0 of each figure of classification_report (support and n are the same for all)."""
    def over(values: list[Any]) -> Any:
        return np.asarray(stat(np.asarray(values, dtype=float))).tolist()

    return {
        "accuracy": over([r["accuracy"] for r in reports]),
        "macro_f1": over([r["macro_f1"] for r in reports]),
        "per_class": {c: {m: over([r["per_class"][c][m] for r in reports]) for m in ("precision", "recall", "f1")}
                      for c in reports[0]["per_class"]},
        "confusion": over([r["confusion"] for r in reports]),
    }


def summary_text(metrics: dict[str, Any], out: Path, files: list[Path]) -> str:
    def line(name: str, agg: dict[str, Any] | None) -> str:
        if agg is None:
            return f"{name}: not retrained (--no-baseline)"
        parts = []
        for split in ("private_test", "test_all"):
            m = agg["mean"][split]["accuracy"]
            s = "" if agg["std"] is None else f" ± {agg['std'][split]['accuracy']:.4f}"
            parts.append(f"{split} {m:.4f}{s}")
        seeds = len(agg["per_seed"])
        return f"{name}: " + ", ".join(parts) + f" ({seeds} seed{'' if seeds == 1 else 's'})"

    bt = metrics["best_trial"]
    return "\n".join([
        line(f"best trial {bt['number']} (val {bt['value']:.4f})", metrics["best"]),
        line("baseline", metrics["baseline"]),
        f"shipped seed {metrics['shipped_seed']}; wrote {len(files)} files to {out}",
    ])
