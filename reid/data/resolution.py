"""Lower resolution without changing size: shrink an image batch by a scale, then blow it back up.

What a camera of lower resolution delivers to a model that takes a fixed input size: the same
number of pixels, less detail. Used for the multi-resolution evaluation (query sets at ½ and ¼)
and for RAF's student passes (reid/raf.py). Shrinking is antialiased (area-like), blowing up is
bilinear, both on the tensors' device.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def parse_scales(text: str) -> tuple[float, ...]:
    """"0.5 0.25" -> (0.5, 0.25); every scale in (0, 1)."""
    scales = tuple(float(part) for part in str(text).replace(",", " ").split())
    if any(not 0 < scale < 1 for scale in scales):
        raise ValueError(f"resolution scales must lie in (0, 1), got {text!r}")
    return scales


def degrade(images: torch.Tensor, scale: float) -> torch.Tensor:
    """``images`` [B, C, H, W] (uint8, or float in any range) at ``scale`` × the resolution, same
    size and dtype; scale 1 returns them unchanged."""
    if scale == 1:
        return images
    height, width = images.shape[-2:]
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = images.float()
    x = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if images.dtype == torch.uint8:
        return x.round().clamp(0, 255).to(torch.uint8)
    return x.to(images.dtype)
