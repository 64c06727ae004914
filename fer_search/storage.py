"""Storage URLs -> tuned Optuna RDB storages (SQLite or PostgreSQL), the claim on taking a trial, the artifact store."""

from __future__ import annotations

import copy
import errno
import fcntl
import functools
import hashlib
import inspect
import logging
import os
import random
import re
import shlex
import shutil
import socket
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import CreateEnginePlugin

from fer_search.errors import UserError, first_line
from fer_search.files import made_folder, may_write, write_atomically
from fer_search.processes import interrupts_deferred

log = logging.getLogger("fer_search")
SQLITE_BUSY_TIMEOUT_MS = 120_000
INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE; 15 and later deny CREATE on public to non-owners
PG_POOL_SIZE = 3  # a worker's session, its heartbeat thread, and the trial claim while it holds it
PG_DISK_FULL = "53100"  # PostgreSQL's SQLSTATE disk_full
# SQLite's words for a write the disk refused: full (ENOSPC), or any other write error, such as a
# file-size limit (EFBIG), which it reports as an I/O error.
SQLITE_WRITE_FAILED = ("database or disk is full", "disk I/O error")


@dataclass(frozen=True)
class Heartbeat:
    """Crash detection: a RUNNING trial silent for grace_period seconds is failed and retried."""

    interval: int
    grace_period: int
    max_retry: int


class SQLiteForConcurrency(CreateEnginePlugin):
    """WAL, a busy timeout and BEGIN IMMEDIATE on every transaction of a SQLite engine.

    Why by hand: Optuna takes only engine kwargs, and pysqlite begins transactions lazily. In
    WAL mode a read transaction that then writes fails at once with SQLITE_BUSY, ignoring the
    busy timeout, so concurrent workers would see "database is locked". Taking the write lock
    at BEGIN makes every transaction wait its turn instead. A SQLAlchemy engine plugin is the one
    hook that runs before Optuna's first connection (table creation).

    Optuna's own set-up (schema stamping) nests a second connection inside a first in one
    thread, which BEGIN IMMEDIATE would deadlock: until open_storage marks the engine ready,
    transactions begin deferred.
    """

    def update_url(self, url: sqlalchemy.URL) -> sqlalchemy.URL:
        return url  # the plugin takes no URL arguments

    def engine_created(self, engine: sqlalchemy.Engine) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below emits BEGIN
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: sqlalchemy.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE" if engine in _IMMEDIATE else "BEGIN")


_IMMEDIATE: weakref.WeakSet[sqlalchemy.Engine] = weakref.WeakSet()


plugins.register("fer_search_sqlite", __name__, "SQLiteForConcurrency")


def engine_kwargs_for(url: str) -> dict[str, Any]:
    """Engine settings per backend (ARCHITECTURE.md, "Reliability")."""
    if url.startswith("sqlite"):
        return {"plugins": ["fer_search_sqlite"]}
    if url.startswith("postgresql"):
        # pre-ping: a connection the server dropped while a long trial trained is replaced, not
        # fatal. Keepalives stop firewalls from silently dropping idle connections.
        return {
            "pool_pre_ping": True,
            "pool_size": PG_POOL_SIZE,
            "max_overflow": 0,
            "pool_recycle": 1800,
            "connect_args": {
                "connect_timeout": 10,
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
                # A query the server stopped answering fails within a minute, not after TCP's 15 minutes of
                # retries: a Ctrl-C waits for the storage call in hand (processes.interrupts_deferred).
                "tcp_user_timeout": 60_000,
            },
        }
    return {}


def open_storage(url: str, heartbeat: Heartbeat | None = None) -> RDBStorage:
    """An RDBStorage for `url`; bad URLs, missing drivers, damaged files and unreachable servers -> UserError."""
    _check_url(url)
    path = sqlite_path(url)
    if path is not None:
        made_folder(path.parent, "storage")
        _refuse_a_folder(url, path)
        if path.is_file():
            check_sqlite_intact(path)
    return _connected(url, heartbeat)


