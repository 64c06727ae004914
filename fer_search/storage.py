"""Storage URLs -> tuned Optuna RDB storages (SQLite or PostgreSQL), and the artifact store."""

from __future__ import annotations

import logging
import random
import shutil
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import CreateEnginePlugin

from fer_search.errors import UserError, first_line
from fer_search.files import made_folder, write_atomically

log = logging.getLogger("fer_search")
SQLITE_BUSY_TIMEOUT_MS = 120_000
INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE; 15 and later deny CREATE on public to non-owners
PG_POOL_SIZE = 2  # a worker uses one connection at a time (plus the heartbeat thread's)


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
            "max_overflow": 1,
            "pool_recycle": 1800,
            "connect_args": {
                "connect_timeout": 10,
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
            },
        }
    return {}


def open_storage(url: str, heartbeat: Heartbeat | None = None) -> RDBStorage:
    """An RDBStorage for `url`; bad URLs, missing drivers and unreachable servers -> UserError."""
    _check_url(url)
    if url.startswith("sqlite:///"):
        made_folder(Path(url[len("sqlite:///") :]).parent, "storage")
    hb: dict[str, Any] = {}
    if heartbeat is not None:
        hb = {
            "heartbeat_interval": heartbeat.interval,
            "grace_period": heartbeat.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry),
        }
    # Several workers starting on an empty database race to create the tables; the loser sees
    # an integrity or "already exists" error, and the tables are there when it tries again.
    for attempt in range(5):
        try:
            storage = _SteadyRDBStorage(
                url, engine_kwargs=engine_kwargs_for(url), skip_table_creation=_tables_exist(url), **hb
            )
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
    """Optuna's RDB storage whose heartbeat outlives a failed write.

    Why: Optuna records heartbeats in a thread that has no error handling, so one transient
    database error (a server restart, a lock held too long) would end them for the rest of the
    trial, and after the grace period the other workers would fail a trial that is still training.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            log.warning(
                "heartbeat of trial id %d not recorded (%s); trying again next interval", trial_id, first_line(e)
            )


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
            f"storage URL {url!r} is not a database URL (e.g. sqlite:///studies/fer2013.db "
            "or postgresql://user:pass@host/db)"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise UserError(
            f"storage URL {redacted(url)}: unsupported database {parsed.get_backend_name()!r} "
            "(use sqlite or postgresql)"
        )
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise UserError(f"storage URL {redacted(url)}: unknown driver {parsed.drivername!r}") from None


def _driver_hint(url: str) -> str:
    return "pip install -e '.[postgres]'" if url.startswith("postgresql") else "install the driver for this URL"


def redacted(url: str) -> str:
    """The URL with its password hidden, for messages and records."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


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
    not a database to create."""
    _check_url(url)
    database = sqlalchemy.engine.make_url(url).database
    sqlite_file = url.startswith("sqlite") and database not in (None, "", ":memory:")
    if sqlite_file and not Path(str(database)).is_file():
        raise UserError(
            f"storage {url}: no such database file (start a study with `fer-search run`, or give --storage / --config)"
        )
    return open_storage(url)


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
