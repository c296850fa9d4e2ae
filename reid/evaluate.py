"""Rank a site's gallery for its own queries with a model: extraction plus the standard metric,
at the native resolution and, for resolution drift, with the queries at lower resolutions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reid.data.dataset import ReIDData
from reid.data.layout import Sample
from reid.data.tensor_cache import load_images, place
from reid.features import extract_features
from reid.metrics import RankResult, evaluate_features
from reid.models import ReIDNet

def _split_features(model: ReIDNet, samples: list[Sample], device: torch.device, batch_size: int,
                    cache_dir: Path | None, workers: int, cache_mb: float,
                    scales: tuple[float, ...] = (1.0,)) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Features of the split at each of ``scales`` (1 = as stored), its pids and cameras."""
    images = place(load_images([s.path for s in samples], model.spec.height, model.spec.width, cache_dir, workers),
                   device, cache_mb)
    features = [extract_features(model, images, device, batch_size, scale) for scale in scales]
    return features, np.array([s.pid for s in samples]), np.array([s.camid for s in samples])


def evaluate_model(model: ReIDNet, data: ReIDData, device: torch.device, batch_size: int = 128,
                   cache_dir: Path | None = None, workers: int = 4, cache_mb: float = 8000.0) -> RankResult:
    """Features of query and gallery (flip-summed, L2), CMC/mAP/mINP from their cosine distances
    (computed a chunk of queries at a time, never the whole matrix); decoded
    images up to ``cache_mb`` (the site's ``train.device_cache_mb``) stay on the GPU."""
    return evaluate_at_scales(model, data, device, (), batch_size, cache_dir, workers, cache_mb)[1.0]


def evaluate_at_scales(model: ReIDNet, data: ReIDData, device: torch.device, query_scales: tuple[float, ...],
                       batch_size: int = 128, cache_dir: Path | None = None, workers: int = 4,
                       cache_mb: float = 8000.0) -> dict[float, RankResult]:
    """{1.0: native result, s: result with every query at s × the resolution, for s in
    ``query_scales``}, always against the native gallery (a low-resolution camera looking for
    people a sharp one recorded)."""
    scales = (1.0, *query_scales)
    q_feats, q_pids, q_cams = _split_features(model, data.query, device, batch_size, cache_dir, workers, cache_mb,
                                              scales)
    (g_feats,), g_pids, g_cams = _split_features(model, data.gallery, device, batch_size, cache_dir, workers,
                                                 cache_mb)
    return {scale: evaluate_features(features, g_feats, q_pids, g_pids, q_cams, g_cams)
            for scale, features in zip(scales, q_feats)}