def _refuse_a_folder(url: str, path: Path) -> None:
    """UserError where the SQLite file `path` of `url` is a folder (SQLite would only say it cannot open it)."""
    if path.is_dir():
        raise UserError(f"storage {url}: {path} is a folder, not a database file")


class LoggedRetry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker is gone, which says so in the log: a line per retried trial."""

    def __init__(self, max_retry: int) -> None:
        super().__init__(max_retry=max_retry)
        self.max_retry = max_retry

    def queues(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether a call on `trial` queues its retry: it was retried fewer than run.max_retry times."""
        return len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) < self.max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # A copy: Optuna's callback appends to the retry_history list of the trial it is given, which for a
        # trial read from the study's cache without a copy would change what this process sees of that trial.
        super().__call__(study, copy.deepcopy(trial))
        if self.queues(trial):
            log.warning(
                "trial %d failed, its worker gone; queued again (retry %d of %d) to continue from its checkpoint",
                trial.number,
                len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) + 1,
                self.max_retry,
            )
        else:
            log.warning(
                "trial %d failed, its worker gone; not retried: it was retried %d times already (run.max_retry)",
                trial.number,
                self.max_retry,
            )


def stale_retry(storage: RDBStorage) -> LoggedRetry | None:
    """The retry `storage` queues for a trial it fails as stale; None for a storage opened without a heartbeat."""
    retry = storage.get_heartbeat_stale_trial_callback()
    return retry if isinstance(retry, LoggedRetry) else None


def _connected(
    url: str, heartbeat: Heartbeat | None = None, read_only: Callable[[], sqlite3.Connection] | None = None
) -> RDBStorage:
    """The RDBStorage of a checked URL; with `read_only`, a SQLite file it connects to (no tables made, no
    write locks taken)."""
    engine_kwargs = engine_kwargs_for(url) | ({} if read_only is None else {"creator": read_only})
    hb: dict[str, Any] = {}
    if heartbeat is not None:
        hb = {
            "heartbeat_interval": heartbeat.interval,
            "grace_period": heartbeat.grace_period,
            "heartbeat_stale_trial_callback": LoggedRetry(max_retry=heartbeat.max_retry),
        }
    # Several workers starting on an empty database race to create the tables; the loser sees
    # an integrity or "already exists" error, and the tables are there when it tries again.
    for attempt in range(5):
        try:
            storage = _SteadyRDBStorage(
                url, engine_kwargs=engine_kwargs, skip_table_creation=read_only is not None or _tables_exist(url), **hb
            )
            if read_only is None:
                _IMMEDIATE.add(storage.engine)
            return storage
        except ImportError as e:
            raise UserError(
                f"storage {redacted(url)}: its database driver is not installed ({_driver_hint(url)})"
            ) from e
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.ProgrammingError,
            optuna.exceptions.StorageInternalError,
        ) as e:
            orig = getattr(e, "orig", None)  # psycopg 3 says sqlstate, psycopg2 pgcode
            if INSUFFICIENT_PRIVILEGE in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None)):
                raise UserError(
                    f"storage {redacted(url)}: the database user may not create Optuna's tables "
                    f"({first_line(orig or e)}); grant it CREATE on the schema, or make it the "
                    "database's owner"
                ) from None
            if attempt == 4:
                raise UserError(
                    f"storage {redacted(url)}: cannot set up Optuna's tables: {first_line(orig or e)}"
                ) from e
            time.sleep(0.2 + random.random())
        except sqlalchemy.exc.DatabaseError as e:  # OperationalError, or SQLite's "file is not a database"
            # SQLite's forms of the same race: tables created meanwhile, or a deferred BEGIN that wrote.
            if ("already exists" in str(e) or "database is locked" in str(e)) and attempt < 4:
                time.sleep(0.2 + random.random())
                continue
            raise UserError(f"storage {redacted(url)}: cannot connect: {first_line(e.orig or e)}") from e
    raise AssertionError("unreachable")


