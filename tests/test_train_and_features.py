"""Local training (optimiser groups, loss going down, small sets) and flip-sum L2 features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reid.data.dataset import ImageDataset, load_reid_data
from reid.data.tensor_cache import LabelledImages, load_images, training_images
from reid.data.transforms import test_transform as eval_transform
from reid.features import cosine_distance, extract_features
from reid.models import ModelSpec, build_model
from reid.train import TrainConfig, epoch_order, make_optimizer, train_local

SPEC = ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32)
CPU = torch.device("cpu")


def test_backbone_learns_at_a_tenth_of_the_head_rate() -> None:
    model = build_model(SPEC, num_classes=4)
    optimizer = make_optimizer(model, TrainConfig(lr=0.05, backbone_lr_mult=0.1))
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.005) and head["lr"] == pytest.approx(0.05)
    assert backbone["nesterov"] and backbone["momentum"] == 0.9 and backbone["weight_decay"] == 5e-4
    assert {id(p) for p in head["params"]} == {id(p) for p in [*model.bottleneck.parameters(),
                                                                *model.classifier.parameters()]}


def test_incomplete_last_batch_is_dropped_and_tiny_sets_are_refused(tiny_site: Path) -> None:
    batches = epoch_order(70, 32, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [32, 32]
    assert len(set(torch.cat(batches).tolist())) == 64 and set(torch.cat(batches).tolist()) <= set(range(70))
    assert [len(b) for b in epoch_order(5, 32, torch.Generator().manual_seed(0))] == [5]  # smaller than a batch
    with pytest.raises(ValueError, match="at least 2"):
        epoch_order(1, 32, torch.Generator().manual_seed(0))
    data = load_reid_data(tiny_site)
    stats = train_local(build_model(SPEC, data.num_train_ids), training_images(data, 64, 32), TrainConfig(), CPU)
    assert stats.images == len(data.train) // 32 * 32 and stats.batches == len(data.train) // 32


def test_training_fits_the_site_identities(tiny_site: Path) -> None:
    torch.manual_seed(0)
    data = load_reid_data(tiny_site)
    model = build_model(SPEC, num_classes=data.num_train_ids)
    images = training_images(data, 64, 32)
    config = TrainConfig(backbone_lr_mult=1.0, local_epochs=4)
    first = train_local(model, images, TrainConfig(backbone_lr_mult=1.0), CPU, seed=1)
    later = train_local(model, images, config, CPU, seed=2)
    assert later.loss < first.loss * 0.8
    assert later.accuracy > first.accuracy and later.images == 4 * (len(images) // 32) * 32


def test_an_extra_loss_term_is_added_to_the_cross_entropy(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site)
    images = training_images(data, 64, 32)
    torch.manual_seed(0)
    plain = train_local(build_model(SPEC, data.num_train_ids), images, TrainConfig(lr=0.0), CPU, seed=3)
    torch.manual_seed(0)
    extra = train_local(build_model(SPEC, data.num_train_ids), images, TrainConfig(lr=0.0), CPU, seed=3,
                        extra_loss=lambda images, features, logits: torch.tensor(2.5))
    assert extra.loss == pytest.approx(plain.loss + 2.5, rel=0.05)


def test_features_are_flip_summed_and_l2_normalised(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site)
    model = build_model(SPEC).eval()
    dataset = ImageDataset(data.query[:5], eval_transform(64, 32))  # the PIL path, for reference
    feats = extract_features(model, load_images([s.path for s in data.query[:5]], 64, 32), CPU, batch_size=2)
    assert feats.shape == (5, 512) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    image = dataset[0][0][None]
    with torch.no_grad():
        manual = model.features(image) + model.features(torch.flip(image, dims=[3]))
    np.testing.assert_allclose(feats[0], (manual / manual.norm()).numpy()[0], atol=1e-5)
    distances = cosine_distance(feats, feats)
    np.testing.assert_allclose(np.diag(distances), 0.0, atol=1e-5)
