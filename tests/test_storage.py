"""Storages: SQLite tuned for concurrent workers, bad URLs as one-line UserErrors, the artifact store."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import io
import json
import logging
import multiprocessing
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from click.testing import CliRunner
from conftest import ctrl_c_after, killed_mid_write
from searching import write_config

from fer_search import storage as storage_module
from fer_search.cli import main
from fer_search.errors import UserError
from fer_search.processes import signals_interrupt
from fer_search.storage import (
    SQLITE_BUSY_TIMEOUT_MS,
    Heartbeat,
    LoggedRetry,
    TrialClaim,
    disk_full_error,
    load_existing_study,
    open_artifact_store,
    open_existing_storage,
    open_storage,
    redacted,
)

WORKERS = 4
TRIALS_PER_WORKER = 30
FIRST_STARTS = 3
FIRST_START_ROUNDS = 4
JOIN_TIMEOUT_S = 120


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def user_error(url: str) -> str:
    """The UserError message open_storage gives for `url` (the test fails if it gives none)."""
    with pytest.raises(UserError) as info:
        open_storage(url)
    return str(info.value)


# --- worker processes (module level: spawned children import them) ------------------------------


def ask_and_tell(barrier: Any, index: int, url: str, study_name: str) -> None:
    """Open the storage, wait for the others, then run short trials as fast as possible."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    barrier.wait(timeout=JOIN_TIMEOUT_S)
    for _ in range(TRIALS_PER_WORKER):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0.0, 1.0))


def first_start(barrier: Any, index: int, folder: str) -> None:
    """Round after round, open the same new database file at the same moment as the others and write to it."""
    for round_ in range(FIRST_START_ROUNDS):
        barrier.wait(timeout=JOIN_TIMEOUT_S)
        storage = open_storage(sqlite_url(Path(folder) / f"new{round_}.db"))
        optuna.create_study(study_name=f"worker{index}", storage=storage)
        storage.engine.dispose()


