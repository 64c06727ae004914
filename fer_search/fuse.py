"""Fused trials: several trainings of one architecture and batch size stepped as one batched model (torch.func)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from fer_search.augment import apply_plan, plan_augmentation
from fer_search.data import FerData
from fer_search.model import (
    Dropout,
    TrialParams,
    build_model,
    keep_rule,
    mask_of,
    mask_words,
    random_bits,
    used_dropouts,
)
from fer_search.processes import raise_if_interrupted
from fer_search.train import Checkpoint, EpochCallback, Training, TrainResult, TrainSettings, match_layouts

# What members of one fused group share: the layers (the pattern places the Dropouts; a rate of 0
# is no mask at all, as in nn.Dropout) and the batch size (one step feeds every member a batch).
# Each member keeps its own rates, lr, weight decay, optimizer, scheduler and seed.
SHARED_FIELDS = ("dropout_pattern", "batch_size", "linear_depth", "width", "convs_per_block")


def fuse_key(params: TrialParams) -> tuple[Any, ...]:
    """Trials with equal keys can train fused."""
    zero_rates = tuple(getattr(params, rate) == 0 for rate in used_dropouts(params.dropout_pattern))
    return tuple(getattr(params, name) for name in SHARED_FIELDS) + zero_rates


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Each Dropout's rate, by module name, in forward order."""
    return {name: m.p for name, m in model.named_modules() if isinstance(m, Dropout)}


@dataclass(frozen=True)
class Member:
    """One training of a fused group: what train_model takes for one."""

    params: TrialParams
    seed: int
    on_epoch: EpochCallback | None = None
    resume: Checkpoint | None = None


Outcome = TrainResult | Exception


def train_fused(
    members: Sequence[Member], data: FerData, epochs: int, device: torch.device
) -> Iterator[tuple[int, Outcome]]:
    """Train `members` (one fuse_key) as one batched model; yields (index, outcome) as each ends.

    Each member trains as train_model would train it alone (same weights, batches, augmentation and
    dropout masks, from its seed; its own optimizer, scheduler, resume and callback), to
    floating-point tolerance. Its outcome is its TrainResult, or the exception that ended it alone
    (DivergedError, or what its callback raised, such as optuna.TrialPruned); the others go on
    without it. An error of the shared step (out of memory) or an interrupt ends them all: it is raised.
    """
    if len({fuse_key(m.params) for m in members}) > 1:
        raise ValueError("fused members must share their architecture and batch size")
    trainings = [Training(m.params, TrainSettings(epochs, m.seed, device), m.resume) for m in members]
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    x_val, y_val = data.val.x.to(device), data.val.y.to(device)
    active = [i for i, t in enumerate(trainings) if not t.done]
    for i in set(range(len(members))) - set(active):
        yield i, trainings[i].result()  # resumed from its last epoch: nothing to train
    if not active:
        return
    group = _Group(members[0].params, device)
    group.bind([trainings[i] for i in active])
    while active:
        start = time.perf_counter()
        losses, accs = group.train_epoch(x_train, y_train)
        train_seconds = time.perf_counter() - start
        ended: list[tuple[int, Outcome]] = []
        for i, loss, acc in zip(active, losses, accs):
            outcome = _end_epoch(trainings[i], members[i].on_epoch, loss, acc, train_seconds, x_train, x_val, y_val)
            if outcome is not None:
                ended.append((i, outcome))
        active = [i for i in active if i not in dict(ended)]
        if ended and active:
            group.bind([trainings[i] for i in active])
        yield from ended


def _end_epoch(
    training: Training,
    on_epoch: EpochCallback | None,
    loss: float,
    acc: float,
    train_seconds: float,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
) -> Outcome | None:
    """A member's epoch end as train_model's: its outcome if it ended, else None."""
    try:
        # Its seconds: the group's training time and its own validation. Its images/s counts its own
        # images over the group's time: the group's throughput is the sum of its members'.
        start = time.perf_counter() - train_seconds
        record = training.end_epoch(loss, acc, start, train_seconds, len(x_train), x_val, y_val)
        if on_epoch is not None:
            on_epoch(record, training.checkpoint)
    except Exception as e:  # this member's end (diverged, pruned, its trial failed elsewhere): the others go on
        return e
    return training.result() if training.done else None


