"""One local training pass, as in the FedReID reference, fed from a decoded tensor cache.

SGD with Nesterov momentum 0.9 and weight decay 5e-4; lr for the bottleneck and classifier, a
multiple (0.1 in the reference) for the backbone; batch 32 with the incomplete last batch
dropped (a batch of one breaks BatchNorm1d); a new optimiser every call, as the reference
re-creates it every round. An optional extra loss term (for instance a KL divergence to the
received global model) is added to the identity cross-entropy.

Speed on a GPU: the images are decoded once (reid/data/tensor_cache.py) and augmented on the
device per batch (reid/data/batch_augment.py); channels_last, bf16 autocast (fp16 with a loss
scaler on GPUs without bf16) and cuDNN autotuning; loss and accuracy are summed on the device
and read back only when progress is logged, so a step never waits for the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from reid.data.batch_augment import BatchAugmenter
from reid.data.tensor_cache import LabelledImages, place
from reid.data.transforms import AugmentSpec
from reid.device import autocast, needs_grad_scaler, tune_for
from reid.models import ReIDNet
from reid.raf import MultiResolution

log = logging.getLogger(__name__)

AUGMENT_STREAM = 0x5DEECE66D  # mixed into the seed so that batch order and augmentation draw different streams

ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(images, bottleneck features, logits) of a batch -> a loss term added to the cross-entropy."""


class FeatureHead(Protocol):
    """A classifier kept outside the model (FedUReID's cluster memory, reid/buc.py): logits from the
    bottleneck features, and an update from each batch's features after the optimiser step."""

    def logits(self, features: torch.Tensor) -> torch.Tensor: ...

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None: ...
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
    num_workers: int = 4  # threads decoding the site's images into the tensor cache
    device_cache_mb: float = 8000.0  # decoded images up to this size live on the GPU; beyond, in pinned memory
    channels_last: bool = True  # on a GPU: NHWC convolutions (tensor cores)


@dataclass(frozen=True)
class TrainStats:
    """What one local pass did, for the client's reply and the logs."""

    loss: float
    accuracy: float
    images: int
    batches: int
    seconds: float
    epochs: int = 0  # epochs run (fewer than asked when ``stop_accuracy`` ended training early)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: ReIDNet, cfg: TrainConfig) -> torch.optim.SGD:
    """Two parameter groups: the backbone at lr*backbone_lr_mult, bottleneck and classifier at lr.

    The default (foreach) implementation: ``fused=True`` with momentum and a GradScaler leaves the
    momentum buffers uninitialised after an overflow on the first step (torch 2.11 and 2.14)."""
    backbone = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    return torch.optim.SGD(
        [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult}, {"params": head, "lr": cfg.lr}],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
    )


