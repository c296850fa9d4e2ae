"""Client clustering: the grouping math, and the whole path from uploaded models to groups."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from reid.config import SiteRunSpec
from reid.data.dataset import load_reid_data
from reid.data.synthetic import DEFAULT_STYLES, generate_site
from reid.data.tensor_cache import training_images
from reid.distill import DistillConfig
from reid.models import ModelSpec, build_model, load_shared_state, shared_state
from reid.train import TrainConfig, train_local
from server.public_steps import PublicSteps
from strategies.clustering import cluster_sites, first_neighbour_clusters, kmeans_clusters, named_partition

CPU = torch.device("cpu")


def _two_groups(rng: np.random.Generator) -> np.ndarray:
    a, b = rng.normal(size=8), rng.normal(size=8)
    return np.stack([a + 0.05 * rng.normal(size=8) for _ in range(3)] + [b + 0.05 * rng.normal(size=8) for _ in range(2)])


def test_first_neighbour_links_and_kmeans_find_planted_groups() -> None:
    embeddings = _two_groups(np.random.default_rng(0))
    assert first_neighbour_clusters(embeddings, max_distance=0.9) == [[0, 1, 2], [3, 4]]
    assert kmeans_clusters(embeddings, k=2) == [[0, 1, 2], [3, 4]]


def test_threshold_keeps_far_sites_alone_and_special_methods() -> None:
    embeddings = _two_groups(np.random.default_rng(1))
    assert first_neighbour_clusters(embeddings, max_distance=1e-9) == [[0], [1], [2], [3], [4]]
    assert cluster_sites("none", None, 3) == [[0, 1, 2]]
    assert cluster_sites("singletons", None, 3) == [[0], [1], [2]]
    assert kmeans_clusters(embeddings, k=9) == [[0], [1], [2], [3], [4]]  # k capped at the site count
    with pytest.raises(ValueError, match="needs one embedding per site"):
        cluster_sites("kmeans", None, 3)
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster_sites("dbscan", None, 3)
    assert named_partition([[2, 0], [1]], ["m", "s", "c"]) == [["c", "m"], ["s"]]


def test_sites_with_clearly_different_styles_are_grouped_apart(tmp_path: Path) -> None:
    """Two colour sites and two night-time infrared sites fine-tune a shared, pre-trained backbone for
    one round; the server embeds the four uploads on public images and must find the two styles."""
    colour = replace(DEFAULT_STYLES[0], num_train_ids=12, num_test_ids=2, num_distractors=0, num_junk=0)
    infrared = replace(DEFAULT_STYLES[1], num_train_ids=12, num_test_ids=2, num_distractors=0, num_junk=0,
                       infrared=True, gain=(0.5, 0.8))
    for name, index, style in (("c1", 0, colour), ("c2", 10, colour), ("n1", 1, infrared), ("n2", 11, infrared)):
        generate_site(tmp_path / name, index, seed=3, style=style)
    public_style = replace(DEFAULT_STYLES[2], num_train_ids=12, num_test_ids=2, num_distractors=0, num_junk=0)
    generate_site(tmp_path / "public", 7, seed=3, style=public_style)

    spec = SiteRunSpec(model=ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32), bn_stats="average")
    # a shared starting point that already knows people, as an ImageNet backbone would
    public = load_reid_data(tmp_path / "public")
    torch.manual_seed(0)
    base = build_model(spec.model, public.num_train_ids)
    train_local(base, training_images(public, 64, 32), TrainConfig(backbone_lr_mult=1.0, local_epochs=15), CPU,
                seed=0)
    start = shared_state(base, "average")
    uploads = []
    for i, name in enumerate(["c1", "c2", "n1", "n2"]):
        data = load_reid_data(tmp_path / name)
        torch.manual_seed(1)
        model = build_model(spec.model, data.num_train_ids)
        load_shared_state(model, {k: v.clone() for k, v in start.items()}, "average")
        train_local(model, training_images(data, 64, 32), TrainConfig(), CPU, seed=i)
        uploads.append(ArrayRecord(shared_state(model, "average")))

    steps = PublicSteps(tmp_path / "public", spec, DistillConfig(), embed_batch=16, device=CPU)
    embeddings = steps.embed(uploads)
    assert embeddings.shape == (4, 16 * 512)
    assert cluster_sites("threshold", embeddings, 4, max_distance=0.9) == [[0, 1], [2, 3]]
    assert cluster_sites("kmeans", embeddings, 4, k=2) == [[0, 1], [2, 3]]
