"""The training loop on the tiny data set (CPU): history, reproducibility, learning, callbacks, resume, devices."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_processes import swallowed_interrupt
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fer_search.train as train_mod
from fer_search.augment import normalize
from fer_search.data import FerData, load_data
from fer_search.errors import UserError
from fer_search.model import BASELINE, TrialParams, build_model
from fer_search.predict import model_from_state
from fer_search.processes import signals_interrupt
from fer_search.train import (
    Checkpoint,
    DivergedError,
    EpochRecord,
    TrainResult,
    TrainSettings,
    evaluate,
    logits_for,
    resolve_device,
    train_model,
)

CPU = torch.device("cpu")
SMALL = dataclasses.replace(BASELINE, batch_size=32, width=0.5)  # the baseline's layout, with its dropouts
NO_DROPOUT = dataclasses.replace(SMALL, dropout_pattern="none", dropout_high=None, dropout_low=None, dropout_head=None)
CHECKPOINT_KEYS = {
    "trial_params",
    "epochs",
    "device_type",
    "model",
    "optimizer",
    "scheduler",
    "generator",
    "rng",
    "history",
    "best_epoch",
    "best_val_acc",
    "best_state",
}


def first_weight(doc: dict[str, Any]) -> str:
    return next(iter(doc["model"]))


def other_params_weights(doc: dict[str, Any]) -> None:
    """The weights of another width under the same trial_params, as a file of another trial's could hold."""
    params = TrialParams.from_dict(doc["trial_params"])
    weights = build_model(dataclasses.replace(params, width=params.width / 2)).state_dict()
    doc.update(model=weights, best_state=weights)


# Checkpoints that load but that train_model could not resume from: each crashed a resuming worker.
MISFITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "a weight of another shape": lambda doc: doc["model"].update({first_weight(doc): torch.zeros(3)}),
    "a weight missing": lambda doc: doc["model"].pop(first_weight(doc)),
    "another params' weights": other_params_weights,
    "optimizer state of another shape": lambda doc: doc["optimizer"]["state"][0].update(exp_avg=torch.zeros(5)),
    "scheduler state of another type": lambda doc: doc["scheduler"].update(last_epoch="1"),
    "generator state of another type": lambda doc: doc.update(generator=doc["generator"].tolist()),
    "torch's generator state cut short": lambda doc: doc.update(rng=doc["rng"][:10]),
    "best accuracy of another type": lambda doc: doc.update(best_val_acc="0.5"),
}
# ... and those that loaded, and that it resumed from with a wrong result or a crash at the end.
QUIET_MISFITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "best weights missing": lambda doc: doc["best_state"].pop(first_weight(doc)),
    "a history record of another type": lambda doc: doc["history"][0].update(val_acc="0.5"),
    "a history without its first epoch": lambda doc: doc["history"][0].update(epoch=2),
    "epochs of another type": lambda doc: doc.update(epochs=3.0),
}


