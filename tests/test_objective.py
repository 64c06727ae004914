"""objective: pruning, out-of-memory, divergence and bugs inside one trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from searching import cli, finished, load, write_config

from fer_search import objective
from fer_search.train import DivergedError


def test_pruning_prunes(tmp_path: Path, tiny_fer: Path) -> None:
    """Three finished trials that report 2.0 at every epoch put every percentile at 2.0: any real accuracy is below."""
    config = write_config(tmp_path, tiny_fer, "[pruner]\nstartup_trials = 1\nwarmup_epochs = 0\n")
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 4, "--device", "cpu").exit_code == 0
    study = load(tmp_path)
    for _ in range(3):
        study.add_trial(
            optuna.create_trial(
                value=2.0, params={}, distributions={}, intermediate_values={e: 2.0 for e in range(1, 5)}
            )
        )
    assert cli("run", "--config", config, "--trials", 6, "--epochs", 4, "--device", "cpu").exit_code == 0
    new = [t for t in load(tmp_path).trials[4:]]
    assert len(new) == 2 and all(t.state == TrialState.PRUNED for t in new)
    assert all(t.user_attrs["epochs_run"] == 1 for t in new)  # pruned after its first epoch, not 4


@pytest.mark.parametrize(
    "error, state, reason",
    [
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
            TrialState.FAIL,
            "out of memory",
        ),
        (DivergedError("training loss is nan at epoch 1"), TrialState.PRUNED, "diverged"),
    ],
)
def test_out_of_memory_or_nan_ends_the_trial_not_the_worker(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, state: TrialState, reason: str
) -> None:
    real_train = objective.train_model
    calls = []

    def first_call_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real_train(*args, **kwargs)

    monkeypatch.setattr(objective, "train_model", first_call_fails)
    config = write_config(tmp_path, tiny_fer)
    result = cli("run", "--config", config, "--trials", 2, "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    study = load(tmp_path)
    assert study.trials[0].state == state and reason in study.trials[0].user_attrs["fail_reason"]
    assert len(finished(study)) == 2


def test_a_bug_in_a_trial_is_not_taken_for_a_trial_failed_elsewhere(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna fails a trial whose objective raised before re-raising, so the trial's state alone
    cannot tell a bug from a trial another worker failed: a bug must still stop the worker."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug")

    monkeypatch.setattr(objective, "train_model", broken)
    config = write_config(tmp_path, tiny_fer)
    with pytest.raises(ValueError, match="a bug"):
        cli("run", "--config", config, "--trials", 3, "--epochs", 1, "--device", "cpu", "--timeout", 60)
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL]
