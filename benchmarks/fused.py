"""Training images/s of K baseline trainings on one device: one after another, K processes at once, and fused.

    python benchmarks/fused.py --data PATH [--device cuda] [--k 2,4,8] [--epochs 1] [--json OUT]

The K trainings have BASELINE's architecture and batch size, seeds 0..K-1 and learning rates spread
from 0.5x to 2x BASELINE's (distinct trials, one fuse_key). Per K, three modes train the same K:
  sequential  one process, K train_model calls one after another (the reference)
  processes   K spawned processes at once, each with configure_cpu_threads(K) and one train_model,
              as `run --workers K` (on CUDA they share the GPU); timed in the parent from the release
              of the children, each with its data loaded and warmed up, to the last one's end
  fused       one process, train_fused with the K members (fuse.py: one batched model)
images/s = K x training images x epochs / wall seconds of the mode, validation included (every mode
validates each member after each epoch). Each mode runs once per K after an untimed short run of it,
so that first-call costs (mkldnn set-up, the CUDA context, cuDNN's choices) are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import queue
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import cpu_model, synchronize

from fer_search.data import FerData, load_data
from fer_search.errors import UserError
from fer_search.fuse import Member, train_fused
from fer_search.model import BASELINE
from fer_search.processes import spawn_context
from fer_search.train import TrainSettings, configure_cpu_threads, resolve_device, train_model

CPU_IMAGES = 2048  # 2 x 4 trainings of it take a few minutes per mode on a 2-core CPU
VAL_IMAGES = 256
SUBSET_SEED = 0
MODES = ("sequential", "processes", "fused")
POLL_S = 1.0  # how often the parent checks that no child died without a word


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every mode, and every child of the processes mode, needs to train the same K trainings."""

    data_path: Path
    cache: Path
    images: int
    val_images: int
    epochs: int
    device: torch.device


