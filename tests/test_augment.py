"""Batched augmentation against torchvision: crop-box statistics, exact geometry, flips, end-to-end statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fer_search.augment import MEAN, STD, augment_batch, crop_resize_flip, normalize, sample_crop_boxes

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
    return {"area": h * w / PADDED**2, "aspect": w / h,
            "top": top / (PADDED - h).clamp(min=1), "left": left / (PADDED - w).clamp(min=1)}


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
    theirs = box_shape_stats(torch.tensor(
        [T.RandomResizedCrop.get_params(image, [0.5, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=torch.float32))
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
    pipeline = T.Compose([T.Pad(4, padding_mode="reflect"), T.RandomResizedCrop(48, scale=(0.5, 1.0)),
                          T.RandomHorizontalFlip()])
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
