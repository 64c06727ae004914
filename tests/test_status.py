"""status and studies: the `status --json` document, training time that counts running trials, accuracies in
percent, `studies` on SQLite and PostgreSQL, a `status` that starts without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from pgserver import PgServer, Unavailable, start_server, unavailable
from searching import cli, load, write_config

from fer_search.status import running_seconds, study_status
from fer_search.storage import open_storage

START = datetime(2024, 5, 1, 12, 0, 0)
LR = {"lr": FloatDistribution(1e-4, 3e-3, log=True)}
BASELINE_PARAMS = {"lr": 0.001, "dropout_pattern": "interlaced", "dropout_high": 0.5, "batch_size": 128}
BEST_PARAMS = {"lr": 0.0021, "dropout_pattern": "none", "dropout_high": None, "batch_size": 64}


def fake_trial(
    state: TrialState,
    seconds: float | None = None,
    value: float | None = None,
    start: datetime | None = START,
    user_attrs: dict[str, Any] | None = None,
    system_attrs: dict[str, Any] | None = None,
    params: dict[str, float] | None = None,
) -> FrozenTrial:
    """A trial as a worker leaves one (no training): `seconds` from start to end, None while unfinished."""
    return FrozenTrial(
        number=0,  # the storage numbers it
        state=state,
        value=value,
        datetime_start=start if state != TrialState.WAITING else None,
        datetime_complete=None if seconds is None or start is None else start + timedelta(seconds=seconds),
        params=params or {},
        distributions={name: LR[name] for name in params or {}},
        user_attrs=user_attrs or {},
        system_attrs=system_attrs or {},
        intermediate_values={},
        trial_id=0,
    )


def fake_study(storage: str | BaseStorage, name: str = "fer2013", running_since: datetime = START) -> optuna.Study:
    """A study as `run` leaves one, made in a moment: 0 the baseline (45.10%), 1 the best (48.68%), 2 pruned,
    3 failed, 4 its retry waiting, 5 running since `running_since` (a Ctrl-C's requeue of trial 2).
    Finished trials took 60 + 120 + 30 + 10 = 220 s."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    trials = [
        fake_trial(
            TrialState.COMPLETE,
            60,
            0.4510,
            params={"lr": 0.001},
            user_attrs={
                "baseline": True,
                "trial_params": BASELINE_PARAMS,
                "best_epoch": 3,
                "epochs_run": 4,
                "seed": 11,
            },
        ),
        fake_trial(
            TrialState.COMPLETE,
            120,
            0.4868,
            start=START + timedelta(minutes=1),
            params={"lr": 0.0021},
            user_attrs={"trial_params": BEST_PARAMS, "best_epoch": 7, "epochs_run": 8, "seed": 12},
        ),
        fake_trial(TrialState.PRUNED, 30, params={"lr": 0.0003}, user_attrs={"epochs_run": 3}),  # no trial_params
        fake_trial(TrialState.FAIL, 10.5, user_attrs={"fail_reason": "out of memory: CUDA, 2 GiB"}),
        fake_trial(TrialState.WAITING, system_attrs={"failed_trial": 3, "retry_history": [3]}),
        fake_trial(TrialState.RUNNING, start=running_since, user_attrs={"resumed_from": 2, "epochs_run": 1}),
    ]
    study.add_trials(trials)
    return study


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder}/studies.db"


def empty_config(folder: Path) -> Path:
    (folder / "search.toml").write_text("")
    return folder / "search.toml"