class _SteadyRDBStorage(RDBStorage):
    """Optuna's RDB storage whose transactions an interrupt does not cut short, and whose heartbeat
    outlives a failed write.

    Why: Optuna records heartbeats in a thread that has no error handling, so one transient
    database error (a server restart, a lock held too long) would end them for the rest of the
    trial, and after the grace period the other workers would fail a trial that is still training.
    Ctrl-C and SIGTERM: see processes.interrupts_deferred, around each of its methods (below).
    """

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            # Optuna's StorageInternalError says only that a commit failed; the cause says why.
            log.warning(
                "heartbeat of trial id %d not recorded (%s); trying again next interval",
                trial_id,
                first_line(e.__cause__ or e),
            )


def _uninterrupted(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with interrupts_deferred():
            return method(*args, **kwargs)

    return wrapped


# Around every method Optuna's RDB storage defines: each opens a transaction, runs in one, or reads a setting.
for _name, _method in vars(RDBStorage).items():
    if inspect.isfunction(_method) and not _name.startswith("__"):
        setattr(_SteadyRDBStorage, _name, _uninterrupted(getattr(_SteadyRDBStorage, _name)))


class TrialClaim:
    """The right to count a study's trials and take one, held by one worker at a time on any host.

    Why by hand: Optuna's ask pops a queued trial, or else creates a fresh one, without looking at how
    many the study holds (MaxTrialsCallback stops a worker only after the fact). Workers counting at
    the same moment would each take the study's last trial, and a worker whose queued trial another
    popped first would create a fresh one in its place: the study would run past --trials. PostgreSQL
    holds the claim as a transaction's advisory lock; SQLite as a flock on the database's folder, not
    its file, since closing any descriptor of the file drops SQLite's own locks on it (POSIX record
    locks belong to the process). Either ends with its process, killed or not. MySQL workers go
    without one and may overshoot, as Optuna's own callback does.
    """

    def __init__(self, storage: RDBStorage, study_name: str) -> None:
        self.storage = storage
        self._sqlite = sqlite_path(storage.url)
        # The study's advisory lock on PostgreSQL: a signed 64-bit number drawn from its name.
        digest = hashlib.sha256(f"fer-search trial claim {study_name}".encode()).digest()
        self._lock_key = int.from_bytes(digest[:8], "big", signed=True)
        self._held = ExitStack()

    def take(self) -> None:
        """Waits until no other worker holds the claim."""
        path = self._sqlite
        if path is not None:
            try:
                folder = os.open(path.parent, os.O_RDONLY)
                self._held.callback(os.close, folder)  # which ends the flock
                fcntl.flock(folder, fcntl.LOCK_EX)
            except OSError as e:  # a folder it may not read, a network file system without flock
                raise UserError(
                    f"cannot lock the folder of the SQLite database {path} ({e.strerror}): the workers take "
                    "their trials in turn by that lock; keep the database in a folder on a local disk that "
                    "they may read and write, or use PostgreSQL"
                ) from None
        elif self.storage.engine.dialect.name == "postgresql":
            connection = self._held.enter_context(self.storage.engine.connect())  # its rollback ends the lock
            # The server's keepalives end the lock within a minute of its holder's host going silent (power,
            # network), not after Linux's two hours; and no timeout a database administrator set cuts the wait.
            connection.execute(
                sqlalchemy.text(
                    "SELECT set_config('tcp_keepalives_idle', '30', true), "
                    "set_config('tcp_keepalives_interval', '10', true), "
                    "set_config('tcp_keepalives_count', '3', true), "
                    "set_config('lock_timeout', '0', true), set_config('statement_timeout', '0', true)"
                )
            )
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self._lock_key})

    def release(self) -> None:
        """Lets the next worker take the claim; does nothing unless held."""
        with suppress(sqlalchemy.exc.SQLAlchemyError):  # a lost connection has ended its lock already
            self._held.close()


@contextmanager
def opened_storage(url: str, heartbeat: Heartbeat | None = None) -> Iterator[RDBStorage]:
    """open_storage whose connection pool is closed on leaving: Optuna's storage sits in reference
    cycles, so its pooled connections would otherwise stay open until the garbage collector runs
    (a fleet held twice its connections at its end)."""
    storage = open_storage(url, heartbeat)
    try:
        yield storage
    finally:
        storage.engine.dispose()


