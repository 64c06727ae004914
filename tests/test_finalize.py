"""finalize: retrain best + baseline over seeds, evaluate on the test set, write every report file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from fer_search.cli import main
from fer_search.data import CLASSES

FILES = ("model.pt", "metrics.json", "epoch_accs.json", "recalls_precisions.txt", "confusion.png",
         "performance.png", "misclassified.png", "search_history.png", "param_importances.png", "report.html")


def final_dir(folder: Path) -> Path:
    return folder / "studies" / "fer2013" / "final"


def test_writes_every_file(finalized: Path) -> None:
    out = final_dir(finalized)
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


def test_rerun_reuses_finished_seeds(finalized: Path) -> None:
    runs = sorted((final_dir(finalized) / "runs").glob("*.pt"))
    assert [r.name for r in runs] == ["baseline-seed0.pt", "baseline-seed1.pt", "best-seed0.pt", "best-seed1.pt"]
    before = (final_dir(finalized) / "metrics.json").read_text()
    result = CliRunner().invoke(main, ["finalize", "--config", str(finalized / "search.toml"), "--seeds", "2"])
    assert result.exit_code == 0
    assert result.output.count("reusing the finished run") == 4
    after = json.loads((final_dir(finalized) / "metrics.json").read_text())
    assert after["best"] == json.loads(before)["best"]


def test_no_baseline_and_out(finalized: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["finalize", "--config", str(finalized / "search.toml"), "--seeds", "1",
                                       "--no-baseline", "--out", str(tmp_path / "out"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["baseline"] is None and m["best"]["std"] is None and m["epochs"] == 1


def test_no_complete_trial_exits_2(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "search.toml").write_text(f'[data]\npath = "{tiny_fer}"\n')
    storage = f"sqlite:///{tmp_path}/studies/fer2013.db"
    (tmp_path / "studies").mkdir()
    optuna.create_study(study_name="fer2013", storage=storage)
    result = CliRunner().invoke(main, ["finalize", "--config", str(tmp_path / "search.toml")])
    assert result.exit_code == 2 and "no complete trial" in result.output


def test_changed_data_exits_2(finalized: Path, tmp_path: Path) -> None:
    from conftest import write_tiny_fer

    other = write_tiny_fer(tmp_path / "other", seed=1)
    result = CliRunner().invoke(main, ["finalize", "--config", str(finalized / "search.toml"), "--data", str(other)])
    assert result.exit_code == 2 and "differs from the data" in result.output and "train" in result.output
