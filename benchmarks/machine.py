"""What the benchmarks say of the machine they ran on, and waiting for its device; imports torch alone.

Why apart: fused.py's spawned children import their script again, and throughput.py imports torchvision,
seconds each on a small CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The first 'model name' of /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
