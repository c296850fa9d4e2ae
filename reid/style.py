"""Cross-client image style sharing for federated domain generalisation (the ``feddg`` presets).

After CCST (Chen, Jiang, Zhang, Lu, "Federated Domain Generalization for Image Recognition via
Cross-Client Style Transfer", WACV 2023): every site shares the *style* of its cameras, the server
gathers the styles into a bank and sends every site the others', and each site trains on its own
images rendered in the other sites' styles, so that the shared model sees every camera domain of
the federation without any image leaving its site. As in the paper:

* a style is a whole vector per camera (CCST's "overall domain style", one per camera here since a
  site's cameras differ), not channels drawn independently of each other;
* images are restyled before the network, so the restyled image passes the whole network;
* styles are computed once from the images (they do not depend on the model) and shared with the
  updates; the bytes they take are reported (``style-bytes``).

What differs from the paper, and why: CCST restyles with a pretrained VGG encoder and AdaIN decoder,
and no pretrained weights can be had here. The transfer is therefore done on the colour statistics
a camera imposes, which is where this benchmark's cameras differ (reid/data/camera_looks.py):

* tone: each channel's value distribution is mapped onto the target's (piecewise-linear between
  the seven octiles, histogram matching), which carries tone curves and contrast;
* colour: the whitening-colouring transform of the pixels' 3-channel mean and covariance (the
  pixel-space form of the WCT behind AdaIN-style transfer), which carries colour matrices, white
  balance and cross-talk between channels.

Texture (blur, noise) and light fall-off across the image are not transferred.

And, as the issue on this method asked: restyled samples are kept out of BatchNorm's running
statistics (``clean_bn``): they are normalised with their batch, but the running mean and variance
a site keeps, and the federation's source-only statistics, are those of its real images.

A camera's style row: mean (3), covariance (3x3, row-major), octiles (3 x 7) of its images' pixels
in [0, 1], averaged over the camera's images: 33 float32 numbers, never an image.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from reid.data.transforms import IMAGENET_MEAN, IMAGENET_STD

QUANTILES = tuple((i + 1) / 8 for i in range(7))
STYLE_WIDTH = 3 + 9 + 3 * len(QUANTILES)
QUANTILE_LIMIT = 2 ** 24
_EPS = 1e-4


@dataclass(frozen=True)
class StyleConfig:
    """Cross-client style knobs (off unless ``enabled``)."""

    enabled: bool = False
    share: bool = True  # targets from the other sites' camera styles; False: another image of the batch
    probability: float = 0.5  # share of each batch restyled
    tone: bool = True  # map each channel's value distribution (tone curves); False: colour moments only
    clean_bn: bool = True  # keep restyled samples out of BatchNorm's running statistics

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"style.probability must be in [0, 1], got {self.probability}")


def image_styles(images: torch.Tensor) -> torch.Tensor:
    """Per image [N, STYLE_WIDTH]: pixel mean, covariance and per-channel octiles of ``images``
    ([N, 3, H, W], float in [0, 1] or uint8)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    flat = x.flatten(2)  # [N, 3, P]
    mean = flat.mean(2)
    centred = flat - mean[:, :, None]
    cov = centred @ centred.transpose(1, 2) / flat.shape[2]
    octiles = torch.quantile(flat, torch.tensor(QUANTILES, device=x.device), dim=2).permute(1, 2, 0)  # [N, 3, 7]
    return torch.cat([mean, cov.flatten(1), octiles.flatten(1)], dim=1)


