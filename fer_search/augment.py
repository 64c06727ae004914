"""The baseline's training augmentation as batched tensor ops on the training device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = 0.5
STD = 0.5
PAD = 4
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CANDIDATES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N,1,H,W) -> float32 (x/255 - MEAN)/STD on the same device."""
    return (x.float() / 255.0 - MEAN) / STD


def sample_crop_boxes(n: int, generator: torch.Generator, size: int = 56,
                      scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """(n,4) float boxes (top, left, height, width) in a size x size image, on the generator's device.

    Same distribution as torchvision's RandomResizedCrop.get_params: up to CANDIDATES draws of
    area fraction (uniform) and aspect ratio (log-uniform) with sides rounded to integers; the
    first candidate that fits wins, else the whole (square) image; then an integer position.
    """
    device = generator.device
    u = torch.rand(2, n, CANDIDATES, generator=generator, device=device)
    area = size * size * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    full = torch.full((n,), float(size), device=device)
    h = torch.where(found, h.gather(1, first).squeeze(1), full)
    w = torch.where(found, w.gather(1, first).squeeze(1), full)
    # floor(u * k) is uniform over 0..k-1, as torch.randint(0, k); the clamp guards rounding up.
    pos = torch.rand(2, n, generator=generator, device=device)
    top = torch.minimum(torch.floor(pos[0] * (size - h + 1)), size - h)
    left = torch.minimum(torch.floor(pos[1] * (size - w + 1)), size - w)
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_flip(padded: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                     out_size: int = 48) -> torch.Tensor:
    """Crop each image's box, resize it to out_size (bilinear) and mirror where flip, in one grid_sample.

    Equals torchvision's resized_crop (antialias off) then hflip: output pixel k samples the
    box at top + (k + 0.5) * h / out_size - 0.5 (pixel-centre convention, align_corners=False),
    clamped to the box's edge pixels as F.interpolate clamps to the cropped image's edges when it
    upsamples. The map is affine per axis, so the grid is built from two 1-D coordinate rows.
    """
    n, _, height, width = padded.shape
    boxes = boxes.to(device=padded.device, dtype=padded.dtype)
    top, left, h, w = boxes.unbind(dim=1)
    frac = (torch.arange(out_size, device=padded.device, dtype=padded.dtype) + 0.5) / out_size
    flip = flip.to(padded.device)[:, None]
    x = _box_coords(left, w, torch.where(flip, 1 - frac, frac), width)  # flip: negated x scale
    y = _box_coords(top, h, frac.expand(n, -1), height)
    grid = torch.stack([x[:, None, :].expand(n, out_size, out_size),
                        y[:, :, None].expand(n, out_size, out_size)], dim=-1)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _box_coords(start: torch.Tensor, length: torch.Tensor, frac: torch.Tensor,
                size: int) -> torch.Tensor:
    """Normalised grid coordinates (N, out) of fractions of each box along one axis."""
    start, length = start[:, None], length[:, None]
    pixel = torch.minimum(torch.maximum(start + length * frac, start + 0.5), start + length - 0.5)
    return pixel * (2 / size) - 1  # align_corners=False: -1 and 1 are the image's outer edges


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N,1,48,48) -> normalised float32 (N,1,48,48): reflect-pad 4, random resized crop, flip.

    All draws come from `generator`, which must live on x's device.
    """
    n, _, height, _ = x.shape
    # Normalising before the resample is equivalent: bilinear weights sum to 1.
    padded = F.pad(normalize(x), (PAD, PAD, PAD, PAD), mode="reflect")
    boxes = sample_crop_boxes(n, generator, size=height + 2 * PAD)
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    return crop_resize_flip(padded, boxes, flip, out_size=height)