def _tables_exist(url: str) -> bool:
    """True when Optuna's tables are there, so later workers skip creating them (a race on PostgreSQL otherwise)."""
    if url.startswith("sqlite"):
        return False  # SQLite's creation race is retried in open_storage; no server to ask
    engine = sqlalchemy.create_engine(url, **engine_kwargs_for(url))
    try:
        return sqlalchemy.inspect(engine).has_table("version_info")
    finally:
        engine.dispose()


def _check_url(url: str) -> None:
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(
            f"storage URL {redacted(url)!r} is not a database URL (e.g. sqlite:///studies/fer2013.db "
            "or postgresql+psycopg://user@host/db, the password in PGPASSWORD)"
        ) from None
    except ValueError:  # SQLAlchemy parses the port with int()
        raise UserError(f"storage URL {redacted(url)}: the port is not a number") from None
    if "@" in (parsed.host or ""):
        raise UserError(
            f"storage URL {redacted(url)}: its password holds '@', which a URL must write %40 (or leave the password "
            "out of the URL and set PGPASSWORD)"
        )
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise UserError(
            f"storage URL {redacted(url)}: unsupported database {parsed.get_backend_name()!r} "
            "(use sqlite or postgresql)"
        )
    if parsed.get_backend_name() == "sqlite" and (parsed.host or parsed.database in (None, "", ":memory:")):
        # sqlite://x.db names a host, and an in-memory database would keep nothing of the study.
        raise UserError(
            f"storage URL {redacted(url)!r}: a SQLite URL is sqlite:/// and then the file's path "
            "(sqlite:///studies/fer2013.db, or sqlite:////abs/path.db)"
        )
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise UserError(f"storage URL {redacted(url)}: unknown driver {parsed.drivername!r}") from None


def sqlite_path(url: str) -> Path | None:
    """The file of a (checked) SQLite URL; None for other databases."""
    parsed = sqlalchemy.engine.make_url(url)
    return Path(str(parsed.database)) if parsed.get_backend_name() == "sqlite" else None


def _read_only_uri(path: Path) -> str:
    """A SQLite URI that reads `path` without writing to it, nor anything beside it in a folder it may not write.

    A WAL database is read through its -shm file, which a reader creates when the last writer has
    removed it. Where the folder forbids that and no writer holds a -wal file, the file is read as
    immutable: no writer is there to change it. Otherwise read-only, seeing the live writers' WAL.
    """
    mode = "mode=ro" if may_write(path.parent) or path.with_name(path.name + "-wal").exists() else "immutable=1"
    return f"file:{quote(str(path.absolute()))}?{mode}"


def _read_only_connection(path: Path) -> Callable[[], sqlite3.Connection]:
    """A function that opens `path` read-only (see _read_only_uri), for an engine's `creator`.

    Why not a URL: a SQLite URI in a SQLAlchemy URL is percent-decoded twice (by SQLAlchemy, then by
    SQLite), so a path holding '#', '?' or '%' would open another file.
    """
    uri = _read_only_uri(path)
    return lambda: sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)


def check_sqlite_intact(path: Path) -> None:
    """UserError naming the file when SQLite finds it damaged.

    Why first: SQLite reads a damaged file until a query meets the damaged pages, and Optuna then
    fails deep inside a command (a traceback, or a trial lost in the middle of a run).
    """
    try:
        with closing(_read_only_connection(path)()) as db:
            problems = [" ".join(str(row[0]).split()) for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as e:
        if e.sqlite_errorname not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):  # locked, unreadable: not damage
            raise UserError(f"storage {path}: cannot read ({first_line(e)})") from None
        problems = [first_line(e)]
    if problems != ["ok"]:
        raise UserError(
            f"storage {path}: the database file is damaged ({'; '.join(problems)}); restore it from a backup, "
            f"or salvage what it holds with: sqlite3 {shlex.quote(str(path))} .recover | sqlite3 recovered.db"
        )


