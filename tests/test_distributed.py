"""Several workers, one real PostgreSQL: the study ends right, a dead worker's trial is retried,
connections survive server-side drops and stay bounded, a first start on an empty database does
not race.

Every worker is a separate `python -m fer_search run` process, as on separate machines. They
share a host name here, so each gets its own --seed (samplers are seeded from seed and host).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
from optuna.trial import FrozenTrial, TrialState
from pgserver import MAX_CONNECTIONS, PASSWORD, RESERVED, ROLE, PgServer, in_ci, unavailable

from fer_search.config import load_config
from fer_search.errors import UserError
from fer_search.model import BASELINE
from fer_search.objective import trial_seed
from fer_search.space import optuna_params
from fer_search.storage import engine_kwargs_for, open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_DEADLINE_S = 150  # far above what these runs take: a hang fails the test instead of blocking it

# Seconds, not the defaults' minutes: a killed worker's trial is failed 3 s after its last
# heartbeat, every epoch writes a checkpoint, an idle worker looks at the study twice a second.
# The space keeps the baseline but leaves out the widest models, which take many seconds an
# epoch on a small CPU.
FLEET_TOML = """\
[study]
artifacts = "artifacts"

[run]
heartbeat_interval = 1
grace_period = 3
checkpoint_every_s = 0
wait_poll_s = 0.5

[space]
width = [0.5, 1.0]
convs_per_block = [1]
"""

# Workers started separately on one host each use every core (only --workers K shares them out);
# spinning OpenMP threads of three such processes on two cores slow each other down threefold.
WORKER_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Workers:
    """`fer-search run` processes sharing one study on their own fresh database, with their logs."""

    url: str
    study: str
    folder: Path  # holds search.toml, the artifact store and one log per worker
    data: Path
    procs: dict[int, subprocess.Popen[bytes]]  # by --seed

    @classmethod
    def on_new_database(cls, postgres: PgServer, name: str, folder: Path, data: Path) -> Workers:
        (folder / "search.toml").write_text(FLEET_TOML)
        return cls(postgres.create_database(name), name, folder, data, {})

    @property
    def config(self) -> Path:
        return self.folder / "search.toml"

    def start(self, seed: int, trials: int, epochs: int) -> None:
        with open(self.folder / f"worker-{seed}.log", "wb") as log:  # a file: a pipe nobody drains fills up
            self.procs[seed] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fer_search",
                    "run",
                    "--config",
                    str(self.config),
                    "--storage",
                    self.url,
                    "--study",
                    self.study,
                    "--data",
                    str(self.data),
                    "--trials",
                    str(trials),
                    "--epochs",
                    str(epochs),
                    "--device",
                    "cpu",
                    "--seed",
                    str(seed),
                ],
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=WORKER_ENV,
            )

    def log(self, seed: int) -> str:
        return (self.folder / f"worker-{seed}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- worker --seed {s} ---\n{self.log(s)[-3000:]}" for s in self.procs)

    def wait(self, while_waiting: Callable[[], None] = lambda: None, poll_s: float = 0.2) -> dict[int, int]:
        """Exit codes by seed, once all have ended; fails with every log past the deadline."""
        deadline = time.monotonic() + WORKER_DEADLINE_S
        while any(p.poll() is None for p in self.procs.values()):
            if time.monotonic() > deadline:
                pytest.fail(f"workers still running after {WORKER_DEADLINE_S} s\n{self.logs()}")
            while_waiting()
            time.sleep(poll_s)
        return {s: p.returncode for s, p in self.procs.items()}

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@contextmanager
def study_at(url: str, name: str) -> Iterator[optuna.Study]:
    """The study through a storage whose connections are closed afterwards (not left to the GC,
    which would hold them open and distort the connection counts)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        yield optuna.load_study(study_name=name, storage=storage)
    finally:
        storage.engine.dispose()


def connections(postgres: PgServer, database: str, admin: psycopg.Connection | None = None) -> int:
    """Server-side connections to `database` (what counts against max_connections)."""
    with postgres.admin() if admin is None else nullcontext(admin) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
    return int(row[0]) if row else 0


def settled_connections(postgres: PgServer, database: str) -> int:
    """Connections left once the server has noticed that its clients are gone (it takes a moment)."""
    deadline = time.monotonic() + 10
    while (n := connections(postgres, database)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return n


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state in FINISHED]


