"""FedPav aggregation arithmetic and the screening of malformed replies, on hand-built messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies.averaging import normalise_weights, weighted_average
from strategies.packing import is_packed, unpack_record
from strategies.clustering import ClusteringSpec
from strategies.fedpav import FedPav



class NodeList:
    """The one Grid call FedAvg's sampling makes: which nodes are connected."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def _arrays(w: list[float], b: float) -> ArrayRecord:
    return ArrayRecord({"layer.weight": Array(np.array(w, dtype=np.float32)),
                        "layer.bias": Array(np.array([b], dtype=np.float32))})


def _started(strategy: FedPav, nodes: list[int], arrays: ArrayRecord | None = None) -> list[Message]:
    config = ConfigRecord({"lr": 0.1})
    return list(strategy.configure_train(3, arrays or _arrays([0.0, 0.0], 0.0), config, NodeList(nodes)))


def _reply(to: Message, arrays: ArrayRecord | None, metrics: dict, site: str, **extra) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site}), **extra})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=to)


def test_configure_train_sends_the_global_arrays_and_the_round_to_every_node() -> None:
    strategy = FedPav(min_sites=3)
    messages = _started(strategy, [11, 12, 13])
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    assert all(m.metadata.message_type == "train" for m in messages)
    assert messages[0].content["config"]["server-round"] == 3
    assert is_packed(messages[0].content["arrays"])  # one flat array + manifest on the wire
    assert set(unpack_record(messages[0].content["arrays"]).keys()) == {"layer.weight", "layer.bias"}


def test_weights_are_training_set_sizes_and_the_average_is_exact() -> None:
    strategy = FedPav(min_sites=3)
    sent = _started(strategy, [1, 2, 3])
    replies = [
        _reply(sent[0], _arrays([1, 2], 10), {"num-examples": 100, "train-loss": 1.0}, "mall"),
        _reply(sent[1], _arrays([3, 4], 20), {"num-examples": 100, "train-loss": 2.0}, "station"),
        _reply(sent[2], _arrays([5, 6], 40), {"num-examples": 200, "train-loss": 4.0}, "campus"),
    ]
    arrays, metrics = strategy.aggregate_train(3, replies)
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), [(1 + 3 + 2 * 5) / 4, (2 + 4 + 2 * 6) / 4])
    np.testing.assert_allclose(arrays["layer.bias"].numpy(), [(10 + 20 + 2 * 40) / 4])
    assert arrays["layer.weight"].numpy().dtype == np.float32
    assert strategy.last_train.accepted == {"mall": 0.25, "station": 0.25, "campus": 0.5}
    assert metrics["train-loss"] == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 4)
    assert metrics["sites-accepted"] == 3 and metrics["sites-rejected"] == 0



def test_replies_checked_as_they_arrive_are_not_checked_again_and_aggregate_the_same() -> None:
    """The round loop hands each training reply to ``check_train_reply_early`` while other sites
    still train; the aggregate must be the one a late check gives, malformed replies included."""
    results = []
    for early in (False, True):
        strategy = FedPav(min_sites=2)
        sent = _started(strategy, [1, 2, 3])
        replies = [
            _reply(sent[0], _arrays([1, 2], 10), {"num-examples": 100, "train-loss": 1.0}, "mall"),
            _reply(sent[1], _arrays([np.nan, 4], 20), {"num-examples": 100, "train-loss": 2.0}, "station"),
            _reply(sent[2], _arrays([5, 6], 40), {"num-examples": 200, "train-loss": 4.0}, "campus"),
        ]
        checks = []
        original = strategy._check_train_reply
        strategy._check_train_reply = lambda reply: checks.append(reply) or original(reply)  # type: ignore[method-assign]
        if early:
            for reply in replies[:2]:  # the third arrives last and is checked at aggregation
                strategy.check_train_reply_early(reply)
            assert len(checks) == 2
        arrays, _ = strategy.aggregate_train(3, replies)
        assert len(checks) == 3  # every reply checked exactly once
        results.append((arrays["layer.weight"].numpy().tolist(), dict(strategy.last_train.accepted),
                        sorted(strategy.last_train.rejected)))
    assert results[0] == results[1]
    assert results[1][2] == ["station"]  # the non-finite upload is rejected either way

