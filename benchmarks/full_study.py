"""The whole real result in one command: environment check, speed, the study, finalize, summary.json.

    python benchmarks/full_study.py --data PATH --out DIR --budget-s 530           # the GPU run
    python benchmarks/full_study.py --device cpu --data TINY --out DIR --budget-s 500 \\
        --trials 2 --epochs 1 --seeds 1 --workers 1                                # its CPU rehearsal

Phases, each under its share of --budget-s (SHARES; unused time passes to the next phase), each
writing into DIR as soon as it ends, so that a run cut short still returns what it did:
  env       versions, the GPU, one short training of the baseline and the largest model through
            every path of the device (bf16 autocast, channels_last, fused optimizer, on-device
            augmentation, dropout) and augmentation statistics against torchvision; a failure
            stops the run with a one-line reason (exit 1)
  speed     benchmarks/throughput.py (one counted round) and one timed baseline training
  study     `fer-search run` with --workers processes sharing the device, each training --fuse
            trials of one architecture at a time as one batched model; at its deadline it is
            interrupted like a Ctrl-C, which queues the running trials again with their checkpoints
  finalize  `fer-search finalize`: the --top-k trials re-ranked over --selection-seeds retrainings,
            then the chosen trial's seeds and the baseline's, --jobs trainings at a time; flip averaging
            decided on validation, the seed ensemble reported (not shipped: the largest architecture's
            would not fit in 16 MiB); then `predict`'s path on the shipped model.pt must reproduce
            its private_test accuracy

DIR's contract (the GPU machine returns at most 8 files of 16 MiB, no folder inside a folder):
summary.json, full_study.log, fer2013.db (the study, checkpointed into one file), model.pt,
metrics.json, report.html (figures inside) and reports.zip (finalize's other files). The working
files (data cache, checkpoints, finished finalize seeds) live in --work, by default a folder in
/tmp named after DIR: called again with the same --out, the run resumes where it stopped, from the
working files on a machine still warm and from DIR's study database on a fresh one.
Exit codes: 0 every phase done; 1 a phase failed; 75 the budget cut a phase short (call again).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The budget counts from here: importing torch and the rest, and the first CUDA call, take seconds
# of the command's limit on a cold machine.
STARTED = time.monotonic()

import torch  # noqa: E402 - after STARTED, on purpose
import torch.nn.functional as F  # noqa: E402
from machine import cpu_model, synchronize
from throughput import subset, throughput
from torchvision import transforms

from fer_search.augment import augment_batch, normalize
from fer_search.config import Config, load_config
from fer_search.data import FerData, load_configured
from fer_search.errors import UserError
from fer_search.files import sha256_json, write_atomically
from fer_search.model import BASELINE, TrialParams
from fer_search.predict import load_model, probabilities
from fer_search.train import TrainSettings, configure_cpu_threads, resolve_device, train_model

STUDY = "fer2013"
# Shares of the budget, from the per-phase plan in BENCHMARKS.md ("The rehearsed GPU run"); the
# rest is the reserve for copying files and the summary.
SHARES = {"env": 0.06, "speed": 0.12, "study": 0.47, "finalize": 0.30}
GRACE_S = 20.0  # an interrupted `run` or `finalize` queues its work and exits well within this
SOFT_STOP = 0.8  # `run --timeout` at this share of the study's time: running trials end before the cut
CHECKPOINT_EVERY_S = 15.0  # a trial cut by the deadline loses at most this much training
MAX_FILES, MAX_BYTES = 8, 16 * 2**20
# Training images of the smoke check: it checks the device's code paths, not their speed (on a CPU the
# largest model takes a second per 10 images).
SMOKE_TRAIN = {"cuda": 1024, "cpu": 32}
FINALIZE_COPIES = ("model.pt", "metrics.json", "report.html")  # the rest of final/ goes into reports.zip
# The largest architecture of the space at its largest batch (the peak memory a worker may need), with
# the other optimiser and schedule than the baseline's.
LARGEST = dataclasses.replace(
    BASELINE,
    dropout_pattern="every",
    width=2.0,
    convs_per_block=2,
    linear_depth=3,
    batch_size=512,
    optimizer="adamw",
    scheduler="cosine",
)

CUT, EXIT_CUT = "cut", 75
RUN_EVERY_CALL = ("env", "study", "finalize")  # env checks this machine; the others skip what is done
IN_PROCESS = ("env", "speed")


class PhaseFailed(Exception):
    """A phase cannot go on; the message is its one-line reason."""


class PhaseCut(BaseException):
    """A phase reached its deadline. A BaseException, as KeyboardInterrupt is, so that no library's
    `except Exception` swallows it."""


class Terminated(PhaseCut):
    """SIGTERM (`timeout`, a machine taken back): the phase at hand is cut and the call ends."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one call runs, from the command line."""

    data: Path
    out: Path
    work: Path
    budget_s: float
    device: str
    trials: int
    epochs: int
    seeds: int
    top_k: int
    selection_seeds: int
    workers: int
    fuse: int
    jobs: int
    seed: int
    config: Path

    @property
    def toml(self) -> Path:
        return self.work / "search.toml"

    @property
    def database(self) -> Path:
        return self.work / f"{STUDY}.db"


