"""search: run / re-run / extend, workers, crash and Ctrl-C recovery, pruning, mismatch, status."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner, Result
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from fer_search import search
from fer_search.cli import main
from fer_search.config import PrunerConfig
from fer_search.model import BASELINE, TrialParams
from fer_search.train import DivergedError

EPOCHS = 16  # a trial long enough that a signal lands mid-trial, after its second checkpoint
FAST_RUN = """
[run]
heartbeat_interval = 1
grace_period = 3
checkpoint_every_s = 0.0
wait_poll_s = 0.5
"""


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
    return subprocess.Popen([sys.executable, "-m", "fer_search", "run", "--config", str(config), "--device", "cpu",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


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
    return any(t.user_attrs.get("checkpoint_epoch", 0) >= 2 for t in trials)


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints in the study's artifact store (not the temporary file of a write a kill cut short)."""
    artifacts = folder / "studies" / "artifacts"
    return sorted(p for p in artifacts.iterdir() if not p.name.startswith(".")) if artifacts.exists() else []


def test_run_rerun_extend(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    first = cli("run", "--config", config, "--trials", 3, "--epochs", 2, "--device", "cpu")
    assert first.exit_code == 0, first.output
    study = load(tmp_path)
    assert len(finished(study)) == 3
    trial0 = study.trials[0]
    assert trial0.user_attrs["baseline"] is True
    assert TrialParams.from_dict(trial0.user_attrs["trial_params"]) == BASELINE
    assert {"seed", "best_epoch", "epochs_run", "seconds", "images_per_s", "device"} <= set(trial0.user_attrs)
    assert study.user_attrs["ready"] and study.user_attrs["epochs"] == 2
    assert set(study.user_attrs["fingerprints"]) == {"train", "val"}

    again = cli("run", "--config", config, "--trials", 3, "--epochs", 2, "--device", "cpu")
    assert again.exit_code == 0 and len(load(tmp_path).trials) == 3  # a no-op that prints the status
    assert "complete 3" in again.output

    more = cli("run", "--config", config, "--trials", 5, "--epochs", 2, "--device", "cpu")
    assert more.exit_code == 0
    study = load(tmp_path)
    assert len(finished(study)) == 5
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1


def test_status_json_contract(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    assert cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu").exit_code == 0
    result = cli("status", "--config", config, "--json")
    doc = json.loads(result.output)
    assert set(doc) == {"study", "trials", "best", "baseline", "seconds"}
    assert set(doc["trials"]) == {s.name for s in TrialState}
    assert doc["trials"]["COMPLETE"] == 2 and doc["seconds"] > 0
    study = load(tmp_path)
    assert doc["best"]["number"] == study.best_trial.number and doc["best"]["value"] == study.best_value
    assert doc["baseline"] == {"number": 0, "value": study.trials[0].value, "state": "COMPLETE"}


def test_changed_epochs_or_space_refused_unless_ignored(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    changed = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "2", "--epochs", "2"])
    assert changed.exit_code == 2 and "epochs (1 -> 2)" in changed.output and "--ignore-mismatch" in changed.output
    write_config(tmp_path, tiny_fer, "[space]\nwidth = [0.5, 1.0]\n")
    choices = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "2", "--epochs", "1",
                                        "--ignore-mismatch"])
    assert choices.exit_code == 2 and "space.width" in choices.output  # Optuna cannot change choices
    write_config(tmp_path, tiny_fer, "[space]\nlr = {low = 1e-4, high = 3e-3, log = false}\n")
    log_scale = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "2", "--epochs", "1",
                                          "--ignore-mismatch"])
    assert log_scale.exit_code == 2 and "space.lr" in log_scale.output and "log scale" in log_scale.output
    write_config(tmp_path, tiny_fer, "[space]\nlr = {low = 1e-4, high = 1e-2, log = true}\n")
    space = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "2", "--epochs", "1"])
    assert space.exit_code == 2 and "space.lr" in space.output
    ok = cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu", "--ignore-mismatch")
    assert ok.exit_code == 0 and len(finished(load(tmp_path))) == 2


def test_baseline_outside_the_space_is_not_enqueued(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, "[space]\nbatch_size = [32, 64]\n")
    result = cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0
    study = load(tmp_path)
    assert study.user_attrs["baseline_excluded"] is True
    assert not any(t.user_attrs.get("baseline") for t in study.trials)
    assert "excludes" in cli("status", "--config", config).output