def run_worker(body: Callable[..., None], barrier: Any, errors: Any, index: int, *args: Any) -> None:
    """A child's entry point: body(barrier, index, *args); a failure is sent to the parent and frees the others."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        body(barrier, index, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        errors.put(f"worker {index}: {type(e).__name__}: {e}")
        raise SystemExit(1) from None


def run_together(body: Callable[..., None], processes: int, *args: Any) -> list[str]:
    """Run body(barrier, index, *args) in `processes` spawned children at once; their error messages."""
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=run_worker, args=(body, barrier, errors, i, *args)) for i in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    messages = [f"process {p.pid} still running" for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    while True:
        try:
            messages.append(errors.get(timeout=0.5))
        except queue.Empty:
            break
    return messages + [f"process {p.pid} exit code {p.exitcode}" for p in procs if p.exitcode not in (0, None)]


# --- SQLite tuning -------------------------------------------------------------------------------


def test_sqlite_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "er" / "x.db"
    storage = open_storage(sqlite_url(db))
    optuna.create_study(study_name="s", storage=storage)
    assert db.is_file()
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS


def test_sqlite_transactions_take_the_write_lock_at_begin(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    storage = open_storage(sqlite_url(db))
    with closing(sqlite3.connect(db, timeout=0, isolation_level=None)) as other:
        with storage.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SELECT 1")  # only a read, yet the write lock is held
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again once the transaction ended
        other.execute("ROLLBACK")


@pytest.mark.parametrize(
    "after",
    [
        "BEGIN",  # its write lock just taken, as a signal that came while waiting for it lands: the write was lost
        "SELECT",  # a statement still open: the connection was kept alive, holding the lock
    ],
)
def test_an_interrupt_inside_a_transaction_is_raised_once_it_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    monkeypatch.setattr(storage_module, "SQLITE_BUSY_TIMEOUT_MS", 2000)  # a lock left held fails, not waits
    storage = open_storage(sqlite_url(tmp_path / "x.db"))
    study = optuna.create_study(study_name="s", storage=storage)
    sent = ctrl_c_after(storage.engine, after)
    with signals_interrupt():
        try:
            study.set_user_attr("interrupted", True)
        except KeyboardInterrupt:
            # As the requeue of an interrupted trial writes, the interrupt in hand.
            study.set_user_attr("saved", True)
        else:
            pytest.fail("the interrupt was lost")
    assert sent
    assert optuna.load_study(study_name="s", storage=sqlite_url(tmp_path / "x.db")).user_attrs == {
        "interrupted": True,
        "saved": True,
    }
    storage.engine.dispose()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_heartbeat_settings_reach_the_storage(tmp_path: Path) -> None:
    storage = open_storage(sqlite_url(tmp_path / "x.db"), Heartbeat(interval=7, grace_period=30, max_retry=2))
    assert (storage.heartbeat_interval, storage.grace_period) == (7, 30)
    callback = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert callback._max_retry == 2


def test_concurrent_workers_never_see_database_is_locked(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "race.db")
    optuna.create_study(study_name="race", storage=open_storage(url))
    errors = run_together(ask_and_tell, WORKERS, url, "race")
    assert errors == []
    trials = optuna.load_study(study_name="race", storage=open_storage(url)).get_trials()
    assert len(trials) == WORKERS * TRIALS_PER_WORKER
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))


def test_simultaneous_first_starts_on_a_new_file_all_succeed(tmp_path: Path) -> None:
    errors = run_together(first_start, FIRST_STARTS, str(tmp_path))
    assert errors == []
    for round_ in range(FIRST_START_ROUNDS):
        names = optuna.study.get_all_study_names(open_storage(sqlite_url(tmp_path / f"new{round_}.db")))
        assert sorted(names) == [f"worker{i}" for i in range(FIRST_STARTS)]


# --- bad URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nonsense", "storage URL 'nonsense' is not a database URL"),
        ("foo://x", "storage URL foo://x: unsupported database 'foo'"),
        ("postgresql+nosuchdriver://u@h/db", "postgresql+nosuchdriver://u@h/db: unknown driver"),
        pytest.param(
            "postgresql+psycopg://u:s3cretpw@127.0.0.1:1/db",
            "postgresql+psycopg://u:***@127.0.0.1:1/db: cannot connect",
            marks=pytest.mark.skipif(missing("psycopg"), reason="psycopg is not installed"),
        ),
        pytest.param(
            "postgresql+psycopg2://u:s3cretpw@127.0.0.1:1/db",
            "postgresql+psycopg2://u:***@127.0.0.1:1/db: its "
            "database driver is not installed (pip install -e '.[postgres]')",
            marks=pytest.mark.skipif(not missing("psycopg2"), reason="psycopg2 is installed"),
        ),
    ],
)
def test_bad_url_is_a_one_line_user_error(url: str, expected: str) -> None:
    message = user_error(url)
    assert expected in message
    assert "\n" not in message
    assert "s3cretpw" not in message


def test_sqlite_file_that_is_not_a_database_is_a_user_error(tmp_path: Path) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("these are not the tables you are looking for\n" * 100)
    message = user_error(sqlite_url(notes))
    assert str(notes) in message and "\n" not in message


def test_sqlite_folder_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    message = user_error(sqlite_url(tmp_path / "file" / "x.db"))
    assert str(tmp_path / "file") in message and "\n" not in message


def test_load_existing_study_names_the_missing_study(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "x.db")
    optuna.create_study(study_name="present", storage=open_storage(url))
    with pytest.raises(UserError, match="no study 'absent'") as info:
        load_existing_study(url, "absent")
    assert "present" in str(info.value) and "\n" not in str(info.value)
    assert load_existing_study(url, "present").study_name == "present"


# --- artifacts -----------------------------------------------------------------------------------


def test_artifact_store_creates_its_folder_and_round_trips_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    store = open_artifact_store(folder)
    assert folder.is_dir()
    for payload in (b"first checkpoint", bytes(range(256)) * 100):  # the second overwrites the first
        store.write("ckpt", io.BytesIO(payload))
        with store.open_reader("ckpt") as reader:
            assert reader.read() == payload


def test_an_artifact_folder_that_cannot_be_made_is_a_user_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as info:
        open_artifact_store(tmp_path / "file" / "artifacts")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'file' / 'artifacts'}: cannot create the artifact store folder")
    assert "\n" not in message


def test_a_failed_heartbeat_write_does_not_end_the_heartbeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Optuna's heartbeat thread has no error handling: one failed write would end it for good."""
    storage = open_storage(sqlite_url(tmp_path / "h.db"), Heartbeat(interval=1, grace_period=3, max_retry=1))
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    outcomes = iter([optuna.exceptions.StorageInternalError("server closed the connection"), None])

    def flaky(self: Any, trial_id: int) -> None:
        error = next(outcomes)
        if error is not None:
            raise error

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", flaky)
    storage.record_heartbeat(trial._trial_id)  # the failure is logged, not raised
    storage.record_heartbeat(trial._trial_id)  # and the next beat goes through
    assert next(outcomes, "done") == "done"
    assert "heartbeat of trial id" in caplog.text and "server closed the connection" in caplog.text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:s3cretpw@host:abc/db", "postgresql://***@host:abc/db: the port is not a number"),
        ("postgresql://u:s3cretpw@@host:abc/db", "postgresql://***@host:abc/db: the port is not a number"),
        ("sqlite://x.db", "a SQLite URL is sqlite:/// and then the file's path"),
        ("sqlite://", "a SQLite URL is sqlite:/// and then the file's path"),
        ("sqlite:///:memory:", "a SQLite URL is sqlite:/// and then the file's path"),
    ],
)
def test_a_malformed_url_is_a_one_line_user_error(url: str, expected: str) -> None:
    message = user_error(url)
    assert expected in message and "\n" not in message and "s3cretpw" not in message, message


