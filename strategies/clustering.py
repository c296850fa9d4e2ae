"""Grouping sites by how their uploaded models see the same public images (FedReID journal version).

Each site's model is embedded (by the server, on one public batch) as one vector; sites are then
grouped, and each group is aggregated on its own. Pure NumPy/scikit-learn on vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans

CLUSTER_METHODS = ("none", "threshold", "kmeans", "singletons")
EMBEDDINGS = ("features", "update")
MAX_UPDATE_VALUES = 1 << 20  # an update embedding samples at most this many values, evenly spaced


@dataclass(frozen=True)
class ClusteringSpec:
    """How sites are grouped: none, threshold (first-neighbour links), kmeans, or singletons."""

    method: str = "none"
    max_distance: float = 0.9
    k: int = 2
    seed: int = 0
    embedding: str = "features"  # features: on public images (needs an embedder); update: the upload's change

    def __post_init__(self) -> None:
        if self.method not in CLUSTER_METHODS:
            raise ValueError(f"unknown clustering method {self.method!r}; choose one of {CLUSTER_METHODS}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown clustering embedding {self.embedding!r}; choose one of {EMBEDDINGS}")

    @property
    def groups_sites(self) -> bool:
        return self.method in ("threshold", "kmeans")

    @property
    def needs_embeddings(self) -> bool:
        """Whether the server needs an embedder (a model on public images) to group the sites."""
        return self.groups_sites and self.embedding == "features"


def update_embeddings(changes: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """One row per site: its model change (upload minus what it was sent) over every float tensor,
    flattened and sampled evenly down to ``MAX_UPDATE_VALUES`` values. Needs no BatchNorm statistics
    and no public images: sites whose data pull the model the same way point the same way."""
    keys = sorted(k for k, v in changes[0].items() if np.asarray(v).dtype.kind == "f")
    total = sum(int(np.size(changes[0][k])) for k in keys)
    stride = max(1, -(-total // MAX_UPDATE_VALUES))
    return np.stack([np.concatenate([np.ravel(c[k]).astype(np.float32) for k in keys])[::stride] for c in changes])


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def cosine_distances(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise 1 - cos between rows."""
    unit = _unit_rows(np.asarray(embeddings, dtype=np.float64))
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def first_neighbour_clusters(embeddings: np.ndarray, max_distance: float) -> list[list[int]]:
    """One FINCH step: link every site to its nearest other site when closer than ``max_distance``;
    the connected components are the clusters (as in the FedReID PR #10 code)."""
    n = len(embeddings)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1:
        dist = cosine_distances(embeddings)
        np.fill_diagonal(dist, np.inf)
        for i, j in enumerate(dist.argmin(axis=1)):
            if dist[i, j] < max_distance:
                parent[root(i)] = root(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def kmeans_clusters(embeddings: np.ndarray, k: int, seed: int = 0) -> list[list[int]]:
    """k-means on the L2-normalised embeddings (k is capped at the number of sites)."""
    n = len(embeddings)
    k = max(1, min(k, n))
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(_unit_rows(embeddings))
    return sorted([[i for i in range(n) if labels[i] == c] for c in set(labels.tolist())])


def cluster_sites(method: str, embeddings: np.ndarray | None, n: int, max_distance: float = 0.9,
                  k: int = 2, seed: int = 0) -> list[list[int]]:
    """Index groups for ``n`` sites by ``method`` (none: one group; singletons: every site alone)."""
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {CLUSTER_METHODS}")
    if method == "none":
        return [list(range(n))]
    if method == "singletons":
        return [[i] for i in range(n)]
    if embeddings is None or len(embeddings) != n:
        raise ValueError(f"{method} clustering needs one embedding per site")
    if method == "threshold":
        return first_neighbour_clusters(embeddings, max_distance)
    return kmeans_clusters(embeddings, k, seed)


def named_partition(groups: Sequence[Sequence[int]], names: Sequence[str]) -> list[list[str]]:
    """Groups of indices as sorted groups of site names, in a canonical order (for logs and diffs)."""
    return sorted(sorted(names[i] for i in group) for group in groups)
