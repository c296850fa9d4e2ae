"""Cross-client style sharing for federated domain generalisation (the ``feddg_ccst`` presets).

After CCST (Chen, Jiang, Zhang, Lu, "Federated Domain Generalization for Image Recognition via
Cross-Client Style Transfer", WACV 2023): every site shares a summary of its images' *style*,
the server gathers them into a style bank and sends it to every site, and each site trains on its
own images rendered in the other sites' styles, so that the shared model sees every camera
domain of the federation without any image leaving its site.

What differs from the paper, and why:

* CCST restyles images with a pretrained AdaIN encoder/decoder (VGG). No pretrained weights can be
  had here, so the style is transferred where MixStyle (Zhou et al., ICLR'21) and the FedDG-ReID
  methods put it: on the channel statistics of the backbone's first stage (``layer1``), whose
  means and standard deviations carry a camera's illumination, colour cast and texture.
* CCST's "overall domain style" is one (mean, std) per site. Here a site's style is a small
  distribution: the mean and the spread over its images of the per-image channel means and
  standard deviations (``[4, C]``: mean of mu, std of mu, mean of sigma, std of sigma), so that
  a target style can be drawn from it (``spread``; off = CCST's single domain style).
* The encoder changes every round, so the styles are measured again in every round's training
  pass (from the images' un-restyled features, at no extra forward pass) and shared with the
  update.

In every step a share ``probability`` of the batch is restyled: x' = (x - mu(x)) / sigma(x) *
sigma_mix + mu_mix, with (mu_mix, sigma_mix) = lam * (mu(x), sigma(x)) + (1 - lam) * target and
lam ~ Beta(alpha, alpha) (MixStyle's mixing); mu and sigma of x are detached, as in MixStyle.
``share: false`` is the ablation without any sharing: the target is another image of the same
batch (MixStyle within one site), so a site sees only its own cameras' styles.

What travels: [4, C] float32 per site up (C = 64 for resnet10 and resnet50: 1 KB), the bank of the
other sites down; statistics averaged over a whole site's training pass, never an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_EPS = 1e-6


@dataclass(frozen=True)
class StyleConfig:
    """Cross-client style knobs (off unless ``enabled``)."""

    enabled: bool = False
    share: bool = True  # targets from the other sites' shared styles; False: another image of the batch
    probability: float = 0.5  # share of each batch restyled
    alpha: float = 0.1  # lam ~ Beta(alpha, alpha) mixes the image's own style with the target
    spread: bool = True  # draw targets from each site's style distribution; False: its mean style only
    layer: str = "layer1"  # the backbone stage whose output is restyled

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0 or self.alpha <= 0:
            raise ValueError(f"style.probability must be in [0, 1] and style.alpha > 0, got {self}")


def style_stage(model: nn.Module, layer: str) -> nn.Module:
    """The backbone stage that ``layer`` names, or a clear error for a backbone without it."""
    stage = getattr(getattr(model, "backbone", None), layer, None)
    if not isinstance(stage, nn.Module):
        raise ValueError(f"style sharing restyles the backbone's {layer!r} stage, which this backbone lacks "
                         "(ResNets have layer1..layer4)")
    return stage


class StyleMixer:
    """Restyles a share of every training batch at ``layer`` and measures the site's own style.

    Use as a context manager around the training pass: the hook acts only in train mode."""

    def __init__(self, model: nn.Module, cfg: StyleConfig, bank: np.ndarray | None, seed: int) -> None:
        self.cfg = cfg
        self.stage = style_stage(model, cfg.layer)
        self.bank = torch.from_numpy(np.asarray(bank, dtype=np.float32)) if bank is not None and len(bank) else None
        self.generator = torch.Generator().manual_seed(seed)
        self._sums: torch.Tensor | None = None  # [4, C]: sum mu, sum mu^2, sum sigma, sum sigma^2
        self._count = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self.restyled = 0

    def __enter__(self) -> "StyleMixer":
        self._handle = self.stage.register_forward_hook(self._hook)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training or out.dim() != 4 or len(out) < 2:
            return None
        mu = out.mean(dim=(2, 3), keepdim=True).detach()
        sigma = (out.var(dim=(2, 3), keepdim=True) + _EPS).sqrt().detach()
        self._measure(mu.flatten(1).float(), sigma.flatten(1).float())
        picked = torch.rand(len(out), generator=self.generator) < self.cfg.probability
        if not picked.any():
            return None
        target_mu, target_sigma = self._targets(mu, sigma, int(picked.sum()), picked)
        lam = torch.distributions.Beta(self.cfg.alpha, self.cfg.alpha).sample((int(picked.sum()), 1, 1, 1))
        lam = lam.to(out.device, out.dtype)
        index = picked.nonzero().flatten().to(out.device)
        mix_mu = lam * mu[index] + (1 - lam) * target_mu
        mix_sigma = lam * sigma[index] + (1 - lam) * target_sigma
        restyled = out.clone()
        restyled[index] = (out[index] - mu[index]) / sigma[index] * mix_sigma + mix_mu
        self.restyled += int(picked.sum())
        return restyled

    def _targets(self, mu: torch.Tensor, sigma: torch.Tensor, count: int,
                 picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) to restyle ``count`` images towards: drawn from the bank's sites, or, without
        sharing (or before any site has shared), other images of the batch."""
        shape = (count, mu.shape[1], 1, 1)
        if not self.cfg.share or self.bank is None:
            others = torch.randint(0, len(mu) - 1, (count,), generator=self.generator)
            own = picked.nonzero().flatten()
            others = others + (others >= own).long()  # never the image itself
            return mu[others.to(mu.device)], sigma[others.to(mu.device)]
        styles = self.bank[torch.randint(0, len(self.bank), (count,), generator=self.generator)]  # [n, 4, C]
        mean_mu, spread_mu, mean_sigma, spread_sigma = styles.unbind(1)
        if self.cfg.spread:
            mean_mu = mean_mu + spread_mu * torch.randn(mean_mu.shape, generator=self.generator)
            mean_sigma = mean_sigma + spread_sigma * torch.randn(mean_sigma.shape, generator=self.generator)
        target_mu = mean_mu.reshape(shape).to(mu.device, mu.dtype)
        target_sigma = mean_sigma.clamp_min(_EPS).reshape(shape).to(sigma.device, sigma.dtype)
        return target_mu, target_sigma

    def _measure(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        sums = torch.stack([mu.sum(0), (mu ** 2).sum(0), sigma.sum(0), (sigma ** 2).sum(0)]).cpu()
        self._sums = sums if self._sums is None else self._sums + sums
        self._count += len(mu)

    def site_style(self) -> np.ndarray:
        """This site's style over the training pass: [4, C] float32 (mean/std of mu, mean/std of sigma)."""
        if self._sums is None or self._count == 0:
            raise RuntimeError("no training batch passed the style stage; nothing to share")
        n = float(self._count)
        mean_mu, mean_sigma = self._sums[0] / n, self._sums[2] / n
        spread_mu = (self._sums[1] / n - mean_mu ** 2).clamp_min(0).sqrt()
        spread_sigma = (self._sums[3] / n - mean_sigma ** 2).clamp_min(0).sqrt()
        return torch.stack([mean_mu, spread_mu, mean_sigma, spread_sigma]).numpy().astype(np.float32)
