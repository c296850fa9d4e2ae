"""Bottom-up clustering (BUC; Lin et al., AAAI 2019): what each FedUReID site learns from, with no labels.

Every training image starts as its own cluster, so the first pseudo-labels are image indices.
Training uses a non-parametric, memory-based classifier over the current clusters: one
L2-normalised slot per cluster, a softmax over the similarities at temperature ``tau``, and a
momentum update of the slots after each step. No learned classifier means nothing site-specific
needs a label space. Between training stages the ``merge_count`` closest pairs of clusters are
merged, where the distance of two clusters is the smallest distance between their images plus
``size_penalty`` × (size_a + size_b), which keeps clusters balanced; clusters are then relabelled
0..C-1 and the memory starts from each cluster's mean feature.

Reference values (BUC): tau 0.1, memory momentum 0.5, size penalty 0.005, merge 5 % of the
images per step. Plain PyTorch; features come in as given (the evaluation's L2-normalised ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relabel(labels: torch.Tensor) -> torch.Tensor:
    """Labels renumbered 0..C-1, keeping the order of the old label values."""
    _, dense = torch.unique(labels, sorted=True, return_inverse=True)
    return dense


def cluster_sizes(labels: torch.Tensor) -> torch.Tensor:
    """Images per cluster, for labels 0..C-1."""
    return torch.bincount(labels)


def cluster_distances(features: torch.Tensor, labels: torch.Tensor, size_penalty: float) -> torch.Tensor:
    """[C, C] BUC distance of every pair of clusters: the smallest Euclidean distance between
    their images plus ``size_penalty`` × (size_a + size_b); +inf on the diagonal."""
    count = int(labels.max()) + 1
    pairwise = torch.cdist(features, features)  # [N, N]
    index = labels.unsqueeze(0).expand_as(pairwise)
    to_cluster = torch.full((len(features), count), float("inf"), dtype=pairwise.dtype, device=pairwise.device)
    to_cluster = to_cluster.scatter_reduce(1, index, pairwise, reduce="amin")  # image -> nearest of each cluster
    between = torch.full((count, count), float("inf"), dtype=pairwise.dtype, device=pairwise.device)
    between = between.scatter_reduce(0, labels.unsqueeze(1).expand_as(to_cluster), to_cluster, reduce="amin")
    sizes = cluster_sizes(labels).to(pairwise.dtype)
    between = between + size_penalty * (sizes.unsqueeze(0) + sizes.unsqueeze(1))
    between.fill_diagonal_(float("inf"))
    return between


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
    upper = torch.triu_indices(count, count, offset=1, device=distances.device)
    values = distances[upper[0], upper[1]]
    order = torch.argsort(values, stable=True)
    parent = list(range(count))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    merged = 0
    for position in order.tolist():
        if merged >= merge_count or not torch.isfinite(values[position]):
            break
        a, b = root(int(upper[0, position])), root(int(upper[1, position]))
        if a != b:
            parent[max(a, b)] = min(a, b)
            merged += 1
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