def epoch_order(size: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of indices: a seeded permutation, the incomplete last batch dropped
    (unless the set is smaller than a batch: then one batch of all)."""
    if size < 2:
        raise ValueError(f"cannot train on {size} image(s): BatchNorm needs batches of at least 2")
    batch = min(batch_size, size)
    order = torch.randperm(size, generator=generator)
    return [order[start:start + batch] for start in range(0, size - batch + 1, batch)]


class BatchFeeder:
    """uint8 batches on the training device, from a cache on that device or in pinned host memory.

    From host memory, each batch is gathered into one of two pinned staging buffers and copied
    asynchronously; a buffer is reused only once its previous copy has finished."""

    def __init__(self, images: torch.Tensor, device: torch.device) -> None:
        self.images, self.device = images, device
        self.on_device = images.device == device or device.type != "cuda"
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def __call__(self, indices: torch.Tensor, device_indices: torch.Tensor) -> torch.Tensor:
        """The batch at ``indices`` (on the host) / ``device_indices`` (the same, on the device)."""
        if self.on_device:
            return self.images[device_indices]
        if len(self._staging) < 2 or self._staging[0][0].shape[0] != len(indices):
            shape = (len(indices), *self.images.shape[1:])
            self._staging = [(torch.empty(shape, dtype=torch.uint8).pin_memory(), None) for _ in range(2)]
        buffer, event = self._staging.pop(0)
        if event is not None:
            event.synchronize()
        torch.index_select(self.images, 0, indices, out=buffer)
        batch = buffer.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._staging.append((buffer, done))
        return batch


def _steps(images: LabelledImages, cfg: TrainConfig, seed: int, device: torch.device,
           augment: AugmentSpec) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
    """(epoch, step, steps per epoch, augmented images, labels) for every step, seeded by ``seed``."""
    feeder = BatchFeeder(place(images.images, device, cfg.device_cache_mb), device)
    labels = images.labels.to(device)
    augmenter = BatchAugmenter(augment, images.images.shape[2])
    order_generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator(device=device).manual_seed(seed ^ AUGMENT_STREAM)  # not the order's stream
    memory_format = torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format
    for epoch in range(cfg.local_epochs):
        batches = epoch_order(len(images), cfg.batch_size, order_generator)
        on_device = torch.stack(batches).to(device)  # one copy per epoch, not one per step
        for step, (indices, device_indices) in enumerate(zip(batches, on_device), start=1):
            x = augmenter(feeder(indices, device_indices), augment_generator).contiguous(memory_format=memory_format)
            yield epoch, step, len(batches), x, labels[device_indices]


def train_local(
    model: ReIDNet,
    images: LabelledImages,
    cfg: TrainConfig,
    device: torch.device,
    seed: int = 0,
    augment: AugmentSpec = AugmentSpec(),
    extra_loss: ExtraLoss | None = None,
    after_step: Callable[[], None] | None = None,
    label: str = "",
    head: FeatureHead | None = None,
    stop_accuracy: float | None = None,
    multires: MultiResolution | None = None,
    restyle: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainStats:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs; logs progress about five times an epoch.

    ``extra_loss(images, features, logits)`` is added to the cross-entropy; ``after_step()`` runs after every
    optimiser step. With ``head`` the logits come from it instead of the model's classifier, and it
    is updated with each batch's features after the step. With ``stop_accuracy`` training ends after
    the first epoch whose training accuracy reaches it (FedUReID's dynamic epochs). The same seed
    gives the same batches and augmentations on the same device. With ``multires`` (RAF, reid/raf.py)
    every batch also passes at lower resolutions and their loss is added. ``restyle(x)`` transforms each
    augmented batch before it enters the network (feddg's style sharing, reid/style.py)."""
    if model.classifier is None and head is None:
        raise ValueError("train_local needs a model with an identity classifier, or a feature head")
    tune_for(device)
    classify: Callable[[torch.Tensor], torch.Tensor] = head.logits if head is not None else model.classifier
    model.to(device).train()
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device))
    criterion = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, batches, epochs = 0, 0, 0
    epoch_correct = torch.zeros((), dtype=torch.long, device=device)
    epoch_seen = 0
    start = time.perf_counter()
    for epoch, step, steps, x, y in _steps(images, cfg, seed, device, augment):
        if restyle is not None:
            x = restyle(x)
        with autocast(device):
            if multires is None:
                features = model.features(x)
            else:  # the full-resolution rows teach the lower-resolution copies of the batch
                feature_map = model.feature_map(multires.batch(x))
                embedding = model.embedding(feature_map)
                features = model.bottleneck[2](embedding[:len(y)])  # dropout
            logits = classify(features)
            loss = criterion(logits, y)
            if multires is not None:
                loss = loss + multires.loss(feature_map, embedding, y, classify, model.bottleneck[2], criterion)
            if extra_loss is not None:
                loss = loss + extra_loss(x, features, logits)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:  # e.g. re-apply pruning masks, so pruned weights stay zero
            after_step()
        if head is not None:
            head.update(features.detach().float(), y)
        hits = (logits.detach().argmax(1) == y).sum()
        loss_sum += loss.detach().float() * len(y)
        correct += hits
        epoch_correct += hits
        seen += len(y)
        epoch_seen += len(y)
        batches += 1
        if step % max(1, steps // 5) == 0 or step == steps:  # the only host-device syncs
            mean_loss = loss_sum.item() / seen
            if not torch.isfinite(torch.tensor(mean_loss)):
                raise FloatingPointError(f"{label} local training diverged (loss {mean_loss}); lower the lr")
            log.info("%s epoch %d/%d batch %d/%d loss %.3f acc %.3f %.1f img/s", label, epoch + 1, cfg.local_epochs,
                     step, steps, mean_loss, correct.item() / seen, seen / (time.perf_counter() - start))
        if step == steps:
            epochs += 1
            epoch_accuracy = epoch_correct.item() / epoch_seen
            epoch_correct.zero_()
            epoch_seen = 0
            if stop_accuracy is not None and epochs < cfg.local_epochs and epoch_accuracy >= stop_accuracy:
                log.info("%s training accuracy %.3f reached %.3f after epoch %d of %d: stopping early", label,
                         epoch_accuracy, stop_accuracy, epochs, cfg.local_epochs)
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.contiguous_format)  # state_dict consumers expect the usual layout
    return TrainStats(loss=loss_sum.item() / max(seen, 1), accuracy=correct.item() / max(seen, 1), images=seen,
                      batches=batches, seconds=seconds, epochs=epochs)