BAD_REPLIES = {
    "missing": (lambda: ArrayRecord({"layer.weight": Array(np.ones(2, np.float32))}), {}, "missing arrays: layer.bias"),
    "extra": (lambda: ArrayRecord({**{k: v for k, v in _arrays([1, 1], 1).items()},
                                   "classifier.weight": Array(np.ones((5, 2), np.float32))}), {},
              "unexpected arrays: classifier.weight"),
    "shape": (lambda: ArrayRecord({"layer.weight": Array(np.ones(3, np.float32)),
                                   "layer.bias": Array(np.ones(1, np.float32))}), {}, "has shape (3,)"),
    "nan": (lambda: _arrays([np.nan, 1], 1), {}, "non-finite"),
    "dtype": (lambda: ArrayRecord({"layer.weight": Array(np.ones(2, np.float64)),
                                   "layer.bias": Array(np.ones(1, np.float32))}), {}, "dtype float64"),
    "no-count": (lambda: _arrays([1, 1], 1), {"num-examples": None}, "'num-examples' missing"),
    "zero-count": (lambda: _arrays([1, 1], 1), {"num-examples": 0}, "must be positive"),
    "inf-count": (lambda: _arrays([1, 1], 1), {"num-examples": float("inf")}, "not a finite scalar"),
    "no-arrays": (lambda: None, {}, "lacks records: arrays"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_malformed_reply_is_rejected_with_its_reason_and_the_round_goes_on(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    make_arrays, metric_patch, reason = BAD_REPLIES[case]
    strategy = FedPav(min_sites=2)
    sent = _started(strategy, [1, 2])
    metrics = {"num-examples": 10, **metric_patch}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    good = _reply(sent[0], _arrays([2, 4], 6), {"num-examples": 10}, "good")
    bad = _reply(sent[1], make_arrays(), metrics, "bad")
    arrays, result = strategy.aggregate_train(3, [good, bad])
    assert reason in strategy.last_train.rejected["bad"]
    assert any("rejected reply from bad" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert list(strategy.last_train.accepted) == ["good"]
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), [2, 4])  # the good update alone
    assert result["sites-rejected"] == 1


def test_error_replies_and_unknown_records_are_rejected() -> None:
    strategy = FedPav(min_sites=3)
    sent = _started(strategy, [1, 2, 3])
    failed = Message(Error(code=0, reason="CUDA out of memory"), reply_to=sent[0])
    smuggler = _reply(sent[1], _arrays([1, 1], 1), {"num-examples": 5}, "smuggler",
                      images=ArrayRecord({"x": Array(np.zeros((2, 2), np.uint8))}))
    good = _reply(sent[2], _arrays([1, 3], 5), {"num-examples": 5}, "good")
    arrays, _ = strategy.aggregate_train(3, [failed, smuggler, good])
    assert "CUDA out of memory" in strategy.last_train.rejected[f"node-{sent[0].metadata.dst_node_id}"]
    assert "unexpected records in reply: images" in strategy.last_train.rejected["smuggler"]
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), [1, 3])


def test_no_acceptable_reply_leaves_nothing_to_aggregate() -> None:
    strategy = FedPav(min_sites=1)
    sent = _started(strategy, [1])
    assert strategy.aggregate_train(3, [_reply(sent[0], _arrays([np.inf, 0], 0), {"num-examples": 3}, "x")]) == (None, None)


