"""cli: bad input exits 2 with one line, data check, dashboard over real HTTP, python -m."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from fer_search.cli import main
from fer_search.data import CLASSES
from fer_search.errors import UserError


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *named: str) -> None:
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    for word in named:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def config(tmp_path: Path, tiny_fer: Path) -> Path:
    path = tmp_path / "search.toml"
    path.write_text(f'[data]\npath = "{tiny_fer}"\n')
    return path


@pytest.mark.parametrize(
    "url, named",
    [
        ("nonsense", "nonsense"),
        ("mongodb://h/db", "mongodb"),
        ("postgresql+nosuchdriver://u@127.0.0.1/db", "nosuchdriver"),
        ("postgresql+psycopg://u:secret@127.0.0.1:1/db", "cannot connect"),
    ],
)
def test_bad_storage_url_exits_2(config: Path, url: str, named: str) -> None:
    code, output = invoke("status", "--config", config, "--storage", url)
    assert_one_line_error(code, output, named)
    assert "secret" not in output


def test_a_password_with_a_raw_at_sign_is_refused_without_showing_it(config: Path) -> None:
    code, output = invoke("status", "--config", config, "--storage", "postgresql+psycopg://u:pa@ss@127.0.0.1:1/db")
    assert_one_line_error(code, output, "%40", "PGPASSWORD")
    assert "pa@ss" not in output and "ss@127" not in output


def test_unknown_study_exits_2(config: Path) -> None:
    optuna.create_study(study_name="other", storage=f"sqlite:///{config.parent}/s.db")
    code, output = invoke(
        "status", "--config", config, "--study", "nope", "--storage", f"sqlite:///{config.parent}/s.db"
    )
    assert_one_line_error(code, output, "nope", "other")


@pytest.mark.parametrize(
    "args, named",
    [
        (["--trials", "0"], "run.trials"),
        (["--trials", "2", "--device", "tpu"], "tpu"),
        (["--trials", "2", "--data", "/no/such/folder"], "/no/such/folder"),
        (["--trials", "2", "--config", "/no/such.toml"], "/no/such.toml"),
        (["--trials", "2", "--workers", "0"], "run.workers"),
        (["--trials", "2", "--fuse", "0"], "run.fuse"),
    ],
)
def test_bad_run_input_exits_2(config: Path, args: list[str], named: str) -> None:
    code, output = invoke("run", "--config", config, *args) if "--config" not in args else invoke("run", *args)
    assert_one_line_error(code, output, named)


def test_the_environment_gives_what_a_flag_would_and_a_flag_wins(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    optuna.create_study(study_name="from-env", storage=f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("FER_SEARCH_STORAGE", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("FER_SEARCH_STUDY", "from-env")
    code, output = invoke("status", "--config", config)
    assert code == 0 and output.startswith("study from-env: no trials"), output
    code, output = invoke("status", "--config", config, "--storage", f"sqlite:///{tmp_path}/flag.db")
    assert_one_line_error(code, output, "flag.db")  # the flag, not the variable


def test_the_environment_names_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "fleet.toml").write_text(f'[study]\nname = "fleet"\nstorage = "sqlite:///{tmp_path}/fleet.db"\n')
    optuna.create_study(study_name="fleet", storage=f"sqlite:///{tmp_path}/fleet.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FER_SEARCH_CONFIG", str(elsewhere / "fleet.toml"))
    code, output = invoke("status")
    assert code == 0 and output.startswith("study fleet:"), output
    monkeypatch.setenv("FER_SEARCH_CONFIG", str(tmp_path / "nope.toml"))
    assert_one_line_error(*invoke("status"), "FER_SEARCH_CONFIG", "nope.toml")


@pytest.mark.parametrize(
    "command, module, function",
    [
        ("run", "search", "run_search"),
        ("finalize", "finalize", "finalize_study"),
        ("dashboard", "storage", "serve_dashboard"),
    ],
)
def test_every_command_that_uses_the_artifact_store_takes_it_from_the_environment(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, module: str, function: str
) -> None:
    """A fleet sets FER_SEARCH_ARTIFACTS once: workers write checkpoints where the others and the dashboard look."""
    seen: list[Path] = []

    def called(*args: Any, **kwargs: Any) -> None:
        seen.append(args[1] if command == "dashboard" else args[0].study.artifacts)  # (url, artifacts) or (config)
        raise UserError("stopped here")

    monkeypatch.setattr(f"fer_search.{module}.{function}", called)
    monkeypatch.setenv("FER_SEARCH_ARTIFACTS", str(tmp_path / "shared"))
    assert_one_line_error(*invoke(command, "--config", config), "stopped here")
    assert_one_line_error(*invoke(command, "--config", config, "--artifacts", tmp_path / "flag"), "stopped here")
    assert seen == [tmp_path / "shared", tmp_path / "flag"]  # the flag wins


@pytest.mark.parametrize(
    "variable, value, named",
    [("FER_SEARCH_WORKERS", "0", "run.workers"), ("FER_SEARCH_DEVICE", "tpu", "run.device")],
)
def test_a_bad_value_from_the_environment_names_the_variable(
    config: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    code, output = invoke("run", "--config", config, "--trials", 2)
    assert_one_line_error(code, output, variable, named)


def test_the_recorded_command_leaves_out_what_the_environment_gave(monkeypatch: pytest.MonkeyPatch) -> None:
    from fer_search.cli import command_line, run

    monkeypatch.setenv("FER_SEARCH_STORAGE", "postgresql+psycopg://fer:env-secret@db/fer")
    parent = main.make_context("fer-search", ["run"])
    ctx = run.make_context("run", ["--trials", "5", "--storage", "postgresql://u:flag-secret@h/db"], parent=parent)
    assert command_line(ctx) == "fer-search run --trials 5 --storage 'postgresql://u:***@h/db'"
    ctx = run.make_context("run", ["--trials", "5"], parent=parent)
    assert ctx.params["storage"].endswith("@db/fer")
    assert command_line(ctx) == "fer-search run --trials 5"


def test_unknown_flag_is_a_usage_error(config: Path) -> None:
    code, output = invoke("run", "--config", config, "--trails", "3")
    assert code == 2 and "--trails" in output and "Traceback" not in output


def test_data_check_json(tiny_fer: Path, config: Path) -> None:
    code, output = invoke("data", "check", tiny_fer, "--json", "--config", config)
    assert code == 0
    doc = json.loads(output)
    assert {s: doc["splits"][s]["total"] for s in ("train", "val", "test")} == {"train": 112, "val": 28, "test": 28}
    assert list(doc["splits"]["train"]["per_class"]) == list(CLASSES)
    assert doc["converted"] == 0 and len(doc["fingerprint"]) == 64


@pytest.mark.realdata
def test_data_check_on_fer2013(fer_root: Path, tmp_path: Path) -> None:
    (tmp_path / "search.toml").write_text("")
    code, output = invoke("data", "check", fer_root, "--json", "--config", tmp_path / "search.toml")
    assert code == 0
    doc = json.loads(output)
    totals = {s: doc["splits"][s]["total"] for s in ("train", "val", "test")}
    assert totals == {"train": 28709, "val": 3589, "test": 3589}
    assert doc["splits"]["test"]["per_class"]["disgust"] == 55


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_serves_the_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/d.db"
    optuna.create_study(study_name="watched", storage=storage)
    (tmp_path / "search.toml").write_text("")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fer_search",
            "dashboard",
            "--config",
            str(tmp_path / "search.toml"),
            "--storage",
            storage,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        body = None
        deadline = time.monotonic() + 60
        while body is None and time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read()
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["watched"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dashboard_warns_off_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna_dashboard

    calls = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda *a, **k: calls.append(k))
    (tmp_path / "search.toml").write_text("")
    optuna.create_study(study_name="watched", storage=f"sqlite:///{tmp_path}/d.db")
    result = CliRunner().invoke(
        main,
        [
            "dashboard",
            "--config",
            str(tmp_path / "search.toml"),
            "--host",
            "0.0.0.0",
            "--storage",
            f"sqlite:///{tmp_path}/d.db",
        ],
    )
    assert result.exit_code == 0 and "no authentication" in result.output
    assert calls and calls[0]["host"] == "0.0.0.0"


def program(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """`python -m fer_search ARGS` run to its end, in a process of its own (for what CliRunner cannot stage)."""
    return subprocess.run([sys.executable, "-m", "fer_search", *args], **kwargs)


def study_with_a_waiting_trial(folder: Path) -> str:
    """The storage URL of a study "fer2013" in `folder`, holding one enqueued trial."""
    storage = f"sqlite:///{folder}/s.db"
    optuna.create_study(study_name="fer2013", storage=storage).enqueue_trial({"lr": 0.1})
    return storage


def test_python_m_is_the_same_program() -> None:
    out = program("--help", capture_output=True, text=True, check=True)
    assert all(cmd in out.stdout for cmd in ("run", "status", "dashboard", "finalize", "predict", "data"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full, a device always full")
@pytest.mark.parametrize("command", [["status"], ["export"], ["studies", "--json"]])
def test_a_full_disk_behind_stdout_is_one_line(tmp_path: Path, command: list[str]) -> None:
    storage = study_with_a_waiting_trial(tmp_path)
    with open("/dev/full", "wb") as full:
        done = program(*command, "--storage", storage, stdout=full, stderr=subprocess.PIPE)
    assert_one_line_error(done.returncode, done.stderr.decode(), "standard output", "No space left on device")


def test_export_out_dev_stdout_writes_into_a_pipe(tmp_path: Path) -> None:
    """/dev/stdout resolves to a pipe that has no path: written into, not renamed over (which would fail)."""
    storage = study_with_a_waiting_trial(tmp_path)
    done = program(
        "export", "--storage", storage, "--format", "csv", "--out", "/dev/stdout", capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("number,value,") and "WAITING" in done.stdout, done


def test_a_folder_as_the_sqlite_file_of_run_is_named_a_folder(config: Path, tmp_path: Path) -> None:
    code, output = invoke("run", "--config", config, "--trials", 1, "--storage", f"sqlite:///{tmp_path}")
    assert_one_line_error(code, output, f"{tmp_path} is a folder, not a database file")


def test_a_closed_pipe_behind_stdout_ends_quietly(tmp_path: Path) -> None:
    """As `fer-search export | head -1` once head has gone: click's quiet exit 1, no error line."""
    storage = study_with_a_waiting_trial(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = program("export", "--storage", storage, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, b"")


def test_dashboard_on_a_taken_port_exits_2(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/d.db"
    optuna.create_study(study_name="watched", storage=storage)
    (tmp_path / "search.toml").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["dashboard", "--config", str(tmp_path / "search.toml"), "--storage", storage, "--port", str(port)]
        )
    assert_one_line_error(result.exit_code, result.output, f"127.0.0.1:{port}", "--port")


@pytest.mark.parametrize("port", ["99999", "-1", "0"])
def test_dashboard_on_an_impossible_port_is_a_usage_error(tmp_path: Path, port: str) -> None:
    code, output = invoke("dashboard", "--storage", f"sqlite:///{tmp_path}/none.db", "--port", port)
    assert code == 2 and f"'--port': {port} is not in the range" in output and "Traceback" not in output, output


@pytest.mark.parametrize("command", [["status"], ["dashboard"], ["finalize"]])
def test_a_mistyped_sqlite_path_is_not_created(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "search.toml").write_text("")
    missing = tmp_path / "typo" / "fer2013.db"
    code, output = invoke(*command, "--config", tmp_path / "search.toml", "--storage", f"sqlite:///{missing}")
    assert_one_line_error(code, output, str(missing), "fer-search run")
    assert not missing.parent.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_several_workers_on_a_missing_gpu_say_so_once_and_create_nothing(config: Path) -> None:
    code, output = invoke("run", "--config", config, "--trials", 2, "--workers", 2, "--device", "cuda")
    assert_one_line_error(code, output, "--device cuda", "no CUDA GPU")
    assert not (config.parent / "studies" / "fer2013.db").exists()


@pytest.mark.parametrize(
    "command, modules, absent",
    [
        ("status", ["fer_search.status", "fer_search.storage"], ["torch", "fer_search.search", "fer_search.objective"]),
        ("dashboard", ["fer_search.storage"], ["torch", "fer_search.search", "fer_search.objective"]),
        ("finalize", ["fer_search.finalize"], ["fer_search.search", "fer_search.objective"]),
    ],
)
def test_commands_import_only_what_they_use(command: str, modules: list[str], absent: list[str]) -> None:
    """`status` and `dashboard` start without torch; no command that reads a study imports the worker code."""
    probe = (
        f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        f"print(sorted(set({absent!r}) & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{command} imports {done.stdout.strip()}"


@pytest.mark.parametrize("command", [["studies"], ["export"], ["export", "--format", "json"]])
def test_studies_and_export_start_without_torch(tmp_path: Path, command: list[str]) -> None:
    """Like `status`, they only read the database: a script calling them often must not pay torch's import."""
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="fer2013", storage=url, direction="maximize").add_trial(
        optuna.trial.create_trial(value=0.5, user_attrs={"trial_params": {"lr": 0.001}, "baseline": True})
    )
    (tmp_path / "search.toml").write_text("")
    probe = (
        "import sys\nfrom fer_search.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    args = [*command, "--config", str(tmp_path / "search.toml"), "--storage", url]
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fer2013" in done.stdout or "0.001" in done.stdout, done.stdout
    assert done.stdout.strip().endswith("no torch")