def test_pruning_prunes(tmp_path: Path, tiny_fer: Path) -> None:
    """Three finished trials that report 2.0 at every epoch put every percentile at 2.0: any real accuracy is below."""
    config = write_config(tmp_path, tiny_fer, "[pruner]\nstartup_trials = 1\nwarmup_epochs = 0\n")
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 4, "--device", "cpu").exit_code == 0
    study = load(tmp_path)
    for _ in range(3):
        study.add_trial(optuna.create_trial(value=2.0, params={}, distributions={},
                                            intermediate_values={e: 2.0 for e in range(1, 5)}))
    assert cli("run", "--config", config, "--trials", 6, "--epochs", 4, "--device", "cpu").exit_code == 0
    new = [t for t in load(tmp_path).trials[4:]]
    assert len(new) == 2 and all(t.state == TrialState.PRUNED for t in new)
    assert all(t.user_attrs["epochs_run"] == 1 for t in new)  # pruned after its first epoch, not 4


def test_timeout_stops_taking_trials(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    result = cli("run", "--config", config, "--trials", 50, "--epochs", 1, "--device", "cpu", "--timeout", 3)
    assert result.exit_code == 0 and "timeout" in result.output
    assert 1 <= len(finished(load(tmp_path))) < 50


def test_three_local_workers_share_one_sqlite_file(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    proc = spawn_run(config, "--trials", 7, "--epochs", 2, "--workers", 3)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "locked" not in err
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert TrialState.FAIL not in states and TrialState.RUNNING not in states
    assert 7 <= len(finished(study)) <= 7 + 3 - 1
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    assert len({t.user_attrs["seed"] for t in study.trials}) == len(study.trials)


def test_killed_worker_trial_is_failed_retried_and_resumed(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    victim = spawn_run(config, "--trials", 1, "--epochs", EPOCHS)
    try:
        wait_for(lambda: running_with_checkpoint(tmp_path), 120, "a running trial with a checkpoint")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed = load(tmp_path).get_trials(states=(TrialState.RUNNING,))[0]
    time.sleep(3.5)  # past the grace period: its heartbeat is stale
    rescuer = spawn_run(config, "--trials", 1, "--epochs", EPOCHS)
    _, err = rescuer.communicate(timeout=300)
    assert rescuer.returncode == 0, err
    study = load(tmp_path)
    assert study.trials[killed.number].state == TrialState.FAIL
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    # From its checkpoint (the file may be one epoch ahead of the attribute if the kill fell between them).
    assert retry.user_attrs["resumed_at_epoch"] >= killed.user_attrs["checkpoint_epoch"] + 1 >= 3
    assert retry.params == killed.params and retry.user_attrs["seed"] == killed.user_attrs["seed"]
    assert sorted(retry.intermediate_values) == list(range(1, retry.user_attrs["epochs_run"] + 1))
    assert checkpoint_files(tmp_path) == []  # the dead trial's and the retry's, removed once it finished


def test_ctrl_c_exits_130_and_the_next_run_resumes(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    proc = spawn_run(config, "--trials", 1, "--epochs", EPOCHS)
    wait_for(lambda: running_with_checkpoint(tmp_path), 120, "a running trial with a checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "resume" in err and "Traceback" not in err
    study = load(tmp_path)
    failed = study.get_trials(states=(TrialState.FAIL,))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(failed) == 1 and len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == failed[0].params
    assert waiting[0].user_attrs["resumed_from"] == failed[0].number

    again = spawn_run(config, "--trials", 1, "--epochs", EPOCHS)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    study = load(tmp_path)
    assert len(finished(study)) == 1 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    resumed = study.trials[waiting[0].number]
    assert resumed.user_attrs["resumed_at_epoch"] >= 3


def test_search_never_reads_the_test_split(tmp_path: Path, tiny_fer: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_fer, data)
    for private in data.glob("test/*/PrivateTest_*"):
        private.write_bytes(b"not an image")
    config = write_config(tmp_path, data)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    result = CliRunner().invoke(main, ["finalize", "--config", str(config), "--seeds", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "PrivateTest_" in result.output


def test_a_trial_taken_but_never_started_is_failed_and_retried(tmp_path: Path, tiny_fer: Path) -> None:
    """A worker that died between asking for a trial and starting it left no heartbeat: Optuna's stale
    check cannot see it, and without fer-search's own check `--trials 2` would wait for it forever."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    orphan = load(tmp_path).ask()  # RUNNING, no heartbeat, never trained: failed a grace period after it is seen
    result = cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu", "--timeout", 120)
    assert result.exit_code == 0 and "timeout" not in result.output
    study = load(tmp_path)
    assert study.trials[orphan.number].state == TrialState.FAIL
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(finished(study)) == 2 and not study.get_trials(states=(TrialState.RUNNING,))


def test_a_live_workers_trial_failed_by_another_is_handed_to_its_retry(tmp_path: Path, tiny_fer: Path) -> None:
    """As when a worker's heartbeats stop reaching the storage for a while: another worker fails its
    trial and queues a retry. The live worker must not crash; it goes on and takes the retry."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    proc = spawn_run(config, "--trials", 1, "--epochs", EPOCHS)
    try:
        wait_for(lambda: running_with_checkpoint(tmp_path), 120, "a running trial with a checkpoint")
        study = load(tmp_path)
        [running] = study.get_trials(states=(TrialState.RUNNING,))
        study.tell(running.number, state=TrialState.FAIL)  # what fail_stale_trials does elsewhere
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, load(tmp_path).trials[running.number])
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"trial {running.number} was failed as stale by another worker" in err and "Traceback" not in err
    study = load(tmp_path)
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == running.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.user_attrs["resumed_at_epoch"] >= 3


@pytest.mark.parametrize("error, state, reason", [
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), TrialState.FAIL,
     "out of memory"),
    (DivergedError("training loss is nan at epoch 1"), TrialState.PRUNED, "diverged"),
])
def test_out_of_memory_or_nan_ends_the_trial_not_the_worker(tmp_path: Path, tiny_fer: Path,
                                                            monkeypatch: pytest.MonkeyPatch, error: Exception,
                                                            state: TrialState, reason: str) -> None:
    real_train = search.train_model
    calls = []

    def first_call_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real_train(*args, **kwargs)

    monkeypatch.setattr(search, "train_model", first_call_fails)
    config = write_config(tmp_path, tiny_fer)
    result = cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    study = load(tmp_path)
    assert study.trials[0].state == state and reason in study.trials[0].user_attrs["fail_reason"]
    assert len(finished(study)) == 2


@pytest.mark.parametrize("kind, patience, expected", [
    ("percentile", 0, optuna.pruners.PercentilePruner),
    ("median", 0, optuna.pruners.PercentilePruner),
    ("hyperband", 0, optuna.pruners.HyperbandPruner),
    ("none", 0, optuna.pruners.NopPruner),
    ("median", 3, optuna.pruners.PatientPruner),
    ("hyperband", 2, optuna.pruners.PatientPruner),
])
def test_the_pruner_is_the_one_configured(kind: str, patience: int, expected: type) -> None:
    config = PrunerConfig(kind=kind, patience=patience)
    assert type(search.make_pruner(config, epochs=30)) is expected


def test_a_hyperband_study_runs_to_its_total(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, "[pruner]\nkind = \"hyperband\"\nmin_epochs = 1\nreduction_factor = 2\n")
    result = cli("run", "--config", config, "--trials", 6, "--epochs", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    study = load(tmp_path)
    assert len(finished(study)) == 6 and study.trials[0].user_attrs["baseline"] is True


def test_samplers_of_different_workers_draw_differently() -> None:
    draws = []
    for worker in (0, 1):
        study = optuna.create_study(sampler=search.make_sampler(0, worker))
        draws.append([study.ask().suggest_float("x", 0, 1) for _ in range(3)])
    assert draws[0] != draws[1]
    again = optuna.create_study(sampler=search.make_sampler(0, 0))
    assert [again.ask().suggest_float("x", 0, 1) for _ in range(3)] == draws[0]  # seeded: reproducible


def test_progress_stays_off_a_terminal(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    result = cli("run", "--config", config, "--trials", 1, "--epochs", 2, "--device", "cpu")
    assert result.exit_code == 0
    assert "\r" not in result.output and "\033[" not in result.output and "epoch 1/2" not in result.output


def test_a_bug_in_a_trial_is_not_taken_for_a_trial_failed_elsewhere(tmp_path: Path, tiny_fer: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna fails a trial whose objective raised before re-raising, so the trial's state alone
    cannot tell a bug from a trial another worker failed: a bug must still stop the worker."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug")

    monkeypatch.setattr(search, "train_model", broken)
    config = write_config(tmp_path, tiny_fer)
    with pytest.raises(ValueError, match="a bug"):
        cli("run", "--config", config, "--trials", 3, "--epochs", 1, "--device", "cpu", "--timeout", 60)
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL]


@pytest.mark.parametrize("kind, pruned", [("median", False), ("percentile", True)])
def test_the_percentile_pruner_keeps_the_best_third_and_the_median_half(kind: str, pruned: bool) -> None:
    study = optuna.create_study(direction="maximize", pruner=search.make_pruner(PrunerConfig(kind=kind), epochs=30))
    for value in (0.1, 0.2, 0.3, 0.4, 0.5):
        study.add_trial(optuna.create_trial(value=value, params={}, distributions={},
                                            intermediate_values={e: value for e in range(1, 4)}))
    trial = study.ask()
    for epoch in (1, 2, 3):  # 0.35: above the median (0.3), below the best third (above 0.37)
        trial.report(0.35, epoch)
    assert bool(trial.should_prune()) is pruned
