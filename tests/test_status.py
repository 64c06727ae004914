"""status: the `status --json` document, and a `status` that starts without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from optuna.trial import TrialState
from searching import cli, load, write_config


def test_status_json_contract(tmp_path: Path, tiny_fer: Path) -> None:
    config = write_config(tmp_path, tiny_fer)
    assert cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu").exit_code == 0
    result = cli("status", "--config", config, "--json")
    doc = json.loads(result.output)
    assert set(doc) == {"study", "trials", "best", "baseline", "seconds"}
    assert set(doc["trials"]) == {s.name for s in TrialState}
    assert doc["trials"]["COMPLETE"] == 2 and doc["seconds"] > 0
    study = load(tmp_path)
    assert doc["best"]["number"] == study.best_trial.number and doc["best"]["value"] == study.best_value
    assert doc["baseline"] == {"number": 0, "value": study.trials[0].value, "state": "COMPLETE"}


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