def disk_full_error(error: BaseException) -> BaseException | None:
    """The write the disk refused (no space, a quota, a size limit) that `error` is or was raised from, if any."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if (
            (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
            or (isinstance(e, sqlite3.OperationalError) and any(m in str(e) for m in SQLITE_WRITE_FAILED))
            or PG_DISK_FULL in (getattr(e, "sqlstate", None), getattr(e, "pgcode", None))
        ):
            return e
        pending += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return None


def _driver_hint(url: str) -> str:
    return "pip install -e '.[postgres]'" if url.startswith("postgresql") else "install the driver for this URL"


def redacted(url: str) -> str:
    """The URL with every password hidden, for messages and records: the user's and any query parameter
    that holds one (libpq takes ?password=... and ?sslpassword=... as well)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
        if "@" in (parsed.host or ""):  # a password's unescaped '@': the rest of it would show as the host
            raise ValueError("not a URL")
        query = {k: HIDDEN if _holds_password(k) else v for k, v in parsed.query.items()}
        return parsed.set(query=query).render_as_string(hide_password=True).replace(quote(HIDDEN, safe=""), HIDDEN)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # unparsable: at least no credentials (a password may hold '@'), nor a query's passwords
        without_user = re.sub(r"^([\w+.-]*:/*)?.*@", rf"\1{HIDDEN}@", url, flags=re.S)
        return re.sub(r"(password=)[^&]*", rf"\1{HIDDEN}", without_user, flags=re.I)


HIDDEN = "***"


def _holds_password(key: str) -> bool:
    return "password" in key.lower()


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system store, but an overwrite goes through a temporary name and a rename.

    Why: a trial overwrites its one checkpoint artifact every few minutes; Optuna's store
    truncates the file first, so a worker killed mid-write would leave its retry nothing to
    resume from.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._get_filepath(artifact_id)
        write_atomically(path, lambda f: shutil.copyfileobj(content_body, f))


def open_artifact_store(path: Path) -> FileSystemArtifactStore:
    """The study's artifact store: the running trials' checkpoints (private entries, not listed as
    artifacts), shared by the workers; the dashboard serves it for artifacts users attach to trials."""
    return AtomicFileSystemArtifactStore(made_folder(path, "artifact store"))


def load_existing_study(url: str, name: str) -> optuna.Study:
    """A study that must exist already (status, finalize, predict); UserError naming it otherwise."""
    storage = open_existing_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = optuna.study.get_all_study_names(storage)
        raise UserError(
            f"no study {name!r} in {redacted(url)} (studies there: {', '.join(known) or 'none'}; "
            "start one with `fer-search run`)"
        ) from None


def open_existing_storage(url: str) -> RDBStorage:
    """open_storage for commands that only read: a SQLite file that is not there is a mistyped path,
    not a database to create, and one in a folder this user may not write to is read without writing."""
    _check_url(url)
    path = sqlite_path(url)
    if path is None:
        return open_storage(url)
    _refuse_a_folder(url, path)
    if not path.is_file():
        raise UserError(
            f"storage {url}: no such database file (start a study with `fer-search run`, or give --storage / --config)"
        )
    if may_write(path.parent):
        return open_storage(url)
    check_sqlite_intact(path)
    return _connected(f"sqlite:///{path}", read_only=_read_only_connection(path))


def serve_dashboard(url: str, artifacts: Path, host: str, port: int, say: Callable[[str], None]) -> None:
    """optuna-dashboard on the storage and the artifact store, until Ctrl-C; `say` gets its address."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError("optuna-dashboard is not installed (pip install optuna-dashboard)") from None
    storage = open_existing_storage(url)
    # Tried first because the web server prints its banner before it fails to bind.
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as the web server (wsgiref) picks it
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
            probe.bind((host, port))
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise UserError(
            f"dashboard: cannot serve on {host}:{port} ({e.strerror or first_line(e)}); pick another --port or --host"
        ) from None
    say(f"optuna-dashboard on http://{host}:{port}/dashboard (Ctrl-C to stop)")
    run_server(storage, host=host, port=port, artifact_store=open_artifact_store(artifacts))
