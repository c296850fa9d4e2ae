"""Server-side steps that need a model and the public images: KD refinement and model embeddings.

They are handed to the strategy as plain callables on ArrayRecords, so ``strategies/`` stays free
of images and datasets.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.supercore import log

from reid.config import SiteRunSpec
from reid.data.dataset import ImageDataset
from reid.data.public import load_public_images
from reid.data.transforms import test_transform, train_transform
from reid.device import pick_device
from reid.distill import DistillConfig, distill, model_embedding
from reid.models import ReIDNet, build_model, load_shared_state, shared_state
from reid.seeding import stable_seed


class PublicSteps:
    """KD and embeddings on the server's public images, for models given as SHARED ArrayRecords."""

    def __init__(self, public_root: str | Path, spec: SiteRunSpec, kd: DistillConfig, embed_batch: int = 32,
                 device: torch.device | None = None) -> None:
        self.spec = spec
        self.kd = kd
        self.device = device or pick_device()
        self.samples = load_public_images(Path(public_root).expanduser().resolve(), spec.verify_images)
        self.train_set = ImageDataset(self.samples, train_transform(spec.augment, spec.model.height, spec.model.width))
        eval_set = ImageDataset(self.samples[:embed_batch], test_transform(spec.model.height, spec.model.width))
        self.embed_images = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
        self.has_running_stats = spec.bn_stats == "average"  # otherwise uploads carry no BN statistics
        log(INFO, "public set %s: %d images", public_root, len(self.samples))

    def model(self, arrays: ArrayRecord) -> ReIDNet:
        model = build_model(self.spec.model)
        load_shared_state(model, arrays.to_torch_state_dict(), self.spec.bn_stats)
        return model

    def refine(self, server_round: int, aggregated: ArrayRecord, uploads: list[ArrayRecord]) -> ArrayRecord:
        """Distil the uploaded models into the aggregated one on the public images."""
        student = self.model(aggregated)
        stats = distill(student, [self.model(a) for a in uploads], self.train_set, self.kd, self.device,
                        seed=stable_seed(self.spec.seed, "kd", server_round),
                        teachers_have_running_stats=self.has_running_stats)
        log(INFO, "round %d KD: %d batches, MSE %.4f -> %.4f, %.1f s", server_round, stats.batches,
            stats.loss_first_batch, stats.loss_last_batch, stats.seconds)
        return ArrayRecord(shared_state(student, self.spec.bn_stats))

    def embed(self, uploads: list[ArrayRecord]) -> np.ndarray:
        """One row per uploaded model: its normalised features on the first public batch, flattened."""
        images = self.embed_images.to(self.device)
        return np.stack([model_embedding(self.model(a).to(self.device), images, self.has_running_stats).cpu().numpy()
                         for a in uploads])