def camera_styles(images: torch.Tensor, cameras: np.ndarray) -> np.ndarray:
    """This site's style: one row per camera (in camera order), the mean of its images' styles."""
    batch = max(1, QUANTILE_LIMIT // max(1, images[0].numel()))  # torch.quantile takes at most 2**24 values
    rows = torch.cat([image_styles(images[i:i + batch]) for i in range(0, len(images), batch)])
    cameras = np.asarray(cameras)
    return np.stack([rows[torch.from_numpy(cameras == cam)].mean(0).numpy() for cam in np.unique(cameras)]
                    ).astype(np.float32)


def _split(style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    count = len(QUANTILES)
    return style[:, :3], style[:, 3:12].reshape(-1, 3, 3), style[:, 12:12 + 3 * count].reshape(-1, 3, count)


def _knots(octiles: torch.Tensor) -> torch.Tensor:
    """[n, 3, 9] strictly increasing knots 0, octiles, 1 (a flat histogram gets a tiny slope)."""
    zeros, ones = torch.zeros_like(octiles[..., :1]), torch.ones_like(octiles[..., :1])
    knots = torch.cat([zeros, octiles.clamp(0, 1), ones], dim=-1)
    ramp = torch.arange(knots.shape[-1], device=knots.device, dtype=knots.dtype) * 1e-4
    return torch.cummax(knots + ramp, dim=-1).values


def _tone_map(x: torch.Tensor, own: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Map each channel of ``x`` [n, 3, P] piecewise-linearly from knots ``own`` onto ``target`` ([n, 3, 9])."""
    n, channels, pixels = x.shape
    source, goal = own.reshape(n * channels, -1), target.reshape(n * channels, -1)
    values = x.reshape(n * channels, pixels).contiguous()
    index = torch.searchsorted(source.contiguous(), values).clamp(1, source.shape[1] - 1)
    low, high = source.gather(1, index - 1), source.gather(1, index)
    t = ((values - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    mapped = goal.gather(1, index - 1) + t * (goal.gather(1, index) - goal.gather(1, index - 1))
    return mapped.reshape(n, channels, pixels)


def restyle(images: torch.Tensor, targets: torch.Tensor, tone: bool = True) -> torch.Tensor:
    """``images`` [n, 3, H, W] in [0, 1] rendered in the ``targets`` styles ([n, STYLE_WIDTH]): tone
    (histogram matching per channel), then colour (whitening-colouring of the 3-channel moments)."""
    n, _, height, width = images.shape
    x = images.flatten(2)
    targets = targets.to(x.device, x.dtype)
    target_mean, target_cov, target_octiles = _split(targets)
    if tone:
        own_octiles = _split(image_styles(images))[2]
        x = _tone_map(x, _knots(own_octiles), _knots(target_octiles))
    mean = x.mean(2, keepdim=True)
    centred = x - mean
    cov = centred @ centred.transpose(1, 2) / x.shape[2]
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    own_root = torch.linalg.cholesky(cov + _EPS * eye)
    target_root = torch.linalg.cholesky(0.5 * (target_cov + target_cov.transpose(1, 2)) + _EPS * eye)
    white = torch.linalg.solve_triangular(own_root, centred, upper=False)
    out = target_root @ white + target_mean[:, :, None]
    return out.clamp(0, 1).reshape(n, 3, height, width)


class StyleSharing:
    """Restyles a share of every training batch (normalised as the network sees it) towards the
    bank's camera styles, and keeps those rows out of BatchNorm's running statistics.

    Call on each batch before the forward pass, inside ``with sharing.clean_running_stats(model):``."""

    def __init__(self, cfg: StyleConfig, bank: np.ndarray | None, seed: int) -> None:
        self.cfg = cfg
        self.bank = torch.from_numpy(np.asarray(bank, dtype=np.float32)) if bank is not None and len(bank) else None
        self.generator = torch.Generator().manual_seed(seed)
        self.restyled = 0
        self._clean: torch.Tensor | None = None  # rows of the current batch that are real images

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        picked = torch.rand(len(x), generator=self.generator) < self.cfg.probability
        if len(x) < 2 or not picked.any():
            self._clean = None
            return x
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
        index = picked.nonzero().flatten()
        pixels = (x[index.to(x.device)] * std + mean).clamp(0, 1).float()
        targets = self._targets(x, picked, pixels.shape[0], mean, std)
        out = x.clone()
        out[index.to(x.device)] = ((restyle(pixels, targets, self.cfg.tone) - mean) / std).to(x.dtype)
        self._clean = ~picked.to(x.device)
        self.restyled += int(picked.sum())
        return out

    def _targets(self, x: torch.Tensor, picked: torch.Tensor, count: int, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor:
        """Styles to render ``count`` images in: rows of the bank (other sites' cameras), or without
        sharing (or before any site has shared) other images of the batch."""
        if self.cfg.share and self.bank is not None:
            return self.bank[torch.randint(0, len(self.bank), (count,), generator=self.generator)]
        own = picked.nonzero().flatten()
        others = torch.randint(0, len(x) - 1, (count,), generator=self.generator)
        others = others + (others >= own).long()  # never the image itself
        return image_styles((x[others.to(x.device)] * std + mean).clamp(0, 1))

    @contextmanager
    def clean_running_stats(self, model: nn.Module) -> Iterator[None]:
        """While active, every BatchNorm layer normalises the whole batch but updates its running
        statistics from the batch's real (not restyled) rows only."""
        if not self.cfg.clean_bn:
            yield
            return
        handles = []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                handles.append(module.register_forward_pre_hook(self._update_from_clean_rows))
                handles.append(module.register_forward_hook(_restore_momentum))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _update_from_clean_rows(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple) -> None:
        clean = self._clean
        if not module.training or clean is None or clean.all() or len(inputs[0]) != len(clean):
            return
        module._saved_momentum = module.momentum  # type: ignore[attr-defined]
        momentum = 0.1 if module.momentum is None else module.momentum
        module.momentum = 0.0  # the forward pass itself then leaves the running statistics alone
        rows = inputs[0][clean].detach().float()
        if len(rows) < 2:
            return
        dims = [0] + list(range(2, rows.dim()))
        count = rows.numel() / rows.shape[1]
        with torch.no_grad():
            mean = rows.mean(dims)
            var = rows.var(dims, unbiased=False) * count / max(count - 1, 1)
            module.running_mean.mul_(1 - momentum).add_(momentum * mean.to(module.running_mean.dtype))
            module.running_var.mul_(1 - momentum).add_(momentum * var.to(module.running_var.dtype))


def _restore_momentum(module: nn.Module, _inputs: tuple, _output: torch.Tensor) -> None:
    if hasattr(module, "_saved_momentum"):
        module.momentum = module._saved_momentum  # type: ignore[assignment]
        del module._saved_momentum
