"""Bottom-up clustering on hand-made features: which pairs merge, what the size penalty does,
relabelling, the memory-based loss, and the cluster-purity measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reid.buc import ClusterMemory, closest_pairs, cluster_distances, merge_closest, relabel
from reid.cluster_quality import cluster_quality
from reid.data.dataset import load_reid_data
from reid.data.tensor_cache import LabelledImages, training_images
from reid.features import extract_features
from reid.models import ModelSpec, build_model
from reid.train import TrainConfig, train_local


def _points(*coordinates: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(coordinates, dtype=torch.float64)


def test_relabel_numbers_clusters_densely() -> None:
    assert relabel(torch.tensor([7, 3, 7, 9])).tolist() == [1, 0, 1, 2]


def test_the_closest_pair_merges_first_and_distance_is_the_nearest_members() -> None:
    features = _points((0, 0), (0.1, 0), (5, 0), (5.3, 0), (10, 0))
    labels = torch.arange(5)
    distances = cluster_distances(features, labels, size_penalty=0.0)
    assert torch.isinf(distances.diagonal()).all()
    assert abs(float(distances[0, 1]) - 0.1 ** 2) < 1e-12 and abs(float(distances[2, 3]) - 0.3 ** 2) < 1e-12
    assert merge_closest(features, labels, 1, 0.0).tolist() == [0, 0, 1, 2, 3]
    assert merge_closest(features, labels, 2, 0.0).tolist() == [0, 0, 1, 1, 2]


def test_cluster_distance_is_single_linkage_over_members() -> None:
    features = _points((0, 0), (1, 0), (1.5, 0), (9, 0))
    labels = torch.tensor([0, 0, 1, 2])  # {0, 1}, {1.5}, {9}
    distances = cluster_distances(features, labels, 0.0)
    assert abs(float(distances[0, 1]) - 0.5 ** 2) < 1e-12  # nearest members (squared), not centres
    assert abs(float(distances[1, 2]) - 7.5 ** 2) < 1e-12


def test_the_size_penalty_lets_a_small_cluster_merge_before_a_big_one() -> None:
    # a big cluster {0, 0.1, 0.2} at distance 1.0 from a, and two singletons 1.2 apart
    features = _points((0, 0), (0.1, 0), (0.2, 0), (1.2, 0), (20, 0), (21.2, 0))
    labels = torch.tensor([0, 0, 0, 1, 2, 3])
    assert merge_closest(features, labels, 1, size_penalty=0.0).tolist() == [0, 0, 0, 0, 1, 2]
    # with the penalty, 1.0² + 0.3 * 4 = 2.2 > 1.2² + 0.3 * 2 = 2.04: the balanced pair goes first
    assert merge_closest(features, labels, 1, size_penalty=0.3).tolist() == [0, 0, 0, 1, 2, 2]


def test_a_chain_of_merges_in_one_step_joins_transitively() -> None:
    features = _points((0, 0), (1, 0), (2, 0), (50, 0))
    merged = merge_closest(features, torch.arange(4), 2, 0.0)
    assert merged.tolist() == [0, 0, 0, 1]


def test_memory_loss_prefers_the_right_cluster_and_its_update_moves_the_slot() -> None:
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    memory = ClusterMemory(features, labels, tau=0.1, momentum=0.5)
    right = memory.loss(features, labels)
    wrong = memory.loss(features, torch.tensor([1, 2, 2, 0, 0, 1]))
    assert float(right) < float(wrong)
    trainable = features.clone().requires_grad_(True)
    memory.loss(trainable, labels).backward()
    assert trainable.grad is not None and torch.isfinite(trainable.grad).all() and trainable.grad.abs().sum() > 0
    before = memory.slots[0].clone()
    memory.update(features[2:3], torch.tensor([0]))
    assert abs(float(memory.slots[0].norm()) - 1.0) < 1e-6
    assert float(memory.slots[0] @ features[2]) > float(before @ features[2])


def test_training_with_the_cluster_memory_needs_no_labels_and_learns(tiny_site: Path) -> None:
    """One BUC stage on a real site: pseudo-labels are image indices, the model has no classifier,
    the memory's loss falls, and a merge step then leaves fewer, relabelled clusters."""
    data = load_reid_data(tiny_site, verify=False)
    decoded = training_images(data, 64, 32)
    pseudo = LabelledImages(decoded.images, torch.arange(len(decoded)))  # every image its own cluster
    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32), num_classes=0)
    device = torch.device("cpu")
    features = torch.from_numpy(extract_features(model, pseudo.images, device))
    memory = ClusterMemory(features, pseudo.labels, tau=0.1, momentum=0.5)
    before_slots = memory.slots.clone()
    cfg = TrainConfig(batch_size=16, local_epochs=3, lr=0.05, backbone_lr_mult=1.0)
    first = train_local(model, pseudo, cfg, device, seed=0, head=memory, label="[buc]")
    second = train_local(model, pseudo, cfg, device, seed=1, head=memory, label="[buc]")
    assert model.classifier is None and np.isfinite(first.loss) and second.loss < first.loss
    assert not torch.allclose(memory.slots, before_slots)
    features = torch.from_numpy(extract_features(model, pseudo.images, device))
    merged = merge_closest(features, pseudo.labels, len(pseudo) // 4, size_penalty=0.005)
    assert int(merged.max()) + 1 == len(pseudo) - len(pseudo) // 4
    assert sorted(set(merged.tolist())) == list(range(int(merged.max()) + 1))


def test_cluster_quality_on_hand_made_partitions() -> None:
    identities = np.array([0, 0, 1, 1, 2, 2])
    perfect = cluster_quality(np.array([5, 5, 3, 3, 9, 9]), identities)  # same partition, other names
    assert perfect.nmi == pytest.approx(1.0) and perfect.pairwise_f == pytest.approx(1.0)
    singletons = cluster_quality(np.arange(6), identities)
    assert singletons.pairwise_precision == 1.0 and singletons.pairwise_recall == 0.0 and singletons.pairwise_f == 0.0
    one_blob = cluster_quality(np.zeros(6, dtype=int), identities)
    assert one_blob.nmi == pytest.approx(0.0) and one_blob.pairwise_recall == 1.0
    assert one_blob.pairwise_precision == pytest.approx(3 / 15)  # 3 same-id pairs among 15
    # one image of identity 1 joined to identity 0's cluster: pairs together {0,1,2}: 3, of which 1 true
    mixed = cluster_quality(np.array([0, 0, 0, 1, 2, 2]), identities)
    assert mixed.pairwise_precision == pytest.approx((1 + 1) / (3 + 1)) and mixed.pairwise_recall == pytest.approx(2 / 3)
    assert 0 < mixed.nmi < 1
    # NMI by hand for a 2x2 case: clusters {a,a,b,b} vs ids {0,1,0,1} are independent
    assert cluster_quality(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])).nmi == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equally long"):
        cluster_quality(np.arange(3), np.arange(4))


def test_closest_pairs_come_in_order_across_topk_batches_and_chunks_change_only_rounding() -> None:
    torch.manual_seed(2)
    features = torch.nn.functional.normalize(torch.randn(90, 16, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 40, (90,))
    labels = relabel(labels)
    whole = cluster_distances(features, labels, 0.01)
    assert torch.allclose(whole, cluster_distances(features, labels, 0.01, chunk=7), rtol=0, atol=1e-12)
    pairs = list(closest_pairs(whole, batch=3))  # many topk batches
    count = whole.shape[0]
    assert len(pairs) == count * (count - 1) // 2 and len({(a, b) for a, b, _ in pairs}) == len(pairs)
    assert all(a < b for a, b, _ in pairs)
    values = [v for _, _, v in pairs]
    assert values == sorted(values)
    upper = whole[torch.triu(torch.ones_like(whole, dtype=torch.bool), diagonal=1)]
    assert values[0] == float(upper.min()) and values[-1] == float(upper.max())
