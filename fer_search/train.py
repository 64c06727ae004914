"""The training loop: data resident on the device, batched augmentation, per-epoch callback."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fer_search.augment import apply_plan, normalize, plan_augmentation
from fer_search.data import FerData
from fer_search.errors import UserError
from fer_search.model import TrialParams, build_model, set_dropout_generator
from fer_search.processes import raise_if_interrupted

EVAL_BATCH = 2048  # validation in a few large batches: one launch sequence, few syncs


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainSettings:
    """What the loop needs beyond the architecture."""

    epochs: int
    seed: int
    device: torch.device


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    images_per_s: float


_RECORD_TYPES: dict[str, type] = typing.get_type_hints(EpochRecord)


@dataclass
class TrainResult:
    history: list[EpochRecord]
    best_epoch: int
    best_val_acc: float
    best_state: dict[str, torch.Tensor]  # CPU copy of the weights at best_epoch
    model: nn.Module  # the model at its last epoch


@dataclass(frozen=True)
class Checkpoint:
    """The whole training state after an epoch: enough to go on exactly as if never stopped.

    Saved and loaded only here, as a dict of tensors and plain values (weights_only loading works);
    the keys are those checkpoints have always had, so that a trial resumes across an upgrade.
    """

    params: TrialParams
    epochs: int
    # Generator states differ between CPU and CUDA, so a checkpoint resumes only on the device type that wrote it.
    device_type: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor
    rng: torch.Tensor  # torch's global generator: unfused dropout on CUDA draws from it
    cuda_rng: torch.Tensor | None
    history: tuple[EpochRecord, ...]
    best_epoch: int
    best_val_acc: float
    best_state: dict[str, torch.Tensor]

    def resumes(self, params: TrialParams, epochs: int, device: torch.device) -> bool:
        """Whether this checkpoint continues a training of `params` for `epochs` on `device`; raises on a misfit."""
        if (self.params, self.epochs, self.device_type) != (params, epochs, device.type):
            return False
        _rehearse_resume(self, device)
        return True

    def to_bytes(self) -> bytes:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("params", "history")}
        doc.update(trial_params=self.params.to_dict(), history=[dataclasses.asdict(r) for r in self.history])
        if self.cuda_rng is None:
            del doc["cuda_rng"]
        buffer = io.BytesIO()
        torch.save(doc, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Checkpoint:
        """Raises torch's errors on a damaged file, ValueError naming the key on a foreign one (missing or mistyped)."""
        doc = of_type(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True), dict, "checkpoint")
        return cls(
            params=TrialParams.from_dict(field_of(doc, "trial_params", dict)),
            epochs=field_of(doc, "epochs", int),
            device_type=field_of(doc, "device_type", str),
            model=_state_dict_of(doc, "model"),
            optimizer=field_of(doc, "optimizer", dict),
            scheduler=field_of(doc, "scheduler", dict),
            generator=field_of(doc, "generator", torch.Tensor),
            rng=field_of(doc, "rng", torch.Tensor),
            cuda_rng=field_of(doc, "cuda_rng", torch.Tensor) if "cuda_rng" in doc else None,
            history=tuple(_record_of(r) for r in field_of(doc, "history", list)),
            best_epoch=field_of(doc, "best_epoch", int),
            best_val_acc=field_of(doc, "best_val_acc", float),
            best_state=_state_dict_of(doc, "best_state"),
        )


def field_of(doc: dict[str, Any], key: str, kind: type, where: str = "checkpoint") -> Any:
    """doc[key] where it is a `kind`; else ValueError naming the key."""
    if key not in doc:
        raise ValueError(f"{where} has no {key!r}")
    return of_type(doc[key], kind, f"{where}'s {key!r}")


def of_type(value: Any, kind: type, what: str) -> Any:
    """`value` where it is a `kind`; else ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, kind):  # no field is a bool, and True is an int to Python
        raise ValueError(f"{what}: {kind.__name__} expected, not {type(value).__name__}")
    return value


def _state_dict_of(doc: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    """doc[key] where it maps names to tensors; else ValueError naming the key."""
    state: dict[str, Any] = field_of(doc, key, dict)
    if not all(isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in state.items()):
        raise ValueError(f"checkpoint's {key!r} holds other than named tensors")
    return state


def _record_of(raw: Any) -> EpochRecord:
    """One epoch of a checkpoint's history, every field there and of its type; else ValueError naming the field."""
    where = "checkpoint's history record"
    record = of_type(raw, dict, where)
    return EpochRecord(**{name: field_of(record, name, kind, where) for name, kind in _RECORD_TYPES.items()})


