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
    """uint8 (N,1,H,W) -> float32 (x/255 - MEAN)/STD on the same device, in two kernels."""
    # uint8 times a Python float promotes to float32 (the default dtype) inside the multiply, so
    # the cast needs no kernel of its own: the affine map is one multiply and one in-place shift.
    return (x * (1 / (255 * STD))).sub_(MEAN / STD)


def sample_crop_boxes(
    n: int,
    generator: torch.Generator,
    size: int = 56,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> torch.Tensor:
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


def crop_resize_flip(padded: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int = 48) -> torch.Tensor:
    """Crop each image's box, resize it to out_size (bilinear) and mirror where flip, in one grid_sample.

    Equals torchvision's resized_crop (antialias off) then hflip: output pixel k samples the
    box at top + (k + 0.5) * h / out_size - 0.5 (pixel-centre convention, align_corners=False),
    clamped to the box's edge pixels as F.interpolate clamps to the cropped image's edges when it
    upsamples. The map is affine per axis, so the grid is built from two 1-D coordinate rows.
    """
    _, _, height, width = padded.shape
    x, y = _sample_positions(boxes.to(device=padded.device, dtype=padded.dtype), flip.to(padded.device), out_size)
    # align_corners=False: -1 and 1 are the image's outer edges, so an edge position p maps to p * 2/size - 1.
    return F.grid_sample(
        padded,
        _grid(x * (2 / width) - 1, y * (2 / height) - 1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


def plan_augmentation(n: int, generator: torch.Generator, size: int = 48) -> torch.Tensor:
    """The crops and flips of n size x size images, drawn at once: (n, 2, size) float grid rows.

    Row 0 holds each image's x sampling coordinates (its flip folded in), row 1 its y coordinates,
    both normalised for apply_plan's grid_sample on the unpadded image. Draws what augment_batch
    always drew, in the same order (the boxes of sample_crop_boxes on the reflect-padded image,
    then one flip each). Why a plan: the trainer pays sampling's ~70 small ops once an epoch, not
    once a batch, and each is a kernel launch on the GPU.
    """
    boxes = sample_crop_boxes(n, generator, size=size + 2 * PAD)
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    x, y = _sample_positions(boxes, flip, size)
    # The reflect padding is folded into the sampling: mirroring the image about its edge pixels'
    # centres and interpolating linearly commute, so sampling the padded image at edge position p
    # equals sampling the unpadded one, with grid_sample's reflection about the corner pixels'
    # centres (align_corners=True), at pixel centre p - 0.5 - PAD. Boxes reach at most PAD pixels
    # past the image (PAD < size - 1), so a single reflection always lands inside.
    rows = torch.stack([x, y], dim=1)
    return (rows - (PAD + 0.5)) * (2 / (size - 1)) - 1  # align_corners=True: -1 and 1 are the corner pixels' centres


def apply_plan(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """uint8 (N,1,S,S) and their plan rows (N,2,S) -> normalised float32 (N,1,S,S), in four kernels.

    rows is a slice of plan_augmentation's result, on x's device, one row pair per image of x.
    """
    # Normalising before the resample is equivalent: bilinear weights sum to 1.
    grid_x, grid_y = rows.unbind(dim=1)
    return F.grid_sample(
        normalize(x), _grid(grid_x, grid_y), mode="bilinear", padding_mode="reflection", align_corners=True
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N,1,48,48) -> normalised float32 (N,1,48,48): reflect-pad 4, random resized crop, flip.

    All draws come from `generator`, which must live on x's device. The trainer draws a whole
    epoch's plan at once instead and applies a slice of it per batch: the same two functions.
    """
    return apply_plan(x, plan_augmentation(len(x), generator, size=x.shape[-1]))


def _sample_positions(boxes: torch.Tensor, flip: torch.Tensor, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel samples its box: x (N, out_size, flips folded in) and y (N, out_size).

    Positions are in pixels of the (padded) image the boxes are in, measured from its left or top
    edge (pixel i spans i to i + 1): top + (k + 0.5) * h / out_size, clamped to the box's edge
    pixels' centres.
    """
    top, left, h, w = boxes.unbind(dim=1)
    frac = (torch.arange(out_size, device=boxes.device, dtype=boxes.dtype) + 0.5) / out_size
    x = _box_positions(left, w, torch.where(flip[:, None], 1 - frac, frac))  # flip: negated x scale
    y = _box_positions(top, h, frac)
    return x, y


def _box_positions(start: torch.Tensor, length: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Positions (N, out) of fractions of each box along one axis, kept within its edge pixels' centres."""
    start, length = start[:, None], length[:, None]
    return torch.minimum(torch.maximum(start + length * frac, start + 0.5), start + length - 0.5)


def _grid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grid_sample's (N, S, S, 2) grid from per-image coordinate rows x and y (N, S): one kernel, the rest views."""
    n, size = x.shape
    return torch.stack([x[:, None, :].expand(n, size, size), y[:, :, None].expand(n, size, size)], dim=-1)
