"""export: every trial as CSV or JSON that loads back a trial per row; finalize's model.pt and report.html
attached to the study for optuna-dashboard, replaced in place on a re-run, a refusing store only warned of."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.artifacts import get_all_artifact_meta
from searching import cli
from test_status import BASELINE_PARAMS, BEST_PARAMS, empty_config, fake_study, sqlite_url

from fer_search.cli import main
from fer_search.errors import UserError
from fer_search.export import attach_final_files, attached_ids, export_format, trial_columns
from fer_search.storage import open_artifact_store

PARAM_NAMES = ["batch_size", "dropout_high", "dropout_pattern", "lr"]


@pytest.fixture
def study_args(tmp_path: Path) -> list[str]:
    """The options that point `export` at fake_study's study, in a fresh SQLite file."""
    fake_study(sqlite_url(tmp_path))
    return ["--config", str(empty_config(tmp_path)), "--storage", sqlite_url(tmp_path)]


def export(*args: object) -> str:
    result = cli("export", *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_csv_loads_back_a_trial_per_row(study_args: list[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(export(*study_args))))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert list(rows[0]) == trial_columns(PARAM_NAMES)
    baseline, best, pruned, failed, retry, running = rows
    assert baseline["user_attrs_baseline"] == "True" and best["user_attrs_baseline"] == "False"
    assert float(best["value"]) == 0.4868 and best["state"] == "COMPLETE" and float(best["duration"]) == 120
    assert best["user_attrs_best_epoch"] == "7" and best["user_attrs_epochs_run"] == "8"
    assert {k: best[f"params_{k}"] for k in PARAM_NAMES} == {k: str(v or "") for k, v in BEST_PARAMS.items()}
    assert best["datetime_start"] == "2024-05-01T12:01:00" and best["datetime_complete"] == "2024-05-01T12:03:00"
    assert pruned["params_lr"] == "0.0003" and pruned["params_batch_size"] == "" and pruned["value"] == ""
    assert failed["user_attrs_fail_reason"] == "out of memory: CUDA, 2 GiB" and float(failed["duration"]) == 10.5
    assert retry["retried_from"] == "3" and retry["state"] == "WAITING" and retry["datetime_start"] == ""
    assert running["retried_from"] == "2" and running["datetime_complete"] == running["duration"] == ""


def test_json_holds_json_types_and_the_study_s_times(study_args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "made" / "trials.json"  # the format from the suffix, the folder made
    assert export(*study_args, "--out", out) == ""
    rows = json.loads(out.read_text())
    study = optuna.load_study(study_name="fer2013", storage=study_args[-1])
    assert len(rows) == len(study.trials) and all(list(r) == trial_columns(PARAM_NAMES) for r in rows)
    baseline, best, pruned, _, retry, running = rows
    assert baseline["user_attrs_baseline"] is True and baseline["value"] == 0.4510 and baseline["user_attrs_seed"] == 11
    assert {k: baseline[f"params_{k}"] for k in PARAM_NAMES} == BASELINE_PARAMS
    assert best["params_dropout_high"] is None and best["duration"] == 120.0 and best["retried_from"] is None
    assert pruned["value"] is None and pruned["user_attrs_epochs_run"] == 3
    assert retry["retried_from"] == 3 and running["retried_from"] == 2
    for row, trial in zip(rows, study.trials):
        start = None if row["datetime_start"] is None else datetime.fromisoformat(row["datetime_start"])
        assert start == trial.datetime_start and row["state"] == trial.state.name
    assert not [p for p in out.parent.iterdir() if p.name != "trials.json"]  # no temporary left


def test_format_flag_overrides_the_suffix(study_args: list[str], tmp_path: Path) -> None:
    export(*study_args, "--format", "JSON", "--out", tmp_path / "trials.txt")
    assert len(json.loads((tmp_path / "trials.txt").read_text())) == 6
    export(*study_args, "--out", tmp_path / "trials.CSV")
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "trials.CSV").read_text())))) == 6