def tampered(saved: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The checkpoint `saved`, changed by `change` and written again."""
    doc = torch.load(io.BytesIO(saved), map_location="cpu", weights_only=True)
    change(doc)
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    return buffer.getvalue()


class Stop(Exception):
    """Raised by a test's epoch callback."""


@dataclass
class Recorded:
    """A run with its callback's records and a checkpoint taken at one epoch (as the search stores it)."""

    params: TrialParams
    result: TrainResult
    records: list[EpochRecord]
    saved: bytes  # Checkpoint.to_bytes of the checkpoint at `save_at`, as the search stores it
    snapshot: Checkpoint  # a deep copy of the same checkpoint, taken in the callback


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a shared CPU two threads run ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tiny_fer: Path, tmp_path_factory: pytest.TempPathFactory) -> FerData:
    return load_data(tiny_fer, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def two_epochs(data: FerData) -> TrainResult:
    return train(data, SMALL, epochs=2)


def train(data: FerData, params: TrialParams, epochs: int, seed: int = 0, **kwargs: Any) -> TrainResult:
    return train_model(params, data, TrainSettings(epochs=epochs, seed=seed, device=CPU), **kwargs)


def subset(data: FerData, n: int) -> FerData:
    """The first n training images (a faster epoch), validation unchanged."""
    train_split = dataclasses.replace(data.train, x=data.train.x[:n], y=data.train.y[:n], names=data.train.names[:n])
    return dataclasses.replace(data, train=train_split)


def curve(history: list[EpochRecord]) -> list[tuple[float, ...]]:
    """What a run computed per epoch (not its wall-clock fields)."""
    return [(r.epoch, r.train_loss, r.train_acc, r.val_loss, r.val_acc, r.lr) for r in history]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def train_recording(data: FerData, params: TrialParams, epochs: int, save_at: int) -> Recorded:
    records: list[EpochRecord] = []
    saved: dict[str, Any] = {}

    def on_epoch(record: EpochRecord, checkpoint: Any) -> None:
        records.append(record)
        if record.epoch == save_at:
            ckpt = checkpoint()
            saved.update(saved=ckpt.to_bytes(), snapshot=copy.deepcopy(ckpt))

    result = train(data, params, epochs, on_epoch=on_epoch)
    return Recorded(params, result, records, saved["saved"], saved["snapshot"])


# --- one run: history, best epoch, best state ---------------------------------------------------


def test_history_has_one_finite_record_per_epoch(two_epochs: TrainResult) -> None:
    history = two_epochs.history
    assert [r.epoch for r in history] == [1, 2]
    for record in history:
        assert all(math.isfinite(v) for v in dataclasses.astuple(record))
        assert record.images_per_s > 0 and record.seconds > 0
        assert 0 <= record.train_acc <= 1 and 0 <= record.val_acc <= 1
        assert record.train_loss > 0 and record.val_loss > 0
        assert record.lr == SMALL.lr  # plateau: no reduction within its patience


def test_best_epoch_is_the_first_best_validation_accuracy(two_epochs: TrainResult) -> None:
    accs = [r.val_acc for r in two_epochs.history]
    assert two_epochs.best_epoch in (1, 2)
    assert two_epochs.best_val_acc == max(accs)
    assert two_epochs.best_epoch == accs.index(max(accs)) + 1


def test_best_state_holds_the_best_epochs_weights(data: FerData, two_epochs: TrainResult) -> None:
    state = two_epochs.best_state
    assert state.keys() == two_epochs.model.state_dict().keys()
    assert all(t.device == CPU for t in state.values())
    loss, acc = evaluate(model_from_state(SMALL, state, 7), data.val.x, data.val.y)
    best = two_epochs.history[two_epochs.best_epoch - 1]
    assert acc == pytest.approx(best.val_acc) and loss == pytest.approx(best.val_loss, rel=1e-5)


def test_training_leaves_the_data_unchanged(data: FerData) -> None:
    before = data.train.x.clone(), data.val.x.clone()
    train(subset(data, 32), NO_DROPOUT, epochs=1)
    assert torch.equal(before[0], data.train.x) and torch.equal(before[1], data.val.x)


def test_a_last_batch_of_one_image_is_skipped(data: FerData) -> None:
    # 33 images in batches of 32: BatchNorm cannot train on the single last image.
    result = train(subset(data, 33), NO_DROPOUT, epochs=1)
    assert math.isfinite(result.history[0].train_loss)


class CountKernels(TorchDispatchMode):
    """Counts the aten calls that are not views: each is about one kernel launch on the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.kernels += func.namespace == "aten" and not func.is_view
        return func(*args, **(kwargs or {}))


def kernels(run: Any) -> int:
    with CountKernels() as counter:
        run()
    return counter.kernels


def test_a_training_step_adds_few_kernels_to_the_models_own(data: FerData) -> None:
    # Counted, not timed. The trainer's own share of a step (the batch's augmentation, the loss and
    # accuracy totals) is the step less a bare forward, loss, backward and optimizer step of the same
    # model: 6 kernels; sampling crops and flips per batch, and gathering each batch, made it 82.
    torch.manual_seed(0)
    model = build_model(NO_DROPOUT).to(memory_format=torch.channels_last)
    optimizer = train_mod.make_optimizer(model, NO_DROPOUT, cuda=False)
    x, y = data.train.x[:96], data.train.y[:96]
    generator = torch.Generator().manual_seed(0)

    def epoch(batches: int) -> None:
        train_mod._train_one_epoch(model, optimizer, x[: 32 * batches], y[: 32 * batches], 32, generator, cuda=False)

    def bare_step() -> None:
        loss = F.cross_entropy(model(xb), y[:32])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    epoch(1)  # Adam's state exists from here on, so every step makes the same calls
    step = (kernels(lambda: epoch(3)) - kernels(lambda: epoch(1))) // 2  # the per-epoch work cancels
    xb = normalize(x[:32]).contiguous(memory_format=torch.channels_last)
    assert step - kernels(bare_step) <= 8


# --- reproducibility and learning ----------------------------------------------------------------


def test_same_seed_gives_the_same_history_and_weights(data: FerData, two_epochs: TrainResult) -> None:
    again = train(data, SMALL, epochs=2)
    assert curve(again.history) == curve(two_epochs.history)
    assert same_tensors(again.model.state_dict(), two_epochs.model.state_dict())
    assert same_tensors(again.best_state, two_epochs.best_state)


def test_another_seed_gives_other_weights(data: FerData, two_epochs: TrainResult) -> None:
    other = train(data, SMALL, epochs=2, seed=1)
    assert [r.train_loss for r in other.history] != [r.train_loss for r in two_epochs.history]
    assert not same_tensors(other.model.state_dict(), two_epochs.model.state_dict())


def test_learns_the_tiny_data_set(data: FerData) -> None:
    # Without dropout this reaches 0.86-1.0 in 6 epochs for seeds 0-7; chance is 1/7.
    result = train(data, dataclasses.replace(NO_DROPOUT, lr=3e-3), epochs=6)
    assert result.best_val_acc >= 0.5
    assert result.history[-1].train_loss < result.history[0].train_loss


# --- the epoch callback, checkpoints and resumption ---------------------------------------------


@pytest.fixture(scope="module", params=["none", "interlaced"])
def recorded(request: pytest.FixtureRequest, data: FerData) -> Recorded:
    params = NO_DROPOUT if request.param == "none" else SMALL
    return train_recording(data, params, epochs=3, save_at=1)


def test_callback_gets_each_epochs_record_once(recorded: Recorded) -> None:
    assert recorded.records == recorded.result.history
    assert [r.epoch for r in recorded.records] == [1, 2, 3]


def test_checkpoint_survives_weights_only_round_trip(recorded: Recorded) -> None:
    doc = torch.load(io.BytesIO(recorded.saved), map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(doc) and "cuda_rng" not in doc  # the keys checkpoints have always had
    ckpt = Checkpoint.from_bytes(recorded.saved)
    assert ckpt.params == recorded.params and ckpt.epochs == 3
    assert ckpt.device_type == "cpu"  # so that a resume on another device type can refuse it
    rng = torch.get_rng_state()
    assert ckpt.resumes(recorded.params, 3, CPU) and not ckpt.resumes(recorded.params, 4, CPU)
    assert torch.equal(torch.get_rng_state(), rng)  # checking it left torch's generator where training left it
    assert not ckpt.resumes(recorded.params, 3, torch.device("cuda"))
    assert ckpt.cuda_rng is None
    assert ckpt.history == (recorded.records[0],)
    assert ckpt.best_epoch == 1 and ckpt.best_val_acc == recorded.records[0].val_acc
    assert same_tensors(ckpt.model, recorded.snapshot.model)
    assert same_tensors(ckpt.best_state, recorded.snapshot.model)
    assert torch.equal(ckpt.generator, recorded.snapshot.generator)
    assert ckpt.scheduler == recorded.snapshot.scheduler


def test_a_damaged_checkpoint_raises(recorded: Recorded) -> None:
    with pytest.raises(RuntimeError):  # torch.load's error on a truncated file
        Checkpoint.from_bytes(recorded.saved[: len(recorded.saved) // 2])


@pytest.fixture(scope="module")
def saved(data: FerData) -> bytes:
    """A checkpoint after the first of two epochs (no dropout, 64 images)."""
    return train_recording(subset(data, 64), NO_DROPOUT, epochs=2, save_at=1).saved


@pytest.mark.parametrize("change", [*MISFITS.values(), *QUIET_MISFITS.values()], ids=[*MISFITS, *QUIET_MISFITS])
def test_a_checkpoint_that_does_not_fit_its_training_raises(saved: bytes, change: Any) -> None:
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        Checkpoint.from_bytes(tampered(saved, change)).resumes(NO_DROPOUT, 2, CPU)


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda doc: doc.pop("rng"), "checkpoint has no 'rng'"),
        (lambda doc: doc.update(epochs="2"), "checkpoint's 'epochs': int expected, not str"),
        (lambda doc: doc.update(best_epoch=True), "checkpoint's 'best_epoch': int expected, not bool"),
        (lambda doc: doc.update(model=[1, 2]), "checkpoint's 'model': dict expected, not list"),
        (lambda doc: doc["best_state"].update(extra=[1.0]), "checkpoint's 'best_state' holds other than named tensors"),
        (lambda doc: doc["history"][0].pop("lr"), "checkpoint's history record has no 'lr'"),
        (lambda doc: doc.update(history=[[1]]), "checkpoint's history record: dict expected, not list"),
    ],
)
def test_a_checkpoint_of_another_layout_names_its_key(saved: bytes, change: Any, says: str) -> None:
    with pytest.raises(ValueError) as info:
        Checkpoint.from_bytes(tampered(saved, change))
    assert str(info.value) == says


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(data: FerData, recorded: Recorded) -> None:
    records: list[EpochRecord] = []
    checkpoint = Checkpoint.from_bytes(recorded.saved)
    assert checkpoint.resumes(recorded.params, 3, CPU)  # the search's check first: it must leave the state as it is
    resumed = train(
        data,
        recorded.params,
        epochs=3,
        resume=checkpoint,
        on_epoch=lambda record, _checkpoint: records.append(record),
    )
    assert [r.epoch for r in records] == [2, 3]
    assert curve(resumed.history) == curve(recorded.result.history)
    assert (resumed.best_epoch, resumed.best_val_acc) == (recorded.result.best_epoch, recorded.result.best_val_acc)
    assert same_tensors(resumed.model.state_dict(), recorded.result.model.state_dict())
    assert same_tensors(resumed.best_state, recorded.result.best_state)


def test_raising_from_the_callback_stops_training(data: FerData) -> None:
    calls: list[int] = []

    def stop(record: EpochRecord, _checkpoint: Any) -> None:
        calls.append(record.epoch)
        raise Stop

    with pytest.raises(Stop):
        train(subset(data, 32), NO_DROPOUT, epochs=3, on_epoch=stop)
    assert calls == [1]


def test_an_interrupt_python_lost_stops_training_at_the_next_step(data: FerData) -> None:
    calls: list[int] = []

    def lose_an_interrupt(record: EpochRecord, _checkpoint: Any) -> None:
        calls.append(record.epoch)
        assert swallowed_interrupt(signal.SIGINT)

    with signals_interrupt(), pytest.raises(KeyboardInterrupt):
        train(subset(data, 32), NO_DROPOUT, epochs=3, on_epoch=lose_an_interrupt)
    assert calls == [1]


def test_huge_learning_rate_diverges(data: FerData) -> None:
    calls: list[int] = []
    with pytest.raises(DivergedError, match="epoch 1"):
        train(
            data,
            dataclasses.replace(NO_DROPOUT, lr=1e12),
            epochs=2,
            on_epoch=lambda record, _checkpoint: calls.append(record.epoch),
        )
    assert calls == []  # the diverged epoch is never reported


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_non_finite_loss_raises_diverged(data: FerData, monkeypatch: pytest.MonkeyPatch, loss: float) -> None:
    monkeypatch.setattr(train_mod, "_train_one_epoch", lambda *args, **kwargs: (loss, 0.0))
    with pytest.raises(DivergedError, match=f"{loss} at epoch 1"):
        train(data, NO_DROPOUT, epochs=2)


# --- optimisers and schedulers -------------------------------------------------------------------


def test_cosine_anneals_the_learning_rate(data: FerData) -> None:
    params = dataclasses.replace(NO_DROPOUT, scheduler="cosine")
    lrs = [r.lr for r in train(subset(data, 32), params, epochs=3).history]
    expected = [params.lr * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]  # lr, 0.75 lr, 0.25 lr
    assert lrs == pytest.approx(expected)


def test_plateau_halves_the_learning_rate_after_its_patience(data: FerData, monkeypatch: pytest.MonkeyPatch) -> None:
    # A validation loss that never improves: epoch 1 sets the best, epochs 2-5 are 4 > patience 3 bad ones.
    monkeypatch.setattr(train_mod, "evaluate", lambda *args, **kwargs: (1.0, 0.5))
    lrs = [r.lr for r in train(subset(data, 16), NO_DROPOUT, epochs=6).history]
    assert lrs == pytest.approx([NO_DROPOUT.lr] * 5 + [NO_DROPOUT.lr / 2])


def test_adamw_runs_and_differs_from_adam(data: FerData) -> None:
    # A large weight decay: Adam's L2 and AdamW's decoupled decay then give clearly different weights.
    runs = {
        name: train(subset(data, 32), dataclasses.replace(NO_DROPOUT, optimizer=name, weight_decay=0.5), epochs=1)
        for name in ("adam", "adamw")
    }
    assert all(math.isfinite(r.history[0].train_loss) for r in runs.values())
    assert not same_tensors(runs["adam"].model.state_dict(), runs["adamw"].model.state_dict())


# --- devices and evaluation ----------------------------------------------------------------------


def test_resolve_device_cpu_and_auto_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == CPU


def test_resolve_device_auto_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_resolve_device_cuda_without_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=f"--device {name}") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "gpus"), [("cuda:0", 1), ("cuda:1", 2), ("cuda", 1)])
def test_resolve_device_accepts_a_gpu_this_machine_has(monkeypatch: pytest.MonkeyPatch, name: str, gpus: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device(name) == torch.device(name)


@pytest.mark.parametrize(
    ("name", "gpus", "says"),
    [
        ("cuda:1", 1, "this machine has 1 CUDA GPU (cuda:0 to cuda:0)"),
        ("cuda:4", 2, "this machine has 2 CUDA GPUs (cuda:0 to cuda:1)"),
    ],
)
def test_resolve_device_index_beyond_the_gpus_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, name: str, gpus: int, says: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UserError) as info:
        resolve_device(name)
    assert str(info.value) == f"--device {name}: {says}"


@pytest.mark.parametrize(("processes", "threads"), [(1, 6), (2, 3), (4, 1), (6, 1), (12, 1)])
def test_cpu_threads_share_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, processes: int, threads: int
) -> None:
    # Six cores in the affinity mask of a 64-core machine: the mask is what the process gets.
    set_to: list[int] = []
    monkeypatch.setattr(train_mod.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setattr(train_mod.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    train_mod.configure_cpu_threads(processes)
    assert set_to == [threads]


def test_cpu_threads_fall_back_to_the_cpu_count_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[int] = []
    monkeypatch.delattr(train_mod.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(train_mod.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    train_mod.configure_cpu_threads(3)
    assert set_to == [2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_is_cpu_on_this_machine() -> None:
    assert resolve_device("auto") == CPU


def test_logits_for_shape_dtype_and_batching(data: FerData, two_epochs: TrainResult) -> None:
    x = data.val.x
    logits = logits_for(two_epochs.model, x)
    assert logits.shape == (len(x), 7) and logits.dtype == torch.float32 and logits.device == x.device
    assert torch.allclose(logits_for(two_epochs.model, x, batch=5), logits, atol=1e-5)
    assert logits_for(two_epochs.model, x[:0]).shape == (0, 7)
    assert not two_epochs.model.training  # evaluated in eval mode


def test_evaluate_matches_the_logits(data: FerData, two_epochs: TrainResult) -> None:
    logits = logits_for(two_epochs.model, data.val.x)
    loss, acc = evaluate(two_epochs.model, data.val.x, data.val.y)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, data.val.y).item())
    assert acc == pytest.approx((logits.argmax(1) == data.val.y).float().mean().item())
    assert acc == pytest.approx(two_epochs.history[-1].val_acc)


def test_a_cpu_model_from_the_best_state_gives_the_models_logits(data: FerData, two_epochs: TrainResult) -> None:
    model = two_epochs.model
    before = copy.deepcopy(model.state_dict())
    cpu = model_from_state(SMALL, model.state_dict(), 7)  # how finalize and predict rebuild it
    assert cpu is not model and not cpu.training
    # The copy is in the standard layout, the trained model in channels_last: same maths, other
    # summation order.
    assert torch.allclose(logits_for(cpu, data.val.x), logits_for(model, data.val.x), atol=1e-5)
    model_from_state(SMALL, {k: torch.zeros_like(v) for k, v in before.items()}, 7)
    assert same_tensors(model.state_dict(), before)  # the trained model keeps its weights