# --- three workers, as on three machines --------------------------------------------------

FLEET_WORKERS, FLEET_TRIALS = 3, 9


@dataclass
class FleetRun:
    workers: Workers
    codes: dict[int, int]
    trials: list[FrozenTrial]
    peak_connections: int
    connections_after: int


@pytest.fixture(scope="module")
def fleet(postgres: PgServer, tiny_fer: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetRun:
    """Three workers started at the same moment on an empty database and run to the end, once
    for the tests below, counting the database's connections while they run."""
    workers = Workers.on_new_database(postgres, "fleet", tmp_path_factory.mktemp("fleet"), tiny_fer)
    peak = 0

    def watch(admin: psycopg.Connection) -> None:
        nonlocal peak
        peak = max(peak, connections(postgres, "fleet", admin))

    try:
        for seed in range(1, FLEET_WORKERS + 1):
            workers.start(seed, trials=FLEET_TRIALS, epochs=2)
        with postgres.admin() as admin:
            codes = workers.wait(lambda: watch(admin), poll_s=0.02)
    finally:
        workers.kill_all()
    after = settled_connections(postgres, "fleet")
    with study_at(workers.url, "fleet") as study:
        trials = study.get_trials()
    return FleetRun(workers, codes, trials, peak, after)


@pytest.mark.postgres
def test_workers_started_together_on_an_empty_database_all_succeed(fleet: FleetRun) -> None:
    assert fleet.codes == {s: 0 for s in range(1, FLEET_WORKERS + 1)}, fleet.workers.logs()


@pytest.mark.postgres
def test_three_workers_finish_the_study_with_the_baseline_once(fleet: FleetRun) -> None:
    trials = fleet.trials
    # N finished, or up to N + K - 1 when the last K trials were taken together (ARCHITECTURE.md, "The search")
    assert FLEET_TRIALS <= len(finished(trials)) <= FLEET_TRIALS + FLEET_WORKERS - 1
    assert [(t.number, t.state.name) for t in trials if t.state not in FINISHED] == [], fleet.workers.logs()
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(baselines) == 1
    assert baselines[0].params == optuna_params(BASELINE, load_config(fleet.workers.config).space)
    assert baselines[0].user_attrs["trial_params"] == BASELINE.to_dict()
    # A trial's seed derives from its worker's --seed: every worker took trials.
    seeds = {s for t in trials for s in range(1, FLEET_WORKERS + 1) if t.user_attrs["seed"] == trial_seed(s, t.number)}
    assert seeds == set(range(1, FLEET_WORKERS + 1))


@pytest.mark.postgres
def test_connections_stay_bounded_and_are_released(fleet: FleetRun) -> None:
    kwargs = engine_kwargs_for(fleet.workers.url)
    per_worker = kwargs["pool_size"] + kwargs["max_overflow"]
    assert 0 < fleet.peak_connections <= FLEET_WORKERS * per_worker < MAX_CONNECTIONS - RESERVED
    assert fleet.connections_after == 0


@pytest.mark.postgres
def test_status_json_and_optuna_see_the_same_study(fleet: FleetRun) -> None:
    w = fleet.workers
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fer_search",
            "status",
            "--json",
            "--config",
            str(w.config),
            "--storage",
            w.url,
            "--study",
            w.study,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=w.folder,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    with study_at(w.url, w.study) as study:
        trials, best = study.get_trials(), study.best_trial
    assert doc["study"] == w.study
    assert doc["trials"] == {s.name: sum(t.state == s for t in trials) for s in TrialState}
    assert doc["best"] == {"number": best.number, "value": best.value, "params": best.user_attrs["trial_params"]}
    baseline = next(t for t in trials if t.user_attrs.get("baseline"))
    assert doc["baseline"] == {"number": baseline.number, "value": baseline.value, "state": "COMPLETE"}


# --- a worker killed mid-trial ------------------------------------------------------------


def running_trial_of(storage: optuna.storages.BaseStorage, study: str, seed: int) -> FrozenTrial | None:
    """The RUNNING trial of the worker with this --seed once it has reported an epoch and written
    its checkpoint, so that killing the worker then loses work that the retry must recover."""
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(states=(TrialState.RUNNING,))
    except KeyError:  # not created yet
        return None
    return next(
        (
            t
            for t in trials
            if t.intermediate_values
            and "checkpoint" in t.user_attrs
            and t.user_attrs.get("seed") == trial_seed(seed, t.number)
        ),
        None,
    )


def mid_trial(workers: Workers, seed: int) -> FrozenTrial:
    """Wait until the worker with this --seed is in the middle of a trial; returns that trial."""
    storage = open_storage(workers.url)  # may come first to the empty database: takes part in its race
    try:
        deadline = time.monotonic() + WORKER_DEADLINE_S
        while (victim := running_trial_of(storage, workers.study, seed)) is None:
            assert workers.procs[seed].poll() is None, f"worker {seed} ended before the kill\n{workers.logs()}"
            assert time.monotonic() < deadline, f"worker {seed} never got mid-trial\n{workers.logs()}"
            time.sleep(0.2)
        return victim
    finally:
        storage.engine.dispose()


@pytest.mark.postgres
def test_a_killed_workers_trial_is_failed_and_retried_from_its_checkpoint(
    postgres: PgServer, tiny_fer: Path, tmp_path: Path
) -> None:
    workers = Workers.on_new_database(postgres, "killed", tmp_path, tiny_fer)
    trials, epochs = 2, 5  # enough epochs that the kill lands mid-trial, after a checkpoint
    try:
        workers.start(1, trials, epochs)
        victim = mid_trial(workers, 1)  # first, so that the other cannot take both trials before it asks
        workers.start(2, trials, epochs)
        os.kill(workers.procs[1].pid, signal.SIGKILL)
        workers.start(3, trials, epochs)  # a newcomer, as a replacement machine would join
        codes = workers.wait()
    finally:
        workers.kill_all()

    assert codes == {1: -signal.SIGKILL, 2: 0, 3: 0}, workers.logs()
    with study_at(workers.url, workers.study) as study:
        all_trials = study.get_trials()
    assert [t.number for t in all_trials if t.state == TrialState.RUNNING] == []
    assert all_trials[victim.number].state == TrialState.FAIL
    retries = [t for t in all_trials if t.system_attrs.get("failed_trial") == victim.number]
    assert [t.state in FINISHED for t in retries] == [True], workers.logs()
    retry = retries[0]
    assert retry.params == victim.params
    started = rf"trial {retry.number} (\(baseline\) )?continues trial {victim.number} at epoch"
    assert re.search(started, workers.log(2) + workers.log(3)), workers.logs()
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))  # the whole curve, resumed epochs too
    assert len(finished(all_trials)) == trials, workers.logs()  # no more: the workers count under the claim
    assert len([t for t in finished(all_trials) if t.user_attrs.get("baseline")]) == 1


