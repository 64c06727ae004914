"""Aten operations dispatched per training step of the baseline, counted (each is about one kernel launch on CUDA).

    python benchmarks/step_ops.py [--ref HEAD] [--time] [--rounds 6] [--threads N]

Counts on the CPU, with a TorchDispatchMode that sees every aten call, in two columns: all calls,
and kernels (calls other than views, which only make tensor metadata and launch nothing):

- **step**: one training step as `fer_search.train._train_one_epoch` runs it (baseline model,
  batch 128, Adam): an epoch of 3 batches minus an epoch of 1, halved, after a warm-up epoch so
  that Adam's state exists. Per-epoch work (permutation, augmentation plan, totals) is reported
  apart, as **epoch overhead** (the 1-batch epoch minus one step).
- **augmentation**: what the step spends to turn one uint8 batch into the model's input.
  `fer_search.augment.apply_plan` on a slice of a prepared plan, where the code has one;
  otherwise `augment_batch` (the per-batch sampling of the code before the plan).
- **optimizer**: `optimizer.step()` alone, for scale: on the CPU the trainer's Adam is torch's
  loop over the parameters, about 12 kernels each; on CUDA it is the fused Adam, counted here too
  (it runs on the CPU as well), as is the step with it: **step, fused Adam**.

`--ref REV` also counts the `augment.py` and `train.py` of a git revision (the rest of fer_search
as it is now), loaded from `git show`; `--time` then times both in the same run, interleaved
rounds of an 8-batch `_train_one_epoch` and of 50 augmentations, and prints the medians of the
per-round time ratios (this VM's speed drifts too much between runs for anything else).
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fer_search.augment
import fer_search.train
from fer_search.model import BASELINE, build_model
from fer_search.train import configure_cpu_threads

BATCH = 128
REPO = Path(__file__).resolve().parent.parent


class CountOps(TorchDispatchMode):
    """Counts the aten calls made while active: all of them, and those that are not views."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace == "aten":  # not the profiler's record_function markers that optimizer.step makes
            self.calls[str(func.overloadpacket)] += 1
            self.views += func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def kernels(self) -> int:
        return self.total - self.views


def count(fn: Callable[[], Any]) -> CountOps:
    with CountOps() as counter:
        fn()
    return counter


def code_at(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """(augment, train) modules of `rev`, the old train bound to the old augment."""

    def load(name: str, path: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__file__ = f"{rev}:{path}"
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        return module

    augment = load("fer_search.augment", "fer_search/augment.py")
    current = sys.modules["fer_search.augment"]
    sys.modules["fer_search.augment"] = augment  # so that the old train.py imports the old augment.py
    try:
        train = load("fer_search.train", "fer_search/train.py")
    finally:
        sys.modules["fer_search.augment"] = current
    return augment, train


class Learner:
    """The trainer's baseline model and Adam (CPU), on random uint8 data of a few batches."""

    def __init__(self, train: types.ModuleType, batches: int = 8, fused: bool = False) -> None:
        torch.manual_seed(0)
        self.train = train
        self.model = build_model(BASELINE).to(memory_format=torch.channels_last)
        self.optimizer = train.make_optimizer(self.model, BASELINE, fused)  # fused: as on CUDA
        self.x = torch.randint(0, 256, (batches * BATCH, 1, 48, 48), dtype=torch.uint8)
        self.y = torch.randint(0, 7, (batches * BATCH,))
        self.generator = torch.Generator().manual_seed(0)

    def epoch(self, batches: int) -> None:
        n = batches * BATCH
        self.train._train_one_epoch(self.model, self.optimizer, self.x[:n], self.y[:n], BATCH, self.generator, False)


def augmentation(augment: types.ModuleType) -> Callable[[], Any]:
    """One batch's augmentation as the trainer of `augment`'s version does it, ready to call."""
    x = torch.randint(0, 256, (8 * BATCH, 1, 48, 48), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    batch = x[:BATCH]
    if hasattr(augment, "apply_plan"):
        rows = augment.plan_augmentation(len(x), generator)[:BATCH]
        return lambda: augment.apply_plan(batch, rows)
    return lambda: augment.augment_batch(batch, generator)


def step_counts(train: types.ModuleType, fused: bool) -> tuple[tuple[int, int], tuple[int, int], CountOps]:
    """(step, epoch overhead) as (aten calls, kernels), and the optimizer step's own count."""
    learner = Learner(train, fused=fused)
    learner.epoch(1)  # warm-up: Adam's state
    one, three = count(lambda: learner.epoch(1)), count(lambda: learner.epoch(3))
    step = ((three.total - one.total) // 2, (three.kernels - one.kernels) // 2)
    xb = torch.randn(BATCH, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    torch.nn.functional.cross_entropy(learner.model(xb), learner.y[:BATCH]).backward()
    return step, (one.total - step[0], one.kernels - step[1]), count(learner.optimizer.step)


def counts(augment: types.ModuleType, train: types.ModuleType) -> dict[str, CountOps | tuple[int, int]]:
    step, overhead, optimizer = step_counts(train, fused=False)
    fused_step, _, fused_optimizer = step_counts(train, fused=True)
    return {
        "step": step,
        "epoch overhead": overhead,
        "augmentation": count(augmentation(augment)),
        "optimizer": optimizer,
        "step, fused Adam": fused_step,
        "optimizer, fused Adam": fused_optimizer,
    }


def show(label: str, figures: dict[str, CountOps | tuple[int, int]]) -> None:
    for name, c in figures.items():
        total, kernels = (c.total, c.kernels) if isinstance(c, CountOps) else c
        print(f"{label} {name}: {total} aten calls, {kernels} kernels")
    aug = figures["augmentation"]
    assert isinstance(aug, CountOps)
    print(f"{label} augmentation calls: {dict(aug.calls)}")


def timed(fn: Callable[[], Any], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def speed(ref: tuple[types.ModuleType, types.ModuleType], rounds: int) -> None:
    code = {"current": (fer_search.augment, fer_search.train), "ref": ref}
    learners = {name: Learner(train) for name, (_, train) in code.items()}
    augments = {name: augmentation(augment) for name, (augment, _) in code.items()}
    for name in code:  # warm-up
        learners[name].epoch(1)
        timed(augments[name], 5)
    step_s: dict[str, list[float]] = {name: [] for name in code}
    augment_ms: dict[str, list[float]] = {name: [] for name in code}
    for r in range(rounds):
        for name in list(code) if r % 2 else list(reversed(code)):
            step_s[name].append(timed(functools.partial(learners[name].epoch, 8), 1) / 8)
            augment_ms[name].append(1000 * timed(augments[name], 50))
    for label, values, unit in (("step", step_s, "s"), ("augmentation", augment_ms, "ms")):
        for name, v in values.items():
            print(f"{name} {label}_{unit}={statistics.median(v):.4f} (rounds: {','.join(f'{x:.4f}' for x in v)})")
        ratio = statistics.median(a / b for a, b in zip(values["current"], values["ref"]))
        print(f"{label} current/ref time ratio={ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="also count (and with --time, time) this git revision's augment.py and train.py")
    parser.add_argument("--time", action="store_true", help="time current against --ref, interleaved")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch threads (default: one per usable core)")
    args = parser.parse_args()
    if args.time and not args.ref:
        parser.error("--time needs --ref")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        configure_cpu_threads(1)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} batch={BATCH} device=cpu")
    show("current", counts(fer_search.augment, fer_search.train))
    if args.ref:
        ref = code_at(args.ref)
        show(f"ref({args.ref})", counts(*ref))
        if args.time:
            speed(ref, args.rounds)


if __name__ == "__main__":
    main()