def test_evaluation_keeps_each_site_and_averages_them_plainly() -> None:
    strategy = FedPav(min_sites=2)
    sent = list(strategy.configure_evaluate(4, _arrays([0, 0], 0), ConfigRecord(), NodeList([1, 2, 3])))
    keys = {"rank5": 0.9, "rank10": 1.0, "mINP": 0.1}
    replies = [
        _reply(sent[0], None, {"rank1": 0.5, "mAP": 0.4, **keys}, "mall"),
        _reply(sent[1], None, {"rank1": 0.3, "mAP": 0.2, **keys}, "campus"),
        _reply(sent[2], None, {"rank1": 0.9}, "broken"),
    ]
    mean = strategy.aggregate_evaluate(4, replies)
    assert mean["rank1"] == pytest.approx(0.4) and mean["mAP"] == pytest.approx(0.3)
    assert set(strategy.last_evaluate.site_metrics) == {"mall", "campus"}
    assert "metric 'rank5' missing" in strategy.last_evaluate.rejected["broken"]


def test_weight_arithmetic_helpers() -> None:
    np.testing.assert_allclose(normalise_weights([1, 3]), [0.25, 0.75])
    for bad in ([0, 0], [1, -1], [np.nan, 1], []):
        with pytest.raises(ValueError):
            normalise_weights(bad)
    out = weighted_average([{"a": np.array([0.0, 4.0])}, {"a": np.array([2.0, 0.0])}], [3, 1])
    np.testing.assert_allclose(out["a"], [0.5, 3.0])


def test_the_average_does_not_depend_on_the_order_replies_arrive_in() -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(size=2).astype(np.float32) for _ in range(5)]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        strategy = FedPav(min_sites=5)
        sent = _started(strategy, [1, 2, 3, 4, 5])
        replies = [_reply(sent[i], _arrays(list(values[i]), float(i)), {"num-examples": 3 + i}, f"site{i}")
                   for i in order]
        results.append(strategy.aggregate_train(3, replies)[0]["layer.weight"].numpy())
    assert results[0].tobytes() == results[1].tobytes()


def test_cdw_weights_are_the_normalised_cosine_distances_and_ignore_data_size() -> None:
    strategy = FedPav(min_sites=2, weighting="cdw")
    sent = _started(strategy, [1, 2])
    replies = [
        _reply(sent[0], _arrays([4, 0], 0), {"num-examples": 1000, "cdw-distance": 0.2}, "big"),
        _reply(sent[1], _arrays([0, 0.8], 0.4), {"num-examples": 10, "cdw-distance": 0.6}, "small"),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_train.accepted == {"big": pytest.approx(0.25), "small": pytest.approx(0.75)}
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), [0.25 * 4, 0.75 * 0.8], rtol=1e-6)
    np.testing.assert_allclose(arrays["layer.bias"].numpy(), [0.75 * 0.4], rtol=1e-6)


def test_cdw_needs_the_distance_metric() -> None:
    strategy = FedPav(min_sites=2, weighting="cdw")
    sent = _started(strategy, [1, 2])
    replies = [_reply(sent[0], _arrays([1, 1], 1), {"num-examples": 5, "cdw-distance": 0.5}, "ok"),
               _reply(sent[1], _arrays([2, 2], 2), {"num-examples": 5}, "silent")]
    strategy.aggregate_train(1, replies)
    assert "'cdw-distance' missing" in strategy.last_train.rejected["silent"]
    assert list(strategy.last_train.accepted) == ["ok"]


def test_refinement_sees_the_aggregate_and_the_uploads_and_only_on_its_rounds() -> None:
    calls = []

    def refine(server_round: int, aggregated: ArrayRecord, uploads: list[ArrayRecord]) -> ArrayRecord:
        calls.append((server_round, aggregated["layer.weight"].numpy().tolist(), len(uploads)))
        return _arrays([9, 9], 9)

    strategy = FedPav(min_sites=2, refine=refine, refine_every=2)
    for server_round, expect in ((1, [1.0, 1.0]), (2, [9.0, 9.0])):
        sent = _started(strategy, [1, 2])
        replies = [_reply(sent[0], _arrays([0, 0], 0), {"num-examples": 1}, "a"),
                   _reply(sent[1], _arrays([2, 2], 2), {"num-examples": 1}, "b")]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        np.testing.assert_allclose(arrays["layer.weight"].numpy(), expect)
    assert calls == [(2, [1.0, 1.0], 2)]


