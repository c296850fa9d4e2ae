"""Pruning masks and schedules, Cross-Round Recovery, and the KL pieces of FedKLPR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reid.data.dataset import load_reid_data
from reid.data.tensor_cache import training_images
from reid.divergence import KLLConfig, feature_kl, kl_regulariser, softened_kl
from reid.models import ModelSpec, build_model, split_state
from reid.pruning import (
    CRRConfig,
    PruneState,
    PruningConfig,
    apply_masks,
    cross_round_check,
    kept_fraction,
    magnitude_masks,
    mask_keeper,
    masks_to_numpy,
    prunable_keys,
    prune_step,
)
from reid.train import TrainConfig, train_local

SPEC = ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32)


def test_only_conv_and_linear_weights_of_the_shared_state_are_prunable() -> None:
    shared = split_state(build_model(SPEC, num_classes=5).state_dict(), "local")[0]
    keys = prunable_keys(shared)
    assert "backbone.conv1.weight" in keys and "bottleneck.0.weight" in keys
    assert not any(k.endswith("bias") or ".bn" in k or "bottleneck.1" in k or k.startswith("classifier")
                   for k in keys)


def test_magnitude_masks_keep_the_largest_weights_at_the_ratio() -> None:
    weight = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -1.0]])
    mask = magnitude_masks({"w": weight}, ["w"], ratio=0.5)["w"]
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]
    assert kept_fraction({"w": mask}) == 0.5
    assert magnitude_masks({"w": weight}, ["w"], 0.0)["w"].all()


@pytest.mark.parametrize("schedule,expected", [
    ("linear", [0.0, 0.2, 0.4, 0.6, 0.6]),
    ("cubic", [0.0, 0.6 * (1 - (2 / 3) ** 3), 0.6 * (1 - (1 / 3) ** 3), 0.6, 0.6]),
    ("constant", [0.0, 0.6, 0.6, 0.6, 0.6]),
])
def test_schedules_ramp_towards_the_target(schedule: str, expected: list[float]) -> None:
    cfg = PruningConfig(enabled=True, target=0.6, schedule=schedule, start_round=2, ramp_rounds=3)
    assert [cfg.ratio_at(r) for r in range(1, 6)] == pytest.approx(expected)
    assert PruningConfig(enabled=False, target=0.6).ratio_at(9) == 0.0


def test_pruned_weights_stay_zero_and_masks_only_shrink() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=3)
    shared = split_state(model.state_dict(), "local")[0]
    state = PruneState()
    cfg = PruningConfig(enabled=True, target=0.5, ramp_rounds=2)
    assert prune_step(state, shared, signal=0.8, server_round=1, cfg=cfg)
    first = {k: m.clone() for k, m in state.masks.items()}
    apply_masks(model, state.masks)
    assert kept_fraction(state.masks) == pytest.approx(0.75, abs=1e-3)
    assert (model.backbone.conv1.weight[~state.masks["backbone.conv1.weight"]] == 0).all()
    shared = split_state(model.state_dict(), "local")[0]
    assert prune_step(state, shared, signal=0.8, server_round=2, cfg=cfg)
    assert all((state.masks[k] <= first[k]).all() for k in first)  # pruned weights stay pruned
    assert state.ratio == 0.5 and state.pending and state.reference == 0.8
    assert not prune_step(state, shared, signal=0.8, server_round=3, cfg=cfg)  # at the target already


def test_cross_round_recovery_restores_on_a_forced_drop_and_holds(caplog: pytest.LogCaptureFixture) -> None:
    weights = {"layer.weight": torch.arange(1.0, 9.0).reshape(2, 4)}
    cfg = PruningConfig(enabled=True, target=0.75, schedule="linear", ramp_rounds=3)
    crr = CRRConfig(enabled=True, threshold=0.05, hold_rounds=2)
    state = PruneState()
    prune_step(state, weights, signal=0.90, server_round=1, cfg=cfg)  # ratio 0.25
    assert cross_round_check(state, signal=0.89, server_round=2, cfg=crr) is None  # small dip: kept
    prune_step(state, weights, signal=0.89, server_round=2, cfg=cfg)  # ratio 0.5
    before = {k: m.clone() for k, m in state.previous_masks.items()}
    reopened = cross_round_check(state, signal=0.70, server_round=3, cfg=crr, site="mall")  # forced drop
    assert reopened is not None and state.recoveries == 1
    assert state.ratio == 0.25 and torch.equal(state.masks["layer.weight"], before["layer.weight"])
    assert int(reopened["layer.weight"].sum()) == 2  # the two weights the failed step had pruned
    assert "validation fell from 0.890 to 0.700" in caplog.text
    assert not prune_step(state, weights, signal=0.7, server_round=4, cfg=cfg)  # holding
    assert prune_step(state, weights, signal=0.7, server_round=5, cfg=cfg)  # hold over
    off = PruneState()
    prune_step(off, weights, 0.9, 1, cfg)
    assert cross_round_check(off, 0.1, 2, CRRConfig(enabled=False)) is None


def test_kl_terms_are_zero_for_identical_outputs_and_grow_with_disagreement() -> None:
    logits = torch.randn(8, 5)
    assert float(softened_kl(logits, logits, tau=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(softened_kl(logits, -logits, tau=2.0)) > 0.1
    features = torch.nn.functional.normalize(torch.randn(8, 512), dim=1)
    assert feature_kl(features, features) == pytest.approx(0.0, abs=1e-6)
    assert feature_kl(features, torch.roll(features, 1, dims=1)) > 0.0


def test_kl_regulariser_pulls_towards_the_frozen_copy_of_the_received_model() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, num_classes=4).eval()
    loss = kl_regulariser(model, KLLConfig(enabled=True, weight=2.0, tau=2.0))
    images = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        assert float(loss(images, model(images))) == pytest.approx(0.0, abs=1e-6)
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))  # the model moves, not the copy
        assert float(loss(images, model(images))) > 0.0


def test_the_step_hook_keeps_pruned_weights_at_zero_through_training(tiny_site: Path) -> None:
    torch.manual_seed(0)
    data = load_reid_data(tiny_site)
    model = build_model(SPEC, num_classes=data.num_train_ids)
    shared = split_state(model.state_dict(), "local")[0]
    masks = magnitude_masks(shared, prunable_keys(shared), 0.5)
    apply_masks(model, masks)
    before = model.backbone.layer1[0].conv1.weight.detach().clone()
    train_local(model, training_images(data, 64, 32), TrainConfig(lr=0.1), torch.device("cpu"),
                after_step=mask_keeper(model, masks))
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        assert (params[key][~mask] == 0).all(), key
    assert not torch.equal(before, model.backbone.layer1[0].conv1.weight)  # the kept weights did train
    assert {k: m.dtype for k, m in masks_to_numpy(masks).items()} == {k: np.dtype(bool) for k in masks}
