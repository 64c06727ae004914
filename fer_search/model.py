"""The documented CNN family: TrialParams -> nn.Module."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fer_search.space import BLOCK_DROPOUTS, TrialParams, used_dropouts

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
    """nn.Dropout whose training mask, on the CPU, comes from 16 random bits an element.

    Why by hand: torch's CPU dropout draws a float per element (bernoulli_), which took a fifth
    of the baseline's training step on 2 cores; drawing 64 bits at a time and comparing 16-bit
    slices with the rate makes the mask about five times cheaper (BENCHMARKS.md). The rate is
    then exact to 1/65536, and kept values are scaled by 1/(1 - that rate). Same module name and
    state, so the layer sequence and model files are unchanged; on CUDA and in eval mode it is
    nn.Dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * _keep_scale(x, self.p)


def _keep_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """A tensor shaped like x: 0 where an element is dropped (probability ~p), 1/(1-p) where kept."""
    dropped = round(p * 65536)  # int16 slices below -2^15 + dropped are dropped: probability dropped / 65536
    if dropped == 65536:
        return torch.zeros_like(x)
    n = x.numel()
    # random_ over int64's full range gives 64 uniform bits; each int16 slice is uniform on [-2^15, 2^15).
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
    # Laid out as x where x is dense (channels_last included), so that x * mask runs at memory speed.
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    keep = (bits.as_strided(x.shape, x.stride()) if dense else bits.view(x.shape)) >= dropped - 32768
    return keep.to(x.dtype).mul_(65536 / (65536 - dropped))


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
        layers += [nn.Conv2d(in_ch if k == 0 else out_ch, out_ch, 3, padding=1),
                   nn.BatchNorm2d(out_ch), nn.ReLU()]
    layers.append(nn.MaxPool2d(2))
    if dropout is not None:
        layers.append(Dropout(float(dropout)))
    return nn.Sequential(*layers)


def _head(features: int, depth: int, dropout: float | None, num_classes: int) -> nn.Sequential:
    """Flatten, then depth-1 hidden Linear -> BN -> ReLU -> [Dropout] stages, then the output."""
    if depth not in (1, 2, 3):
        raise ValueError(f"linear_depth must be 1, 2 or 3, not {depth!r}")
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