# --- connections --------------------------------------------------------------------------


@pytest.mark.postgres
def test_pool_pre_ping_replaces_connections_the_server_dropped(postgres: PgServer) -> None:
    url = postgres.create_database("preping")
    storage = open_storage(url)
    try:
        study = optuna.create_study(study_name="ping", storage=storage)
        study.set_user_attr("before", 1)  # leaves an open connection in the pool
        with postgres.admin() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                ("preping",),
            ).fetchone()
        assert row is not None and row[0] >= 1  # the pool's connection was there, and is now dead
        assert settled_connections(postgres, "preping") == 0
        study.set_user_attr("after", 2)
        assert optuna.load_study(study_name="ping", storage=storage).user_attrs == {"before": 1, "after": 2}
    finally:
        storage.engine.dispose()


@pytest.mark.postgres
def test_a_role_that_may_not_create_tables_is_told_so(postgres: PgServer) -> None:
    """PostgreSQL 15 and later let only a database's owner create tables in its public schema."""
    with postgres.admin() as conn:
        conn.execute('CREATE DATABASE "notmine"')  # owned by the superuser, not by the workers' role
    with pytest.raises(UserError, match="may not create Optuna's tables.*grant it CREATE") as caught:
        open_storage(postgres.url("notmine"))
    assert "\n" not in str(caught.value) and "fer-test-password" not in str(caught.value)


# --- a first start, many at once ----------------------------------------------------------

