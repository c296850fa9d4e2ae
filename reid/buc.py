"""Bottom-up clustering (BUC; Lin et al., AAAI 2019): what each FedUReID site learns from, with no labels.

Every training image starts as its own cluster, so the first pseudo-labels are image indices.
Training uses a non-parametric, memory-based classifier over the current clusters: one
L2-normalised slot per cluster, a softmax over the similarities at temperature ``tau``, and a
momentum update of the slots after each step. No learned classifier means nothing site-specific
needs a label space. Between training stages the ``merge_count`` closest pairs of clusters are
merged, where the distance of two clusters is the smallest squared Euclidean distance between
their images plus ``size_penalty`` × (size_a + size_b), which keeps clusters balanced; clusters are
then relabelled 0..C-1 and the memory starts from each cluster's mean feature.

Reference values (BUC): tau 0.1, memory momentum 0.5, size penalty 0.005 (FedUReID's config:
0.003), merge 5 % of the images per step. Memory grows as C² (one distance per pair of clusters),
not N²; the pairs are found with topk rather than a full sort. Plain PyTorch; features come in
as given (the evaluation's L2-normalised ones).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def relabel(labels: torch.Tensor) -> torch.Tensor:
    """Labels renumbered 0..C-1, keeping the order of the old label values."""
    _, dense = torch.unique(labels, sorted=True, return_inverse=True)
    return dense


def cluster_sizes(labels: torch.Tensor) -> torch.Tensor:
    """Images per cluster, for labels 0..C-1."""
    return torch.bincount(labels)


def cluster_distances(features: torch.Tensor, labels: torch.Tensor, size_penalty: float,
                      chunk: int = 2048) -> torch.Tensor:
    """[C, C] BUC distance of every pair of clusters: the smallest squared Euclidean distance
    between their images plus ``size_penalty`` × (size_a + size_b); +inf on the diagonal.

    Squared, as the BUC and FedUReID code compute it, which is the scale their size penalty was
    tuned for. Images are taken ``chunk`` rows at a time, so memory stays at C² + chunk × N
    rather than N² (32,621 MSMT17 images would need 4 GB per N² copy)."""
    count = int(labels.max()) + 1
    between = torch.full((count, count), float("inf"), dtype=features.dtype, device=features.device)
    for start in range(0, len(features), chunk):
        rows = slice(start, start + chunk)
        squared = torch.cdist(features[rows], features).square()  # [b, N]
        to_cluster = torch.full((squared.shape[0], count), float("inf"), dtype=squared.dtype, device=squared.device)
        to_cluster.scatter_reduce_(1, labels.unsqueeze(0).expand_as(squared), squared, reduce="amin")
        between.scatter_reduce_(0, labels[rows].unsqueeze(1).expand_as(to_cluster), to_cluster, reduce="amin")
    sizes = cluster_sizes(labels).to(between.dtype)
    between = between + size_penalty * (sizes.unsqueeze(0) + sizes.unsqueeze(1))
    between.fill_diagonal_(float("inf"))
    return between


def closest_pairs(distances: torch.Tensor, batch: int) -> Iterator[tuple[int, int, float]]:
    """(a, b, distance) for the pairs a < b, nearest first (equal distances by position), taken
    from topk in growing batches instead of sorting all C²/2 pairs; stops at +inf."""
    count = distances.shape[0]
    upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    flat = torch.where(upper, distances, torch.full_like(distances, float("inf"))).flatten()
    done: set[int] = set()
    k = min(flat.numel(), max(batch, 64))
    while True:
        values, positions = torch.topk(flat, k, largest=False, sorted=False)
        by_position = torch.argsort(positions)
        values, positions = values[by_position], positions[by_position]
        in_order = torch.argsort(values, stable=True)
        for value, position in zip(values[in_order].tolist(), positions[in_order].tolist()):
            if value == float("inf"):
                return
            if position not in done:
                done.add(position)
                yield position // count, position % count, value
        if k == flat.numel():
            return
        k = min(flat.numel(), 2 * k)


def merge_closest(features: torch.Tensor, labels: torch.Tensor, merge_count: int,
                  size_penalty: float) -> torch.Tensor:
    """Merge the ``merge_count`` closest pairs of clusters (as BUC: the pairs with the smallest
    distances, taken in order, a pair whose clusters are already joined being skipped) and return
    the new labels, renumbered 0..C-1."""
    labels = relabel(labels)
    count = int(labels.max()) + 1
    if merge_count <= 0 or count < 2:
        return labels
    distances = cluster_distances(features, labels, size_penalty)
    parent = list(range(count))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    merged = 0
    for a, b, _ in closest_pairs(distances, 2 * merge_count):
        a, b = root(a), root(b)
        if a != b:
            parent[max(a, b)] = min(a, b)
            merged += 1
            if merged >= merge_count:
                break
    mapping = torch.tensor([root(c) for c in range(count)], device=labels.device)
    return relabel(mapping[labels])


class ClusterMemory:
    """One L2-normalised feature slot per cluster; the non-parametric classifier BUC trains with."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, tau: float = 0.1, momentum: float = 0.5) -> None:
        self.tau, self.momentum = tau, momentum
        self.slots = self.centroids(features, labels)

    @classmethod
    def from_slots(cls, slots: torch.Tensor, tau: float = 0.1, momentum: float = 0.5) -> "ClusterMemory":
        """A memory that continues from saved slots (a site's state between rounds)."""
        memory = cls.__new__(cls)
        memory.tau, memory.momentum, memory.slots = tau, momentum, F.normalize(slots.clone(), dim=1)
        return memory

    @staticmethod
    def centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each cluster's mean feature, L2-normalised."""
        count = int(labels.max()) + 1
        sums = torch.zeros(count, features.shape[1], dtype=features.dtype, device=features.device)
        sums.index_add_(0, labels, features)
        return F.normalize(sums, dim=1)

    def to(self, device: torch.device) -> "ClusterMemory":
        self.slots = self.slots.to(device)
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(normalised feature · slot) / tau for every cluster: the non-parametric classifier."""
        return F.normalize(features, dim=1) @ self.slots.to(features.dtype).t() / self.tau

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the softmax over the logits against the clusters."""
        return F.cross_entropy(self.logits(features), labels)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """slot <- normalise(momentum × slot + (1 - momentum) × feature), image by image in batch
        order; one vectorised step when no cluster occurs twice in the batch (the common case)."""
        features = F.normalize(features.detach().to(self.slots.dtype), dim=1)
        if len(torch.unique(labels)) == len(labels):
            mixed = self.momentum * self.slots[labels] + (1 - self.momentum) * features
            self.slots[labels] = F.normalize(mixed, dim=1)
            return
        for feature, label in zip(features, labels.tolist()):
            self.slots[label] = F.normalize(self.momentum * self.slots[label] + (1 - self.momentum) * feature, dim=0)
