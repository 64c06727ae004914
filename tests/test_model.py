"""The model family: layer sequences by (pattern, depth), parameter counts, widths, forward shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from fer_search.config import MAX_CONVS_PER_BLOCK, MAX_LINEAR_DEPTH, MAX_WIDTH, MIN_WIDTH
from fer_search.model import (
    BASELINE,
    HEAD_WIDTHS,
    Dropout,
    TrialParams,
    build_model,
    check_params,
    count_parameters,
    forward_flops,
    keep_scale,
)

BLOCK = "Conv2d BatchNorm2d ReLU MaxPool2d"
HIDDEN = "Linear BatchNorm1d ReLU"
# Distinct rates, so a Dropout with the wrong rate shows in the sequence.
HIGH, LOW, HEAD = 0.6, 0.2, 0.4

# (pattern, linear_depth) -> the model's leaf layers in order; Dropout written with its p.
SEQUENCES = {
    ("none", 1): f"{BLOCK} {BLOCK} {BLOCK} {BLOCK} Flatten Linear",
    ("none", 2): f"{BLOCK} {BLOCK} {BLOCK} {BLOCK} Flatten {HIDDEN} Linear",
    ("none", 3): f"{BLOCK} {BLOCK} {BLOCK} {BLOCK} Flatten {HIDDEN} {HIDDEN} Linear",
    ("head", 1): f"{BLOCK} {BLOCK} {BLOCK} {BLOCK} Flatten Dropout(0.4) Linear",
    ("head", 2): f"{BLOCK} {BLOCK} {BLOCK} {BLOCK} Flatten {HIDDEN} Dropout(0.4) Linear",
    ("head", 3): f"{BLOCK} {BLOCK} {BLOCK} {BLOCK} Flatten {HIDDEN} Dropout(0.4) {HIDDEN} Dropout(0.4) Linear",
    ("every", 1): f"{BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6)"
    f" Flatten Dropout(0.4) Linear",
    ("every", 2): f"{BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6)"
    f" Flatten {HIDDEN} Dropout(0.4) Linear",
    ("every", 3): f"{BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.6)"
    f" Flatten {HIDDEN} Dropout(0.4) {HIDDEN} Dropout(0.4) Linear",
    ("alternate", 1): f"{BLOCK} Dropout(0.6) {BLOCK} {BLOCK} Dropout(0.6) {BLOCK} Flatten Dropout(0.4) Linear",
    ("alternate", 2): f"{BLOCK} Dropout(0.6) {BLOCK} {BLOCK} Dropout(0.6) {BLOCK} Flatten {HIDDEN} Dropout(0.4) Linear",
    ("alternate", 3): f"{BLOCK} Dropout(0.6) {BLOCK} {BLOCK} Dropout(0.6) {BLOCK}"
    f" Flatten {HIDDEN} Dropout(0.4) {HIDDEN} Dropout(0.4) Linear",
    ("interlaced", 1): f"{BLOCK} Dropout(0.6) {BLOCK} Dropout(0.2) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.2)"
    f" Flatten Dropout(0.4) Linear",
    ("interlaced", 2): f"{BLOCK} Dropout(0.6) {BLOCK} Dropout(0.2) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.2)"
    f" Flatten {HIDDEN} Dropout(0.4) Linear",
    ("interlaced", 3): f"{BLOCK} Dropout(0.6) {BLOCK} Dropout(0.2) {BLOCK} Dropout(0.6) {BLOCK} Dropout(0.2)"
    f" Flatten {HIDDEN} Dropout(0.4) {HIDDEN} Dropout(0.4) Linear",
}

BASELINE_SEQUENCE = (
    f"{BLOCK} Dropout(0.5) {BLOCK} Dropout(0.3) {BLOCK} Dropout(0.5) {BLOCK} Dropout(0.3)"
    f" Flatten {HIDDEN} Dropout(0.5) Linear"
)


def params(pattern: str = "interlaced", depth: int = 2, **changes: object) -> TrialParams:
    """BASELINE with a pattern, a depth and the rates that pattern uses (None elsewhere)."""
    rates = {
        "dropout_high": HIGH if pattern in ("every", "alternate", "interlaced") else None,
        "dropout_low": LOW if pattern == "interlaced" else None,
        "dropout_head": None if pattern == "none" else HEAD,
    }
    return dataclasses.replace(BASELINE, dropout_pattern=pattern, linear_depth=depth, **rates, **changes)


def layer_sequence(model: nn.Module) -> str:
    leaves = [m for m in model.modules() if not any(m.children())]
    return " ".join(f"Dropout({m.p})" if isinstance(m, nn.Dropout) else type(m).__name__ for m in leaves)


def test_table_covers_every_pattern_and_depth() -> None:
    patterns = ("none", "head", "every", "alternate", "interlaced")
    assert set(SEQUENCES) == {(p, d) for p in patterns for d in (1, 2, 3)}


@pytest.mark.parametrize(("pattern", "depth"), sorted(SEQUENCES))
def test_layer_sequence(pattern: str, depth: int) -> None:
    assert layer_sequence(build_model(params(pattern, depth))) == SEQUENCES[(pattern, depth)]


def test_pattern_none_has_no_dropout() -> None:
    model = build_model(params("none", 1))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_dropouts_are_plain_float_modules() -> None:
    drops = [m for m in build_model(BASELINE).modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 5 and all(type(m) is Dropout and type(m.p) is float for m in drops)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.6])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_drops_at_its_rate_and_keeps_the_mean(p: float, layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 32, 24, 24).add_(0.5).contiguous(memory_format=layout)  # > 0: a zero means dropped
    y = Dropout(p).train()(x)
    n = x.numel()
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard errors
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-4)
    assert y.is_contiguous(memory_format=layout)
    # Neighbours in memory (channels, in channels_last) drop independently: both at p squared.
    drop = (y == 0).float()
    both = (drop[:, 0] * drop[:, 1]).mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / drop[:, 0].numel()) ** 0.5


def test_cpu_dropout_of_a_strided_view_and_of_almost_everything() -> None:
    x = torch.rand(32, 64, 12, 12).add_(0.5)[:, ::2]  # neither contiguous nor channels_last
    y = Dropout(0.5).train()(x)
    assert y.shape == x.shape and abs((y == 0).float().mean().item() - 0.5) < 0.01
    assert torch.equal(Dropout(1 - 1e-7).train()(x), torch.zeros_like(x))


def test_cpu_dropout_gradient_is_its_mask_and_it_is_seeded() -> None:
    drop = Dropout(0.5).train()
    x = torch.randn(8, 16, 6, 6, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, (y != 0).float() * 2.0)
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # the same seed draws the same mask


def test_cpu_dropout_draws_from_its_generator_the_same_mask_in_any_layout() -> None:
    """Whatever vmap makes of a fused member's layout, the member draws the mask it draws alone (fuse.py)."""
    drop = Dropout(0.5).train()
    drop.generator = torch.Generator().manual_seed(3)
    x = torch.rand(8, 16, 6, 6).add_(0.5)
    before = torch.get_rng_state()
    plain = drop(x)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    drop.generator.manual_seed(3)
    assert torch.equal(drop(x.contiguous(memory_format=torch.channels_last)), plain)
    drop.generator.manual_seed(3)
    mask = keep_scale(x.shape, 0.5, drop.generator, torch.float32, x.device)
    assert torch.equal(x * mask, plain)