def damaged_copy(tmp_path: Path) -> Path:
    """A study database some of whose pages were overwritten (a bad sector, a copy cut short)."""
    path = tmp_path / "study.db"
    storage = open_storage(sqlite_url(path))
    study = optuna.create_study(study_name="damaged", storage=storage)
    for i in range(100):
        trial = study.ask()
        trial.set_user_attr("note", "x" * 500)
        study.tell(trial, i)
    storage.engine.dispose()
    data = bytearray(path.read_bytes())
    page = 4096
    middle = len(data) // page // 2
    data[middle * page : (middle + 3) * page] = bytes(range(256)) * (3 * page // 256)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("opener", [open_storage, open_existing_storage])
def test_a_damaged_sqlite_file_is_one_line_naming_it(tmp_path: Path, opener: Callable[[str], Any]) -> None:
    path = damaged_copy(tmp_path)
    with pytest.raises(UserError) as info:
        opener(sqlite_url(path))
    message = str(info.value)
    assert message.startswith(f"storage {path}: the database file is damaged") and ".recover" in message
    assert "\n" not in message


def test_status_of_a_damaged_sqlite_file_is_one_line(tmp_path: Path) -> None:
    path = damaged_copy(tmp_path)
    result = CliRunner().invoke(main, ["status", "--storage", sqlite_url(path), "--study", "damaged"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "damaged" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EFBIG, "File too large"), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (sqlite3.OperationalError("database or disk is full"), True),
        (sqlite3.OperationalError("database is locked"), False),
    ],
)
def test_disk_full_error_finds_the_refused_write_in_a_chain(error: Exception, full: bool) -> None:
    """Optuna raises StorageInternalError from SQLAlchemy's error, which holds the driver's in .orig."""
    wrapped = sqlalchemy.exc.OperationalError("INSERT ...", {}, error)
    try:
        try:
            raise wrapped
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    except optuna.exceptions.StorageInternalError as e:
        assert (disk_full_error(e) is error) == full


def test_opening_the_artifact_store_removes_a_killed_writers_temporary(tmp_path: Path) -> None:
    store = open_artifact_store(tmp_path / "artifacts")
    store.write("ckpt", io.BytesIO(b"epoch 2"))
    left = killed_mid_write(tmp_path / "artifacts" / "ckpt")
    assert left.exists()
    store = open_artifact_store(tmp_path / "artifacts")  # as the next worker does
    assert not left.exists()
    with store.open_reader("ckpt") as reader:
        assert reader.read() == b"epoch 2"


@pytest.mark.parametrize("live_writer", [False, True], ids=["closed", "while-written"])
def test_status_reads_a_study_in_a_folder_it_cannot_write_to(
    tmp_path: Path, make_unwritable: Callable[[Path], None], live_writer: bool
) -> None:
    """A study shared read-only (another user's, a mounted backup): SQLite reads WAL through a -shm file
    it would create beside the database, and our engine takes write locks."""
    folder = tmp_path / "run#2 & co"  # characters a SQLite URI would read as its syntax
    url = sqlite_url(folder / "study.db")
    writer = open_storage(url)
    study = optuna.create_study(study_name="shared", storage=writer)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    if live_writer:
        study.ask()  # its -wal and -shm stay while it runs
    else:
        writer.engine.dispose()  # the last connection removes -wal and -shm
    make_unwritable(folder)
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(main, ["status", "--storage", url, "--study", "shared", "--json"])
    assert result.exit_code == 0, result.output
    trials = json.loads(result.output)["trials"]
    assert trials["COMPLETE"] == 2 and trials["RUNNING"] == (1 if live_writer else 0)
    assert sorted(p.name for p in folder.iterdir()) == before
    writer.engine.dispose()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql+psycopg://fer:s3cret@db:5432/fer", "postgresql+psycopg://fer:***@db:5432/fer"),
        (
            "postgresql://fer@db/fer?password=s3cret&sslmode=require",
            "postgresql://fer@db/fer?password=***&sslmode=require",
        ),
        ("postgresql://fer@db/fer?sslpassword=s3cret", "postgresql://fer@db/fer?sslpassword=***"),
        ("postgresql://fer:s3c@ret@db/fer", "postgresql://***@db/fer"),  # an unescaped '@': SQLAlchemy splits it
        ("post gres://fer:s3cret@db/fer?PASSWORD=s3cret", "***@db/fer?PASSWORD=***"),  # not a URL at all
        ("sqlite:////srv/studies/fer2013.db", "sqlite:////srv/studies/fer2013.db"),
    ],
)
def test_redacted_urls_hold_no_password_anywhere(url: str, shown: str) -> None:
    assert redacted(url) == shown
    assert "s3c" not in redacted(url)


