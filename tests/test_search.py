"""search: run / re-run / extend, local workers, crash and Ctrl-C recovery, timeouts, orphans."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from conftest import ctrl_c_after
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from searching import (
    EPOCHS,
    FAST_RUN,
    QUICK_SPACE,
    SMALL_SPACE,
    checkpoint_files,
    checkpointed_epochs,
    cli,
    crashing_worker,
    finished,
    live_in_session,
    load,
    running_with_checkpoint,
    spawn_run,
    wait_for,
    write_config,
)

from fer_search import search
from fer_search.cli import main
from fer_search.config import Config, load_config
from fer_search.fuse import SHARED_FIELDS
from fer_search.model import BASELINE, TrialParams
from fer_search.processes import INTERRUPTED, signals_interrupt
from fer_search.search import requeue_interrupted
from fer_search.status import TrialCounts
from fer_search.storage import LoggedRetry, open_storage


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
    # The second run's sampler did not replay the first run's draws.
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 5, [t.params for t in study.trials]


def test_timeout_stops_taking_trials(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    result = cli("run", "--config", config, "--trials", 50, "--epochs", 1, "--device", "cpu", "--timeout", 3)
    assert result.exit_code == 0 and "timeout" in result.output
    assert 1 <= len(finished(load(tmp_path))) < 50


def test_three_local_workers_share_one_sqlite_file(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, QUICK_SPACE)
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


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_requeues_the_trial_and_the_next_run_resumes(
    tmp_path: Path, tiny_fer: Path, sig: signal.Signals, code: int
) -> None:
    """SIGTERM is what timeout, systemd, Kubernetes and docker stop send: it must save as Ctrl-C does."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    proc = spawn_run(config, "--trials", 1, "--epochs", EPOCHS)
    wait_for(lambda: running_with_checkpoint(tmp_path), 120, "a running trial with a checkpoint")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "resume with: fer-search run" in err and "Traceback" not in err
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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_local_workers_stop_and_requeue_when_their_parent_is_killed(
    tmp_path: Path, tiny_fer: Path, sig: signal.Signals
) -> None:
    """The signal goes to the parent alone (docker stop and Kubernetes signal PID 1; kill -9 a shell's job)."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    proc = spawn_run(config, "--trials", 4, "--epochs", EPOCHS, "--workers", 2)
    try:
        wait_for(lambda: _checkpointed(tmp_path) == 2, 180, "two running trials with checkpoints")
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -sig if sig == signal.SIGKILL else proc.returncode == 143, err
        wait_for(lambda: not live_in_session(proc.pid), 30, "the workers to stop")
    finally:
        for pid in live_in_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    study = load(tmp_path)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(failed) == 2 and sorted(t.user_attrs["resumed_from"] for t in waiting) == [t.number for t in failed]
    assert all(t.user_attrs["checkpoint_epoch"] >= 2 for t in waiting)  # resumable


def _checkpointed(folder: Path) -> int:
    """Running trials whose checkpoint holds two epochs or more."""
    try:
        running = load(folder).get_trials(states=(TrialState.RUNNING,))
    except Exception:  # no database, or no study in it yet
        return 0
    return sum(checkpointed_epochs(t) >= 2 for t in running)


def test_a_retry_queued_once_the_study_holds_its_trials_still_runs(tmp_path: Path, tiny_fer: Path) -> None:
    """A killed trial's retry can be queued after the other workers have finished --trials: it runs anyway."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    assert cli("run", "--config", config, "--trials", 2, "--epochs", 2, "--device", "cpu").exit_code == 0
    study = load(tmp_path)
    killed = study.trials[1]
    # As Optuna's heartbeat retry enqueues it: the trial's params and attributes, marked as a retry.
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=killed.params,
            distributions=killed.distributions,
            user_attrs=killed.user_attrs,
            system_attrs={"failed_trial": killed.number, "retry_history": [killed.number]},
        )
    )
    result = cli("run", "--config", config, "--trials", 2, "--epochs", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    study = load(tmp_path)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    assert study.trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED) and len(study.trials) == 3