def test_a_dropout_given_its_mask_uses_it_and_keeps_it_out_of_the_state() -> None:
    drop = Dropout(0.5).train()
    keep = torch.tensor([[0.0, 2.0, 2.0]])
    drop.keep = keep
    assert torch.equal(drop(torch.ones(1, 3)), keep)
    assert "keep" not in drop.state_dict()  # model files and checkpoints are unchanged


def test_dropout_is_the_identity_in_eval_mode() -> None:
    x = torch.randn(4, 256)
    assert torch.equal(Dropout(0.5).eval()(x), x)


def test_baseline_is_the_documented_model() -> None:
    model = build_model(BASELINE)
    assert layer_sequence(model) == BASELINE_SEQUENCE
    assert count_parameters(model) == 981_191
    assert [name for name, _ in model.named_children()] == ["block1", "block2", "block3", "block4", "head"]


def test_parameter_count_of_a_small_model() -> None:
    # Width 0.5, no hidden layer: convs 160 + 4,640 + 18,496 + 73,856, their BNs 32 + 64 + 128
    # + 256, output Linear(128*3*3, 7) 8,071.
    assert count_parameters(build_model(params("none", 1, width=0.5))) == 105_703


def test_forward_flops_of_a_small_model() -> None:
    # Width 0.5, no hidden layer: 2 FLOPs a multiply-add; convs 16x1, 32x16, 64x32, 128x64 (x9 taps)
    # at 48², 24², 12², 6², then Linear(1152, 7). Normalisation, ReLU and pooling are not counted.
    convs = 2 * 9 * (16 * 1 * 48**2 + 32 * 16 * 24**2 + 64 * 32 * 12**2 + 128 * 64 * 6**2)
    assert forward_flops(params("none", 1, width=0.5)) == convs + 2 * 1152 * 7 == 16_604_928


def test_forward_flops_grow_with_the_square_of_the_width_and_with_convs_per_block() -> None:
    assert 3.8 < forward_flops(params(width=2.0)) / forward_flops(params()) < 4
    assert 3.5 < forward_flops(params(convs_per_block=2)) / forward_flops(params()) < 4


def test_frozen_parameters_are_not_counted() -> None:
    model = build_model(BASELINE)
    model.head.requires_grad_(False)
    assert count_parameters(model) == 981_191 - 590_080 - 512 - 1_799


