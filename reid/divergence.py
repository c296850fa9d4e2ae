"""How far a site's model moved in one round, measured on a batch of its own images.

``cosine_logit_distance`` is FedReID's Cosine Distance Weight (CDW): the mean over a batch of
1 - cos(logits of the received global model with the site's previous head, logits of the trained
model with its new head). Sites that changed more get more weight.

The reference computes it in train mode on the first augmented batch, so dropout and batch
statistics make it noisy; here it is computed in eval mode on a batch fixed per round and site
(test transform, seeded choice), so the value depends only on the two models.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from reid.models import ReIDNet


def fixed_batch(dataset: Dataset, size: int, seed: int) -> torch.Tensor:
    """``size`` images of ``dataset`` chosen by ``seed`` (without replacement), stacked."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(size, len(dataset)), replace=False)
    return torch.stack([dataset[int(i)][0] for i in sorted(indices)])


@torch.no_grad()
def eval_logits(model: ReIDNet, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's identity logits in eval mode, on the CPU."""
    model.to(device).eval()
    return model(images.to(device)).float().cpu()


def cosine_logit_distance(before: torch.Tensor, after: torch.Tensor) -> float:
    """mean_x [1 - cos(before(x), after(x))]; in [0, 2]."""
    return float((1.0 - F.cosine_similarity(before, after, dim=1)).mean())