def _rehearse_resume(ckpt: Checkpoint, device: torch.device) -> None:
    """Raises what train_model would on resuming from `ckpt`, by resuming throwaway copies of what it builds."""
    epochs = [r.epoch for r in ckpt.history]
    if not epochs or epochs != list(range(1, len(epochs) + 1)) or not 1 <= ckpt.best_epoch <= len(epochs):
        raise ValueError(f"checkpoint's history (epochs {epochs}) and best_epoch {ckpt.best_epoch} are no training's")
    with torch.random.fork_rng(devices=[]):  # the initial weights draw from torch's global generator
        model = build_model(ckpt.params)
    optimizer = make_optimizer(model, ckpt.params, cuda=False)
    scheduler = make_scheduler(optimizer, ckpt.params, ckpt.epochs)
    # Copies: an optimizer loads tensors already on the right device and dtype as they are, and the step
    # below would then change, in place, the state the real resume loads next.
    ckpt = dataclasses.replace(ckpt, optimizer=copy.deepcopy(ckpt.optimizer), scheduler=copy.deepcopy(ckpt.scheduler))
    _restore(ckpt, model, optimizer, scheduler, torch.Generator(device=device))
    # The next epoch's first steps too: load_state_dict takes an optimizer's or a scheduler's state unchecked, and
    # a misfit would otherwise surface mid-epoch and crash the worker.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    _step_scheduler(scheduler, ckpt.history[-1].val_loss)
    model.load_state_dict(ckpt.best_state)
    torch.Generator().set_state(ckpt.rng)  # what torch.set_rng_state checks, on a generator of its own
    if device.type == "cuda" and ckpt.cuda_rng is not None:
        torch.Generator(device=device).set_state(ckpt.cuda_rng)


# Called after every epoch with the epoch's record and a function that returns a checkpoint of
# the whole training state (built only when asked; it holds the live tensors, so save it at
# once). It may raise to stop training (the search raises optuna.TrialPruned through it).
EpochCallback = Callable[[EpochRecord, Callable[[], Checkpoint]], None]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when there is one, else cpu; a CUDA device this machine lacks is the user's mistake."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    gpus = torch.cuda.device_count()
    if device.index is not None and device.index >= gpus:
        # Caught here: CUDA would fail only at the first tensor, with an "invalid device ordinal" traceback.
        raise UserError(
            f"--device {name}: this machine has {gpus} CUDA GPU{'' if gpus == 1 else 's'} (cuda:0 to cuda:{gpus - 1})"
        )
    return device


def _usable_cores() -> int:
    """The cores this process may run on: its affinity mask where the OS has one (os.cpu_count ignores it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure_cpu_threads(processes: int) -> None:
    """Share the cores between the worker processes of this machine (oversubscription halves speed)."""
    torch.set_num_threads(max(1, _usable_cores() // max(1, processes)))


def train_model(
    params: TrialParams,
    data: FerData,
    settings: TrainSettings,
    on_epoch: EpochCallback | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train `params` on data.train, validating on data.val every epoch; from `resume`'s next epoch if given."""
    training = Training(params, settings, resume)
    cuda = settings.device.type == "cuda"
    x_train, y_train = data.train.x.to(settings.device), data.train.y.to(settings.device)
    x_val, y_val = data.val.x.to(settings.device), data.val.y.to(settings.device)
    while not training.done:
        start = time.perf_counter()
        loss, acc = _train_one_epoch(
            training.model, training.optimizer, x_train, y_train, params.batch_size, training.generator, cuda
        )
        record = training.end_epoch(loss, acc, start, time.perf_counter() - start, len(x_train), x_val, y_val)
        if on_epoch is not None:
            on_epoch(record, training.checkpoint)
    return training.result()