class Run:
    """summary.json and full_study.log in DIR, rewritten as each phase ends."""

    def __init__(self, plan: Plan, command: str) -> None:
        self.plan = plan
        self.summary_path = plan.out / "summary.json"
        self.log_path = plan.out / "full_study.log"
        previous = json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {}
        self.summary: dict[str, Any] = {"phases": previous.get("phases", {}), "calls": previous.get("calls", [])}
        self.summary["calls"].append(
            {"command": command, "started": _now(), "budget_s": plan.budget_s, "host": socket.gethostname()}
        )

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.log_path.open("a") as log:
            log.write(f"{_now()} {line}\n")

    def record(self, phase: str, figures: dict[str, Any]) -> None:
        self.summary["phases"][phase] = figures
        self.save()

    def save(self) -> None:
        self.summary["files"] = dir_files(self.plan.out)
        _write(self.summary_path, json.dumps(self.summary, indent=2).encode())


def main() -> int:
    plan = _parse_args()
    plan.out.mkdir(parents=True, exist_ok=True)
    plan.work.mkdir(parents=True, exist_ok=True)
    for partial in plan.out.glob(".*.tmp"):  # left by a call killed while it wrote
        partial.unlink()
    run = Run(plan, shlex.join([sys.executable, *sys.argv]))
    try:
        code = run_all(plan, run)
    except Terminated:
        run.say(f"stopped by SIGTERM; resume with: {run.summary['calls'][-1]['command']}")
        code = EXIT_CUT
    run.summary["calls"][-1].update({"ended": _now(), "exit": code})
    run.save()
    return code