def test_clusters_are_aggregated_apart_and_each_site_gets_its_own_clusters_model() -> None:
    # each upload is recognised by its bias value; a* and b* point in clearly different directions
    directions = {1.0: [1.0, 0.0, 0.0], 3.0: [0.98, 0.1, 0.0], 10.0: [0.0, 1.0, 0.1], 30.0: [0.0, 0.97, 0.0]}
    strategy = FedPav(min_sites=4, clustering=ClusteringSpec(method="threshold", max_distance=0.5),
                      embed=lambda ups: np.array([directions[float(u["layer.bias"].numpy()[0])] for u in ups]))
    sent = {m.metadata.dst_node_id: m for m in _started(strategy, [1, 2, 3, 4])}
    sites = {1: ("a1", 1.0), 2: ("a2", 3.0), 3: ("b1", 10.0), 4: ("b2", 30.0)}
    replies = [_reply(sent[n], _arrays([v, v], v), {"num-examples": 1}, name) for n, (name, v) in sites.items()]
    global_arrays, _ = strategy.aggregate_train(3, replies)
    assert strategy.last_train.clusters == [["a1", "a2"], ["b1", "b2"]]
    np.testing.assert_allclose(global_arrays["layer.weight"].numpy(), [11.0, 11.0])  # all four, equal weights
    following = strategy.configure_train(4, global_arrays, ConfigRecord(), NodeList([1, 2, 3, 4]))
    received = {m.metadata.dst_node_id: float(unpack_record(m.content["arrays"])["layer.weight"].numpy()[0]) for m in following}
    assert received == {1: 2.0, 2: 2.0, 3: 20.0, 4: 20.0}
    assert float(strategy.site_models["b2"]["layer.bias"].numpy()[0]) == 20.0


def test_singletons_give_every_site_back_its_own_model() -> None:
    strategy = FedPav(min_sites=2, clustering=ClusteringSpec(method="singletons"))
    sent = {m.metadata.dst_node_id: m for m in _started(strategy, [1, 2])}
    strategy.aggregate_train(1, [_reply(sent[1], _arrays([1, 1], 1), {"num-examples": 9}, "x"),
                                 _reply(sent[2], _arrays([5, 5], 5), {"num-examples": 4}, "y")])
    following = strategy.configure_evaluate(1, _arrays([0, 0], 0), ConfigRecord(), NodeList([1, 2]))
    assert {m.metadata.dst_node_id: float(unpack_record(m.content["arrays"])["layer.bias"].numpy()[0]) for m in following} == {1: 1.0, 2: 5.0}


def test_mask_aware_average_counts_each_weight_over_the_sites_that_kept_it() -> None:
    from strategies.averaging import masked_weighted_average
    from strategies.sparse_records import Tensor

    a = Tensor(np.array([1.0, 2.0, 0.0, 4.0], np.float32), np.array([True, True, False, True]))
    b = Tensor(np.array([3.0, 0.0, 0.0, 8.0], np.float32), np.array([True, False, False, True]))
    c = Tensor(np.array([5.0, 6.0, 7.0, 8.0], np.float32))  # dense: every weight kept
    out = masked_weighted_average([{"w": a}, {"w": b}, {"w": c}], [1, 1, 2])["w"]
    np.testing.assert_allclose(out, [(0.25 * 1 + 0.25 * 3 + 0.5 * 5) / 1.0, (0.25 * 2 + 0.5 * 6) / 0.75, 7.0,
                                     (0.25 * 4 + 0.25 * 8 + 0.5 * 8) / 1.0], rtol=1e-6)
    nobody = masked_weighted_average([{"w": a}, {"w": b}], [1, 3])["w"]
    np.testing.assert_allclose(nobody, [(1 * 1 + 3 * 3) / 4, 2.0, 0.0, (4 + 3 * 8) / 4], rtol=1e-6)


WIDE = ArrayRecord({"layer.weight": Array(np.zeros(202, np.float32)), "layer.bias": Array(np.zeros(1, np.float32))})


def _sparse(values: list[float], kept: list[bool], bias: float) -> ArrayRecord:
    from strategies.sparse_records import encode_record

    weight = np.array(values, np.float32)
    return encode_record({"layer.weight": weight, "layer.bias": np.array([bias], np.float32)},
                         {"layer.weight": np.array(kept)})


def test_sparse_uploads_are_decoded_and_aggregated_mask_aware() -> None:
    strategy = FedPav(min_sites=2)
    sent = _started(strategy, [1, 2], WIDE)
    big = [0.0] * 200
    first = _sparse([2.0, 0.0] + big, [True, False] + [False] * 200, 1.0)
    second = _sparse([4.0, 6.0] + big, [True, True] + [False] * 200, 3.0)
    assert first["layer.weight"].numpy().dtype == np.uint8  # it really travelled encoded
    arrays, _ = strategy.aggregate_train(1, [_reply(sent[0], first, {"num-examples": 1}, "a"),
                                             _reply(sent[1], second, {"num-examples": 1}, "b")])
    weight = arrays["layer.weight"].numpy()
    np.testing.assert_allclose(weight[:3], [3.0, 6.0, 0.0])
    np.testing.assert_allclose(arrays["layer.bias"].numpy(), [2.0])


def test_a_malformed_encoding_is_rejected_and_the_round_goes_on() -> None:
    strategy = FedPav(min_sites=2)
    sent = _started(strategy, [1, 2], WIDE)
    good = _sparse([1.0] * 2 + [0.0] * 200, [True] * 2 + [False] * 200, 1.0)
    bad = _sparse([1.0] * 2 + [0.0] * 200, [True] * 2 + [False] * 200, 1.0)
    bad["layer.weight"] = Array(bad["layer.weight"].numpy()[:-2])  # values cut short in transit
    arrays, _ = strategy.aggregate_train(1, [_reply(sent[0], good, {"num-examples": 1}, "good"),
                                             _reply(sent[1], bad, {"num-examples": 1}, "bad")])
    assert "undecodable arrays" in strategy.last_train.rejected["bad"]
    assert "value bytes" in strategy.last_train.rejected["bad"]
    assert list(strategy.last_train.accepted) == ["good"] and arrays is not None


def test_klpwa_weights_are_the_normalised_product_with_switchable_directions() -> None:
    from strategies.weighting import KLPWASpec, klpwa_weights

    kl, kept = np.array([0.2, 0.6]), np.array([0.5, 1.0])
    np.testing.assert_allclose(klpwa_weights(kl, kept, KLPWASpec(klaw="gain")), np.array([0.1, 0.6]) / 0.7)
    np.testing.assert_allclose(klpwa_weights(kl, kept, KLPWASpec(klaw="off")), [1 / 3, 2 / 3])
    np.testing.assert_allclose(klpwa_weights(kl, kept, KLPWASpec(klaw="gain", praw="off")), [0.25, 0.75])
    aligned = klpwa_weights(kl, kept, KLPWASpec(klaw="alignment", praw="off"))
    assert aligned[0] > aligned[1]  # closer to the global model weighs more
    compact = klpwa_weights(kl, kept, KLPWASpec(klaw="off", praw="sparsity"))
    np.testing.assert_allclose(compact, [1.0, 0.0])
    with pytest.raises(ValueError, match="klaw"):
        KLPWASpec(klaw="sideways")


def _weights(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"layer.weight": Array(np.array(values, dtype=np.float32).reshape(2, 4)),
                        "layer.bias": Array(np.array([0.5], dtype=np.float32))})