def test_a_full_disk_stops_the_run_with_one_line_and_loses_no_trial(tmp_path: Path, tiny_fer: Path) -> None:
    """A file-size limit stands in for a full disk: writes fail (EFBIG) as with ENOSPC, in the study's
    database as in the artifact store, and a test needs no disk of its own to fill."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 2, "--device", "cpu").exit_code == 0
    db = tmp_path / "studies" / "fer2013.db"
    room = db.stat().st_size + 40_000  # a few epochs of the study's writes

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))

    command = [sys.executable, "-m", "fer_search", "run", "--config", str(config), "--device", "cpu"]
    full = subprocess.run(
        [*command, "--trials", "3", "--epochs", "2"], preexec_fn=full_disk, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 2, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write (") and "disk" in last and "Traceback" not in full.stderr
    stopped = load(tmp_path).trials[-1]
    assert stopped.state in (TrialState.RUNNING, TrialState.FAIL) and f"trial {stopped.number}" in last

    again = subprocess.run([*command, "--trials", "3", "--epochs", "2"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = load(tmp_path)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    assert len(finished(study)) >= 3
    followers = [
        t
        for t in study.trials
        if stopped.number in (t.system_attrs.get("failed_trial"), t.user_attrs.get("resumed_from"))
    ]
    assert any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in followers)


def test_a_crashed_worker_ends_the_run_with_one_line(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "_worker_process", crashing_worker)  # spawned workers import it from tests/
    config = write_config(tmp_path, tiny_fer)
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--workers", "2", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == "error: worker 1 crashed with exit code 1 (its traceback is above)"


def test_a_worker_that_cannot_start_stops_the_started_ones(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left running, worker 0 would take the study's trials, unwatched, and Python would wait for it at exit."""
    start = multiprocessing.process.BaseProcess.start
    started: list[multiprocessing.process.BaseProcess] = []

    def start_the_first_only(process: multiprocessing.process.BaseProcess) -> None:
        if started:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        start(process)
        started.append(process)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_the_first_only)
    config = load_config(write_config(tmp_path, tiny_fer), {"run.device": "cpu", "run.workers": 3})
    try:
        with pytest.raises(OSError, match="Resource temporarily unavailable"):
            search.run_search(config)
        assert len(started) == 1 and started[0].exitcode == INTERRUPTED  # stopped as by Ctrl-C, and ended
    finally:
        for process in started:
            process.kill()
            process.join()
    assert not load(tmp_path).get_trials(states=(TrialState.RUNNING,))


