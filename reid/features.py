"""Feature extraction as in the reference: eval mode, feature(image) + feature(flipped image), L2."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from reid.device import autocast
from reid.models import ReIDNet


@torch.no_grad()
def extract_features(
    model: ReIDNet, dataset: Dataset, device: torch.device, batch_size: int = 128, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (features [N, D] float32 L2-normalised, pids [N], camids [N]) in dataset order."""
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, pids, camids = [], [], []
    for images, batch_pids, batch_cams in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device):
            summed = model.features(images) + model.features(torch.flip(images, dims=[3]))
        feats.append(F.normalize(summed.float(), dim=1).cpu())
        pids.append(batch_pids)
        camids.append(batch_cams)
    return (torch.cat(feats).numpy(), torch.cat(pids).numpy(), torch.cat(camids).numpy())


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of L2-normalised rows, float32 [Q, G]."""
    return (1.0 - torch.from_numpy(query) @ torch.from_numpy(gallery).T).numpy()
