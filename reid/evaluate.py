"""Rank a site's gallery for its own queries with a model: extraction plus the standard metric."""

from __future__ import annotations

import torch

from reid.data.dataset import ImageDataset, ReIDData
from reid.data.transforms import test_transform
from reid.features import cosine_distance, extract_features
from reid.metrics import RankResult, evaluate_rank
from reid.models import ReIDNet


def evaluate_model(model: ReIDNet, data: ReIDData, device: torch.device, batch_size: int = 128,
                   num_workers: int = 0) -> RankResult:
    """Features of query and gallery (flip-summed, L2), cosine distances, CMC/mAP/mINP."""
    transform = test_transform(model.spec.height, model.spec.width)
    q_feats, q_pids, q_cams = extract_features(model, ImageDataset(data.query, transform), device,
                                               batch_size, num_workers)
    g_feats, g_pids, g_cams = extract_features(model, ImageDataset(data.gallery, transform), device,
                                               batch_size, num_workers)
    return evaluate_rank(cosine_distance(q_feats, g_feats), q_pids, g_pids, q_cams, g_cams)