def run_all(plan: Plan, run: Run) -> int:
    """The phases still to do, each under its deadline; the call's exit code."""
    # A SIGTERM (`timeout`, a machine being taken back) ends the phase at hand like its deadline
    # (the service is interrupted, its work saved, the phase recorded), then the call.
    signal.signal(signal.SIGTERM, _terminate)
    configure_cpu_threads(1)
    config = write_config(plan)
    restore_study(plan)
    done = {name for name, phase in run.summary["phases"].items() if phase.get("status") == "done"}
    todo = [name for name in SHARES if name not in done or name in RUN_EVERY_CALL]
    deadlines = _deadlines(STARTED, plan.budget_s, todo)
    phases: dict[str, Callable[[], dict[str, Any]]] = {
        "env": lambda: env_phase(config, plan),
        "speed": lambda: speed_phase(config, plan),
        "study": lambda: study_phase(plan, run, deadlines["study"]),
        "finalize": lambda: finalize_phase(config, plan, run, deadlines["finalize"]),
    }
    statuses = []
    for name in todo:
        if name == "study" and _study_complete(run.summary["phases"].get("study"), plan):
            run.say("study: finished in an earlier call; kept")
            continue
        if name == "finalize" and _finalized_for_this_study(run.summary["phases"].get("finalize"), plan):
            run.say("finalize: done for the study as it stands in an earlier call; kept")
            continue
        # The services end themselves at their deadline (SIGINT, like a Ctrl-C); the alarm is their safety net.
        run.say(f"{name}: starting, {deadlines[name] - time.monotonic():.0f} s left for it")
        alarm = deadlines[name] + (0 if name in IN_PROCESS else GRACE_S + 60)
        status = run_phase(run, name, phases[name], alarm)
        statuses.append(status)
        if name == "env" and status == "failed":
            run.say(f"stopping: env failed: {run.summary['phases']['env']['reason']}")
            return 1
    check_contract(plan.out)
    if "failed" in statuses:
        return 1
    if CUT in statuses:
        run.say(f"the budget cut a phase short; resume with: {run.summary['calls'][-1]['command']}")
        return EXIT_CUT
    run.say("every phase done")
    return 0


