"""The training augmentation of reid/data/transforms.py, on a whole uint8 batch at once, on its device.

Every image draws its own crop offset, flip, jitter factors and erasing box (``transforms.v2`` on a
batched tensor would draw one crop and one flip for the whole batch). The crop and the flip are one
gather: output pixel (y, x) of image b reads padded pixel (dy_b + y, dx_b + x), or
(dy_b + y, dx_b + W - 1 - x) when b is flipped. No Python loop runs per image.

Distribution, as in the PIL path: offsets uniform in [0, 2 * pad] (``RandomCrop`` after ``Pad``),
flip with probability 1/2, zero (black) padding, ImageNet normalisation, random erasing with
torchvision's defaults (area 2-33 %, aspect 0.3-3.3 log-uniform, up to 10 tries, value 0 after
normalisation). Two deliberate differences: colour jitter runs on the resized image rather than
before the resize, and its three operations in a fixed order (brightness, contrast, saturation)
rather than a random one.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, scaled_pad

JITTER = 0.1  # brightness, contrast and saturation factors uniform in [1 - JITTER, 1 + JITTER], as in the PIL path
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_TRIES = 10
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float [B, 3, H, W] -> ImageNet-normalised float32, on the images' device."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GREY, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def colour_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors on [0, 1] floats, clamped like PIL."""
    b = x.shape[0]
    factors = _uniform(generator, (3, b, 1, 1, 1), 1 - JITTER, 1 + JITTER, x.device)
    x = (x * factors[0]).clamp(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (factors[1] * x + (1 - factors[1]) * mean).clamp(0, 1)
    return (factors[2] * x + (1 - factors[2]) * _grey(x)).clamp(0, 1)


def crop_and_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to H x W at a per-image offset, flip per image: one gather."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=x.device)
    rows = dy + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip:
        flipped = torch.rand((b, 1), generator=generator, device=x.device) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    cols = dx + cols
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def erase_boxes(b: int, h: int, w: int, p: float, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """[B, 1, H, W] bool: the box each image erases (all False for images that draw none).

    torchvision's RandomErasing, vectorised: ERASE_TRIES candidate boxes per image, the first that
    fits is used, an image whose tries all fail is left whole."""
    area = h * w * _uniform(generator, (b, ERASE_TRIES), *ERASE_SCALE, device)
    log_ratio = _uniform(generator, (b, ERASE_TRIES), math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), device)
    box_h = torch.sqrt(area * torch.exp(log_ratio)).round().long()
    box_w = torch.sqrt(area / torch.exp(log_ratio)).round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.long().argmax(dim=1, keepdim=True)
    box_h, box_w = box_h.gather(1, first), box_w.gather(1, first)  # [B, 1]
    chosen = fits.any(dim=1, keepdim=True) & (torch.rand((b, 1), generator=generator, device=device) < p)
    top = (torch.rand((b, 1), generator=generator, device=device) * (h - box_h + 1).clamp(min=1)).long()
    left = (torch.rand((b, 1), generator=generator, device=device) * (w - box_w + 1).clamp(min=1)).long()
    y = torch.arange(h, device=device).view(1, h)
    x = torch.arange(w, device=device).view(1, w)
    in_rows = (y >= top) & (y < top + box_h)  # [B, H]
    in_cols = (x >= left) & (x < left + box_w)  # [B, W]
    return (in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, :, None]).unsqueeze(1)


class BatchAugmenter:
    """uint8 [B, 3, H, W] -> augmented, normalised float32, drawing from a generator on the batch's device."""

    def __init__(self, spec: AugmentSpec, height: int) -> None:
        self.spec = spec
        self.pad = scaled_pad(spec, height)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.float() / 255.0
        if self.spec.color_jitter:
            x = colour_jitter(x, generator)
        x = normalise(crop_and_flip(x, self.pad, self.spec.flip, generator))
        if self.spec.random_erasing > 0:
            b, _, h, w = x.shape
            x = x.masked_fill(erase_boxes(b, h, w, self.spec.random_erasing, generator, x.device), 0.0)
        return x