# Each racer gets ready (imports done), then waits for the go file, so that all of them create
# the tables and the study within milliseconds: a far tighter race than workers that start
# together but take seconds, each a different number, to import torch.
RACER = textwrap.dedent("""\
    import dataclasses, sys, time
    from pathlib import Path
    from fer_search.config import Config
    from fer_search.study import ensure_study
    from fer_search.storage import open_storage

    url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    config = Config()
    config = dataclasses.replace(config, study=dataclasses.replace(config.study, name="race"))
    record = {"fingerprints": {"train": "t", "val": "v"}, "space": config.space.to_dict(), "epochs": 30}
    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    ensure_study(config, open_storage(url), record)
""")


@pytest.mark.postgres
def test_many_first_starts_at_once_create_the_tables_and_the_study_once(postgres: PgServer, tmp_path: Path) -> None:
    url = postgres.create_database("race")
    go, ready = tmp_path / "go", [tmp_path / f"ready-{i}" for i in range(3)]
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, url, str(r), str(go)], stderr=subprocess.PIPE, text=True)
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        errors = [p.communicate(timeout=60)[1] for p in racers]
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in racers] == [0] * len(racers), "\n".join(errors)
    with study_at(url, "race") as study:
        assert study.user_attrs["ready"] is True
        assert [t.user_attrs.get("baseline") for t in study.get_trials()] == [True]


# --- no PostgreSQL here -------------------------------------------------------------------


def test_without_postgresql_a_workstation_skips_but_ci_fails() -> None:
    with pytest.raises(pytest.skip.Exception):
        unavailable("no initdb", {})
    with pytest.raises(pytest.fail.Exception):
        unavailable("no initdb", {"CI": "true"})
    assert not in_ci({"CI": "false"})


def test_no_password_given_in_a_url_is_stored_logged_exported_or_reported(
    postgres: PgServer, tiny_fer: Path, tmp_path: Path
) -> None:
    """The password in the URL's user part, in its query, and in PGPASSWORD: nowhere in the database, the logs,
    the exports or finalize's files afterwards."""
    flag_url = postgres.create_database("secrets")  # fer:<password>@...
    query_url = f"postgresql+psycopg://{ROLE}@127.0.0.1:{postgres.port}/secrets?password={PASSWORD}"
    bare_url = f"postgresql+psycopg://{ROLE}@127.0.0.1:{postgres.port}/secrets"
    config = tmp_path / "search.toml"
    config.write_text(f'[data]\npath = "{tiny_fer}"\n[run]\nepochs = 1\ndevice = "cpu"\n')
    outputs = []

    def fer(*args: object, env: dict[str, str] | None = None, ok: bool = True) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "fer_search", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=WORKER_DEADLINE_S,
            env={**WORKER_ENV, **(env or {})},
            cwd=tmp_path,
        )
        outputs.append(done.stdout + done.stderr)
        assert (done.returncode == 0) == ok, outputs[-1]
        return done.stdout

    fer("run", "--config", config, "--storage", flag_url, "--trials", 2)
    fer("run", "--config", config, "--trials", 3, env={"FER_SEARCH_STORAGE": query_url})
    fer("run", "--config", config, "--trials", 4, "--storage", bare_url, env={"PGPASSWORD": PASSWORD})
    fer("run", "--config", config, "--storage", flag_url.replace(str(postgres.port), "1"), "--trials", 5, ok=False)
    fer("status", "--config", config, "--storage", flag_url)
    fer("studies", "--config", config, "--storage", query_url, "--json")
    fer("export", "--config", config, "--storage", flag_url, "--format", "json", "--out", tmp_path / "trials.json")
    fer("export", "--config", config, "--storage", flag_url, "--format", "csv")
    fer(
        "finalize",
        "--config",
        config,
        "--storage",
        flag_url,
        "--seeds",
        1,
        "--top-k",  # the search's best as it is: re-ranking is not this test's subject
        1,
        "--no-baseline",
        "--out",
        tmp_path / "final",
    )

    assert len(json.loads((tmp_path / "trials.json").read_text())) >= 4
    assert (tmp_path / "final" / "report.html").is_file()
    with postgres.admin("secrets") as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = [str(r[0]) for t in tables for r in conn.execute(f'SELECT t::text FROM "{t}" t')]
    assert any("fer-search run" in row for row in rows)  # the command is recorded, with its password hidden
    for where, text in [("database", "\n".join(rows)), ("output", "\n".join(outputs))]:
        assert PASSWORD not in text, where
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
