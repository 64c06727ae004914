"""The bare baseline training step in four variants, in one run: memory layout x dropout implementation.

    python benchmarks/train_step.py [--rounds 8] [--steps 6]

Forward, backward and Adam step on one fixed random batch of 128 on the CPU, the four variants
in interleaved rounds (the order reversed every other round) so that drift on a shared machine
touches them alike. Prints each variant's median images/s and the two ratios that matter:
channels_last with fer_search's Dropout against the reference model (standard layout,
nn.Dropout), and against channels_last with nn.Dropout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fer_search.model import BASELINE, Dropout, build_model
from fer_search.train import configure_cpu_threads

BATCH = 128


def learner(fast_dropout: bool, channels_last: bool) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    model = build_model(BASELINE)
    if not fast_dropout:  # torch's own, as the reference pipeline of throughput.py trains
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, Dropout):
                    setattr(module, name, nn.Dropout(child.p))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return (
        model,
        torch.optim.Adam(model.parameters(), lr=BASELINE.lr, weight_decay=BASELINE.weight_decay),
        channels_last,
    )


def images_per_s(
    learner: tuple[nn.Module, torch.optim.Optimizer, bool], x: torch.Tensor, y: torch.Tensor, steps: int
) -> float:
    model, optimizer, channels_last = learner
    xb = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(xb), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant per round")
    args = parser.parse_args()
    configure_cpu_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 1, 48, 48), torch.randint(0, 7, (BATCH,))
    variants = {
        "standard+nn.Dropout": learner(False, False),
        "channels_last+nn.Dropout": learner(False, True),
        "channels_last+Dropout": learner(True, True),
        "standard+Dropout": learner(True, False),
    }
    for v in variants.values():  # warm-up
        images_per_s(v, x, y, 2)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, v in variants.items() if r % 2 else reversed(list(variants.items())):
            rates[name].append(images_per_s(v, x, y, args.steps))
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} rounds={args.rounds} steps={args.steps}")
    for name, values in rates.items():
        print(f"{name}_images_per_s={statistics.median(values):.1f} (rounds: {','.join(f'{v:.0f}' for v in values)})")
    for reference in ("standard+nn.Dropout", "channels_last+nn.Dropout"):
        ratio = statistics.median(a / b for a, b in zip(rates["channels_last+Dropout"], rates[reference]))
        print(f"ratio_vs_{reference}={ratio:.2f}")


if __name__ == "__main__":
    main()