class _Group:
    """The active members' weights and buffers stacked, and the batched step that trains them.

    Each member's nn.Module keeps its own Parameter objects (its optimizer's), re-pointed at its
    row of the stacked tensors: vmap computes every member's gradients in one pass, and each
    optimizer steps its member's row in place. Why by hand: torch.func stacks modules and maps a
    function over them, but has no training loop that keeps per-member optimizers, schedulers,
    RNG streams and early exits.
    """

    def __init__(self, params: TrialParams, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = build_model(params).to(device)  # its forward only: functional_call swaps its tensors
        self.shapes = _dropout_input_shapes(self.base, device)
        self.base.train()
        self.step = vmap(grad_and_value(self._loss, has_aux=True), in_dims=(0, 0, 0, 1, 1))

    def bind(self, trainings: list[Training]) -> None:
        """Stack these members' weights and buffers (again, once one has left) and point each member at its row."""
        self.trainings = trainings
        # Each member's parameters by name, listed once: walking its modules every step costs the GPU's time.
        self.named_params = [list(t.model.named_parameters()) for t in trainings]
        models = [t.model for t in trainings]
        params, buffers = stack_module_state(models)
        # Contiguous, so that each member's row, its gradient's row and its optimizer state share one layout:
        # CUDA's fused Adam refuses differing strides.
        self.params = {name: p.detach().contiguous() for name, p in params.items()}
        self.buffers = buffers
        stacked = {**self.params, **self.buffers}
        for j, t in enumerate(trainings):
            for name, tensor in [*t.model.named_parameters(), *t.model.named_buffers()]:
                tensor.data = stacked[name][j]
            match_layouts(t.optimizer)
        rates = [dropout_rates(m) for m in models]
        dtype = torch.bfloat16 if self.cuda else torch.float32  # the activations' dtype under autocast
        # Per layer, each member's (threshold, scale), made once: a tensor from a list is a host-to-device copy.
        self.rules = {
            name: tuple(
                torch.tensor(column, device=self.device, dtype=kind)
                for column, kind in zip(zip(*[keep_rule(r[name]) for r in rates]), (torch.int32, dtype))
            )
            for name in self.shapes
            if rates[0][name] > 0
        }

    def _loss(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        keeps: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.cuda):
            logits = functional_call(self.base, (params, buffers, keeps), (x,))
            return F.cross_entropy(logits, y), logits

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
        """One pass over x per member, each in its own seeded order: (mean losses, accuracies), one host sync."""
        n, k = len(x), len(self.trainings)
        batch_size = self.trainings[0].params.batch_size
        orders = [torch.randperm(n, generator=t.generator, device=x.device) for t in self.trainings]
        plans = [plan_augmentation(n, t.generator, size=x.shape[-1]) for t in self.trainings]
        # (n, k, ...): a step's batches, one per member, are one slice, augmented in one apply_plan.
        xs, ys = torch.stack([x[o] for o in orders], 1), torch.stack([y[o] for o in orders], 1)
        plan = torch.stack(plans, 1)
        loss_sum = torch.zeros(k, device=x.device)
        predicted = torch.empty(n, k, device=x.device, dtype=torch.long)
        seen = 0
        for i in range(0, n, batch_size):
            raise_if_interrupted()
            end = min(i + batch_size, n)
            if end - i < 2:  # as train_model: BatchNorm cannot train on a single image
                continue
            xb = apply_plan(xs[i:end].flatten(0, 1), plan[i:end].flatten(0, 1)).unflatten(0, (end - i, k))
            grads, (loss, logits) = self.step(self.params, self.buffers, self._keeps(end - i), xb, ys[i:end])
            grads = {name: g.contiguous() for name, g in grads.items()}  # laid out as the stacked weights
            for j, (t, named) in enumerate(zip(self.trainings, self.named_params)):
                for name, p in named:
                    p.grad = grads[name][j]
                t.optimizer.step()
            loss_sum.add_(loss.detach(), alpha=end - i)
            predicted[i:end] = logits.argmax(-1).T
            seen = end
        correct = (predicted[:seen] == ys[:seen]).sum(0)
        return [s / max(seen, 1) for s in loss_sum.tolist()], [c / max(seen, 1) for c in correct.tolist()]

    def _keeps(self, batch: int) -> dict[str, torch.Tensor]:
        """Every member's dropout masks for one step, drawn from its generator as its Dropouts draw alone.

        A member draws a layer's bits after the previous layer's, so one draw per member holds them
        all (torch's CPU generator gives the same bits in one draw as in several); each layer's masks
        are then made for every member at once.
        """
        shapes = {name: (batch, *self.shapes[name]) for name in self.rules}
        words = [mask_words(math.prod(s)) for s in shapes.values()]
        words_drawn = torch.empty(len(self.trainings), sum(words), dtype=torch.int64, device=self.device)
        for row, t in zip(words_drawn, self.trainings):
            random_bits(row, t.generator)
        keeps, offset = {}, 0
        for (name, shape), n_words in zip(shapes.items(), words):
            bits = words_drawn[:, offset : offset + n_words].view(torch.int16)[:, : math.prod(shape)]
            thresholds, scales = (t.view(-1, *[1] * len(shape)) for t in self.rules[name])
            keeps[f"{name}.keep"] = mask_of(bits, shape, thresholds, scales, scales.dtype)
            offset += n_words
        return keeps


def _dropout_input_shapes(model: nn.Module, device: torch.device) -> dict[str, tuple[int, ...]]:
    """The shape of one image's activation entering each Dropout, by module name, in forward order."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape[1:])))
        for name, m in model.named_modules()
        if isinstance(m, Dropout)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 1, 48, 48, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes
