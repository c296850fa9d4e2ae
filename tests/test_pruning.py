"""FedKLPR's pieces: the server's pruning plan (one mask, a schedule tied to learning, Cross-Round
Recovery above the noise floor), the KL terms, KLPWA, and a site keeping the received mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reid.data.dataset import load_reid_data
from reid.data.tensor_cache import training_images
from reid.divergence import KLLConfig, cosine_logit_distance, feature_kl, kl_regulariser, softened_kl
from reid.holdout import hold_back
from reid.models import ModelSpec, build_model, split_state
from reid.pruning import CRRConfig, apply_masks, kept_fraction, mask_keeper
from reid.train import TrainConfig, train_local
from strategies.pruning_plan import (PruningPlan, PruningSchedule, RecoveryRule, Signal, judge, magnitude_mask,
                                     mask_overlap, prunable_keys)
from strategies.weighting import KLPWASpec, klpwa_weights

SMALL = ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
            "fc.weight": rng.normal(size=(16, 32)).astype(np.float32),
            "fc.bias": rng.normal(size=16).astype(np.float32)}


def test_only_conv_and_linear_weights_are_prunable() -> None:
    assert prunable_keys(_arrays()) == ["conv.weight", "fc.weight"]
    shared = split_state(build_model(SMALL).state_dict(), "average")[0]
    keys = prunable_keys({k: v.numpy() for k, v in shared.items()})
    assert "backbone.conv1.weight" in keys and "bottleneck.0.weight" in keys
    assert not any(k.endswith(("bias", "running_mean", "running_var")) or ".bn" in k for k in keys)


def test_magnitude_masks_keep_the_largest_and_never_revive_what_was_pruned() -> None:
    values = np.arange(1, 101, dtype=np.float32).reshape(10, 10) * np.where(np.arange(100) % 2, 1, -1).reshape(10, 10)
    mask = magnitude_mask(values, 0.3)
    assert mask.sum() == 70 and (np.abs(values[mask]) > 30).all()
    pruned_before = np.zeros(100, bool).reshape(10, 10)
    pruned_before[9, 9] = True  # the largest, pruned earlier: it stays pruned
    assert not magnitude_mask(values, 0.3, pruned_before)[9, 9]


def _signals(value: float, queries: int = 40, se: float = 0.01) -> dict[str, Signal]:
    return {"mall": Signal(value, se, queries), "station": Signal(value, se, queries)}


def test_pruning_waits_for_learning_then_ramps_one_step_a_round_on_one_mask() -> None:
    plan = PruningPlan(PruningSchedule(enabled=True, target=0.6, ramp_rounds=3, start_round=2, start_accuracy=0.3,
                                       min_weights=0))
    arrays = _arrays()
    notes = [plan.advance(r, arrays, _signals(0.5), accuracy) for r, accuracy in [(1, 0.9), (2, 0.1), (3, 0.35)]]
    assert [n["step"] for n in notes] == [False, False, True]  # round 1: too early; round 2: not learnt yet
    assert plan.ratio == pytest.approx(0.2)
    plan.advance(4, arrays, _signals(0.5), 0.4)
    plan.advance(5, arrays, _signals(0.5), 0.4)
    assert plan.ratio == pytest.approx(0.6) and not plan.advance(6, arrays, _signals(0.5), 0.4)["step"]
    for key in prunable_keys(arrays):
        assert plan.masks[key].mean() == pytest.approx(0.4, abs=0.02)
        assert not arrays[key][~plan.masks[key]].any()  # the global model itself is pruned
    assert "fc.bias" not in plan.masks
    small = PruningPlan(PruningSchedule(enabled=True, target=0.6, ramp_rounds=1, start_round=1, start_accuracy=0,
                                        min_weights=300))  # the 288-weight conv stays dense, as a stem would
    small.advance(1, _arrays(), _signals(0.5), 1.0)
    assert set(small.masks) == {"fc.weight"}


def test_recovery_restores_the_previous_mask_and_values_then_backs_off_instead_of_jumping() -> None:
    plan = PruningPlan(PruningSchedule(enabled=True, target=0.8, ramp_rounds=4, start_round=1, start_accuracy=0,
                                       min_weights=0),
                       RecoveryRule(threshold=0.02, z=2.0, min_queries=10, hold_rounds=2, backoff=0.5))
    arrays = _arrays()
    plan.advance(1, arrays, _signals(0.60), 1.0)  # step to 0.2
    kept_at_02 = {k: m.copy() for k, m in plan.masks.items()}
    before_step = {k: v.copy() for k, v in arrays.items()}
    plan.advance(2, arrays, _signals(0.61), 1.0)  # judged fine; step to 0.4
    note = plan.advance(3, arrays, _signals(0.45), 1.0)  # the step to 0.4 cost 0.16 mAP: recover
    assert note["recovered"] and note["crr"]["recover"] and note["crr"]["judged"] == ["mall", "station"]
    assert plan.ratio == pytest.approx(0.2) and plan.recoveries == 1
    for key, mask in kept_at_02.items():
        np.testing.assert_array_equal(plan.masks[key], mask)
        np.testing.assert_array_equal(arrays[key][mask], before_step[key][mask])  # re-opened from before the step
    assert not plan.advance(4, arrays, _signals(0.45), 1.0)["step"]  # holding
    assert not plan.advance(5, arrays, _signals(0.45), 1.0)["step"]
    plan.advance(6, arrays, _signals(0.45), 1.0)
    assert plan.ratio == pytest.approx(0.3)  # half a step (0.2 -> 0.3), not 0.4 and not the target


def test_recovery_does_not_trigger_on_a_signal_below_the_noise_floor() -> None:
    rule = RecoveryRule(threshold=0.02, z=2.0, min_queries=10)
    small = {"ilids": Signal(0.9, 0.2, 4)}  # 4 queries: not judged, however far it falls
    assert not judge(small, {"ilids": Signal(0.1, 0.2, 4)}, rule).recover
    assert judge(small, {"ilids": Signal(0.1, 0.2, 4)}, rule).judged == []
    noisy = {"mall": Signal(0.60, 0.05, 20)}  # a 0.1 fall within 2 standard errors of a noisy estimate
    verdict = judge(noisy, {"mall": Signal(0.50, 0.05, 20)}, rule)
    assert not verdict.recover and verdict.floor == pytest.approx(2 * np.sqrt(2) * 0.05)
    precise = {"mall": Signal(0.60, 0.01, 200)}
    assert judge(precise, {"mall": Signal(0.50, 0.01, 200)}, rule).recover


def test_mask_overlap_is_one_for_agreed_masks_and_less_for_differing_ones() -> None:
    one = {"w": np.array([True, False, True, True])}
    assert mask_overlap([one, {"w": one["w"].copy()}]) == 1.0
    assert mask_overlap([one, {"w": np.array([True, True, False, True])}]) == pytest.approx(2 / 4)
    assert mask_overlap([one]) is None


def test_klpwa_weighs_by_data_size_times_normalised_klaw_and_praw() -> None:
    kl, kept, sizes = np.array([0.1, 0.3]), np.array([0.5, 0.5]), np.array([100.0, 300.0])
    weights = klpwa_weights(kl, kept, KLPWASpec(klaw="gain"), sizes)
    assert weights == pytest.approx(np.array([100 * 0.1, 300 * 0.3]) / (10 + 90))
    assert klpwa_weights(kl, kept, KLPWASpec(klaw="gain", size=False), sizes) == pytest.approx([0.25, 0.75])
    tempered = klpwa_weights(kl, kept, KLPWASpec(), sizes)  # the default: alignment at T = 10
    assert 0.25 < tempered[0] < 0.3  # a little more than its size share, as the site moved less
    assert klpwa_weights(kl, kept, KLPWASpec(klaw="off", praw="off"), sizes) == pytest.approx([0.25, 0.75])
    aligned = klpwa_weights(kl, kept, KLPWASpec(klaw="alignment", size=False, temperature=1.0), sizes)
    assert aligned[0] > aligned[1]  # closer to the global model: more weight


def test_kl_terms_are_zero_for_identical_outputs_and_grow_with_disagreement() -> None:
    logits = torch.randn(8, 5)
    assert float(softened_kl(logits, logits, tau=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(softened_kl(logits, -logits, tau=2.0)) > 0.1
    features = torch.nn.functional.normalize(torch.randn(8, 512), dim=1)
    assert feature_kl(features, features) == pytest.approx(0.0, abs=1e-6)
    assert feature_kl(features, torch.roll(features, 1, dims=1)) > 0.0
    assert cosine_logit_distance(logits, logits) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("target", ["features", "logits"])
def test_kl_regulariser_pulls_towards_the_frozen_copy_of_the_received_model(target: str) -> None:
    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=4).eval()
    loss = kl_regulariser(model, KLLConfig(enabled=True, weight=2.0, tau=0.1 if target == "features" else 2.0,
                                           target=target))
    images = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        assert float(loss(images, model.features(images), model(images))) == pytest.approx(0.0, abs=1e-5)
        moved = model.bottleneck[0].weight if target == "features" else model.classifier.weight
        moved.add_(torch.randn_like(moved))  # the model moves, not the copy
        assert float(loss(images, model.features(images), model(images))) > 0.0
        if target == "features":  # the identity head does not enter the feature term
            model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
            again = kl_regulariser(model, KLLConfig(enabled=True, target=target))
            assert float(again(images, model.features(images), model(images))) == pytest.approx(0.0, abs=1e-5)


def test_the_step_hook_keeps_the_received_mask_through_training(tiny_site: Path) -> None:
    torch.manual_seed(0)
    data = load_reid_data(tiny_site)
    model = build_model(SMALL, num_classes=data.num_train_ids)
    shared = {k: v.numpy() for k, v in split_state(model.state_dict(), "local")[0].items()}
    masks = {k: torch.from_numpy(magnitude_mask(shared[k], 0.5)) for k in prunable_keys(shared)}
    apply_masks(model, masks)
    before = model.backbone.layer1[0].conv1.weight.detach().clone()
    train_local(model, training_images(data, 64, 32), TrainConfig(lr=0.1), torch.device("cpu"),
                after_step=mask_keeper(model, masks))
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        assert (params[key][~mask] == 0).all(), key
    assert not torch.equal(before, model.backbone.layer1[0].conv1.weight)  # the kept weights did train
    assert kept_fraction(masks, model) == pytest.approx(0.5, abs=0.01)


def test_a_large_enough_site_holds_back_the_same_few_identities_every_round(tiny_site: Path) -> None:
    data = load_reid_data(tiny_site)  # 8 training identities
    first = hold_back(data, CRRConfig(holdout_fraction=0.25, min_identities=8), seed=3)
    again = hold_back(data, CRRConfig(holdout_fraction=0.25, min_identities=8), seed=3)
    assert first.identities == 2 and [s.path for s in first.samples] == [s.path for s in again.samples]
    assert first.training.num_train_ids == 6 and not {s.pid for s in first.samples} & set(first.training.train_pids)
    too_small = hold_back(data, CRRConfig(holdout_fraction=0.25, min_identities=20), seed=3)
    assert too_small.samples == [] and too_small.training.num_train_ids == 8