def run_two_workers_in_threads(config: Config) -> None:
    """Two workers of one study, as threads: the test can hold them up at the same point of their loops."""
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            search.run_worker(config, index, 2)
        except BaseException as e:  # noqa: BLE001 - a thread's exception would reach nobody
            errors.append(e)

    workers = [threading.Thread(target=work, args=(index,), daemon=True) for index in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(worker.is_alive() for worker in workers)
    assert not errors, errors


@pytest.mark.parametrize("fuse", [1, 2], ids=["alone", "fused"])
@pytest.mark.parametrize("queued", [False, True], ids=["the-last-fresh-trial", "a-queued-trial"])
def test_workers_counting_at_once_take_only_what_the_study_needs(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch, queued: bool, fuse: int
) -> None:
    """Two workers count the study at the same moment: both see room for one fresh trial, or one queued
    trial. Only one may take it; without the claim the other took a fresh one too (a queued trial popped
    by another leaves Optuna's ask creating a fresh one)."""
    config_file = write_config(tmp_path, tiny_fer, FAST_RUN + SMALL_SPACE)
    assert cli("run", "--config", config_file, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    if queued:  # as a Ctrl-C leaves it
        load(tmp_path).enqueue_trial(load(tmp_path).trials[0].params, user_attrs={"resumed_from": 0})
    trials = 1 if queued else 2
    config = load_config(config_file, {"run.device": "cpu", "run.trials": trials, "run.epochs": 1, "run.fuse": fuse})
    together, count_trials = threading.Barrier(2), search.count_trials

    def counted_together(study: optuna.Study) -> TrialCounts:
        counts = count_trials(study)
        with contextlib.suppress(threading.BrokenBarrierError):  # the other is kept out, or has ended
            together.wait(timeout=3)  # the other's start may lag by a second on a busy machine
        return counts

    monkeypatch.setattr(search, "count_trials", counted_together)
    run_two_workers_in_threads(config)
    study = load(tmp_path)
    assert len(finished(study)) == 2 and len(study.trials) == 2, [(t.number, t.state) for t in study.trials]


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


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_an_interrupt_while_a_dead_trial_is_failed_waits_for_its_retry(tmp_path: Path) -> None:
    """Failing a dead worker's trial and queueing its retry are two writes: a Ctrl-C between them would leave
    the trial failed and its checkpoint never resumed."""
    url = f"sqlite:///{tmp_path}/s.db"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.ask()  # RUNNING and never started: its worker died before training it
    sent = ctrl_c_after(storage.engine, "UPDATE trials")  # the trial's state: FAIL
    with signals_interrupt(), pytest.raises(KeyboardInterrupt):
        search.fail_dead_trials(study, search.OrphanWatch(grace_period=0, retry=LoggedRetry(max_retry=1)))
    assert sent
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    storage.engine.dispose()


# A worker killed (SIGKILL) between failing a dead trial and queueing its retry: the trial's state is written,
# the retry is not. argv: the database URL.
KILLED_WHILE_FAILING = """
import os, signal, sys
import optuna
from fer_search import search
from fer_search.storage import LoggedRetry, open_storage

class KilledFirst(LoggedRetry):
    def __call__(self, study, trial):
        os.kill(os.getpid(), signal.SIGKILL)

study = optuna.load_study(study_name="fer2013", storage=open_storage(sys.argv[1]))
study.ask()  # a trial whose worker died before starting it
search.fail_dead_trials(study, search.OrphanWatch(grace_period=0, retry=KilledFirst(max_retry=3)))
"""


def test_a_dead_trial_whose_retry_a_kill_lost_is_retried_by_the_next_run(tmp_path: Path, tiny_fer: Path) -> None:
    """Failing a dead trial and queueing its retry are two writes, and kill -9 cannot be deferred: without the
    next worker's repair, the trial stayed failed and its checkpoint was never resumed."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    url = f"sqlite:///{tmp_path}/studies/fer2013.db"
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_FAILING, url], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE, TrialState.FAIL]  # and no retry
    result = cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu", "--timeout", 120)
    assert result.exit_code == 0 and "timeout" not in result.output
    study = load(tmp_path)
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and len(study.trials) == 3


def failed_trial(user_attrs: dict[str, object] | None = None, retries: int = 0) -> optuna.trial.FrozenTrial:
    history = {"retry_history": list(range(100, 100 + retries))} if retries else {}
    return optuna.create_trial(state=TrialState.FAIL, user_attrs=user_attrs or {}, system_attrs=history)


def test_only_the_failed_trials_owed_a_retry_get_one_and_only_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    for trial in [
        failed_trial(),  # 0: its worker died, and so did the one failing it: owed a retry
        failed_trial({"fail_reason": "error: ValueError: a bug"}),  # 1: failed by its own worker
        failed_trial(),  # 2: requeued by a Ctrl-C, as 3
        optuna.create_trial(state=TrialState.WAITING, user_attrs={"resumed_from": 2}),
        failed_trial(retries=3),  # 4: retried run.max_retry times already
        optuna.create_trial(state=TrialState.COMPLETE, value=0.5),  # 5
    ]:
        study.add_trial(trial)
    caplog.set_level(logging.WARNING, "fer_search")
    for _ in range(2):
        search.queue_lost_retries(study, LoggedRetry(max_retry=3))
    assert [(t.number, t.system_attrs.get("retry_history")) for t in study.trials[6:]] == [(6, [0])]
    assert caplog.messages[0] == "trial 0 was failed without its retry: the worker failing it was killed first"
    assert len(caplog.messages) == 2  # and LoggedRetry's line


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


def test_a_hyperband_study_runs_to_its_total(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer, '[pruner]\nkind = "hyperband"\nmin_epochs = 1\nreduction_factor = 2\n')
    result = cli("run", "--config", config, "--trials", 6, "--epochs", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    study = load(tmp_path)
    assert len(finished(study)) == 6 and study.trials[0].user_attrs["baseline"] is True


# A log line as it reaches a file: its time, level and logger, then the message.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO fer_search: (.*)$")


def test_a_run_logging_to_a_file_writes_a_timestamped_line_for_each_trial_as_it_ends(
    tmp_path: Path, tiny_fer: Path
) -> None:
    config = write_config(tmp_path, tiny_fer)
    log = tmp_path / "run.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fer_search", "run", "--config", str(config), "--device", "cpu"]
            + ["--trials", "4", "--epochs", "2"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(lambda: "trial 1 (worker 0) complete" in log.read_text() or proc.poll() is not None, 240, "trial 1")
        assert proc.poll() is None, log.read_text()  # written when the trial ended, not when the run did
        assert proc.wait(timeout=240) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "\r" not in text and "\033[" not in text  # no progress bars off a terminal
    messages = [m.group(1) for m in map(LOG_LINE.match, text.splitlines()) if m]
    ends = [m for m in messages if re.match(r"trial \d+ \((baseline, )?worker 0\) (complete|pruned)", m)]
    assert [int(m.split()[1]) for m in ends] == [0, 1, 2, 3], text
    assert "complete: val_acc " in ends[0] and "% at epoch " in ends[0]
    assert f"best so far {load(tmp_path).best_value:.2%}" in ends[-1], ends[-1]
    assert all("; took " in m and " lr=" in m and "batch_size=" in m for m in ends)
    starts = [m for m in messages if re.match(r"trial \d+ (\(baseline\) )?started on cpu \(worker 0\): ", m)]
    assert len(starts) == 4, text
    estimates = [m for m in messages if m.startswith("on the CPU an epoch took ")]
    assert len(estimates) == 1, text
    # The baseline's first epoch; width 2 with two convolutions a block and three linear layers is 14.2x its compute.
    assert "if each drew the space's largest model, 14.2x this one's compute;" in estimates[0], text
    assert not any(" epoch 1/2: val_acc " in m for m in messages)  # epochs only with -v


@pytest.mark.parametrize("flag, trials_logged, epochs_logged", [("-q", False, False), ("-v", True, True)])
def test_quiet_and_verbose_runs_log_less_and_more(
    tmp_path: Path,
    tiny_fer: Path,
    caplog: pytest.LogCaptureFixture,
    flag: str,
    trials_logged: bool,
    epochs_logged: bool,
) -> None:
    config = write_config(tmp_path, tiny_fer)
    result = cli("run", "--config", config, "--trials", 1, "--epochs", 2, "--device", "cpu", flag)
    assert result.exit_code == 0, result.output
    messages = [r.getMessage() for r in caplog.records if r.name == "fer_search"]
    assert any(m.startswith("trial 0 (baseline, worker 0) complete") for m in messages) == trials_logged, messages
    assert any(m.startswith("trial 0 (worker 0) epoch 1/2: val_acc ") for m in messages) == epochs_logged, messages


def test_quiet_and_verbose_together_is_a_mistake(tmp_path: Path, tiny_fer: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--config", str(write_config(tmp_path, tiny_fer)), "-q", "-v"])
    assert result.exit_code == 2 and "-q and -v" in result.output, result.output


def test_no_worker_counts_between_a_dead_trials_failure_and_its_retry(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing a dead worker's trial and queueing its retry take two writes, slow ones here. A worker
    counting in between saw room for a fresh trial, and the study ended one trial past --trials."""
    config_file = write_config(tmp_path, tiny_fer, FAST_RUN + SMALL_SPACE)
    assert cli("run", "--config", config_file, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    dead = load(tmp_path).ask()  # its worker died before starting it: failed after the grace period
    queue_retry = LoggedRetry.__call__

    def slowly(self: LoggedRetry, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        time.sleep(2)  # four of the other worker's polls
        queue_retry(self, study, trial)

    monkeypatch.setattr(LoggedRetry, "__call__", slowly)
    config = load_config(config_file, {"run.device": "cpu", "run.trials": 2, "run.epochs": 1})
    run_two_workers_in_threads(config)
    trials = load(tmp_path).trials
    assert [t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials] == [True, False, True], trials
    assert trials[dead.number].state == TrialState.FAIL and trials[2].system_attrs["failed_trial"] == dead.number


def test_an_interrupted_trial_is_queued_again_before_it_is_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed first, a trial whose copy the storage then refuses (a full disk) would be lost; queued first,
    a refusal leaves it RUNNING, and a later run retries it as stale."""
    study = optuna.create_study()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("seed", 7)
    assert requeue_interrupted(study, trial.number)
    [copy] = study.get_trials(states=(TrialState.WAITING,))
    assert study.trials[trial.number].state == TrialState.FAIL
    assert (
        copy.user_attrs == {"seed": 7, "resumed_from": trial.number}
        and copy.system_attrs["fixed_params"] == trial.params
    )

    refused = study.ask()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(study, "enqueue_trial", full_disk)
    assert not requeue_interrupted(study, refused.number)
    assert study.trials[refused.number].state == TrialState.RUNNING


def test_an_artifact_folder_that_cannot_be_made_stops_run_with_one_line(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "file").write_text("")
    config = write_config(tmp_path, tiny_fer, f'[study]\nartifacts = "{tmp_path / "file" / "artifacts"}"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--trials", "1", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and str(tmp_path / "file" / "artifacts") in result.output
    assert "Traceback" not in result.output


def _shared(trial: optuna.trial.FrozenTrial) -> tuple[object, ...]:
    params = trial.user_attrs["trial_params"]
    return tuple(params[name] for name in SHARED_FIELDS)


def test_fused_run_trains_groups_of_one_architecture_each_trial_reported_and_pruned_alone(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--fuse 3: two groups of three, each of one architecture; trial 4, pruned at epoch 2, ends there while its
    group mates train on (the pruner's verdict, made certain here: tiny-data accuracies tie too often)."""
    monkeypatch.setattr(
        optuna.trial.Trial,
        "should_prune",
        lambda trial: trial.number == 4 and len(trial.storage.get_trial(trial._trial_id).intermediate_values) == 2,
    )
    config = write_config(tmp_path, tiny_fer, "[pruner]\nkind = 'none'\n" + SMALL_SPACE)
    result = cli("run", "--config", config, "--trials", 6, "--epochs", 3, "--device", "cpu", "--fuse", 3)
    assert result.exit_code == 0, result.output
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 + [TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.user_attrs["epochs_run"] for t in trials] == [3, 3, 3, 3, 2, 3]
    assert all(len({_shared(t) for t in group}) == 1 for group in (trials[:3], trials[3:]))
    assert len({t.user_attrs["seed"] for t in trials}) == 6  # each its own trial
    assert len({t.params["lr"] for t in trials}) == 6  # sampled apart
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs_run"] + 1))
        assert t.user_attrs["best_epoch"] if t.state == TrialState.COMPLETE else True
    assert "trial 4 (worker 0) pruned after epoch 2 of 3" in result.output


def test_an_interrupted_fused_group_queues_every_member_and_each_resumes_from_its_checkpoint(
    tmp_path: Path, tiny_fer: Path
) -> None:
    config = write_config(tmp_path, tiny_fer, FAST_RUN + SMALL_SPACE)
    epochs = 8  # the small space's fused epochs take a fraction of a second: a checkpoint at 2 leaves time to signal
    proc = spawn_run(config, "--trials", 2, "--epochs", epochs, "--fuse", 2)
    wait_for(lambda: _checkpointed(tmp_path) == 2, 180, "two fused trials with checkpoints")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "resume with: fer-search run" in err and "Traceback" not in err
    study = load(tmp_path)
    failed = study.get_trials(states=(TrialState.FAIL,))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(failed) == 2 and sorted(t.user_attrs["resumed_from"] for t in waiting) == [t.number for t in failed]

    again = spawn_run(config, "--trials", 2, "--epochs", epochs, "--fuse", 2)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    study = load(tmp_path)
    assert len(finished(study)) == 2 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert all(study.trials[t.number].user_attrs["resumed_at_epoch"] >= 3 for t in waiting)
    assert checkpoint_files(tmp_path) == []