def _parse_args() -> Plan:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="FER2013 image folders (train/, test/)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to bring back (at most 8 files)")
    parser.add_argument(
        "--budget-s", type=float, default=530.0, help="seconds for the whole call, counted from its start (default 530)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3, help="trials finalize re-ranks (1: the search's best)")
    parser.add_argument("--selection-seeds", type=int, default=2, help="retrainings of each re-ranked trial")
    parser.add_argument("--workers", type=int, help="search processes sharing the device (default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--fuse", type=int, default=1, help="trials a worker trains as one batched model (default 1)")
    parser.add_argument("--jobs", type=int, help="finalize's trainings at once (default: all on CUDA, 1 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "search.toml",
        help="the search.toml whose [pruner] and [space] the study uses",
    )
    parser.add_argument("--work", type=Path, help="working files (default: a folder in /tmp named after --out)")
    args = parser.parse_args()
    out = args.out.resolve()
    cuda = resolve_device(args.device).type == "cuda"
    for name in ("trials", "epochs", "seeds", "top_k", "selection_seeds", "workers", "fuse", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    if not args.data.exists():
        parser.error(f"--data {args.data}: no such file or folder")
    work = args.work or Path(tempfile.gettempdir()) / f"fer-full-study-{sha256_json(str(out))[:12]}"
    return Plan(
        data=args.data.resolve(),
        out=out,
        work=work.resolve(),
        budget_s=args.budget_s,
        device=args.device,
        trials=args.trials,
        epochs=args.epochs,
        seeds=args.seeds,
        top_k=args.top_k,
        selection_seeds=args.selection_seeds,
        workers=args.workers or (4 if cuda else 1),
        fuse=args.fuse,
        # On CUDA every training of a phase at once: the re-ranking's top_k x selection_seeds, then the
        # final seeds of the chosen trial and of the baseline.
        jobs=args.jobs or (max(2 * args.seeds, args.top_k * args.selection_seeds) if cuda else 1),
        seed=args.seed,
        config=args.config,
    )


def _terminate(_signum: int, _frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not break the clean-up
    raise Terminated("stopped by SIGTERM")


def _deadlines(start: float, budget_s: float, todo: list[str]) -> dict[str, float]:
    """Each phase's end on time.monotonic(): the budget's shares of the phases still to run, cumulated."""
    shares = {name: SHARES[name] for name in todo}
    scale = sum(SHARES.values()) / sum(shares.values())  # the reserve keeps its share
    ends, used = {}, 0.0
    for name, share in shares.items():
        used += share * scale
        ends[name] = start + budget_s * used
    return ends


def run_phase(run: Run, name: str, phase: Callable[[], dict[str, Any]], alarm: float) -> str:
    """Run one phase until it ends or the alarm rings (a time.monotonic() value) and record it: done,
    cut (resumable) or failed (with a reason)."""
    started = time.monotonic()
    terminated = False
    try:
        with _alarm(alarm - time.monotonic()):
            figures = {"status": "done", **phase()}
    except PhaseCut as cut:
        figures = {"status": CUT, "reason": str(cut), **getattr(cut, "figures", {})}
        terminated = isinstance(cut, Terminated)
    except PhaseFailed as failure:
        figures = {"status": "failed", "reason": str(failure), **getattr(failure, "figures", {})}
    except Exception as error:  # noqa: BLE001 - any error ends this phase with its reason, never the run's record
        figures = {"status": "failed", "reason": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
    previous = run.summary["phases"].get(name, {})
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["seconds_all_calls"] = round(previous.get("seconds_all_calls", 0.0) + figures["seconds"], 1)
    if figures["status"] != "done" and previous.get("status") == "done":  # DIR still holds what it made
        figures["earlier_done"] = {k: v for k, v in previous.items() if k != "earlier_done"}
    run.record(name, figures)
    run.say(
        f"{name}: {figures['status']} in {figures['seconds']:.0f} s"
        + (f" ({figures['reason']})" if "reason" in figures else "")
    )
    if terminated:
        raise Terminated(figures["reason"])
    return figures["status"]


@contextlib.contextmanager
def _imports_whole() -> Iterator[None]:
    """The alarm and SIGTERM held back (blocked, then delivered) while importing: a cut inside an import
    leaves a half-initialised module in sys.modules, and every later phase then fails to import it."""
    former = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, former)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise PhaseCut in this (main) thread after `seconds`; the study and finalize phases end their
    subprocesses themselves before it rings."""

    def ring(_signum: int, _frame: Any) -> None:
        raise PhaseCut(f"deadline reached after its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the configuration the service runs with --------------------------------------------------


def write_config(plan: Plan) -> Config:
    """The search.toml of this run in --work: the paths of --work, the command line's sizes, and
    --config's pruner and space. Returns it loaded, as the service will load it."""
    base = load_config(plan.config)
    sections: dict[str, dict[str, Any]] = {
        "data": {"path": plan.data, "cache_dir": plan.work / "cache"},
        "study": {
            "name": STUDY,
            "storage": f"sqlite:///{plan.database}",
            "artifacts": plan.work / "artifacts",
            "dir": plan.work / "studies",
        },
        "run": {
            "trials": plan.trials,
            "epochs": plan.epochs,
            "device": plan.device,
            "workers": plan.workers,
            "fuse": plan.fuse,
            "seed": plan.seed,
            "checkpoint_every_s": CHECKPOINT_EVERY_S,
        },
        "pruner": dataclasses.asdict(base.pruner),
        "space": base.space.to_dict(),
        "finalize": {
            "seeds": plan.seeds,
            "epochs": plan.epochs,
            "jobs": plan.jobs,
            "top_k": plan.top_k,
            "selection_seeds": plan.selection_seeds,
            "out": plan.work / "final",
        },
    }
    text = "".join(
        f"[{name}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in table.items()) + "\n"
        for name, table in sections.items()
    )
    _write(plan.toml, text.encode())
    return load_config(plan.toml)


def _toml(value: Any) -> str:
    """A TOML value. By hand: Python reads TOML (tomllib) but writes none, and the GPU machine has no tomli_w."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON's escapes are TOML's basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def restore_study(plan: Plan) -> None:
    """On a fresh machine, continue the study from the database that an earlier call left in DIR."""
    shipped = plan.out / plan.database.name
    if not plan.database.exists() and shipped.exists():
        _sqlite_copy(shipped, plan.database)


# --- phase 1: the environment and the device's paths --------------------------------------------


def env_phase(config: Config, plan: Plan) -> dict[str, Any]:
    device = resolve_device(plan.device)
    figures = {"environment": environment(device), "device": str(device), "data": str(plan.data)}
    data = load_configured(config.data)
    small = subset(data, torch.arange(min(SMOKE_TRAIN[device.type], len(data.train.y))))  # and a few validation images
    figures["smoke"] = {
        name: smoke_training(params, small, device) for name, params in (("baseline", BASELINE), ("largest", LARGEST))
    }
    figures["augmentation"] = augmentation_statistics(device)
    if not figures["augmentation"]["matches_torchvision"]:
        raise _with(
            PhaseFailed(f"augmentation on {device} does not match torchvision's statistics: {figures['augmentation']}"),
            figures,
        )
    return figures


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, machine and device: what a figure of this run must name."""
    # Imports Optuna: a broken install is then this phase's failure, not the script's.
    with _imports_whole():
        from fer_search.study import package_version, provenance

    found = provenance()
    env: dict[str, Any] = {
        **found["versions"],
        "git": found["git"],
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "date": _now(),
    }
    for name in ("torchvision", "numpy", "matplotlib"):
        env[name] = package_version(name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            {
                "gpu": props.name,
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "gpu_capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    return env


def smoke_training(params: TrialParams, data: FerData, device: torch.device) -> dict[str, Any]:
    """One epoch of `params` on a few images through train_model's paths on `device`; its figures."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train_model(params, data, TrainSettings(epochs=1, seed=0, device=device))
    record = result.history[-1]
    if not all(map(_finite, (record.train_loss, record.val_loss))):
        raise PhaseFailed(
            f"smoke training of {params} on {device}: loss {record.train_loss}, val loss {record.val_loss}"
        )
    figures = {
        "seconds": round(time.perf_counter() - start, 2),
        "train_loss": record.train_loss,
        "val_acc": record.val_acc,
        "images_per_s": round(record.images_per_s, 1),
    }
    if device.type == "cuda":
        figures["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return figures


def augmentation_statistics(device: torch.device, distinct: int = 8, copies: int = 125) -> dict[str, Any]:
    """augment_batch on `device` against torchvision's transforms on the CPU, on copies of smooth
    random faces: overall mean and spread, and the mean row profile (the crops' vertical geometry),
    with the unit test's tolerances."""
    coarse = torch.rand(distinct, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 255
    faces = F.interpolate(coarse, size=(48, 48), mode="bilinear").round().to(torch.uint8).repeat(copies, 1, 1, 1)
    reference = transforms.Compose(
        [
            transforms.Pad(4, padding_mode="reflect"),
            transforms.RandomResizedCrop(48, scale=(0.5, 1.0)),
            transforms.RandomHorizontalFlip(),
        ]
    )
    torch.manual_seed(0)
    expected = normalize(torch.stack([reference(face) for face in faces]))
    got = augment_batch(faces.to(device), torch.Generator(device=device).manual_seed(0)).cpu()
    gaps = {
        "mean": abs(got.mean() - expected.mean()).item(),
        "std": abs(got.std() - expected.std()).item(),
        "row_profile": (got.mean(dim=(0, 1, 3)) - expected.mean(dim=(0, 1, 3))).abs().max().item(),
    }
    limits = {"mean": 0.01, "std": 0.01, "row_profile": 0.04}
    return {"gaps": gaps, "limits": limits, "matches_torchvision": all(gaps[k] < limits[k] for k in limits)}


# --- phase 2: speed ----------------------------------------------------------------------------


def speed_phase(config: Config, plan: Plan) -> dict[str, Any]:
    device = resolve_device(plan.device)
    figures: dict[str, Any] = {}
    try:
        if (plan.data / "train").is_dir():
            figures["throughput"] = throughput(plan.data, device, repeats=1, cache_dir=config.data.cache_dir)
        else:
            figures["throughput"] = {"skipped": "the reference pipeline reads image folders; --data is not one"}
        figures["baseline_training"] = timed_baseline(config, plan, device)
    except PhaseCut as cut:
        raise _with(cut, figures) from None  # what was measured before the deadline stays
    return figures


def timed_baseline(config: Config, plan: Plan, device: torch.device) -> dict[str, Any]:
    """One baseline training of --epochs epochs on the whole training set, timed from start to end."""
    data = load_configured(config.data)
    synchronize(device)
    start = time.perf_counter()
    result = train_model(BASELINE, data, TrainSettings(epochs=plan.epochs, seed=plan.seed, device=device))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "epochs": plan.epochs,
        "seconds": round(seconds, 2),
        "seconds_per_epoch": round(seconds / plan.epochs, 3),
        "train_images": len(data.train.y),
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "train_images_per_s": round(sum(r.images_per_s for r in result.history) / len(result.history), 1),
    }


# --- phase 3: the study --------------------------------------------------------------------------


def study_phase(plan: Plan, run: Run, deadline: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        code = service(run, ["run", "--timeout", f"{max(1.0, SOFT_STOP * (deadline - started)):.0f}"], deadline)
    finally:
        ship_database(plan)  # however the service ended, the study as it stands comes back
    seconds = run.summary["phases"].get("study", {}).get("seconds_all_calls", 0.0) + time.monotonic() - started
    figures = study_figures(plan)
    figures["trials_per_hour"] = round(figures["finished"] / seconds * 3600, 1)  # over every call's study time
    figures = _phase_end(code, "run", {**figures, "log_tail": _log_tail(run.log_path)})
    if figures["finished"] < plan.trials:  # `run --timeout` stopped it (exit 0) before the deadline
        raise _with(PhaseCut(f"{figures['finished']} of {plan.trials} trials finished when its time ran out"), figures)
    return figures


def service(run: Run, args: list[str], deadline: float) -> int:
    """`python -m fer_search ARGS --config WORK/search.toml` until it ends or the deadline, when it
    gets the Ctrl-C a terminal would send (exit 130); its output goes to the log."""
    command = [sys.executable, "-m", "fer_search", *args, "--config", str(run.plan.toml)]
    run.say("$ " + shlex.join(command))
    with run.log_path.open("ab") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )  # its own process group: the signal reaches its workers
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return _interrupt(proc)
        except BaseException:  # the alarm or a Ctrl-C of this run: the service must not outlive it
            _interrupt(proc)
            raise


def _interrupt(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT to the service's process group, as Ctrl-C in a terminal; SIGKILL after GRACE_S.
    Its exit code: 130 where the signal stopped it, its own where it ended first."""
    with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
        os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 130
    return 130 if code in (130, -signal.SIGINT) else code


def _phase_end(code: int, command: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The phase's figures, or PhaseCut / PhaseFailed carrying them, by the service's exit code."""
    if code == 130:
        raise _with(PhaseCut(f"`{command}` interrupted at the phase's deadline; its work is saved"), figures)
    if code != 0:
        raise _with(PhaseFailed(f"`{command}` exited {code}: {_last_error_line(figures.get('log_tail', ''))}"), figures)
    return figures


def _with(error: Exception, figures: dict[str, Any]) -> Exception:
    error.figures = figures  # type: ignore[attr-defined]
    return error


def ship_database(plan: Plan) -> None:
    """The study database into DIR: checkpointed (nothing left in a -wal file) and copied as one file."""
    if plan.database.exists():
        _sqlite_copy(plan.database, plan.out / plan.database.name)


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database in rollback-journal mode, so that it is one whole file.
    Made in a temporary folder, where its side files come and go, then written to `target` at once."""
    with tempfile.TemporaryDirectory(prefix="fer-db-") as temp:
        copy = Path(temp) / "copy.db"
        with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(copy)) as dst:
            src.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
        _write(target, copy.read_bytes())


def study_figures(plan: Plan) -> dict[str, Any]:
    """Trials by state, epochs trained against unpruned, best and baseline, read from the database
    (no trials where `run` was stopped before it created the study)."""
    with _imports_whole():
        import optuna  # the study phase's library, imported where it is needed

        from fer_search.status import study_status

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = None
    if plan.database.exists():
        storage = optuna.storages.RDBStorage(f"sqlite:///{plan.database}")
        if STUDY in optuna.get_all_study_names(storage):
            study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    status = study_status(study) if study is not None else {"best": None, "baseline": None}
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    epochs_run = sum(t.user_attrs.get("epochs_run", 0) for t in finished)
    return {
        "workers": plan.workers,
        "fuse": plan.fuse,
        "finished": len(finished),
        "trials": {
            state: sum(t.state.name == state for t in trials)
            for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
        },
        "epochs_run": epochs_run,
        "epochs_unpruned": len(finished) * plan.epochs,
        "share_of_epochs_pruned": round(1 - epochs_run / max(1, len(finished) * plan.epochs), 3),
        "best": status["best"],
        "baseline": status["baseline"],
        "trial_seconds": round(sum(t.user_attrs.get("seconds", 0.0) for t in finished), 1),
    }


# --- phase 4: finalize ----------------------------------------------------------------------------


def finalize_phase(config: Config, plan: Plan, run: Run, deadline: float) -> dict[str, Any]:
    study = study_figures(plan)
    if study["best"] is None:
        raise PhaseCut("the study has no complete trial yet")
    code = service(run, ["finalize"], deadline)
    if code != 0:
        return _phase_end(code, "finalize", {"log_tail": _log_tail(run.log_path)})
    metrics = json.loads((config.final_dir / "metrics.json").read_text())
    ship_final(config.final_dir, plan.out)
    figures = {
        "jobs": plan.jobs,
        "top_k": plan.top_k,
        "selection_seeds": plan.selection_seeds,
        **finalize_figures(metrics),
        "predict": predict_check(config, plan.out, metrics),
        "study_finished": study["finished"],
    }
    if not figures["predict"]["reproduces"]:
        raise _with(
            PhaseFailed(
                "predict on the shipped model.pt does not reproduce metrics.json's private_test "
                f"accuracy: {figures['predict']}"
            ),
            figures,
        )
    return figures


def ship_final(final: Path, out: Path) -> None:
    """model.pt, metrics.json and report.html as they are; finalize's other files in reports.zip."""
    for name in FINALIZE_COPIES:
        _write(out / name, (final / name).read_bytes())
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(final.iterdir()):
            if path.is_file() and path.name not in FINALIZE_COPIES:
                archive.write(path, path.name)
    _write(out / "reports.zip", bundle.getvalue())


def finalize_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """What is shipped; the re-ranking; best trial and baseline, single and flip averaged: per-seed and
    mean ± std accuracies on PrivateTest and Public + Private; the ensemble's."""

    def accuracies(agg: dict[str, Any] | None) -> dict[str, Any] | None:
        if agg is None:
            return None
        return {
            split: {
                "per_seed": {seed: run[split]["accuracy"] for seed, run in agg["per_seed"].items()},
                "mean": agg["mean"][split]["accuracy"],
                "std": None if agg["std"] is None else agg["std"][split]["accuracy"],
            }
            for split in ("private_test", "test_all")
        }

    def scored(figures: dict[str, Any]) -> dict[str, Any]:
        return {"val_acc": figures["val_acc"], **{s: figures[s]["accuracy"] for s in ("private_test", "test_all")}}

    shipped, selection, ensemble = metrics["shipped"], metrics["selection"], metrics["ensemble"]
    return {
        "best_trial": metrics["best_trial"],
        "shipped": {**{k: shipped[k] for k in ("trial", "seeds", "flip", "ensemble")}, **scored(shipped)},
        "selection": None if selection is None else _selection_figures(selection),
        "flip": metrics["flip"],
        "seeds": metrics["seeds"],
        "epochs": metrics["epochs"],
        "best": accuracies(metrics["best"]),
        "best_flipped": accuracies(metrics["best_flipped"]),
        "ensemble": ensemble and {mode: scored(ensemble[mode]) for mode in ("plain", "flipped")},
        "baseline": accuracies(metrics["baseline"]),
        "baseline_flipped": accuracies(metrics["baseline_flipped"]),
    }


def _selection_figures(selection: dict[str, Any]) -> dict[str, Any]:
    """The re-ranking: each candidate's search score and retrained accuracies, the choice and its overstatement."""
    return {
        "chosen": selection["chosen"],
        "overstated_by": selection["overstated_by"],
        "candidates": [
            {k: c[k] for k in ("number", "value", "val_accs", "mean", "std")} for c in selection["candidates"]
        ],
    }


def predict_check(config: Config, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of the shipped model.pt on PrivateTest through predict's path, against metrics.json."""
    data = load_configured(config.data, with_test=True)
    loaded = load_model(out / "model.pt")
    predicted = probabilities(loaded.model, data.test.x).argmax(1)
    accuracy = (predicted == data.test.y).sum().item() / len(data.test.y)  # as metrics.json counts it
    expected = metrics["shipped"]["private_test"]["accuracy"]
    return {
        "images": len(data.test.y),
        "accuracy": accuracy,
        "metrics_json": expected,
        "reproduces": abs(accuracy - expected) < 0.5 / len(data.test.y),
    }


def _study_complete(previous: dict[str, Any] | None, plan: Plan) -> bool:
    """An earlier call finished the study: `run` would start its workers only to find nothing to do."""
    if not previous or previous.get("status") != "done" or not plan.database.exists():
        return False
    study = study_figures(plan)
    return study["finished"] >= plan.trials and not (study["trials"]["RUNNING"] or study["trials"]["WAITING"])


def _finalized_for_this_study(previous: dict[str, Any] | None, plan: Plan) -> bool:
    """An earlier call finalized the study as it stands now (same finished trials, seeds and epochs)."""
    if not previous or previous.get("status") != "done" or not plan.database.exists():
        return False
    if not all((plan.out / name).is_file() for name in (*FINALIZE_COPIES, "reports.zip")):
        return False
    return (
        previous.get("study_finished") == study_figures(plan)["finished"]
        and len(previous.get("seeds", [])) == plan.seeds
        and previous.get("epochs") == plan.epochs
        and (previous.get("top_k"), previous.get("selection_seeds")) == (plan.top_k, plan.selection_seeds)
    )


# --- DIR and small helpers --------------------------------------------------------------------


def dir_files(out: Path) -> list[dict[str, Any]]:
    return [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(out.iterdir()) if p.is_file()]


def check_contract(out: Path) -> None:
    """At most MAX_FILES files of at most MAX_BYTES, no folder, no SQLite side file: what can come back."""
    entries = sorted(out.iterdir())
    problems = [f"{p.name} is a folder" for p in entries if p.is_dir()]
    problems += [
        f"{p.name} has {p.stat().st_size} bytes" for p in entries if p.is_file() and p.stat().st_size > MAX_BYTES
    ]
    problems += [
        f"{p.name} is a SQLite side file or a partial write"
        for p in entries
        if p.name.endswith(("-wal", "-shm", "-journal", ".tmp"))
    ]
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries, more than {MAX_FILES}")
    if problems:
        raise SystemExit(f"{out}: breaks the contract of what comes back: {'; '.join(problems)}")


def _write(path: Path, content: bytes) -> None:
    """Write `path` whole or not at all (fer-search's atomic write; an interrupted one leaves no file)."""
    write_atomically(path, lambda f: f.write(content))


def _log_tail(path: Path, lines: int = 5) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _last_error_line(tail: str) -> str:
    errors = [line for line in tail.splitlines() if line.startswith("error:") or "Error" in line]
    return (errors or tail.splitlines() or ["no output"])[-1]


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:  # a bad --device, --config or data path: one line, as the CLI's
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
