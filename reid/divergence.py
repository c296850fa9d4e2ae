"""How far a site's model moved in one round, and FedKLPR's KL regulariser.

``cosine_logit_distance`` is FedReID's Cosine Distance Weight (CDW): the mean over a batch of
1 - cos(logits of the received global model with the site's previous head, logits of the trained
model with its new head). Sites that changed more get more weight.

The reference computes it in train mode on the first augmented batch, so dropout and batch
statistics make it noisy; here it is computed in eval mode on a batch fixed per round and site
(test transform, seeded choice), so the value depends only on the two models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from reid.data.batch_augment import normalise
from reid.data.tensor_cache import LabelledImages
from reid.models import ReIDNet


def fixed_batch(images: LabelledImages, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, labels) of ``size`` images chosen by ``seed`` (without replacement): what
    the test transform would give, from the decoded cache."""
    rng = np.random.default_rng(seed)
    indices = torch.tensor(sorted(int(i) for i in rng.choice(len(images), size=min(size, len(images)),
                                                              replace=False)))
    return normalise(images.images[indices]), images.labels[indices]


def cosine_logit_distance(before: torch.Tensor, after: torch.Tensor) -> float:
    """mean_x [1 - cos(before(x), after(x))]; in [0, 2]."""
    return float((1.0 - F.cosine_similarity(before, after, dim=1)).mean())


FEATURE_TAU = 0.1  # temperature of the softmax over the 512 L2-normalised feature dimensions (KLAW)


@torch.no_grad()
def eval_outputs(model: ReIDNet, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity logits, L2-normalised bottleneck features) in eval mode, on the CPU, from one forward
    pass (the change measures need both, before and after training)."""
    model.to(device).eval()
    features = model.features(images.to(device))
    logits = model.classifier(features) if model.classifier is not None else features
    return logits.float().cpu(), F.normalize(features.float(), dim=1).cpu()


def feature_kl(reference: torch.Tensor, features: torch.Tensor, tau: float = FEATURE_TAU) -> float:
    """KL(softmax(reference/tau) || softmax(features/tau)) over feature dimensions, batch mean.

    FedKLPR's KLAW: how far a site's model moved from the global one, on features rather than
    logits, because features are shared by every site while heads (and their sizes) are not; a
    logit-based value grows with a site's number of identities and would swamp the weights.
    """
    return float(F.kl_div(F.log_softmax(features / tau, dim=1), F.log_softmax(reference / tau, dim=1),
                          log_target=True, reduction="batchmean"))


def softened_kl(reference_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(reference/tau) || softmax(logits/tau)), averaged over the batch (Hinton scaling)."""
    return F.kl_div(F.log_softmax(logits / tau, dim=1), F.log_softmax(reference_logits / tau, dim=1),
                    log_target=True, reduction="batchmean") * tau * tau


KLL_TARGETS = ("features", "logits")


@dataclass(frozen=True)
class KLLConfig:
    """FedKLPR's KL regularisation: loss += weight * KL(global model || local model) on a batch.

    ``target="features"`` (the paper's wording: it "enforces alignment between the local model's
    feature distribution and the global model's"): softmax over the 512 L2-normalised bottleneck
    dimensions at ``tau``, the global side a frozen copy of the received model in eval mode.
    ``target="logits"`` (the first reconstruction): tau^2 KL of the softened identity logits, the
    global side the received backbone with the site's previous head; on the nine sites it held the
    models near the previous round's predictions and halved the training accuracy reached by round
    10 (0.27 against FedPav's 0.61). Both sides see the same augmented batch of local images; in the
    first round the received model is untrained, so the term starts at ``start_round``.
    """

    enabled: bool = False
    weight: float = 1.0
    tau: float = 0.1
    start_round: int = 2
    target: str = "features"

    def __post_init__(self) -> None:
        if self.target not in KLL_TARGETS:
            raise ValueError(f"kll.target must be one of {KLL_TARGETS}, got {self.target!r}")


def kl_regulariser(model: ReIDNet, cfg: KLLConfig) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """An extra-loss hook for ``train_local``: freezes a copy of ``model`` as it is now."""
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)

    layout: list[torch.memory_format] = []

    def loss(images: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not layout and images.is_cuda and images.is_contiguous(memory_format=torch.channels_last):
            reference.to(memory_format=torch.channels_last)  # the layout the batches come in, once
            layout.append(torch.channels_last)
        with torch.no_grad():
            if cfg.target == "features":
                reference_side = F.normalize(reference.features(images).float(), dim=1)
            else:
                reference_side = reference(images).float()
        if cfg.target == "features":
            return cfg.weight * softened_kl(reference_side, F.normalize(features.float(), dim=1), cfg.tau) / (
                cfg.tau * cfg.tau)
        return cfg.weight * softened_kl(reference_side, logits.float(), cfg.tau)

    return loss