def test_a_retried_trial_says_so_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "fer_search")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    retry = LoggedRetry(max_retry=1)
    first = study.ask()
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    retry(study, study.trials[first.number])
    again = study.ask()  # the retry, queued
    assert again.number == 1
    study.tell(again, state=optuna.trial.TrialState.FAIL)
    retry(study, study.trials[again.number])
    assert [r.getMessage() for r in caplog.records] == [
        "trial 0 failed, its worker gone; queued again (retry 1 of 1) to continue from its checkpoint",
        "trial 1 failed, its worker gone; not retried: it was retried 1 times already (run.max_retry)",
    ]
    assert len(study.trials) == 2  # no third


def test_a_retry_leaves_the_trial_it_copies_as_it_was(tmp_path: Path) -> None:
    """Optuna's callback appends to the retry_history list of the trial it is given: a finished trial read from the
    study's cache without a copy would then name itself as the trial it continues."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    failed = optuna.trial.TrialState.FAIL
    study.add_trial(optuna.create_trial(state=failed, system_attrs={"retry_history": [7]}))
    [cached] = study.get_trials(deepcopy=False)
    LoggedRetry(max_retry=3)(study, cached)
    assert [t.system_attrs["retry_history"] for t in study.get_trials(deepcopy=False)] == [[7], [7, 0]]
    assert cached.system_attrs["retry_history"] == [7]


# --- the trial claim -----------------------------------------------------------------------------

# Another worker's process: takes the claim, then releases it at the first line on stdin, and ends at the second
# (so that what frees the claim is the release, not the process's end).
CLAIM_HOLDER = """
import sys
from fer_search.storage import TrialClaim, open_storage
claim = TrialClaim(open_storage(sys.argv[1]), "fer2013")
claim.take()
print("held", flush=True)
sys.stdin.readline()
claim.release()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def claim_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "studies" / "fer2013.db")
    return request.getfixturevalue("postgres").create_database(f"claim_{uuid.uuid4().hex}")


def claim_holder(url: str) -> subprocess.Popen[str]:
    """A process holding the claim on `url` once this returns."""
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def claim_taken_in_background(url: str) -> tuple[TrialClaim, threading.Event]:
    """A claim being taken in a thread, and the event set once it is."""
    claim, taken = TrialClaim(open_storage(url), "fer2013"), threading.Event()

    def take() -> None:
        claim.take()
        taken.set()

    threading.Thread(target=take, daemon=True).start()
    return claim, taken


def test_a_trial_claim_is_held_by_one_worker_at_a_time(claim_url: str) -> None:
    holder = claim_holder(claim_url)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        claim, taken = claim_taken_in_background(claim_url)
        assert not taken.wait(1.0)  # the other process holds it
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "released\n"
        assert taken.wait(30)
        claim.release()
        claim.release()  # a second release does nothing
        claim.take()  # and it can be taken again
        claim.release()
        claim.storage.engine.dispose()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_workers_claim_is_free_again(claim_url: str) -> None:
    holder = claim_holder(claim_url)
    try:
        claim, taken = claim_taken_in_background(claim_url)
        assert not taken.wait(1.0)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert taken.wait(30)
    claim.release()
    claim.storage.engine.dispose()


def test_a_sqlite_folder_without_locks_is_one_line_naming_the_database(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "studies" / "fer2013.db"
    claim = TrialClaim(open_storage(sqlite_url(path)), "fer2013")

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")  # as a network file system without flock says

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(UserError) as info:
        claim.take()
    assert str(info.value).startswith(f"cannot lock the folder of the SQLite database {path} (No locks available)")
    claim.release()  # closes the folder it opened
    run = CliRunner().invoke(
        main, ["run", "--config", str(write_config(tmp_path, tiny_fer)), "--trials", "1", "--device", "cpu"]
    )
    assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
    assert "cannot lock the folder of the SQLite database" in run.output and "Traceback" not in run.output
