"""Batched augmentation against torchvision: crop-box statistics, exact geometry, flips, end-to-end statistics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fer_search import augment
from fer_search.augment import (
    MEAN,
    STD,
    apply_plan,
    augment_batch,
    crop_resize_flip,
    normalize,
    plan_augmentation,
    sample_crop_boxes,
)

PADDED = 56
QUANTILES = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_faces(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8, generator=gen(seed))


def smooth_images(distinct: int, copies: int, seed: int = 0) -> torch.Tensor:
    """Fixed random images with large-scale structure, so crops change their statistics."""
    coarse = torch.rand(distinct, 1, 6, 6, generator=gen(seed)) * 255
    smooth = F.interpolate(coarse, size=(48, 48), mode="bilinear", align_corners=False)
    return smooth.round().to(torch.uint8).repeat(copies, 1, 1, 1)


def padded(x: torch.Tensor) -> torch.Tensor:
    return F.pad(normalize(x), (4, 4, 4, 4), mode="reflect")


def box_shape_stats(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.T
    return {
        "area": h * w / PADDED**2,
        "aspect": w / h,
        "top": top / (PADDED - h).clamp(min=1),
        "left": left / (PADDED - w).clamp(min=1),
    }


def test_normalize() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), (torch.tensor([0.0, 1.0, 0.2]) - MEAN) / STD)


def test_crop_boxes_inside_the_image_with_integer_sides() -> None:
    boxes = sample_crop_boxes(20_000, gen(0))
    top, left, h, w = boxes.T
    assert boxes.shape == (20_000, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= PADDED).all() and (left + w <= PADDED).all()
    area = h * w / PADDED**2
    # Sides are rounded to whole pixels (as torchvision does), so an area drawn at 0.5 can come
    # out a little under it: 0.491 is the smallest either gives.
    assert area.min() >= 0.48 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4


def test_crop_boxes_match_torchvision_statistics() -> None:
    n = 20_000
    ours = box_shape_stats(sample_crop_boxes(n, gen(1)))
    torch.manual_seed(1)
    image = torch.empty(1, PADDED, PADDED)
    theirs = box_shape_stats(
        torch.tensor(
            [T.RandomResizedCrop.get_params(image, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=torch.float32
        )
    )
    for key in ("area", "aspect"):
        assert abs(ours[key].mean() - theirs[key].mean()) < 0.01, key
        diffs = (torch.quantile(ours[key], QUANTILES) - torch.quantile(theirs[key], QUANTILES)).abs()
        assert diffs.max() < 0.02, (key, diffs)
    for key in ("top", "left"):  # position within the free range: uniform, mean about 0.5
        assert abs(ours[key].mean() - theirs[key].mean()) < 0.02, key


def test_identity_box_reproduces_the_input() -> None:
    # Tolerance: float32 rounding in the coordinate maps, far below one grey level (1/127.5).
    x = random_faces(4)
    centre = torch.tensor([[4.0, 4.0, 48.0, 48.0]]).repeat(4, 1)
    no_flip = torch.zeros(4, dtype=torch.bool)
    out = crop_resize_flip(padded(x), centre, no_flip)
    torch.testing.assert_close(out, normalize(x), rtol=0, atol=1e-4)
    flipped = crop_resize_flip(padded(x), centre, ~no_flip)
    torch.testing.assert_close(flipped, normalize(x).flip(-1), rtol=0, atol=1e-4)


def test_crop_resize_flip_equals_torchvision_resized_crop() -> None:
    # Exact geometry: each box cropped, resized (bilinear, no antialias) and flipped as torchvision does.
    n = 64
    x = padded(random_faces(n))
    boxes = sample_crop_boxes(n, gen(2))
    flip = torch.arange(n) % 2 == 0
    out = crop_resize_flip(x, boxes, flip)
    for i in range(n):
        top, left, h, w = (int(v) for v in boxes[i])
        ref = TF.resized_crop(x[i], top, left, h, w, [48, 48], antialias=False)
        torch.testing.assert_close(out[i], TF.hflip(ref) if flip[i] else ref, rtol=0, atol=1e-4)


def test_output_dtype_shape_and_range() -> None:
    x = random_faces(256)
    out = augment_batch(x, gen(0))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6


def test_flip_rate_is_one_half() -> None:
    # Bright left half: every crop (at least 34 of 56 pixels wide) keeps some of both halves in
    # order, so the output is brighter on its right exactly when it was flipped.
    x = torch.zeros(4000, 1, 48, 48, dtype=torch.uint8)
    x[..., :24] = 255
    out = augment_batch(x, gen(3))
    flipped = out[..., 24:].mean(dim=(1, 2, 3)) > out[..., :24].mean(dim=(1, 2, 3))
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


def test_same_seed_same_output_different_seed_different() -> None:
    x = random_faces(32)
    assert torch.equal(augment_batch(x, gen(7)), augment_batch(x, gen(7)))
    assert not torch.equal(augment_batch(x, gen(7)), augment_batch(x, gen(8)))


def test_statistics_match_torchvision_pipeline() -> None:
    distinct, copies = 8, 125
    x = smooth_images(distinct, copies)
    pipeline = T.Compose(
        [T.Pad(4, padding_mode="reflect"), T.RandomResizedCrop(48, scale=(0.5, 1.0)), T.RandomHorizontalFlip()]
    )
    torch.manual_seed(0)
    theirs = normalize(torch.stack([pipeline(image) for image in x]))
    ours = augment_batch(x, gen(0))
    assert abs(ours.mean() - theirs.mean()) < 0.01
    assert abs(ours.std() - theirs.std()) < 0.01
    # The spread of each image's mean over its copies comes from where the crops fall.
    spread = [out.mean(dim=(1, 2, 3)).view(copies, distinct).std(dim=0).mean() for out in (ours, theirs)]
    assert spread[0] == pytest.approx(spread[1], rel=0.25)
    # Mean row profile: vertical geometry (flips do not change it).
    rows = [out.mean(dim=(0, 1, 3)) for out in (ours, theirs)]
    assert (rows[0] - rows[1]).abs().max() < 0.04


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_a_cuda_generator() -> None:
    x = random_faces(128).cuda()
    g = torch.Generator(device="cuda")
    out = augment_batch(x, g.manual_seed(0))
    assert out.device == x.device and out.dtype == torch.float32
    assert torch.equal(out, augment_batch(x, g.manual_seed(0)))


# --- an epoch's plan, applied a batch at a time (as the trainer does) -------------------------------


class CountOps(TorchDispatchMode):
    """Counts aten calls, and those that are not views (each about one kernel launch on the GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def test_plan_shape_and_dtype() -> None:
    plan = plan_augmentation(10, gen(0))
    assert plan.shape == (10, 2, 48) and plan.dtype == torch.float32


def test_a_planned_batch_takes_a_few_operations() -> None:
    # Sampling crops and flips per batch took 91 aten calls (74 kernels); from a plan it is a cast
    # with the scale, a shift, the grid and grid_sample, and a few views.
    x, plan = random_faces(256), plan_augmentation(256, gen(0))
    batch, rows = x[:128], plan[:128]
    with CountOps() as ops:
        apply_plan(batch, rows)
    assert ops.calls <= 12 and ops.kernels <= 5, (ops.calls, ops.kernels)


def test_plan_applied_in_slices_equals_augment_batch() -> None:
    # What the trainer does (one plan an epoch, a slice a batch) is what the statistics tests test.
    x = random_faces(96)
    plan = plan_augmentation(len(x), gen(5))
    sliced = torch.cat([apply_plan(x[i : i + 32], plan[i : i + 32]) for i in range(0, len(x), 32)])
    assert torch.equal(sliced, augment_batch(x, gen(5)))


def test_plan_equals_crop_resize_flip_of_the_reflect_padded_image(monkeypatch: pytest.MonkeyPatch) -> None:
    # The plan samples the unpadded image with the padding folded into the grid; crop_resize_flip,
    # whose geometry equals torchvision's, samples the padded image. Random boxes and the extreme
    # ones (each corner of the padded image, the whole of it), each with and without a flip.
    n = 512
    boxes = sample_crop_boxes(n, gen(4))
    extremes = torch.tensor(
        [
            [0.0, 0, 28, 28],
            [0, 28, 28, 28],
            [28, 0, 28, 28],
            [28, 28, 28, 28],
            [0, 0, 56, 56],
            [0, 22, 56, 34],
            [22, 0, 34, 56],
        ]
    )
    boxes[: 10 * len(extremes)] = extremes.repeat_interleave(10, dim=0)
    monkeypatch.setattr(augment, "sample_crop_boxes", lambda *args, **kwargs: boxes)
    flip = torch.rand(n, generator=gen(9)) < 0.5  # the plan's flips: the boxes are its only other draw
    assert all(0 < f.sum() < 10 for f in flip[: 10 * len(extremes)].view(len(extremes), 10))  # both, for each
    x = random_faces(n)
    out = apply_plan(x, plan_augmentation(n, gen(9)))
    # Tolerance: float32 rounding in the two coordinate maps, far below one grey level (1/127.5).
    torch.testing.assert_close(out, crop_resize_flip(padded(x), boxes, flip), rtol=0, atol=1e-4)
