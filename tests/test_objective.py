"""objective: pruning, out-of-memory, divergence and bugs inside one trial."""

from __future__ import annotations

import io
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from searching import FAST_RUN, checkpoint_files, cli, finished, load, write_config
from test_train import MISFITS, tampered, train_recording

from fer_search import objective, storage
from fer_search.data import load_data
from fer_search.model import TrialParams
from fer_search.status import retried_from
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


@pytest.mark.parametrize("fuse", [1, 2], ids=["alone", "fused"])
def test_a_trial_failed_by_a_bug_says_so_and_the_next_run_does_not_retry_it(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch, fuse: int
) -> None:
    """A failed trial that gives no reason is taken for one whose worker died with its retry unqueued
    (search.queue_lost_retries): without its reason, the bug's trial was trained again by the next run."""

    def broken(self: objective.TrialRun) -> None:
        raise ValueError("a bug\nits second line")

    monkeypatch.setattr(objective.TrialRun, "drop_checkpoint", broken)  # as the trial ends, alone or fused
    config = write_config(tmp_path, tiny_fer, FAST_RUN)
    run = ("run", "--config", config, "--epochs", 1, "--device", "cpu", "--fuse", fuse)
    with pytest.raises(ValueError, match="a bug"):
        cli(*run, "--trials", 2)
    [failed] = load(tmp_path).get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["fail_reason"] == "error: ValueError: a bug"
    monkeypatch.undo()
    assert cli(*run, "--trials", 2, "--timeout", 120).exit_code == 0
    study = load(tmp_path)
    assert len(finished(study)) == 2 and failed.number not in {retried_from(t) for t in study.trials}


@pytest.fixture(scope="module")
def searched_with_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_fer: Path) -> tuple[Path, bytes]:
    """A study of one finished trial of 2 epochs (the baseline), and a checkpoint of its training after epoch 1."""
    folder = tmp_path_factory.mktemp("searched")
    config = write_config(folder, tiny_fer)
    assert cli("run", "--config", config, "--trials", 1, "--epochs", 2, "--device", "cpu").exit_code == 0
    params = TrialParams.from_dict(load(folder).trials[0].user_attrs["trial_params"])
    data = load_data(tiny_fer, folder / "cache")
    return folder, train_recording(data, params, epochs=2, save_at=1).saved


@pytest.mark.parametrize("change", MISFITS.values(), ids=MISFITS)
def test_a_trial_whose_checkpoint_does_not_fit_starts_again_from_epoch_1(
    searched_with_checkpoint: tuple[Path, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture, change: Any
) -> None:
    """A retry inherits a checkpoint of its own params that loads but that training could not go on from."""
    folder = Path(shutil.copytree(searched_with_checkpoint[0], tmp_path / "study"))
    artifact_id = str(uuid.uuid4())
    store = storage.open_artifact_store(folder / "studies" / "artifacts")
    store.write(artifact_id, io.BytesIO(tampered(searched_with_checkpoint[1], change)))
    study = load(folder)
    study.enqueue_trial(study.trials[0].params, user_attrs={"checkpoint": artifact_id})
    caplog.set_level(logging.INFO, "fer_search")
    result = cli("run", "--config", folder / "search.toml", "--trials", 2, "--epochs", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    retry = load(folder).trials[1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_at_epoch"] == 1
    assert sorted(retry.intermediate_values) == [1, 2]
    assert f"trial 1: checkpoint {artifact_id} unusable" in caplog.text
    assert "trial 1: no usable checkpoint, starting from epoch 1" in caplog.text
    assert checkpoint_files(folder) == []  # the misfit was removed with the trial's own once it finished


@pytest.mark.parametrize("moment", ["between epochs", "while it writes its checkpoint"])
def test_a_trial_failed_elsewhere_leaves_no_checkpoint_behind(
    tmp_path: Path, tiny_fer: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, moment: str
) -> None:
    """Another worker fails trial 0 as stale (its heartbeats were late) while it trains; its retry resumes from
    the trial's checkpoint, then removes it. The slow worker must not write a checkpoint that nothing removes."""
    config = write_config(tmp_path, tiny_fer, FAST_RUN)  # a checkpoint every epoch
    left: dict[str, list[Path]] = {}
    failed: list[int] = []

    def fail_trial_0() -> None:
        load(tmp_path).tell(0, state=TrialState.FAIL)  # what fail_stale_trials does in another worker
        failed.append(0)

    on_epoch = objective.TrialRun.on_epoch

    def on_epoch_failing_trial_0(state: Any, record: Any, checkpoint: Any) -> None:
        if moment == "between epochs" and (state.trial.number, record.epoch) == (0, 2):
            fail_trial_0()
            for path in checkpoint_files(tmp_path):  # epoch 1's: its retry resumed from it, then removed it
                path.unlink()
        if state.trial.number == 1:
            left.setdefault("trial 0", checkpoint_files(tmp_path))  # before trial 1 writes its own
        on_epoch(state, record, checkpoint)

    write = storage.AtomicFileSystemArtifactStore.write

    def write_then_fail_trial_0(store: Any, artifact_id: str, body: Any) -> None:
        write(store, artifact_id, body)
        if moment != "between epochs" and not failed:
            fail_trial_0()  # after the worker's check that its trial still runs, before it names the file

    monkeypatch.setattr(objective.TrialRun, "on_epoch", on_epoch_failing_trial_0)
    monkeypatch.setattr(storage.AtomicFileSystemArtifactStore, "write", write_then_fail_trial_0)
    result = cli("run", "--config", config, "--trials", 1, "--epochs", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "trial 0 was failed as stale by another worker" in caplog.text
    assert failed and left["trial 0"] == []
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]  # the worker went on
    assert checkpoint_files(tmp_path) == []
