"""Training images/s of fer_search's trainer against a torchvision DataLoader pipeline and the model alone."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import cpu_model, synchronize
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from fer_search.augment import CROP_SCALE, MEAN, PAD, STD
from fer_search.data import SIZE, FerData, load_data
from fer_search.model import BASELINE, build_model
from fer_search.train import EpochRecord, TrainSettings, configure_cpu_threads, train_model

BATCH = BASELINE.batch_size
CPU_IMAGES = 4096  # the full training set takes about 2 minutes per epoch on a 2-core CPU
VAL_IMAGES = 256  # the trainer validates after every epoch, untimed: keep that short
SEED = 0


@dataclasses.dataclass(frozen=True)
class Learner:
    """The baseline model and its Adam; `channels_last` (the trainer's layout everywhere) and `fast`
    (its CUDA numerics: bf16 autocast, fused Adam)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    channels_last: bool
    fast: bool


class ImageCountError(ValueError):
    """More training images asked for than the data set has, or fewer than a step needs."""


@dataclasses.dataclass
class Rates:
    """Images/s per measured round (warm-up round excluded) of the three pipelines."""

    trainer: list[float]
    reference: list[float]
    compute_bound: list[float]


def main() -> None:
    args = _parse_args()
    configure_cpu_threads(1)  # torch threads = cores, for all three pipelines
    try:
        figures = throughput(args.data, torch.device(args.device), args.images, args.repeats, args.cache_dir)
    except ImageCountError as error:
        raise SystemExit(f"--images: {error}") from None
    for key, value in figures.items():
        print(f"{key}={value}")


def throughput(
    data_path: Path, device: torch.device, images: int | None = None, repeats: int = 3, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The run's figures, by name: the header, each pipeline's median images/s and its rounds, the ratios.

    `images` defaults to CPU_IMAGES on a CPU (fewer where the training set is smaller) and the whole
    training set on CUDA; `data_path` must be the image-folder layout, which the reference reads.
    """
    with tempfile.TemporaryDirectory(prefix="fer-bench-") as temp:
        data = load_data(data_path, cache_dir or Path(temp))
    available = len(data.train.y)
    if images is None:
        images = min(CPU_IMAGES, available) if device.type == "cpu" else available
    if not 2 <= images <= available:
        raise ImageCountError(f"must be between 2 and {available}, not {images}")
    indices = torch.randperm(available, generator=torch.Generator().manual_seed(SEED))[:images]
    rates = measure(subset(data, indices), _reference_loader(data_path, indices, device), device, repeats)
    figures = {**_header(device, images, repeats), **_rate_figures(rates)}
    if device.type == "cuda":
        figures["epoch_seconds"] = round(full_epoch_seconds(data, device), 2)
    return figures


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--data", type=Path, required=True, help="FER2013 image folders (train/<class>/*.jpg)")
    parser.add_argument("--cache-dir", type=Path, help="fer_search's data cache (default: a temporary folder)")
    parser.add_argument(
        "--images", type=int, help=f"training images per pass (default {CPU_IMAGES} on cpu, all on cuda)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up round (default 3)")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        parser.error(f"{args.data}: the reference pipeline needs the image-folder layout (train/<class>/*.jpg)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def measure(data: FerData, loader: DataLoader, device: torch.device, repeats: int) -> Rates:
    """Rounds of one trainer epoch, one reference pass and one model-alone pass over the same number of images.

    The trainer's epochs run in train_model; the other two passes run from its per-epoch callback, so
    the three alternate (the other two in turns of order) and drift on a shared machine touches them
    alike. Round 1 warms all three up and is not counted.
    """
    rates = Rates([], [], [])
    reference_learner = make_learner(device, trainer_numerics=False)
    bound_learner = make_learner(device, trainer_numerics=True)
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=device)
    y = torch.randint(0, 7, (BATCH,), device=device)
    steps = max(1, len(data.train.y) // BATCH)  # one step at least, on a training set smaller than a batch

    def after_epoch(record: EpochRecord, _checkpoint: Callable[[], dict[str, Any]]) -> None:
        if record.epoch % 2:
            reference = reference_pass(loader, reference_learner, device)
            bound = bound_pass(bound_learner, x, y, steps)
        else:
            bound = bound_pass(bound_learner, x, y, steps)
            reference = reference_pass(loader, reference_learner, device)
        if record.epoch > 1:
            rates.trainer.append(record.images_per_s)
            rates.reference.append(reference)
            rates.compute_bound.append(bound)

    train_model(BASELINE, data, TrainSettings(epochs=repeats + 1, seed=SEED, device=device), on_epoch=after_epoch)
    return rates


def make_learner(device: torch.device, *, trainer_numerics: bool) -> Learner:
    """The baseline with Adam on `device`: plain float32, or set up as train_model sets it up there.

    The reference is the conventional float32 pipeline; the compute bound copies the trainer's
    numerics (train_model uses channels_last everywhere, bf16 autocast and fused Adam on CUDA only).
    """
    fast = trainer_numerics and device.type == "cuda"
    model = build_model(BASELINE).to(device)
    if trainer_numerics:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=BASELINE.lr, weight_decay=BASELINE.weight_decay, fused=fast or None
    )
    return Learner(model, optimizer, trainer_numerics, fast)


def train_step(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimisation step on the batch (x, y)."""
    if learner.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=learner.fast):
        loss = F.cross_entropy(learner.model(x), y)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()


def reference_pass(loader: DataLoader, learner: Learner, device: torch.device) -> float:
    """Images/s of one pass over the loader, training on every batch."""
    learner.model.train()
    seen = 0
    start = time.perf_counter()
    for x, y in loader:
        train_step(learner, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def bound_pass(learner: Learner, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Images/s of `steps` training steps on one fixed batch already on the device: the compute bound."""
    learner.model.train()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(learner, x, y)
    synchronize(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def full_epoch_seconds(data: FerData, device: torch.device) -> float:
    """Seconds of one baseline epoch (training and validation) on the full training set, after a warm-up epoch."""
    result = train_model(BASELINE, data, TrainSettings(epochs=2, seed=SEED, device=device))
    return result.history[-1].seconds


def subset(data: FerData, indices: torch.Tensor) -> FerData:
    """The training images at `indices` and the first VAL_IMAGES validation images."""
    train = dataclasses.replace(
        data.train,
        x=data.train.x[indices],
        y=data.train.y[indices],
        names=tuple(data.train.names[i] for i in indices.tolist()),
    )
    val = dataclasses.replace(
        data.val, x=data.val.x[:VAL_IMAGES], y=data.val.y[:VAL_IMAGES], names=data.val.names[:VAL_IMAGES]
    )
    return dataclasses.replace(data, train=train, val=val, test=None)


def _reference_loader(root: Path, indices: torch.Tensor, device: torch.device) -> DataLoader:
    """ImageFolder + PIL transforms equal to the baseline's augmentation, one worker per core.

    ImageFolder sorts classes and files as load_data sorts names, so `indices` pick the same images.
    """
    transform = transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Pad(PAD, padding_mode="reflect"),
            transforms.RandomResizedCrop(SIZE, scale=CROP_SCALE),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    folder = datasets.ImageFolder(str(root / "train"), transform=transform)
    return DataLoader(
        Subset(folder, indices.tolist()),
        batch_size=BATCH,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        persistent_workers=True,
        pin_memory=device.type == "cuda",
    )


def _header(device: torch.device, images: int, repeats: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dataloader_workers": os.cpu_count() or 1,
        "cpu_model": cpu_model(),
        "images_per_pass": images,
        "repeats": repeats,
    }


def _rate_figures(rates: Rates) -> dict[str, Any]:
    """Medians of each pipeline's rounds (and the rounds), then the medians of the per-round ratios."""
    figures: dict[str, Any] = {}
    for name, values in dataclasses.asdict(rates).items():
        figures[f"{name}_images_per_s"] = round(statistics.median(values), 1)
        figures[f"{name}_rounds"] = ",".join(f"{v:.1f}" for v in values)
    figures["ratio_vs_reference"] = round(statistics.median(t / r for t, r in zip(rates.trainer, rates.reference)), 2)
    figures["fraction_of_compute_bound"] = round(
        statistics.median(t / b for t, b in zip(rates.trainer, rates.compute_bound)), 2
    )
    return figures


if __name__ == "__main__":
    main()
