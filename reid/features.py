"""Feature extraction as in the reference: eval mode, feature(image) + feature(flipped image), L2.

The images come decoded (reid/data/tensor_cache.py) and are normalised and flipped on the device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from reid.data.batch_augment import normalise
from reid.data.resolution import degrade
from reid.device import autocast, tune_for
from reid.models import ReIDNet


@torch.no_grad()
def embed_batch(model: ReIDNet, batch: torch.Tensor, device: torch.device, flip: bool = True) -> torch.Tensor:
    """One normalised batch on ``device`` -> L2-normalised features(x) + features(flipped x) (``flip``)
    or features(x); the model is in eval mode."""
    with autocast(device):
        feats = model.features(batch)
        if flip:
            feats = feats + model.features(torch.flip(batch, dims=[3]))
    return F.normalize(feats.float(), dim=1)


@torch.no_grad()
def extract_features(model: ReIDNet, images: torch.Tensor, device: torch.device, batch_size: int = 128,
                     scale: float = 1.0, flip: bool = True) -> np.ndarray:
    """uint8 [N, 3, H, W] (or an already normalised float batch) -> features [N, D], float32,
    L2-normalised, in input order; with ``scale`` < 1 each image is first brought to that
    resolution (reid/data/resolution.py); ``flip=False``: one pass, no flip-sum."""
    tune_for(device)
    model.to(device).eval()
    feats = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = normalise(degrade(batch, scale))
        feats.append(embed_batch(model, batch, device, flip))
    if not feats:
        return np.zeros((0, model.spec.bottleneck_dim), dtype=np.float32)
    return torch.cat(feats).cpu().numpy()


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of L2-normalised rows, float32 [Q, G]."""
    return (1.0 - torch.from_numpy(query) @ torch.from_numpy(gallery).T).numpy()


@torch.no_grad()
def adapt_batchnorm(model: ReIDNet, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> None:
    """Recompute every BatchNorm's running statistics on ``images`` (uint8, unaugmented): what a
    site does with a model whose statistics stayed elsewhere (``bn_stats=local``). A cumulative
    average over all batches (momentum None), in train mode, with dropout's randomness unused."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    model.to(device).train()
    for start in range(0, len(images) - 1, batch_size):  # stops short of a last batch of one (no statistics)
        model.features(normalise(images[start:start + batch_size].to(device, non_blocking=True)))
    for module, momentum in zip(norms, saved):
        module.momentum = momentum
    model.eval()
