"""Identities a site holds back from its training, so that it can tell the server, without labels
ever leaving, whether a round made its model better or worse at re-identifying people it has
never trained on: FedKLPR's Cross-Round Recovery signal.

A site with at least ``min_identities`` training identities holds back ``holdout_fraction`` of
them (at least two), drawn with a seed fixed per run and site, so the same ones every round. The
signal is re-ID, not classification: each held-back image is a query against the other held-back
images plus up to ``DISTRACTORS`` of the site's training images (other people), ranked with the
evaluation's features and protocol (same-camera matches removed). The site reports the mean AP,
its standard error and the number of queries that had a match, so the server can tell a real fall
from noise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from reid.data.dataset import ReIDData
from reid.data.layout import Sample
from reid.features import cosine_distance, extract_features
from reid.metrics import evaluate_rank
from reid.models import ReIDNet
from reid.pruning import CRRConfig

DISTRACTORS = 256


@dataclass(frozen=True)
class HeldBack:
    """A site's training split without the held-back identities, and those identities' images."""

    training: ReIDData
    samples: list[Sample]

    @property
    def identities(self) -> int:
        return len({s.pid for s in self.samples})


def hold_back(data: ReIDData, cfg: CRRConfig, seed: int) -> HeldBack:
    """Split off the held-back identities (none when the site is too small or CRR is off)."""
    pids = data.train_pids
    if not cfg.enabled or cfg.holdout_fraction <= 0 or len(pids) < cfg.min_identities:
        return HeldBack(data, [])
    count = max(2, int(round(cfg.holdout_fraction * len(pids))))
    held = set(random.Random(seed).sample(pids, count))
    return HeldBack(replace(data, train=[s for s in data.train if s.pid not in held]),
                    [s for s in data.train if s.pid in held])


@dataclass(frozen=True)
class HeldBackScore:
    """Mean AP over the held-back queries that had a match, its standard error, and their number."""

    mAP: float
    se: float
    queries: int


def held_back_score(model: ReIDNet, held: torch.Tensor, held_samples: list[Sample], distractors: torch.Tensor,
                    distractor_samples: list[Sample], device: torch.device, batch_size: int = 128) -> HeldBackScore:
    """Rank every held-back image (uint8 ``held``) against the other held-back images and the
    ``distractors``; per-query AP under the standard protocol."""
    held_feats = extract_features(model, held, device, batch_size)
    gallery_feats = np.concatenate([held_feats, extract_features(model, distractors, device, batch_size)])
    pids = np.array([s.pid for s in held_samples])
    cams = np.array([s.camid for s in held_samples])
    g_pids = np.concatenate([pids, [-2 - s.pid for s in distractor_samples]]).astype(np.int64)  # never a match
    g_cams = np.concatenate([cams, [s.camid for s in distractor_samples]])
    distances = cosine_distance(held_feats, gallery_feats)
    aps = []
    for i in range(len(held_samples)):
        try:
            result = evaluate_rank(distances[i:i + 1], pids[i:i + 1], g_pids, cams[i:i + 1], g_cams)
        except ValueError:  # no other image of this person from another camera
            continue
        aps.append(result.mAP)
    if not aps:
        return HeldBackScore(0.0, 0.0, 0)
    values = np.array(aps)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 1.0
    return HeldBackScore(float(values.mean()), se, len(values))


def distractor_choice(samples: list[Sample], seed: int, count: int = DISTRACTORS) -> list[int]:
    """Indices of a fixed subset of the training images used as distractors."""
    indices = list(range(len(samples)))
    if len(indices) <= count:
        return indices
    return sorted(random.Random(seed).sample(indices, count))