def main() -> None:
    args = _parse_args()
    configure_cpu_threads(1)  # this process's modes use every core
    with tempfile.TemporaryDirectory(prefix="fer-bench-") as temp:
        # The children of the processes mode read the cache the parent fills: it lives as long as the run.
        cache = args.cache or Path(temp)
        try:
            available = len(load_data(args.data, cache).train.y)
        except UserError as error:  # no data set there: one line, not a traceback
            raise SystemExit(f"--data: {error}") from None
        images = args.images
        if images is None:
            images = min(CPU_IMAGES, available) if args.device.type == "cpu" else available
        if not 2 <= images <= available:
            raise SystemExit(f"--images must be between 2 and {available}, not {images}")
        setup = Setup(args.data, cache, images, args.val_images, args.epochs, args.device)
        data = load_subset(setup)
        rows = [row for k in args.k for row in measure_k(setup, data, k)]
    header = _header(setup)
    print(_table(header, rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": rows}, indent=2) + "\n")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="FER2013 image folders (train/<class>/*.jpg)")
    parser.add_argument("--cache", "--cache-dir", type=Path, help="fer_search's data cache (default: a temporary one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--k", help="group sizes, comma-separated (default 2,4 on cpu, 2,4,8 on cuda)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each training (default 1)")
    parser.add_argument("--images", type=int, help=f"training images (default {CPU_IMAGES} on cpu, all on cuda)")
    parser.add_argument("--val-images", type=int, default=VAL_IMAGES, help=f"validation images (default {VAL_IMAGES})")
    parser.add_argument("--json", type=Path, help="also write the header and the results to this file")
    args = parser.parse_args()
    try:
        args.device = resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))
    try:
        args.k = [int(k) for k in (args.k or ("2,4,8" if args.device.type == "cuda" else "2,4")).split(",")]
    except ValueError:
        parser.error(f"--k {args.k}: comma-separated whole numbers expected")
    if min(args.k) < 1 or args.epochs < 1 or args.val_images < 1:
        parser.error("--k, --epochs and --val-images must be at least 1")
    return args


def members(k: int) -> list[Member]:
    """K distinct trials of BASELINE's architecture and batch size: lr from 0.5x to 2x BASELINE's, seeds 0..K-1."""
    factors = [2.0 ** (2 * i / (k - 1) - 1) for i in range(k)] if k > 1 else [1.0]
    return [Member(dataclasses.replace(BASELINE, lr=BASELINE.lr * f), seed=i) for i, f in enumerate(factors)]


def load_subset(setup: Setup) -> FerData:
    """The same seeded random training images and the first validation images, in every process."""
    data = load_data(setup.data_path, setup.cache)
    chosen = torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(SUBSET_SEED))[: setup.images]
    return _cut(data, chosen, setup.val_images)


def _cut(data: FerData, train: torch.Tensor, val: int) -> FerData:
    names = data.train.names
    return dataclasses.replace(
        data,
        train=dataclasses.replace(
            data.train, x=data.train.x[train], y=data.train.y[train], names=tuple(names[i] for i in train.tolist())
        ),
        val=dataclasses.replace(data.val, x=data.val.x[:val], y=data.val.y[:val], names=data.val.names[:val]),
        test=None,
    )


def _tiny(data: FerData) -> FerData:
    """One batch and a few validation images: enough to warm a mode up."""
    return _cut(data, torch.arange(min(len(data.train.y), BASELINE.batch_size)), 16)


Timed = tuple[float, list[float]]  # a mode's seconds, and each training's last training loss


def measure_k(setup: Setup, data: FerData, k: int) -> list[dict[str, Any]]:
    """The three modes' rows for one K (`data`: load_subset's, which each child of the processes mode loads)."""
    group = members(k)
    runs: dict[str, Callable[[], Timed]] = {
        "sequential": lambda: _sequential(group, data, setup),
        "processes": lambda: _processes(group, setup),
        "fused": lambda: _fused(group, data, setup),
    }
    timed = {}
    for mode in MODES:
        timed[mode] = runs[mode]()
        print(f"K={k} {mode}: {timed[mode][0]:.1f} s", file=sys.stderr, flush=True)
    rate = {mode: k * setup.images * setup.epochs / seconds for mode, (seconds, _) in timed.items()}
    reference = timed["sequential"][1]
    return [
        {
            "k": k,
            "mode": mode,
            "seconds": seconds,
            "images_per_s": rate[mode],
            "ratio_vs_sequential": rate[mode] / rate["sequential"],
            "ratio_vs_processes": rate[mode] / rate["processes"],
            # The same trainings in every mode: last losses equal to floating-point tolerance (wider
            # under CUDA's bf16) say that a faster mode did the same work.
            "max_loss_diff_vs_sequential": max(abs(a - b) for a, b in zip(losses, reference)),
        }
        for mode, (seconds, losses) in timed.items()
    ]


def _sequential(group: list[Member], data: FerData, setup: Setup) -> Timed:
    train_model(group[0].params, _tiny(data), TrainSettings(1, 0, setup.device))  # warm-up, untimed
    start = time.perf_counter()
    results = [train_model(m.params, data, TrainSettings(setup.epochs, m.seed, setup.device)) for m in group]
    synchronize(setup.device)
    return time.perf_counter() - start, [r.history[-1].train_loss for r in results]


def _fused(group: list[Member], data: FerData, setup: Setup) -> Timed:
    list(train_fused(group, _tiny(data), 1, setup.device))  # warm-up, untimed
    start = time.perf_counter()
    outcomes = dict(train_fused(group, data, setup.epochs, setup.device))
    synchronize(setup.device)
    seconds = time.perf_counter() - start
    losses = []
    for i in range(len(group)):
        outcome = outcomes[i]
        if isinstance(outcome, Exception):  # a diverged member: no figure to quote
            raise outcome
        losses.append(outcome.history[-1].train_loss)
    return seconds, losses


def _processes(group: list[Member], setup: Setup) -> Timed:
    """K children at once, timed from their release (data loaded, warmed up) to the last one's end."""
    context = spawn_context()
    messages, go = context.Queue(), context.Event()
    children = [
        context.Process(target=_child, args=(i, m, setup, len(group), messages, go), daemon=True)
        for i, m in enumerate(group)
    ]
    for child in children:
        child.start()
    try:
        for _ in children:
            _next(messages, children, "ready")
        go.set()
        start = time.perf_counter()
        losses = dict(_next(messages, children, "done") for _ in children)
        seconds = time.perf_counter() - start
        for child in children:
            child.join()
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
    return seconds, [losses[i] for i in range(len(group))]


def _next(messages: Any, children: list[Any], kind: str) -> tuple[int, Any]:
    """The next message of `kind` as (child index, value); RuntimeError where a child failed or died silently."""
    while True:
        try:
            got, index, value = messages.get(timeout=POLL_S)
        except queue.Empty:
            dead = [c.exitcode for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a child process died (exit code {dead[0]})") from None
            continue
        if got == "error":
            raise RuntimeError(f"child {index}: {value}")
        assert got == kind, (got, kind)
        return index, value


def _child(index: int, member: Member, setup: Setup, k: int, messages: Any, go: Any) -> None:
    try:
        configure_cpu_threads(k)
        data = load_subset(setup)
        train_model(member.params, _tiny(data), TrainSettings(1, 0, setup.device))  # warm-up
        messages.put(("ready", index, None))
        go.wait()
        result = train_model(member.params, data, TrainSettings(setup.epochs, member.seed, setup.device))
        synchronize(setup.device)
        messages.put(("done", index, result.history[-1].train_loss))
    except BaseException as error:
        messages.put(("error", index, f"{type(error).__name__}: {error}"))
        raise


def _header(setup: Setup) -> dict[str, Any]:
    device = setup.device
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "images": setup.images,
        "val_images": setup.val_images,
        "epochs": setup.epochs,
        "command": shlex.join(["python3", *sys.argv]),
    }


def _table(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    machine = header["device"] if header["device"] != "cpu" else f"{header['cpu_model']}, {header['cores']} cores"
    lines = [
        f"{header['date']}; {machine}; torch {header['torch']}; {header['images']} training images, "
        f"{header['val_images']} validation images, {header['epochs']} epoch(s) per training",
        f"command: {header['command']}",
        "",
        "| K | mode | seconds | images/s | x sequential | fused / processes |",
        "|--:|------|--------:|---------:|-------------:|------------------:|",
    ]
    for row in rows:
        versus = f"{row['ratio_vs_processes']:.2f}" if row["mode"] == "fused" else ""
        lines.append(
            f"| {row['k']} | {row['mode']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} "
            f"| {row['ratio_vs_sequential']:.2f} | {versus} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
