"""The CNN family: its parameters (TrialParams, the baseline, the dropout table) and TrialParams -> nn.Module."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fer_search.config import DROPOUT_RATES, broken_family_rule
from fer_search.sources import SIZE


@dataclass(frozen=True)
class TrialParams:
    """One point of the family: architecture and optimisation. Unused dropout rates are None."""

    dropout_pattern: str
    dropout_high: float | None
    dropout_low: float | None
    dropout_head: float | None
    lr: float
    weight_decay: float
    batch_size: int
    linear_depth: int
    optimizer: str
    scheduler: str
    width: float
    convs_per_block: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialParams:
        values: dict[str, Any] = {f.name: d.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


# The documented hand-tuned model ("the baseline"): trial 0 of every study.
BASELINE = TrialParams(
    dropout_pattern="interlaced",
    dropout_high=0.5,
    dropout_low=0.3,
    dropout_head=0.5,
    lr=1e-3,
    weight_decay=1e-4,
    batch_size=128,
    linear_depth=2,
    optimizer="adam",
    scheduler="plateau",
    width=1.0,
    convs_per_block=1,
)


# The rate after each of the four conv blocks, by dropout_pattern (None: no Dropout there); every
# pattern but "none" also puts dropout_head in the head. The model builds from this table and
# the space suggests from it, so the two cannot disagree.
BLOCK_DROPOUTS: dict[str, tuple[str | None, ...]] = {
    "none": (None,) * 4,
    "head": (None,) * 4,
    "every": ("dropout_high",) * 4,
    "alternate": ("dropout_high", None, "dropout_high", None),
    "interlaced": ("dropout_high", "dropout_low", "dropout_high", "dropout_low"),
}


def used_dropouts(pattern: str) -> tuple[str, ...]:
    """The dropout rates a pattern uses, so that only those are suggested and recorded."""
    conv = tuple(dict.fromkeys(name for name in BLOCK_DROPOUTS[pattern] if name is not None))
    return conv + (() if pattern == "none" else ("dropout_head",))


def check_params(params: TrialParams) -> None:
    """Raises ValueError naming the first field outside the family (config.FAMILY_RULES) and its rule."""
    # Called before build_model on params from a file, which could otherwise ask for gigabytes or fail
    # deep inside torch; trials need no call, as config checks the space against the same rules.
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        rule = None if value is None and f.name in DROPOUT_RATES else broken_family_rule(f.name, value)
        if rule is not None:
            raise ValueError(f"{f.name} = {reprlib.repr(value)}: {rule}")
    _conv_dropouts(params)  # a rate the pattern uses is not None
    _head_dropout(params)


BASE_CHANNELS = (32, 64, 128, 256)
HEAD_WIDTHS = (256, 128)  # the linear layers keep these whatever the width
SPATIAL_AFTER_BLOCKS = 3  # 48 -> 24 -> 12 -> 6 -> 3 after four MaxPool2d(2)


def build_model(params: TrialParams, num_classes: int = 7) -> nn.Module:
    """Four conv blocks, then the head: a Sequential of named Sequentials, easy to list."""
    channels = [round(c * params.width) for c in BASE_CHANNELS]
    conv_dropouts = _conv_dropouts(params)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_ch = 1
    for i, (out_ch, p) in enumerate(zip(channels, conv_dropouts), start=1):
        layers[f"block{i}"] = _conv_block(in_ch, out_ch, params.convs_per_block, p)
        in_ch = out_ch
    features = in_ch * SPATIAL_AFTER_BLOCKS * SPATIAL_AFTER_BLOCKS
    layers["head"] = _head(features, params.linear_depth, _head_dropout(params), num_classes)
    return nn.Sequential(layers)


class Dropout(nn.Dropout):
    """nn.Dropout whose training mask, on the CPU, comes from 16 random bits an element of the training's generator.

    Why by hand: torch's CPU dropout draws a float per element (bernoulli_), which took a fifth
    of the baseline's training step on 2 cores; drawing 64 bits at a time and comparing 16-bit
    slices with the rate makes the mask about five times cheaper (BENCHMARKS.md). The rate is
    then exact to 1/65536, and kept values are scaled by 1/(1 - that rate). The bits come from
    `generator` (train.py gives each Dropout its training's generator; None: torch's global one),
    so that a trial's masks follow its seed alone, and a fused training (fuse.py), which draws
    each member's masks itself from the member's generator with `keep_scale` and hands them in
    through the non-persistent buffer `keep`, trains every member on the masks it would draw
    alone. Same module name and state, so the layer sequence and model files are unchanged; on
    CUDA (unfused) and in eval mode it is nn.Dropout.
    """

    keep: torch.Tensor | None

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.generator: torch.Generator | None = None
        self.register_buffer("keep", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.keep is not None:
            return x * self.keep
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * keep_scale(x.shape, self.p, self.generator, x.dtype, x.device)


def keep_scale(
    shape: torch.Size, p: float, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A dropout mask: 0 where an element is dropped (probability ~p), 1/(1-p) where kept, drawn from `generator`."""
    threshold, scale = keep_rule(p)
    n = math.prod(shape)
    bits = random_bits(torch.empty(mask_words(n), dtype=torch.int64, device=device), generator)[:n]
    return mask_of(bits, shape, threshold, scale, dtype)


