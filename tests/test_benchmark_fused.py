"""benchmarks/fused.py on a tiny data set: every mode runs and the JSON holds what the table prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fused.py"
MODES = {"sequential", "processes", "fused"}


def test_fused_benchmark_measures_the_three_modes(tiny_fer: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "--data", str(tiny_fer), "--cache", str(tmp_path / "cache")]
    command += ["--k", "2", "--epochs", "1", "--images", "64", "--val-images", "16", "--device", "cpu"]
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    rows = {row["mode"]: row for row in doc["results"]}
    assert set(rows) == MODES and {row["k"] for row in doc["results"]} == {2}
    assert all(row["images_per_s"] > 0 and row["seconds"] > 0 for row in rows.values())
    assert rows["fused"]["ratio_vs_sequential"] == pytest.approx(
        rows["fused"]["images_per_s"] / rows["sequential"]["images_per_s"]
    )
    assert rows["sequential"]["ratio_vs_sequential"] == 1.0
    # The same trainings in every mode (on the CPU in float32).
    assert all(row["max_loss_diff_vs_sequential"] < 1e-3 for row in rows.values())
    assert doc["header"]["images"] == 64 and doc["header"]["command"].endswith(f"--json {out}")
    assert "| 2 | fused |" in result.stdout
