"""benchmarks/full_study.py rehearsed on the CPU: what comes back, summary.json, the shipped model, resuming."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from fer_search.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "full_study.py"
SHIPPED = {"summary.json", "full_study.log", "fer2013.db", "model.pt", "metrics.json", "report.html", "reports.zip"}
PHASES = ("env", "speed", "study", "finalize")


def full_study(data: Path, out: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The issue's rehearsal command (with the working files kept in the test's folder)."""
    command = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--data",
        str(data),
        "--out",
        str(out),
        "--work",
        str(work),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


# The GPU run's phases at the least size that runs each path (finalize re-ranks 2 trials, one retraining each).
REHEARSAL = (
    "--budget-s",
    "500",
    "--trials",
    "2",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--top-k",
    "2",
    "--selection-seeds",
    "1",
    "--workers",
    "1",
)


@pytest.fixture(scope="module")
def rehearsed(tiny_fer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR of one rehearsal on the tiny data set; do not modify it."""
    folder = tmp_path_factory.mktemp("full_study")
    result = full_study(tiny_fer, folder / "out", folder / "work", *REHEARSAL)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "out"


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def assert_within_contract(out: Path) -> None:
    entries = list(out.iterdir())
    assert len(entries) <= 8, entries
    assert all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in entries), entries
    assert not [p for p in entries if p.name.endswith(("-wal", "-shm", "-journal", ".tmp"))]


def test_rehearsal_returns_the_shipped_files_within_the_contract(rehearsed: Path) -> None:
    assert {p.name for p in rehearsed.iterdir()} == SHIPPED
    assert_within_contract(rehearsed)
    with sqlite3.connect(rehearsed / "fer2013.db") as db:  # one whole file: nothing waits in a -wal
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_summary_holds_every_phase_and_its_figures(rehearsed: Path) -> None:
    summary = summary_of(rehearsed)
    phases = summary["phases"]
    assert [phases[name]["status"] for name in PHASES] == ["done"] * 4
    env = phases["env"]
    assert env["environment"]["torch"] and env["environment"]["optuna"] == optuna.__version__
    assert env["augmentation"]["matches_torchvision"]
    assert set(env["smoke"]) == {"baseline", "largest"}
    speed = phases["speed"]
    assert speed["throughput"]["trainer_images_per_s"] > 0 and speed["throughput"]["ratio_vs_reference"] > 0
    assert speed["baseline_training"]["epochs"] == 1 and speed["baseline_training"]["seconds"] > 0
    study = phases["study"]
    assert study["finished"] == 2 and study["trials"]["COMPLETE"] + study["trials"]["PRUNED"] == 2
    assert study["baseline"]["number"] == 0 and study["trials_per_hour"] > 0
    assert 0 <= study["share_of_epochs_pruned"] < 1
    assert (study["workers"], study["fuse"]) == (1, 1)
    final = phases["finalize"]
    assert final["seeds"] == [0] and final["predict"]["reproduces"]
    assert (final["top_k"], final["selection_seeds"]) == (2, 1)
    for name in ("best", "baseline", "best_flipped", "baseline_flipped"):
        assert 0 <= final[name]["private_test"]["mean"] <= 1
    shipped = final["shipped"]
    assert shipped["seeds"] == [0] and shipped["flip"] == final["flip"]["used"] and not shipped["ensemble"]
    assert final["predict"]["metrics_json"] == shipped["private_test"]
    assert final["ensemble"] is None  # one seed
    if final["selection"] is not None:  # two complete trials of distinct configurations
        candidates = [c["number"] for c in final["selection"]["candidates"]]
        assert len(candidates) == 2 and final["selection"]["chosen"] in candidates
    assert all(phases[name]["seconds"] >= 0 for name in PHASES)
    assert {f["name"] for f in summary["files"]} <= SHIPPED


def load_copy(database: Path, folder: Path) -> optuna.Study:
    """The study in a copy of `database`: opening DIR's own would leave side files in it."""
    folder.mkdir()
    shutil.copy(database, folder / "copy.db")
    return optuna.load_study(study_name="fer2013", storage=f"sqlite:///{folder / 'copy.db'}")


def test_shipped_database_holds_the_study(rehearsed: Path, tmp_path: Path) -> None:
    study = load_copy(rehearsed / "fer2013.db", tmp_path / "copy")
    assert len([t for t in study.trials if t.state.is_finished()]) == 2
    assert study.trials[0].user_attrs["baseline"] is True


def test_predict_on_the_shipped_model_reproduces_its_metrics(rehearsed: Path, tiny_fer: Path) -> None:
    images = sorted(tiny_fer.glob("test/*/PrivateTest_*.jpg"))
    result = CliRunner().invoke(main, ["predict", "--json", "--model", str(rehearsed / "model.pt"), *map(str, images)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    accuracy = sum(line["label"] == Path(line["path"]).parent.name for line in lines) / len(images)
    metrics = json.loads((rehearsed / "metrics.json").read_text())
    assert accuracy == metrics["shipped"]["private_test"]["accuracy"]


def test_a_fresh_machine_continues_the_study_from_dir(rehearsed: Path, tiny_fer: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(rehearsed, out)  # what came back; the new working folder is empty, as on a new machine
    # The GPU run's layout: search workers and finalize's trainings in processes of their own.
    # The rehearsal's settings, one trial more; argparse takes an option's last value.
    result = full_study(tiny_fer, out, tmp_path / "work", *REHEARSAL, "--trials", "3", "--workers", "2", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = summary_of(out)
    phases = summary["phases"]
    assert phases["study"]["finished"] == 3 and phases["finalize"]["study_finished"] == 3
    assert [call["exit"] for call in summary["calls"]] == [0, 0]
    assert phases["speed"]["seconds_all_calls"] == summary_of(rehearsed)["phases"]["speed"]["seconds"]  # not redone
    before, after = (
        load_copy(folder / "fer2013.db", tmp_path / name) for folder, name in ((rehearsed, "a"), (out, "b"))
    )
    # The same trials, not a new study that drew the same first two.
    assert [t.datetime_start for t in after.trials[:2]] == [t.datetime_start for t in before.trials[:2]]
    assert phases["finalize"]["predict"]["reproduces"]
    assert_within_contract(out)


def test_a_run_cut_short_says_so_and_a_second_call_finishes_it(tiny_fer: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    cut = full_study(tiny_fer, out, work, "--budget-s", "3", *REHEARSAL[2:])
    assert cut.returncode == 75, cut.stdout + cut.stderr
    assert "resume with:" in cut.stdout
    assert "cut" in {phase["status"] for phase in summary_of(out)["phases"].values()}
    assert_within_contract(out)
    resumed = full_study(tiny_fer, out, work, *REHEARSAL)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = summary_of(out)
    assert [summary["phases"][name]["status"] for name in PHASES] == ["done"] * 4
    assert len(summary["calls"]) == 2
    assert_within_contract(out)


def test_a_study_its_timeout_stopped_short_is_cut_not_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `run --timeout` exits 0 with fewer trials than asked for: the phase must say cut, so the call exits 75.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import full_study

    plan = full_study.Plan(
        data=tmp_path,
        out=tmp_path / "out",
        work=tmp_path,
        budget_s=60,
        device="cpu",
        trials=50,
        epochs=1,
        seeds=1,
        top_k=1,
        selection_seeds=1,
        workers=1,
        fuse=1,
        jobs=1,
        seed=0,
        config=tmp_path / "search.toml",
    )
    plan.out.mkdir()
    monkeypatch.setattr(full_study, "service", lambda *args: 0)
    monkeypatch.setattr(full_study, "study_figures", lambda _plan: {"finished": 12})
    with pytest.raises(full_study.PhaseCut, match="12 of 50 trials"):
        full_study.study_phase(plan, full_study.Run(plan, "test"), deadline=0.0)


def test_fuse_reaches_the_services_configuration(
    tiny_fer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `run` reads --workers and --fuse from the search.toml the script writes into --work.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import full_study

    args = ["--device", "cpu", "--data", str(tiny_fer), "--out", str(tmp_path / "out"), "--work", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args, "--fuse", "2"])
    plan = full_study._parse_args()
    assert plan.fuse == 2
    assert full_study.write_config(plan).run.fuse == 2


def test_bad_input_is_one_line_and_exit_2(tiny_fer: Path, tmp_path: Path) -> None:
    result = full_study(tiny_fer, tmp_path / "out", tmp_path / "work", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"error: config file not found: {tmp_path / 'missing.toml'}"]
    result = full_study(tmp_path / "no-data", tmp_path / "out", tmp_path / "work")
    assert result.returncode == 2 and "--data" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
