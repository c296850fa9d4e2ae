"""Server-side knowledge distillation (FedReID, ACM MM'20) and model embeddings on public images.

KD: after aggregation the global model (student, train mode) regresses its 512-d bottleneck
features onto the mean of the sites' L2-normalised features (teachers) on public, unlabeled
images, with MSE; no temperature, no labels. The teachers are exactly the models the sites
uploaded, so no extra bytes travel. Only trainable parameters change: the student's BatchNorm
running statistics are restored afterwards, so public images never shift them.

Teachers and embeddings use each model's own running statistics when it has them
(``bn_stats=average``); under ``bn_stats=local`` the uploads carry none, and the batch's statistics
stand in. Dropout is off for teachers (the reference leaves it on, which only adds noise to the
targets).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from reid.models import ReIDNet


@dataclass(frozen=True)
class DistillConfig:
    """KD optimisation; the reference uses SGD at 0.01 x lr (5e-4) for one pass over CUHK02."""

    lr: float = 5e-4
    epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class DistillStats:
    loss_first_batch: float
    loss_last_batch: float
    batches: int
    seconds: float


@contextlib.contextmanager
def batch_statistics(model: ReIDNet) -> Iterator[None]:
    """Eval mode, except BatchNorm normalises with the batch's own statistics (running ones untouched)."""
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.train()
        layer.momentum = 0.0  # running = 1.0 * running + 0.0 * batch: unchanged
    try:
        yield
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()


@torch.no_grad()
def normalised_features(model: ReIDNet, images: torch.Tensor, running_stats: bool) -> torch.Tensor:
    """L2-normalised bottleneck features of a batch, dropout off."""
    if running_stats:
        model.eval()
        return F.normalize(model.features(images), dim=1)
    with batch_statistics(model):
        return F.normalize(model.features(images), dim=1)


def model_embedding(model: ReIDNet, images: torch.Tensor, running_stats: bool) -> torch.Tensor:
    """One vector per model: its normalised features on a fixed batch, flattened (batch x 512)."""
    return normalised_features(model, images, running_stats).flatten()


def distill(
    student: ReIDNet,
    teachers: Sequence[ReIDNet],
    public: Dataset,
    cfg: DistillConfig,
    device: torch.device,
    seed: int,
    teachers_have_running_stats: bool,
) -> DistillStats:
    """Refine ``student`` in place towards the teachers' mean normalised features on ``public``."""
    if not teachers:
        raise ValueError("distillation needs at least one teacher model")
    student.to(device).train()
    for teacher in teachers:
        teacher.to(device)
    buffers = {name: b.detach().clone() for name, b in student.named_buffers()}
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    size = len(public)
    loader = DataLoader(public, batch_size=min(cfg.batch_size, size), shuffle=True, drop_last=size >= 2,
                        generator=torch.Generator().manual_seed(seed))
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        for images, _pids, _cams in loader:
            images = images.to(device)
            target = torch.stack([normalised_features(t, images, teachers_have_running_stats)
                                  for t in teachers]).mean(dim=0)
            loss = F.mse_loss(student.features(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        for name, buffer in student.named_buffers():
            buffer.copy_(buffers[name])
    student.eval()
    return DistillStats(losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                        len(losses), time.perf_counter() - start)
