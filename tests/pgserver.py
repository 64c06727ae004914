"""A throwaway PostgreSQL cluster for the distributed tests: a real server, never a mock.

initdb into a fresh temporary folder, serve on a free loopback port with the unix socket inside
that folder, and stop with `pg_ctl stop -m immediate` (the data is thrown away, so there is
nothing to flush). The server refuses to run as root: as root (here and in CI) every server
command runs as the `postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest

SERVER_USER = "postgres"  # the system account Debian's postgresql package creates
ROLE, PASSWORD = "fer", "fer-test-password"  # the unprivileged role the workers connect as
ADMIN = "postgres"  # the cluster's superuser, reached over the unix socket without a password
RESERVED = 3  # of max_connections, kept for superusers: the workers' role gets the rest
MAX_CONNECTIONS = 20  # small, so that workers leaking connections run into the limit


class Unavailable(Exception):
    """No PostgreSQL server can be started here (no binaries, or no user to run it as)."""


def find_bindir() -> Path | None:
    """The newest Debian-installed PostgreSQL's bin folder, else the one holding `initdb` on PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def in_ci(env: Mapping[str, str] = os.environ) -> bool:
    """CI must run the PostgreSQL tests, never skip them (CI=true, as GitHub and GitLab set it)."""
    return env.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str, env: Mapping[str, str] = os.environ) -> NoReturn:
    """Skip with the reason on a developer's machine; fail in CI, so that CI never silently skips."""
    if in_ci(env):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run, not skip", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bindir: Path
    base: Path  # the temporary folder: data/, the socket, the log
    port: int
    run_as: str | None  # the system user server commands run as; None = this process's user

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.base / "server.log"

    def url(self, database: str, driver: str = "psycopg") -> str:
        """A worker's storage URL: the unprivileged role, with its password, over TCP."""
        return f"postgresql+{driver}://{ROLE}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def admin(self, database: str = "postgres") -> psycopg.Connection:
        """A superuser connection over the unix socket, autocommit (for CREATE DATABASE and inspection)."""
        return psycopg.connect(host=str(self.base), port=self.port, user=ADMIN, dbname=database, autocommit=True)

    def create_database(self, name: str) -> str:
        """A new empty database owned by the workers' role; returns its storage URL."""
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return self.url(name)

    def pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the server's user; raises with its output when it fails."""
        user: dict[str, Any] = {}
        if self.run_as is not None:
            user = {"user": self.run_as, "group": pwd.getpwnam(self.run_as).pw_gid, "extra_groups": []}
        done = subprocess.run(
            [str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120, cwd=self.base, **user
        )
        if done.returncode != 0:
            log = self.log_file.read_text() if self.log_file.is_file() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")
        return done

    def stop(self) -> None:
        """Stop at once and remove everything; safe to call on a server that never started."""
        try:
            if (self.data_dir / "postmaster.pid").is_file():
                self.pg("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def start_server(max_connections: int = MAX_CONNECTIONS) -> PgServer:
    """initdb + start a cluster with a role and nothing else; the caller must stop() it."""
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH; "
            "apt-get install postgresql)"
        )
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise Unavailable(f"running as root, and there is no {SERVER_USER!r} user to run the server as") from None
        run_as = SERVER_USER
    # Right under /tmp: pytest's folders (0700, root's) are closed to the server's user, and a
    # long $TMPDIR could push the socket's path past the 107 bytes a unix socket name may take.
    server = PgServer(bindir, Path(tempfile.mkdtemp(prefix="fer-pg-", dir="/tmp")), 0, run_as)
    try:
        _init_and_start(server, max_connections)
    except BaseException:
        server.stop()
        raise
    return server


def _init_and_start(server: PgServer, max_connections: int) -> None:
    pwfile = server.base / "password"
    pwfile.write_text(PASSWORD + "\n")
    if server.run_as is not None:
        entry = pwd.getpwnam(server.run_as)
        for path in (server.base, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    # Passwords over TCP, as the workers connect; trust on the socket, which only the folder's owner can reach.
    server.pg(
        "initdb",
        "-D",
        str(server.data_dir),
        "-U",
        ADMIN,
        "--pwfile",
        str(pwfile),
        "--auth-local",
        "trust",
        "--auth-host",
        "scram-sha-256",
        "-E",
        "UTF8",
        "--no-sync",
    )
    # Durability off: the cluster is thrown away, and fsyncs would only slow the tests down.
    settings = {
        "listen_addresses": "127.0.0.1",
        "max_connections": max_connections,
        "superuser_reserved_connections": RESERVED,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    for attempt in range(3):  # a free port can be taken between probing it and binding it
        server.port = free_port()
        options = f"-p {server.port} -k {server.base} " + " ".join(f"-c {k}={v}" for k, v in settings.items())
        try:
            server.pg(
                "pg_ctl",
                "start",
                "-D",
                str(server.data_dir),
                "-l",
                str(server.log_file),
                "-w",
                "-t",
                "60",
                "-o",
                options,
            )
            break
        except RuntimeError:
            if attempt == 2:
                raise
    with server.admin() as conn:
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