@pytest.mark.parametrize(
    "args, named",
    [
        (["--out", "trials.txt"], "'.txt'"),
        (["--out", "trials"], "--out trials"),
        (["--format", "xml"], "'xml'"),
        (["--format", "xml", "--out", "trials.csv"], "'xml'"),
    ],
)
def test_an_unknown_format_is_one_line_naming_it(
    study_args: list[str], args: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", *study_args, *args])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and named in result.output, result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("trials*"))


def test_export_format_defaults_to_csv() -> None:
    assert export_format(None, None) == "csv" and export_format(None, Path("a.Json")) == "json"
    with pytest.raises(UserError, match="--format 'tsv'"):
        export_format("tsv", None)


def test_an_empty_study_exports_a_header_or_an_empty_list(tmp_path: Path) -> None:
    optuna.create_study(study_name="fer2013", storage=sqlite_url(tmp_path))
    args = ["--config", empty_config(tmp_path), "--storage", sqlite_url(tmp_path)]
    assert export(*args) == ",".join(trial_columns([])) + "\n"
    assert json.loads(export(*args, "--format", "json")) == []


def test_an_unknown_study_is_one_line_naming_it(study_args: list[str]) -> None:
    result = CliRunner().invoke(main, ["export", *study_args, "--study", "nope"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "'nope'" in result.output


def final_files(folder: Path, model: bytes = b"weights", report: bytes = b"<html>report</html>") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(model)
    (folder / "report.html").write_bytes(report)
    return folder


def stored(store: Path, study: optuna.Study) -> dict[str, bytes]:
    """The study's attachments read back from the store, by file name; fails on a name attached twice."""
    metas = get_all_artifact_meta(study)
    assert len({m.filename for m in metas}) == len(metas), metas
    return {m.filename: (store / m.artifact_id).read_bytes() for m in metas}


def test_attaching_again_replaces_the_files_in_place(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s", storage=sqlite_url(tmp_path))
    attach_final_files(study, tmp_path / "artifacts", final_files(tmp_path / "final"))
    assert stored(tmp_path / "artifacts", study) == {"model.pt": b"weights", "report.html": b"<html>report</html>"}
    assert {m.filename: m.mimetype for m in get_all_artifact_meta(study)} == {
        "model.pt": "application/octet-stream",
        "report.html": "text/html",
    }
    ids = attached_ids(study)
    attach_final_files(study, tmp_path / "artifacts", final_files(tmp_path / "final", b"v2", b"<p>2</p>"))
    assert stored(tmp_path / "artifacts", study) == {"model.pt": b"v2", "report.html": b"<p>2</p>"}
    assert attached_ids(study) == ids
    assert len(list((tmp_path / "artifacts").iterdir())) == 2


def test_attaching_after_the_dashboard_deleted_an_attachment(tmp_path: Path) -> None:
    """optuna-dashboard unlinks a deleted artifact by nulling its entry, which get_all_artifact_meta cannot read."""
    study = optuna.create_study(study_name="s", storage=sqlite_url(tmp_path))
    attach_final_files(study, tmp_path / "artifacts", final_files(tmp_path / "final"))
    [report] = attached_ids(study)["report.html"]
    open_artifact_store(tmp_path / "artifacts").remove(report)  # as the dashboard deletes it
    study._storage.set_study_system_attr(study._study_id, f"artifacts:{report}", json.dumps(None))
    attach_final_files(study, tmp_path / "artifacts", final_files(tmp_path / "final", report=b"again"))
    [new_report] = attached_ids(study)["report.html"]
    assert new_report != report and (tmp_path / "artifacts" / new_report).read_bytes() == b"again"
    assert len(attached_ids(study)["model.pt"]) == 1


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fer_search" and r.levelno == logging.WARNING]


def test_a_store_that_refuses_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    study = optuna.create_study(study_name="s", storage=sqlite_url(tmp_path))
    blocked = tmp_path / "artifacts"
    blocked.write_text("a file where the store's folder should be")
    attach_final_files(study, blocked, final_files(tmp_path / "final"))
    [warning] = warnings_logged(caplog)
    assert warning.startswith("model.pt and report.html not attached to study 's'") and "\n" not in warning
    assert str(blocked) in warning and str(tmp_path / "final") in warning
    assert attached_ids(study) == {}


def finalize(folder: Path) -> None:
    """finalize again in `folder` (its seeds reused: evaluation and reports only)."""
    result = CliRunner().invoke(main, ["finalize", "--config", str(folder / "search.toml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_finalize_attaches_model_and_report_once(
    finalized: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = shutil.copytree(finalized, tmp_path / "study")  # the fixture's study is shared: a copy to re-run
    study = optuna.load_study(study_name="fer2013", storage=f"sqlite:///{folder}/studies/fer2013.db")
    final, store = folder / "studies" / "fer2013" / "final", folder / "studies" / "artifacts"
    first = stored(store, study)
    assert first == {name: (final / name).read_bytes() for name in ("model.pt", "report.html")}
    ids = attached_ids(study)
    finalize(folder)
    assert warnings_logged(caplog) == []
    assert attached_ids(study) == ids  # replaced in place, not piled up
    assert stored(store, study) == {name: (final / name).read_bytes() for name in ("model.pt", "report.html")}


def test_finalize_with_a_store_that_refuses_still_writes_its_reports(
    finalized: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = shutil.copytree(finalized, tmp_path / "study")
    final = folder / "studies" / "fer2013" / "final"
    for name in ("model.pt", "report.html", "metrics.json"):
        (final / name).unlink()
    (folder / "blocked").write_text("a file where the artifact store's folder should be")
    with open(folder / "search.toml", "a") as toml:
        toml.write('[study]\nartifacts = "blocked"\n')
    finalize(folder)
    [warning] = warnings_logged(caplog)
    assert "not attached" in warning and str(folder / "blocked") in warning
    assert all((final / name).is_file() for name in ("model.pt", "report.html", "metrics.json"))
