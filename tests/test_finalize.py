"""finalize: retrain best + baseline over seeds, evaluate on the test set, write every report file."""

from __future__ import annotations

import html
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner, Result

from fer_search.cli import main
from fer_search.data import CLASSES

FILES = ("model.pt", "metrics.json", "epoch_accs.json", "recalls_precisions.txt", "confusion.png",
         "performance.png", "misclassified.png", "search_history.png", "param_importances.png", "report.html")


def final_dir(folder: Path) -> Path:
    return folder / "studies" / "fer2013" / "final"


def resume_dir(folder: Path) -> Path:
    return folder / "studies" / "fer2013" / "finalize-runs"


def finalize(folder: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["finalize", "--config", str(folder / "search.toml"), *args])


def one_line_error(result: Result) -> str:
    """The error of a run that must end with exit 2 and a single line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == "", result.output
    return result.stderr


def test_writes_every_file_and_nothing_else(finalized: Path) -> None:
    out = final_dir(finalized)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # the resume files live with the study
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_hold_best_and_baseline_per_seed_and_aggregated(finalized: Path) -> None:
    m = json.loads((final_dir(finalized) / "metrics.json").read_text())
    study = optuna.load_study(study_name="fer2013", storage=f"sqlite:///{finalized}/studies/fer2013.db")
    assert m["best_trial"]["number"] == study.best_trial.number and m["best_trial"]["value"] == study.best_value
    assert m["seeds"] == [0, 1] and m["shipped_seed"] in (0, 1) and m["epochs"] == 2
    for kind in ("best", "baseline"):
        agg = m[kind]
        assert set(agg["per_seed"]) == {"0", "1"}
        for run in agg["per_seed"].values():
            assert run["private_test"]["n"] == 28 and run["test_all"]["n"] == 56  # 4 + 4 per class, 7 classes
            assert set(run["private_test"]["per_class"]) == set(CLASSES)
            assert len(run["private_test"]["confusion"]) == 7
        accs = [r["private_test"]["accuracy"] for r in agg["per_seed"].values()]
        assert agg["mean"]["private_test"]["accuracy"] == pytest.approx(sum(accs) / 2)
        assert agg["std"]["private_test"]["accuracy"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        confusions = np.array([r["private_test"]["confusion"] for r in agg["per_seed"].values()])
        assert np.allclose(agg["mean"]["private_test"]["confusion"], confusions.mean(axis=0))
        assert np.allclose(agg["std"]["test_all"]["confusion"],
                           np.array([r["test_all"]["confusion"] for r in agg["per_seed"].values()]).std(axis=0, ddof=1))
    shipped = m["best"]["per_seed"][str(m["shipped_seed"])]
    assert shipped["val_acc"] == max(r["val_acc"] for r in m["best"]["per_seed"].values())


def test_predict_reproduces_the_shipped_private_test_accuracy(finalized: Path, tiny_fer: Path) -> None:
    """An honest cross-check: predict, run as a user would, scores exactly what metrics.json says."""
    m = json.loads((final_dir(finalized) / "metrics.json").read_text())
    images = sorted(tiny_fer.glob("test/*/PrivateTest_*.jpg"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "fer_search", "predict", "--config", str(finalized / "search.toml"),
                          "--json", *map(str, images)], capture_output=True, text=True, env=env, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(images)
    correct = sum(line["label"] == Path(line["path"]).parent.name for line in lines)
    assert correct / len(images) == m["best"]["per_seed"][str(m["shipped_seed"])]["private_test"]["accuracy"]


def test_metrics_and_page_give_the_commands(finalized: Path) -> None:
    m = json.loads((final_dir(finalized) / "metrics.json").read_text())
    assert m["commands"]["finalize"].startswith(
        shlex.join(["fer-search", "finalize", "--config", str(finalized / "search.toml"), "--seeds", "2"]))
    page = (final_dir(finalized) / "report.html").read_text()
    assert html.escape(m["commands"]["finalize"], quote=True) in page
    assert m["commands"]["run"].startswith("fer-search run --trials 3 ")  # recorded by the `run` that created the study
    assert html.escape(m["commands"]["run"], quote=True) in page


def test_the_finalize_command_hides_a_storage_password(finalized: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fer_search.finalize

    seen = []
    monkeypatch.setattr(fer_search.finalize, "finalize_study", lambda _config, command, _say: seen.append(command) or "")
    result = finalize(finalized, "--storage", "postgresql://me:secret@db.example/fer", "--no-baseline")
    assert result.exit_code == 0, result.output
    assert seen == [shlex.join([
        "fer-search", "finalize", "--storage", "postgresql://me:***@db.example/fer", "--config", str(finalized / "search.toml"),
        "--no-baseline"])]


def test_rerun_reuses_finished_seeds(finalized: Path) -> None:
    kinds_and_seeds = {r.name.rsplit("-", 1)[0] for r in resume_dir(finalized).glob("*.pt")}
    assert {"baseline-seed0", "baseline-seed1", "best-seed0", "best-seed1"} <= kinds_and_seeds
    before = (final_dir(finalized) / "metrics.json").read_text()
    result = finalize(finalized, "--seeds", "2")
    assert result.exit_code == 0
    assert result.stderr.count("reusing the finished run") == 4
    after = json.loads((final_dir(finalized) / "metrics.json").read_text())
    assert after["best"] == json.loads(before)["best"]


def test_interrupted_finalize_retrains_only_the_unfinished_seed(finalized: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(finalized, tmp_path / "study"))  # the session's study stays as it is
    next(resume_dir(folder).glob("best-seed1-*.pt")).unlink()  # interrupted while training the best trial's seed 1
    (final_dir(folder) / "metrics.json").unlink()
    result = finalize(folder, "--seeds", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("reusing the finished run") == 3
    trained = {line.split(": epoch")[0] for line in result.stderr.splitlines() if ": epoch " in line}
    assert trained == {"best seed 1"}
    m = json.loads((final_dir(folder) / "metrics.json").read_text())
    assert set(m["best"]["per_seed"]) == set(m["baseline"]["per_seed"]) == {"0", "1"} and m["best"]["std"] is not None
    assert len(list(resume_dir(folder).glob("best-seed1-*.pt"))) == 1


def test_no_baseline_and_out(finalized: Path, tmp_path: Path) -> None:
    before = set(resume_dir(finalized).iterdir())
    result = finalize(finalized, "--seeds", "1", "--no-baseline", "--out", str(tmp_path / "out"), "--epochs", "1")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["baseline"] is None and m["best"]["std"] is None and m["epochs"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    new = set(resume_dir(finalized).iterdir()) - before  # --out moves the outputs, not the resume files
    assert [p.name.rsplit("-", 1)[0] for p in new] == ["best-seed0"]


def test_unusable_out_exits_2_before_any_training(finalized: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    error = one_line_error(finalize(finalized, "--out", str(blocker / "final")))
    assert str(blocker / "final") in error


def test_no_complete_trial_exits_2(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "search.toml").write_text(f'[data]\npath = "{tiny_fer}"\n')
    storage = f"sqlite:///{tmp_path}/studies/fer2013.db"
    (tmp_path / "studies").mkdir()
    optuna.create_study(study_name="fer2013", storage=storage)
    assert "no complete trial" in one_line_error(finalize(tmp_path))


def test_changed_data_exits_2(finalized: Path, tmp_path: Path) -> None:
    from conftest import write_tiny_fer

    other = write_tiny_fer(tmp_path / "other", seed=1)
    error = one_line_error(finalize(finalized, "--data", str(other)))
    assert "differs from the data" in error and "train" in error


def test_a_missing_data_path_names_the_one_the_study_was_searched_on(finalized: Path, tiny_fer: Path,
                                                                       tmp_path: Path) -> None:
    """`run --data X` then a bare `finalize`: the study remembers X, and the error says to pass it."""
    error = one_line_error(finalize(finalized, "--data", str(tmp_path / "moved")))
    assert str(tmp_path / "moved") in error and f"--data {tiny_fer}" in error
