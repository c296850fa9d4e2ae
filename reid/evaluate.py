"""Rank a site's gallery for its own queries with a model: extraction plus the standard metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reid.data.dataset import ReIDData
from reid.data.layout import Sample
from reid.data.tensor_cache import load_images, place
from reid.features import cosine_distance, extract_features
from reid.metrics import RankResult, evaluate_rank
from reid.models import ReIDNet

def _split_features(model: ReIDNet, samples: list[Sample], device: torch.device, batch_size: int,
                    cache_dir: Path | None, workers: int, cache_mb: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = load_images([s.path for s in samples], model.spec.height, model.spec.width, cache_dir, workers)
    features = extract_features(model, place(images, device, cache_mb), device, batch_size)
    return features, np.array([s.pid for s in samples]), np.array([s.camid for s in samples])


def evaluate_model(model: ReIDNet, data: ReIDData, device: torch.device, batch_size: int = 128,
                   cache_dir: Path | None = None, workers: int = 4, cache_mb: float = 8000.0) -> RankResult:
    """Features of query and gallery (flip-summed, L2), cosine distances, CMC/mAP/mINP; decoded
    images up to ``cache_mb`` (the site's ``train.device_cache_mb``) stay on the GPU."""
    q_feats, q_pids, q_cams = _split_features(model, data.query, device, batch_size, cache_dir, workers, cache_mb)
    g_feats, g_pids, g_cams = _split_features(model, data.gallery, device, batch_size, cache_dir, workers, cache_mb)
    return evaluate_rank(cosine_distance(q_feats, g_feats), q_pids, g_pids, q_cams, g_cams)