def test_status_json_contract(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    assert cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu").exit_code == 0
    result = cli("status", "--config", config, "--json")
    doc = json.loads(result.output)
    assert set(doc) == {"study", "trials", "best", "baseline", "seconds", "running_seconds", "baseline_excluded"}
    assert set(doc["trials"]) == {s.name for s in TrialState}
    assert doc["trials"]["COMPLETE"] == 2 and doc["seconds"] > 0
    study = load(tmp_path)
    assert doc["best"]["number"] == study.best_trial.number and doc["best"]["value"] == study.best_value
    assert doc["baseline"] == {"number": 0, "value": study.trials[0].value, "state": "COMPLETE"}
    assert study.metric_names == ["val_acc"]  # named by its creator, for optuna-dashboard's labels


def test_joining_a_study_made_before_metric_names_names_it(tmp_path: Path) -> None:
    from fer_search.config import load_config
    from fer_search.study import ensure_study, study_record

    config = load_config(empty_config(tmp_path), {"study.storage": sqlite_url(tmp_path), "run.ignore_mismatch": True})
    storage = open_storage(sqlite_url(tmp_path))
    old = optuna.create_study(study_name=config.study.name, storage=storage, direction="maximize")
    old.set_user_attr("ready", True)
    assert old.metric_names is None
    ensure_study(config, storage, study_record(config, {"train": "t", "val": "v"}))
    assert optuna.load_study(study_name=config.study.name, storage=sqlite_url(tmp_path)).metric_names == ["val_acc"]


def test_status_starts_without_torch(tmp_path: Path, tiny_fer: Path) -> None:
    """`status` is what a user runs again and again on a busy study: it must not pay torch's import."""
    config = write_config(tmp_path, tiny_fer)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 1, "--device", "cpu").exit_code == 0
    probe = (
        "import sys\nfrom fer_search.cli import main\n"
        "try:\n    main(['status', '--config', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "complete 1" in done.stdout and done.stdout.strip().endswith("no torch")


def test_training_time_counts_running_trials_as_of_now(tmp_path: Path) -> None:
    study = fake_study(sqlite_url(tmp_path))
    doc = study_status(study, now=START + timedelta(seconds=90))
    assert doc["running_seconds"] == 90 and doc["seconds"] == 220.5 + 90
    assert study_status(study, now=START - timedelta(hours=2))["running_seconds"] == 0  # a worker's clock ahead


def test_running_time_compares_local_times_as_optuna_stores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna stamps naive local times: read against UTC, a trial started now would have run 11 hours here."""
    monkeypatch.setenv("TZ", "XST+11")  # 11 hours behind UTC, no tz database needed
    time.tzset()
    try:
        study = optuna.create_study(direction="maximize")
        study.ask()
        assert 0 <= running_seconds(study.get_trials(), datetime.now()) < 60
        assert 0 <= study_status(study)["running_seconds"] < 60
    finally:
        monkeypatch.undo()
        time.tzset()


def test_status_prints_accuracies_in_percent_and_running_time(tmp_path: Path) -> None:
    fake_study(sqlite_url(tmp_path), running_since=datetime.now() - timedelta(minutes=3))
    result = cli("status", "--config", empty_config(tmp_path), "--storage", sqlite_url(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("study fer2013: running 1, complete 2, pruned 1, fail 1, waiting 1; 6.")
    assert lines[0].endswith(" min of training (3.0 in running trials)")  # 220.5 s finished + 3 min running
    assert lines[1] == "best: trial 1, val_acc 48.68%"
    assert lines[2] == "  lr=0.0021 dropout_pattern=none batch_size=64"  # as the log lines give them
    assert lines[3] == "baseline: trial 0 (complete), val_acc 45.10%"
    doc = json.loads(
        cli("status", "--config", tmp_path / "search.toml", "--storage", sqlite_url(tmp_path), "--json").output
    )
    assert doc["best"]["value"] == 0.4868 and doc["baseline"]["value"] == 0.4510  # fractions stay in the JSON


def assert_lists_studies(config: Path, url: str, storage: str | BaseStorage) -> None:
    """`studies` on a storage holding fake_study "fer2013" then an empty study "tiny" whose [space] excludes the
    baseline: a table of both, and the JSON list of their status documents."""
    result = cli("studies", "--config", config, "--storage", url)
    assert result.exit_code == 0, result.output
    header, fer, tiny = result.output.splitlines()
    assert header.split("  ")[0] == "study" and fer.startswith("fer2013 ") and tiny.startswith("tiny ")
    for column, cell in [("trials", "running 1, complete 2,"), ("best", "48.68% (trial 1)"), ("baseline", "45.10%")]:
        assert header.index(column) == fer.index(cell), (column, header, fer)  # aligned
    assert "none" in tiny and "excluded by [space]" in tiny and tiny.endswith("0.0 min")
    assert fer.endswith(" min")
    docs = json.loads(cli("studies", "--config", config, "--storage", url, "--json").output)
    assert [d["study"] for d in docs] == ["fer2013", "tiny"]
    for doc in docs:
        expected = study_status(optuna.load_study(study_name=doc["study"], storage=storage))
        assert {k: v for k, v in doc.items() if "seconds" not in k} == {
            k: v for k, v in expected.items() if "seconds" not in k
        }
    assert docs[0]["trials"]["COMPLETE"] == 2 and docs[0]["best"]["params"] == BEST_PARAMS
    assert docs[0]["running_seconds"] > 0 and docs[1]["baseline_excluded"] is True


def add_tiny_study(storage: str | BaseStorage) -> None:
    optuna.create_study(study_name="tiny", storage=storage).set_user_attr("baseline_excluded", True)


def test_studies_lists_every_study_of_a_sqlite_storage(tmp_path: Path) -> None:
    fake_study(sqlite_url(tmp_path))
    add_tiny_study(sqlite_url(tmp_path))
    assert_lists_studies(empty_config(tmp_path), sqlite_url(tmp_path), sqlite_url(tmp_path))


def test_studies_of_an_empty_storage_says_so(tmp_path: Path) -> None:
    open_storage(sqlite_url(tmp_path)).engine.dispose()  # Optuna's tables, no study
    result = cli("studies", "--config", empty_config(tmp_path), "--storage", sqlite_url(tmp_path))
    assert (
        result.exit_code == 0
        and result.output == f"no studies in {sqlite_url(tmp_path)} (start one with `fer-search run`)\n"
    )
    assert (
        cli("studies", "--config", tmp_path / "search.toml", "--storage", sqlite_url(tmp_path), "--json").output
        == "[]\n"
    )


def test_studies_on_a_missing_sqlite_file_is_status_s_one_line(tmp_path: Path) -> None:
    missing = ["--config", empty_config(tmp_path), "--storage", f"sqlite:///{tmp_path}/typo/studies.db"]
    studies, status = cli("studies", *missing), cli("status", *missing)
    assert studies.exit_code == status.exit_code == 2
    assert (
        studies.output == status.output
        and studies.output.count("\n") == 1
        and "no such database file" in studies.output
    )
    assert not (tmp_path / "typo").exists()
    a_folder = cli("status", "--config", empty_config(tmp_path), "--storage", f"sqlite:///{tmp_path}")
    assert (
        a_folder.exit_code == 2
        and a_folder.output == f"error: storage sqlite:///{tmp_path}: {tmp_path} is a folder, not a database file\n"
    )


@pytest.fixture(scope="module")
def postgres() -> Iterator[PgServer]:
    """A throwaway PostgreSQL cluster for this module's tests."""
    try:
        server = start_server(max_connections=10)
    except Unavailable as e:
        unavailable(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.postgres
def test_studies_lists_every_study_of_a_postgresql_storage(tmp_path: Path, postgres: PgServer) -> None:
    url = postgres.create_database("studies")
    storage = open_storage(url)  # one pool, closed at the end: the server takes few connections
    try:
        fake_study(storage)
        add_tiny_study(storage)
        assert_lists_studies(empty_config(tmp_path), url, storage)
    finally:
        storage.engine.dispose()