class Training:
    """One training's state between epochs: model, optimizer, scheduler, generator, history and best weights.

    train_model steps one; fuse.py steps several as one batched model, each exactly as here.
    """

    def __init__(self, params: TrialParams, settings: TrainSettings, resume: Checkpoint | None = None) -> None:
        device = settings.device
        cuda = device.type == "cuda"
        self.params, self.settings = params, settings
        torch.manual_seed(settings.seed)  # the initial weights
        # channels_last on the CPU too: the model alone steps 10-20% faster in it here (max-pooling
        # is slow in the default layout); see BENCHMARKS.md.
        self.model = build_model(params).to(device).to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, params, cuda)
        self.scheduler = make_scheduler(self.optimizer, params, settings.epochs)
        # Shuffles, augments and (on the CPU, or fused) drops out: a trial's randomness after its weights.
        self.generator = torch.Generator(device=device).manual_seed(settings.seed)
        set_dropout_generator(self.model, self.generator)
        self.history: list[EpochRecord] = []
        self.best_epoch, self.best_acc, self.best_state = 0, -1.0, {}
        if resume is not None:
            _restore(resume, self.model, self.optimizer, self.scheduler, self.generator)
            match_layouts(self.optimizer)
            torch.set_rng_state(resume.rng)
            if cuda and resume.cuda_rng is not None:
                torch.cuda.set_rng_state(resume.cuda_rng, device)
            self.history = list(resume.history)
            self.best_epoch, self.best_acc, self.best_state = resume.best_epoch, resume.best_val_acc, resume.best_state

    @property
    def done(self) -> bool:
        return len(self.history) >= self.settings.epochs

    def end_epoch(
        self,
        train_loss: float,
        train_acc: float,
        start: float,
        train_seconds: float,
        images: int,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
    ) -> EpochRecord:
        """Validate, step the scheduler, keep the best weights: the record of the epoch just trained."""
        epoch = len(self.history) + 1
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss is {train_loss} at epoch {epoch}")
        val_loss, val_acc = evaluate(self.model, x_val, y_val, autocast=self.settings.device.type == "cuda")
        lr = self.optimizer.param_groups[0]["lr"]
        _step_scheduler(self.scheduler, val_loss)
        seconds = time.perf_counter() - start
        record = EpochRecord(epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds, images / train_seconds)
        self.history.append(record)
        if val_acc > self.best_acc:
            self.best_epoch, self.best_acc = epoch, val_acc
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return record

    def checkpoint(self) -> Checkpoint:
        """The training state as it is now (the optimizer's and scheduler's live tensors: save it at once)."""
        device = self.settings.device
        return Checkpoint(
            params=self.params,
            epochs=self.settings.epochs,
            device_type=device.type,
            # Copies: a fused member's weights are views of its group's stacked tensors, which torch.save
            # would write whole.
            model={k: v.detach().clone() for k, v in self.model.state_dict().items()},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            generator=self.generator.get_state(),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            history=tuple(self.history),
            best_epoch=self.best_epoch,
            best_val_acc=self.best_acc,
            best_state=self.best_state,
        )

    def result(self) -> TrainResult:
        return TrainResult(self.history, self.best_epoch, self.best_acc, self.best_state, self.model)


def _restore(
    ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator
) -> None:
    """Load `ckpt`'s weights, optimizer, scheduler and generator states into these (the weights strictly)."""
    model.load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    generator.set_state(ckpt.generator)


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Lay each optimizer state tensor out as its parameter is (channels_last here, contiguous in a fused group).

    Why: CUDA's fused Adam refuses a state whose strides differ from its parameter's, and a checkpoint
    written fused may resume unfused, or the other way round.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)


def _step_scheduler(scheduler: Any, val_loss: float) -> None:
    """The end of an epoch's scheduler step: ReduceLROnPlateau watches the validation loss, the others count epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def make_optimizer(model: nn.Module, params: TrialParams, cuda: bool) -> torch.optim.Optimizer:
    # Adam's weight_decay is L2 on every parameter (as the documented model trained); AdamW decouples it.
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=cuda or None)


def make_scheduler(optimizer: torch.optim.Optimizer, params: TrialParams, epochs: int) -> Any:
    if params.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=3)


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    cuda: bool,
) -> tuple[float, float]:
    """One pass over x in a seeded random order; returns (mean loss, accuracy) with one host sync."""
    model.train()
    n = len(x)
    order = torch.randperm(n, generator=generator, device=x.device)
    # Images, labels and augmentation drawn once per epoch, in the permutation's order, so that a
    # batch is a slice (a view) of each: per step that saves two gathers and the ~70 small ops of
    # sampling crops and flips, each a kernel launch on the GPU (BENCHMARKS.md). The price is one
    # copy of the uint8 training images (66 MB for FER2013's 28,709).
    x, y = x[order], y[order]
    plan = plan_augmentation(n, generator, size=x.shape[-1])
    loss_sum = torch.zeros((), device=x.device)
    predicted = torch.empty(n, device=x.device, dtype=torch.long)
    seen = 0
    for i in range(0, n, batch_size):
        raise_if_interrupted()
        end = min(i + batch_size, n)
        if end - i < 2:  # BatchNorm cannot train on a single image (only the last batch can be this short)
            continue
        xb = apply_plan(x[i:end], plan[i:end]).contiguous(memory_format=torch.channels_last)
        yb = y[i:end]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # One kernel each per step: the weighted loss added in place, the predictions written into
        # the epoch's buffer and compared with the labels once, after the loop.
        loss_sum.add_(loss.detach(), alpha=end - i)
        torch.argmax(logits, dim=1, out=predicted[i:end])
        seen = end  # the trained batches are a prefix of the epoch
    correct = (predicted[:seen] == y[:seen]).sum()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


@torch.no_grad()
def logits_for(model: nn.Module, x: torch.Tensor, *, autocast: bool = False, batch: int = EVAL_BATCH) -> torch.Tensor:
    """float32 logits of uint8 images x (N,1,48,48), on x's device, in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = normalize(x[i : i + batch]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            out.append(model(xb).float())
    return torch.cat(out) if out else torch.zeros((0, 7), device=x.device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, autocast: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on uint8 images x with labels y."""
    logits = logits_for(model, x, autocast=autocast)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc
