"""Wild but well-formed updates are turned away (or clipped) and the round goes on without them:
every weight x1e6, a site whose training really diverged, an absurd training-set size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from reid.data.dataset import load_reid_data
from reid.data.synthetic import DEFAULT_STYLES, generate_site
from reid.data.tensor_cache import training_images
from reid.models import ModelSpec, build_model, shared_state
from reid.train import TrainConfig, train_local
from strategies.fedpav import FedPav
from strategies.screening import ExampleLedger, ScreenSpec, judge_norms, leave_one_out_medians

SPEC = ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32)


class Nodes:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _send(strategy: FedPav, arrays: dict[str, np.ndarray], nodes: list[int], server_round: int = 1) -> list[Message]:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return list(strategy.configure_train(server_round, record, ConfigRecord({}), Nodes(nodes)))


def _reply(to: Message, arrays: dict[str, np.ndarray], examples: float, site: str) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples}), "site": ConfigRecord({"name": site})})
    return Message(content=content, reply_to=to)


def _moved(base: dict[str, np.ndarray], seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()}


BASE = {"conv.weight": np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 20), "bias": np.ones(4, np.float32)}


def _round(strategy: FedPav, uploads: dict[str, tuple[dict[str, np.ndarray], float]]) -> ArrayRecord | None:
    sent = _send(strategy, BASE, list(range(1, len(uploads) + 1)))
    replies = [_reply(m, arrays, n, site) for m, (site, (arrays, n)) in zip(sent, uploads.items())]
    return strategy.aggregate_train(1, replies)[0]


def _expected_average(uploads: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in uploads)
    return {k: sum(a[k].astype(np.float64) * n for a, n in uploads) / total for k in uploads[0][0]}


def test_an_update_scaled_by_a_million_is_rejected_and_the_others_make_the_model() -> None:
    honest = {"mall": (_moved(BASE, 1), 120.0), "station": (_moved(BASE, 2), 80.0)}
    wild = {k: v * 1e6 for k, v in _moved(BASE, 3).items()}
    strategy = FedPav(min_sites=2)
    arrays = _round(strategy, {**honest, "campus": (wild, 100.0)})
    assert "update too large" in strategy.last_train.rejected["campus"]
    assert sorted(strategy.last_train.accepted) == ["mall", "station"]
    expected = _expected_average(list(honest.values()))
    for key in BASE:  # exactly the model the two honest sites make on their own
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6)
    assert all(m["screen-score"] > 0 for m in strategy.last_train.site_metrics.values())


def test_two_sites_check_each_other() -> None:
    strategy = FedPav(min_sites=2)
    arrays = _round(strategy, {"mall": (_moved(BASE, 1), 50.0),
                               "station": ({k: v * 1e6 for k, v in BASE.items()}, 50.0)})
    assert list(strategy.last_train.rejected) == ["station"] and list(strategy.last_train.accepted) == ["mall"]
    np.testing.assert_allclose(arrays["bias"].numpy(), _moved(BASE, 1)["bias"])


def test_the_switch_turns_screening_off_and_clip_pulls_the_update_back_instead() -> None:
    uploads = {"mall": (_moved(BASE, 1), 100.0), "station": (_moved(BASE, 2), 100.0),
               "campus": ({k: v * 1e6 for k, v in BASE.items()}, 100.0)}
    off = FedPav(min_sites=2, screen=ScreenSpec(enabled=False))
    assert np.abs(_round(off, uploads)["bias"].numpy()).max() > 1e5 and not off.last_train.rejected

    clip = FedPav(min_sites=2, screen=ScreenSpec(action="clip"))
    clipped = _round(clip, uploads)
    assert not clip.last_train.rejected and len(clip.last_train.accepted) == 3
    change = np.sqrt(sum(float(((clipped[k].numpy() - BASE[k]) ** 2).sum()) for k in BASE))
    honest = np.sqrt(sum(float(((uploads["mall"][0][k] - BASE[k]) ** 2).sum()) for k in BASE))
    assert change < ScreenSpec().max_norm_ratio * honest  # at most the bound x the others' median, shared 3 ways


def test_a_site_whose_training_diverged_is_rejected(tmp_path: Path) -> None:
    """Real local training: two sites at the usual lr, one at 100x; the third's loss runs away."""
    torch.manual_seed(0)
    start = {k: v.numpy().copy() for k, v in shared_state(build_model(SPEC), "local").items()}
    uploads = {}
    for index, (site, lr) in enumerate((("mall", 0.05), ("station", 0.05), ("campus", 5.0))):
        style = replace(DEFAULT_STYLES[index], num_train_ids=8, num_test_ids=2, num_distractors=0, num_junk=0)
        generate_site(tmp_path / site, site_index=index, seed=5, style=style)
        data = load_reid_data(tmp_path / site)
        images = training_images(data, SPEC.height, SPEC.width)
        model = build_model(SPEC, data.num_train_ids)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()}, strict=False)
        stats = train_local(model, images, TrainConfig(lr=lr, local_epochs=2), torch.device("cpu"), seed=index)
        uploads[site] = ({k: v.numpy() for k, v in shared_state(model, "local").items()}, len(images), stats.loss)
    assert uploads["campus"][2] > 5 * uploads["mall"][2]  # its loss really diverged, yet stayed finite
    strategy = FedPav(min_sites=2)
    sent = _send(strategy, start, [1, 2, 3])
    replies = [_reply(m, a, n, site) for m, (site, (a, n, _)) in zip(sent, uploads.items())]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert "update too large" in strategy.last_train.rejected["campus"]
    scores = {s: m["screen-score"] for s, m in strategy.last_train.site_metrics.items()}
    assert sorted(scores) == ["mall", "station"]
    expected = _expected_average([(uploads[s][0], uploads[s][1]) for s in ("mall", "station")])
    key = "bottleneck.0.weight"
    np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-5, atol=1e-7)


def test_an_absurd_number_of_training_images_is_rejected() -> None:
    strategy = FedPav(min_sites=2, screen=ScreenSpec(max_examples=1_000_000))
    arrays = _round(strategy, {"mall": (_moved(BASE, 1), 100.0), "station": (_moved(BASE, 2), 100.0),
                               "campus": (_moved(BASE, 3), 5e9)})
    assert "more than the configured maximum" in strategy.last_train.rejected["campus"]
    np.testing.assert_allclose(arrays["bias"].numpy(), _expected_average(
        [(_moved(BASE, 1), 100.0), (_moved(BASE, 2), 100.0)])["bias"], rtol=1e-6)

    # the next round, a site claims far more than it ever reported: rejected; a small rise is fine
    arrays = _round(strategy, {"mall": (_moved(BASE, 4), 105.0), "station": (_moved(BASE, 5), 900.0)})
    assert "more than 1.1 x the 100 it reported before" in strategy.last_train.rejected["station"]
    assert list(strategy.last_train.accepted) == ["mall"]


def test_the_arithmetic_of_the_bounds() -> None:
    assert leave_one_out_medians([1.0, 2.0, 30.0]) == [16.0, 15.5, 1.5]
    assert leave_one_out_medians([4.0]) == [None]
    spec = ScreenSpec(max_norm_ratio=10)
    verdicts = judge_norms([1.0, 2.0, 30.0], spec)
    assert [v.reason is None for v in verdicts] == [True, True, False]
    assert judge_norms([0.0, 5.0], spec)[1].reason is None  # the other did not move: nothing to compare with
    clipped = judge_norms([1.0, 2.0, 30.0], replace(spec, action="clip"))[2]
    assert clipped.reason is None and clipped.scale == pytest.approx(15.0 / 30.0)
    ledger = ExampleLedger(ScreenSpec(examples_growth=1.5))
    ledger.record("mall", 100)
    assert ledger.check("mall", 150) is None and "1.5 x the 100" in ledger.check("mall", 151)
    with pytest.raises(ValueError, match="screen action"):
        ScreenSpec(action="shrug")


def test_the_change_norm_taken_block_by_block_equals_the_whole_float64_sum() -> None:
    from strategies.screening import NORM_BLOCK, change_norm
    from strategies.sparse_records import Tensor

    rng = np.random.default_rng(4)
    big = rng.normal(size=(NORM_BLOCK * 2 + 123,)).astype(np.float32)  # spans three blocks, the last one short
    masked = rng.normal(size=(7, NORM_BLOCK // 3)).astype(np.float32)
    mask = (rng.random(masked.shape) > 0.4).astype(np.uint8)
    tensors = {"big": Tensor(big, None), "masked": Tensor(masked * mask, mask),
               "count": Tensor(np.arange(5, dtype=np.int64), None)}  # not a float: no part of the norm
    sent = {"big": big + rng.normal(size=big.shape).astype(np.float32) * 1e-3,
            "masked": rng.normal(size=masked.shape).astype(np.float32), "count": np.zeros(5, np.int64)}
    kept = mask.astype(bool)
    expected = np.sqrt(np.sum((big.astype(np.float64) - sent["big"]) ** 2)
                       + np.sum(((masked * mask).astype(np.float64) - sent["masked"])[kept] ** 2))
    assert change_norm(tensors, sent) == pytest.approx(expected, rel=1e-12)


def test_a_reply_scored_on_arrival_gets_the_score_it_would_get_at_the_end() -> None:
    uploads = {"mall": (_moved(BASE, 1), 120.0), "station": (_moved(BASE, 2, 0.03), 80.0),
               "campus": (_moved(BASE, 3, 0.02), 100.0)}
    scored: dict[str, dict[str, float]] = {}
    for early in (set(), {"mall", "campus"}):
        strategy = FedPav(min_sites=2)
        sent = _send(strategy, BASE, [1, 2, 3])
        replies = [_reply(m, arrays, n, site) for m, (site, (arrays, n)) in zip(sent, uploads.items())]
        for site, reply in zip(uploads, replies):
            if site in early:
                strategy.check_train_reply_early(reply)
        assert len(strategy._early_scores) == len(early)  # noqa: SLF001 - scored as they arrived
        strategy.aggregate_train(1, replies)
        scored["late" if not early else "early"] = {s: m["screen-score"]
                                                    for s, m in strategy.last_train.site_metrics.items()}
    assert scored["early"] == scored["late"]
    change = np.sqrt(sum(np.sum((uploads["mall"][0][k].astype(np.float64) - BASE[k]) ** 2) for k in BASE))
    assert scored["early"]["mall"] == pytest.approx(change / np.sqrt(120.0), rel=1e-12)
