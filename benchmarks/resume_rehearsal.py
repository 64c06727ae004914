"""What Checkpoint.resumes costs since it rehearses a resume, against loading the checkpoint file it checks.

    python benchmarks/resume_rehearsal.py

A trial that resumes pays both once: Checkpoint.from_bytes (torch.load of the file) and resumes (a
throwaway model, optimizer step, scheduler and generators loaded from it). Both are timed here on
checkpoints of the baseline and of the space's largest model (width 2, 2 convs a block), CPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from fer_search.model import BASELINE, TrialParams, build_model
from fer_search.train import Checkpoint, EpochRecord, make_optimizer, make_scheduler

EPOCHS = 30
REPEATS = 7


def checkpoint_of(params: TrialParams) -> Checkpoint:
    """A checkpoint after one epoch of `params`, with optimizer state, as a trial writes it."""
    torch.manual_seed(0)
    model = build_model(params)
    optimizer = make_optimizer(model, params, cuda=False)
    scheduler = make_scheduler(optimizer, params, EPOCHS)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    record = EpochRecord(1, 1.0, 0.5, 1.0, 0.5, 1e-3, 1.0, 100.0)
    state = model.state_dict()
    return Checkpoint(
        params, EPOCHS, "cpu", state, optimizer.state_dict(), scheduler.state_dict(),
        torch.Generator().get_state(), torch.get_rng_state(), None, (record,), 1, 0.5, state,
    )  # fmt: skip


def median_s(work: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(name: str, params: TrialParams) -> str:
    """One line: the checkpoint's size, its load time, the rehearsal's, and their ratio."""
    ckpt = checkpoint_of(params)
    raw = ckpt.to_bytes()
    load = median_s(lambda: Checkpoint.from_bytes(raw))
    rehearse = median_s(lambda: ckpt.resumes(params, EPOCHS, torch.device("cpu")))
    size = len(raw) / 2**20
    return f"{name}: {size:.1f} MiB, load {load:.3f} s, rehearsal {rehearse:.3f} s ({rehearse / load:.1f}x)"


def main() -> None:
    print(timed("baseline", BASELINE))
    print(timed("largest", dataclasses.replace(BASELINE, width=2.0, convs_per_block=2)))


if __name__ == "__main__":
    main()
