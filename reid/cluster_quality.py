"""How well pseudo-label clusters match hidden identities: for reporting only, never for training.

FedUReID sites train without labels; where a site's identities are known (the synthetic sites,
the benchmark datasets) these say how pure its clusters are:

- NMI: mutual information of clusters and identities over the arithmetic mean of their entropies
  (scikit-learn's default normalisation); 1 for identical partitions, 0 for independent ones.
- pairwise precision / recall / F-score (as BUC reports): of the image pairs put in one cluster,
  the share that are one identity; of the pairs of one identity, the share put in one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterQuality:
    nmi: float
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f: float


def _contingency(clusters: np.ndarray, identities: np.ndarray) -> np.ndarray:
    _, cluster_index = np.unique(clusters, return_inverse=True)
    _, identity_index = np.unique(identities, return_inverse=True)
    table = np.zeros((cluster_index.max() + 1, identity_index.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_index, identity_index), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _pairs(counts: np.ndarray) -> float:
    return float((counts * (counts - 1) // 2).sum())


def cluster_quality(clusters: np.ndarray, identities: np.ndarray) -> ClusterQuality:
    """NMI and pairwise precision/recall/F of ``clusters`` against ``identities`` (same length)."""
    clusters, identities = np.asarray(clusters), np.asarray(identities)
    if clusters.shape != identities.shape or clusters.ndim != 1 or len(clusters) == 0:
        raise ValueError(f"need two equally long, non-empty label vectors; got {clusters.shape} and {identities.shape}")
    table = _contingency(clusters, identities)
    n = table.sum()
    joint = table[table > 0] / n
    outer = np.outer(table.sum(1), table.sum(0))[table > 0] / n**2
    mutual = float((joint * np.log(joint / outer)).sum())
    h_clusters, h_identities = _entropy(table.sum(1)), _entropy(table.sum(0))
    mean_entropy = (h_clusters + h_identities) / 2
    nmi = 1.0 if mean_entropy == 0 else max(0.0, mutual / mean_entropy)
    together, same_identity, both = _pairs(table.sum(1)), _pairs(table.sum(0)), _pairs(table)
    precision = both / together if together else 1.0
    recall = both / same_identity if same_identity else 1.0
    f_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ClusterQuality(nmi=nmi, pairwise_precision=precision, pairwise_recall=recall, pairwise_f=f_score)
