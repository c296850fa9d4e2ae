"""One local training pass, as in the FedReID reference.

SGD with Nesterov momentum 0.9 and weight decay 5e-4; lr for the bottleneck and classifier, a
multiple (0.1 in the reference) for the backbone; batch 32 with the incomplete last batch
dropped (a batch of one breaks BatchNorm1d); a new optimiser every call, as the reference
re-creates it every round. An optional extra loss term (for instance a KL divergence to the
received global model) is added to the identity cross-entropy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reid.device import autocast
from reid.models import ReIDNet

log = logging.getLogger(__name__)

ExtraLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(images, logits) -> scalar loss added to the cross-entropy."""


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation knobs; defaults are the FedReID reference values."""

    lr: float = 0.05
    backbone_lr_mult: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    batch_size: int = 32
    local_epochs: int = 1
    num_workers: int = 0


@dataclass(frozen=True)
class TrainStats:
    """What one local pass did, for the client's reply and the logs."""

    loss: float
    accuracy: float
    images: int
    batches: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: ReIDNet, cfg: TrainConfig) -> torch.optim.SGD:
    """Two parameter groups: the backbone at lr*backbone_lr_mult, bottleneck and classifier at lr."""
    backbone = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    return torch.optim.SGD(
        [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult}, {"params": head, "lr": cfg.lr}],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
    )


def make_train_loader(dataset: Dataset, cfg: TrainConfig, seed: int, device: torch.device) -> DataLoader:
    """Shuffled, seeded loader; drops the last incomplete batch unless the set is smaller than a batch."""
    size = len(dataset)
    if size < 2:
        raise ValueError(f"cannot train on {size} image(s): BatchNorm needs batches of at least 2")
    batch = min(cfg.batch_size, size)
    return DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def train_local(
    model: ReIDNet,
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    seed: int = 0,
    extra_loss: ExtraLoss | None = None,
    after_step: Callable[[], None] | None = None,
    label: str = "",
) -> TrainStats:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs; logs progress about five times an epoch.

    ``extra_loss(images, logits)`` is added to the cross-entropy; ``after_step()`` runs after every
    optimiser step."""
    if model.classifier is None:
        raise ValueError("train_local needs a model with an identity classifier")
    model.to(device).train()
    loader = make_train_loader(dataset, cfg, seed, device)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen, batches = 0.0, 0, 0, 0
    report_every = max(1, len(loader) // 5)
    start = time.perf_counter()
    for epoch in range(cfg.local_epochs):
        for step, (images, labels, _cams) in enumerate(loader, start=1):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device):
                logits = model(images)
                loss = criterion(logits, labels)
                if extra_loss is not None:
                    loss = loss + extra_loss(images, logits)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label} local training diverged (loss {loss.item()}); lower the lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:  # e.g. re-apply pruning masks, so pruned weights stay zero
                after_step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            batches += 1
            if step % report_every == 0 or step == len(loader):
                elapsed = time.perf_counter() - start
                log.info("%s epoch %d/%d batch %d/%d loss %.3f acc %.3f %.1f img/s", label, epoch + 1,
                         cfg.local_epochs, step, len(loader), total_loss / seen, correct / seen, seen / elapsed)
    seconds = time.perf_counter() - start
    return TrainStats(loss=total_loss / max(seen, 1), accuracy=correct / max(seen, 1), images=seen,
                      batches=batches, seconds=seconds)