def random_bits(words: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`words` (int64) filled with random bits from `generator`, as int16 slices: each uniform on [-2^15, 2^15)."""
    return words.random_(-(2**63), None, generator=generator).view(torch.int16)


def mask_of(
    bits: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    threshold: int | torch.Tensor,
    scale: float | torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mask of `shape` that random_bits' slices give under keep_rule's threshold and scale (or, fused, a
    row of them per member: tensors that broadcast over the leading dimension of `bits`)."""
    return (laid_out(bits, shape) >= threshold).to(dtype).mul_(scale)


def mask_words(n: int) -> int:
    """The 64-bit words a mask of n elements draws: 16 bits an element."""
    return (n + 3) // 4


def keep_rule(p: float) -> tuple[int, float]:
    """(threshold, scale): an element whose 16 random bits, as an int16, are >= threshold is kept and scaled."""
    dropped = round(p * 65536)  # int16 values below -2^15 + dropped are dropped: probability dropped / 65536
    return dropped - 32768, 0.0 if dropped == 65536 else 65536 / (65536 - dropped)


def laid_out(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A mask's bits (its last dimension) as an activation of `shape`, images in (N, H, W, C) order.

    Channels_last, as the model's images are, so that x * mask runs at memory speed. An element's
    bits depend on its place in that order, never on x's memory layout, so a member of a fused
    training (fuse.py), whose layout vmap decides, draws the masks it draws alone.
    """
    lead = bits.shape[:-1]
    if len(shape) == 4:
        n, c, h, w = shape
        return bits.view(*lead, n, h, w, c).movedim(-1, -3)
    return bits.view(*lead, *shape)


def set_dropout_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Make every Dropout of `model` draw its masks from `generator` (the training's, seeded with the trial)."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.generator = generator


def forward_flops(params: TrialParams) -> int:
    """FLOPs of one image through the model: how an epoch's compute compares between two trials."""
    model = build_model(params).eval()  # eval: one image through BatchNorm in train mode is an error
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, SIZE, SIZE))
    return counter.get_total_flops()


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the baseline has 981,191)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv_dropouts(params: TrialParams) -> list[float | None]:
    """Dropout rate after each of the four blocks (None: no Dropout layer there)."""
    if params.dropout_pattern not in BLOCK_DROPOUTS:
        raise ValueError(f"unknown dropout_pattern {params.dropout_pattern!r}")
    names = BLOCK_DROPOUTS[params.dropout_pattern]
    rates = [None if name is None else getattr(params, name) for name in names]
    missing = sorted({name for name, rate in zip(names, rates) if name and rate is None})
    if missing:
        raise ValueError(f"dropout_pattern {params.dropout_pattern!r} needs {', '.join(missing)}")
    return rates


def _head_dropout(params: TrialParams) -> float | None:
    if "dropout_head" not in used_dropouts(params.dropout_pattern):
        return None
    if params.dropout_head is None:
        raise ValueError(f"dropout_pattern {params.dropout_pattern!r} needs dropout_head")
    return params.dropout_head


def _conv_block(in_ch: int, out_ch: int, convs: int, dropout: float | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(convs):
        layers += [nn.Conv2d(in_ch if k == 0 else out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
    layers.append(nn.MaxPool2d(2))
    if dropout is not None:
        layers.append(Dropout(float(dropout)))
    return nn.Sequential(*layers)


def _head(features: int, depth: int, dropout: float | None, num_classes: int) -> nn.Sequential:
    """Flatten, then depth-1 hidden Linear -> BN -> ReLU -> [Dropout] stages, then the output."""
    if not 1 <= depth <= len(HEAD_WIDTHS) + 1:
        raise ValueError(f"linear_depth must lie in [1, {len(HEAD_WIDTHS) + 1}], not {depth!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    if depth == 1 and dropout is not None:
        layers.append(Dropout(float(dropout)))
    in_f = features
    for out_f in HEAD_WIDTHS[: depth - 1]:
        layers += [nn.Linear(in_f, out_f), nn.BatchNorm1d(out_f), nn.ReLU()]
        if dropout is not None:
            layers.append(Dropout(float(dropout)))
        in_f = out_f
    layers.append(nn.Linear(in_f, num_classes))
    return nn.Sequential(*layers)