@pytest.mark.parametrize("width", [0.5, 1.0, 1.5, 2.0])
def test_width_scales_conv_channels_only(width: float) -> None:
    model = build_model(params("interlaced", 3, width=width))
    channels = [round(c * width) for c in (32, 64, 128, 256)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == channels
    assert [c.in_channels for c in convs] == [1] + channels[:3]
    assert [(m.in_features, m.out_features) for m in linears] == [(channels[3] * 9, 256), (256, 128), (128, 7)]


def test_two_convs_per_block_doubles_the_convs() -> None:
    model = build_model(params("every", 2, convs_per_block=2))
    block = "Conv2d BatchNorm2d ReLU Conv2d BatchNorm2d ReLU MaxPool2d Dropout(0.6)"
    assert layer_sequence(model) == f"{block} {block} {block} {block} Flatten {HIDDEN} Dropout(0.4) Linear"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 32),
        (32, 32),
        (32, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
    ]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in convs)


@pytest.mark.parametrize(
    "trial",
    [
        BASELINE,
        params("none", 1, width=0.5),
        params("alternate", 3, width=1.5, convs_per_block=2),
        params("head", 2, width=2.0),
    ],
)
def test_forward_shape(trial: TrialParams) -> None:
    torch.manual_seed(0)
    model = build_model(trial)
    x = torch.randn(5, 1, 48, 48)
    assert model(x).shape == (5, 7)
    model.eval()
    with torch.no_grad():
        out = model(x)
        # channels_last must give the same function (the trainer uses it on CUDA).
        out_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert out.shape == (5, 7)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)


def test_num_classes() -> None:
    assert build_model(BASELINE, num_classes=3)(torch.randn(2, 1, 48, 48)).shape == (2, 3)


@pytest.mark.parametrize(
    "bad", [{"dropout_pattern": "sometimes"}, {"linear_depth": 4}, {"dropout_head": None}, {"dropout_low": None}]
)
def test_invalid_params_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_model(dataclasses.replace(BASELINE, **bad))


# (field, a value outside the family): each is named by check_params with the rule it breaks.
@pytest.mark.parametrize(
    "field, value",
    [
        ("width", 1e6),
        ("width", MAX_WIDTH + 0.5),
        ("width", MIN_WIDTH / 2),
        ("width", "wide"),
        ("width", math.nan),
        ("width", math.inf),
        ("width", True),
        ("width", 10**400),
        ("width", None),
        ("convs_per_block", 10**6),
        ("convs_per_block", MAX_CONVS_PER_BLOCK + 1),
        ("convs_per_block", 0),
        ("convs_per_block", 2.0),
        ("linear_depth", 0),
        ("linear_depth", MAX_LINEAR_DEPTH + 1),
        ("batch_size", -1),
        ("batch_size", 10**9),
        ("dropout_high", 5.0),
        ("dropout_high", -0.1),
        ("dropout_head", math.nan),
        ("dropout_low", "0.3"),
        ("dropout_pattern", ["interlaced"]),
        ("dropout_pattern", "sometimes"),
        ("lr", math.inf),
        ("lr", 0.0),
        ("lr", "0.001"),
        ("weight_decay", -1e-4),
        ("optimizer", "sgd"),
        ("scheduler", None),
    ],
)
def test_check_params_names_the_field_outside_the_family(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} = .{{1,80}}: must "):
        check_params(dataclasses.replace(BASELINE, **{field: value}))


def test_check_params_names_a_rate_the_pattern_needs() -> None:
    with pytest.raises(ValueError, match="^dropout_pattern 'every' needs dropout_high$"):
        check_params(dataclasses.replace(params("every", 2), dropout_high=None))


@pytest.mark.parametrize(("pattern", "depth"), sorted(SEQUENCES))
def test_check_params_accepts_every_pattern_and_depth(pattern: str, depth: int) -> None:
    check_params(params(pattern, depth))  # unused rates are None


def test_the_head_has_the_depths_the_family_allows() -> None:
    assert MAX_LINEAR_DEPTH == len(HEAD_WIDTHS) + 1


@pytest.mark.parametrize(
    "width, convs, parameters", [(MIN_WIDTH, 1, 53_687), (MAX_WIDTH, MAX_CONVS_PER_BLOCK, 46_212_743)]
)
def test_the_family_s_extremes_pass_the_check_and_build(width: float, convs: int, parameters: int) -> None:
    """The narrowest keeps a channel in each block; the largest is the size config.py's comment gives."""
    trial = params("interlaced", MAX_LINEAR_DEPTH, width=width, convs_per_block=convs)
    check_params(trial)
    model = build_model(trial).eval()
    assert count_parameters(model) == parameters
    assert min(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) >= 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 48, 48)).shape == (1, 7)
