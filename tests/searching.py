"""Helpers of the search tests (test_search, test_objective, test_study, test_status): a tiny study via the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from click.testing import CliRunner, Result
from optuna.trial import FrozenTrial, TrialState

from fer_search.cli import main

EPOCHS = 16  # a trial long enough that a signal lands mid-trial, after its second checkpoint
FAST_RUN = """
[run]
heartbeat_interval = 1
grace_period = 3
checkpoint_every_s = 0.0
wait_poll_s = 0.5
"""


# The space's cheaper architectures, the baseline's among them: for tests whose subject is not the models.
QUICK_SPACE = "[space]\nwidth = [0.5, 1.0]\nconvs_per_block = 1\nbatch_size = [64, 128]\n"
# Small, fast architectures only (the baseline, width 1 and batch 128, is then left out of the study).
SMALL_SPACE = "[space]\nwidth = 0.5\nconvs_per_block = 1\nbatch_size = [32, 64]\nlinear_depth = [1, 2]\n"


def write_config(folder: Path, data: Path, extra: str = "") -> Path:
    """A search.toml whose study, cache and artifacts all live in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "search.toml"
    path.write_text(f'[data]\npath = "{data}"\n' + extra)
    return path


def cli(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def load(folder: Path, name: str = "fer2013") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/studies/fer2013.db")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def spawn_run(config: Path, *args: Any) -> subprocess.Popen[str]:
    """`fer-search run` as a real process, its own process group so a signal reaches only it."""
    return subprocess.Popen(
        [sys.executable, "-m", "fer_search", "run", "--config", str(config), "--device", "cpu", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def running_with_checkpoint(folder: Path) -> bool:
    """A RUNNING trial whose checkpoint on disk holds at least two epochs."""
    db = folder / "studies" / "fer2013.db"
    if not db.exists():
        return False
    try:
        trials = load(folder).get_trials(states=(TrialState.RUNNING,))
    except (KeyError, Exception):
        return False
    return any(checkpointed_epochs(t) >= 2 for t in trials)


def checkpointed_epochs(trial: FrozenTrial) -> int:
    """The epochs a trial's checkpoint holds: 0 before its first, and once a trial that ended dropped it (the
    attribute is then None, for a moment before the trial's state says it ended)."""
    return trial.user_attrs.get("checkpoint_epoch") or 0


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints in the study's artifact store (not the temporary file of a write a kill cut short)."""
    artifacts = folder / "studies" / "artifacts"
    return sorted(p for p in artifacts.iterdir() if not p.name.startswith(".")) if artifacts.exists() else []


def live_in_session(session: int) -> list[int]:
    """Processes of a session (a process started with start_new_session, and its children) that have
    not ended (zombies count as ended). Needs /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def crashing_worker(config: Any, index: int, k: int, queue: Any, live: bool, level: int) -> None:
    """Stands in for search._worker_process (spawned children import it from here): worker 1 crashes."""
    from fer_search.processes import run_child

    def work() -> None:
        if index == 1:
            raise ZeroDivisionError("a bug in worker 1")

    run_child(f"worker {index}", queue, work, level)