def _change(base: ArrayRecord, target: ArrayRecord, **spec: object) -> ArrayRecord:
    from strategies.update_codec import CompressionSpec, encode_record_change

    return encode_record_change({k: a.numpy() for k, a in target.items()}, {k: a.numpy() for k, a in base.items()},
                                CompressionSpec(enabled=True, block=16, **spec)).record  # type: ignore[arg-type]


COMPRESSED_DAMAGE = {
    "truncated": (lambda b: b[:-2], "bytes of scales and values"),
    "nan scale": (lambda b: np.concatenate([b[:32], np.frombuffer(np.float32(np.nan).tobytes(), np.uint8), b[36:]]),
                  "scale is negative, too large or not finite"),
    "other tensor": (lambda b: np.concatenate([b[:12], np.frombuffer(np.uint64(7).tobytes(), np.uint8), b[20:]]),
                     "the change has 7 elements, the tensor 8"),
}


@pytest.mark.parametrize("case", sorted(COMPRESSED_DAMAGE))
def test_a_malformed_compressed_change_is_rejected_with_its_reason_and_the_round_goes_on(case: str) -> None:
    """With compressed transfers, replies are changes from what each node was sent: they are rebuilt
    on the server's copy of it, and one that does not decode is rejected, naming why."""
    from strategies.transfer import CompressedTransfer
    from strategies.update_codec import CompressionSpec

    strategy = FedPav(min_sites=2, transfer=CompressedTransfer(CompressionSpec(enabled=True, block=16)))
    start = _weights([0.0] * 8)
    sent = _started(strategy, [1, 2], start)
    good = _reply(sent[0], _change(start, _weights([1, 2, 3, 4, 5, 6, 7, 8])), {"num-examples": 10}, "good")
    record = _change(start, _weights([8, 7, 6, 5, 4, 3, 2, 1]))
    damage, reason = COMPRESSED_DAMAGE[case]
    record["layer.weight"] = Array(damage(record["layer.weight"].numpy()).astype(np.uint8))
    bad = _reply(sent[1], record, {"num-examples": 10}, "bad")
    arrays, _ = strategy.aggregate_train(3, [good, bad])
    assert "malformed compressed change" in strategy.last_train.rejected["bad"]
    assert reason in strategy.last_train.rejected["bad"]
    assert list(strategy.last_train.accepted) == ["good"]
    np.testing.assert_allclose(arrays["layer.weight"].numpy().ravel(), np.arange(1, 9), atol=8 / 127)


def test_compressed_changes_average_as_changes_and_a_missing_entry_is_no_change() -> None:
    """Top-k changes from two sites: an entry one site did not send counts as that site's 'no change'
    (the value it was sent), not as a zero weight."""
    from strategies.transfer import CompressedTransfer
    from strategies.update_codec import CompressionSpec

    transfer = CompressedTransfer(CompressionSpec(enabled=True, block=16, topk=0.25))
    strategy = FedPav(min_sites=2, transfer=transfer)
    start = _weights([10.0] * 8)
    sent = _started(strategy, [1, 2], start)
    one = _change(start, _weights([12, 10, 10, 10, 10, 10, 10, 10]), topk=0.125)  # changes entry 0 only
    two = _change(start, _weights([10, 10, 10, 10, 10, 10, 10, 14]), topk=0.125)  # changes entry 7 only
    arrays, _ = strategy.aggregate_train(3, [_reply(sent[0], one, {"num-examples": 10}, "a"),
                                             _reply(sent[1], two, {"num-examples": 10}, "b")])
    np.testing.assert_allclose(arrays["layer.weight"].numpy().ravel(), [11, 10, 10, 10, 10, 10, 10, 12], atol=1e-5)
    sent_versions = {m.metadata.dst_node_id: m.content["config"]["update-version"] for m in sent}
    assert transfer.held == sent_versions and len(set(sent_versions.values())) == 1  # one version for both
