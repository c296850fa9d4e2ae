"""What a site sends: only SHARED arrays and a few numbers; its head stays in context.state.

The ClientApp is called exactly as Flower calls it (a Message and a Context), on real images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from clients.app import app
from clients.kept import LOCAL_STATE_KEY
from clients.location import SiteConfigError, locate_site
from reid.config import SiteRunSpec
from reid.data.layout import DatasetLayoutError
from reid.models import ModelSpec, build_model, is_local_key, shared_state
from reid.train import TrainConfig
from strategies.packing import is_packed, pack_record, unpack_record
from strategies.wire import message_wire_bytes

SPEC = SiteRunSpec(model=ModelSpec(backbone="resnet10", last_stride=1, height=64, width=32),
                   train=TrainConfig(batch_size=16), bn_stats="local")


def _message(kind: str, arrays: ArrayRecord, spec: SiteRunSpec, server_round: int) -> Message:
    config = ConfigRecord(spec.to_flat())
    config["server-round"] = server_round
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type=kind)


def _context(site: Path) -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-root": str(site), "dataset": "tiny-site"},
                   state=RecordDict(), run_config={})


def _global(spec: SiteRunSpec) -> ArrayRecord:
    """The same global model whatever ran before (the ClientApp seeds itself; this is the server's)."""
    torch.manual_seed(0)
    return ArrayRecord(shared_state(build_model(spec.model), spec.bn_stats))


def _serialised(message: Message) -> bytes:
    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


@pytest.mark.parametrize("bn_stats", ["local", "average"])
def test_train_reply_holds_no_local_key_and_no_image_bytes(tiny_site: Path, bn_stats: str) -> None:
    spec = SiteRunSpec(model=SPEC.model, train=SPEC.train, bn_stats=bn_stats)
    global_arrays = _global(spec)
    sent = time.time()
    reply = app(_message("train", global_arrays, spec, 1), _context(tiny_site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site", "timing"}
    timing = content["timing"]  # when the site worked on it, for the server's time split; nothing else
    assert set(timing.keys()) == {"work-start", "work-end"}
    assert sent <= timing["work-start"] < timing["work-end"] <= time.time()
    assert timing["work-end"] - timing["work-start"] >= content["metrics"]["train-seconds"]
    assert set(content["arrays"].keys()) == set(global_arrays.keys())
    assert not any(is_local_key(k, bn_stats) for k in content["arrays"].keys())
    assert all(np.dtype(a.dtype) == np.float32 for a in content["arrays"].values())
    assert dict(content["site"]) == {"name": "tiny-site"}
    assert content["metrics"]["num-examples"] == len(list((tiny_site / "train").iterdir()))
    # no image bytes: no 64-byte window of any image file appears in the serialised reply, and the
    # reply is no larger than its float arrays plus a little framing
    blob = _serialised(reply)
    for image in sorted(tiny_site.rglob("*.jpg"))[::5]:
        data = image.read_bytes()
        assert data[len(data) // 2: len(data) // 2 + 64] not in blob
    array_bytes = sum(len(a.data) for a in content["arrays"].values())
    assert array_bytes < message_wire_bytes(reply) < array_bytes + 64_000


def test_a_site_skips_the_change_probe_unless_asked_and_trains_the_same_model(tiny_site: Path) -> None:
    replies = {}
    for measure in (True, False):
        spec = SiteRunSpec(model=SPEC.model, train=SPEC.train, bn_stats="local", measure_change=measure)
        replies[measure] = app(_message("train", _global(spec), spec, 1), _context(tiny_site)).content
    assert replies[True]["metrics"]["cdw-distance"] > 0 and replies[True]["metrics"]["kl-divergence"] > 0
    assert not {"cdw-distance", "kl-divergence"} & set(replies[False]["metrics"].keys())
    for key, array in replies[True]["arrays"].items():  # the probe is eval-mode only: same training
        np.testing.assert_array_equal(array.numpy(), replies[False]["arrays"][key].numpy())


def test_head_and_local_bn_statistics_stay_in_context_state_across_rounds(tiny_site: Path) -> None:
    context = _context(tiny_site)
    first = app(_message("train", _global(SPEC), SPEC, 1), context)
    saved = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    num_ids = int(first.content["metrics"]["num-identities"])
    assert tuple(saved["classifier.weight"].shape) == (num_ids, 512)
    assert "backbone.bn1.running_mean" in saved  # bn_stats=local keeps statistics on the site
    # round 2 with lr 0: the head must be the one trained in round 1, not a fresh one
    frozen = SiteRunSpec(model=SPEC.model, train=TrainConfig(batch_size=16, lr=0.0), bn_stats="local")
    app(_message("train", first.content["arrays"], frozen, 2), context)
    again = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    np.testing.assert_array_equal(again["classifier.weight"].numpy(), saved["classifier.weight"].numpy())
    fresh = build_model(SPEC.model, num_classes=num_ids).classifier.weight.detach().numpy()
    assert np.abs(saved["classifier.weight"].numpy() - fresh).max() > 1e-3


def test_evaluate_reply_holds_only_metrics(tiny_site: Path) -> None:
    reply = app(_message("evaluate", _global(SPEC), SPEC, 1), _context(tiny_site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"metrics", "site", "timing"}
    timing = reply.content["timing"]  # all of an evaluation message's work is evaluation
    assert (timing["eval-start"], timing["eval-end"]) == (timing["work-start"], timing["work-end"])
    metrics = reply.content["metrics"]
    assert {"rank1", "rank5", "rank10", "mAP", "mINP", "num-queries"} <= set(metrics.keys())
    assert 0.0 <= metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1.0
    assert message_wire_bytes(reply) < 4_000


def test_a_site_without_statistics_of_its_own_adapts_batchnorm_once_per_received_model(
        tiny_site: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A held-out site (no LOCAL state) computes AdaBN statistics for a model it is sent; the same
    model sent again reuses them (same ranks), another model gets its own pass."""
    from clients import site as site_module

    passes: list[int] = []
    real = site_module.adapt_batchnorm
    monkeypatch.setattr(site_module, "adapt_batchnorm", lambda *a, **k: (passes.append(1), real(*a, **k))[1])
    context = _context(tiny_site)
    context.run_id = 99  # a run of its own: this process's Site for run 1 has seen the global model already
    first = app(_message("evaluate", _global(SPEC), SPEC, 1), context)
    again = app(_message("evaluate", _global(SPEC), SPEC, 2), context)
    assert len(passes) == 1 and "reused" in caplog.text
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    other = {k: Array(a.numpy() * (1.01 if "conv" in k else 1.0)) for k, a in _global(SPEC).items()}
    app(_message("evaluate", ArrayRecord(other), SPEC, 3), context)
    assert len(passes) == 2


def test_a_missing_data_root_fails_the_handler_naming_the_path(tmp_path: Path) -> None:
    # Flower turns a handler's exception into an error reply carrying this message
    with pytest.raises(DatasetLayoutError, match="no-such-site.*Market-1501-style"):
        app(_message("train", _global(SPEC), SPEC, 1), _context(tmp_path / "no-such-site"))


def test_simulated_sites_are_picked_by_partition_id(tiny_sites: Path) -> None:
    node = {"partition-id": 1, "num-partitions": 3}
    assert locate_site(node, {"sites-root": str(tiny_sites)}).name == "1-station"
    with pytest.raises(SiteConfigError, match="holds only 3 site folders"):
        locate_site({"partition-id": 0, "num-partitions": 5}, {"sites-root": str(tiny_sites)})
    with pytest.raises(SiteConfigError, match="sites-root"):
        locate_site(node, {"sites-root": ""})
    with pytest.raises(SiteConfigError, match="--node-config"):
        locate_site({}, {})


class _Nodes:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _federate(strategy, sites: dict[int, Context], spec: SiteRunSpec, arrays: ArrayRecord, server_round: int
              ) -> tuple[ArrayRecord, list[Message], list[Message]]:
    """One training round between a real strategy and real ClientApp calls: (new global, sent, replies)."""
    config = ConfigRecord(spec.to_flat())
    sent = list(strategy.configure_train(server_round, arrays, config, _Nodes(sorted(sites))))
    replies = [app(message, sites[message.metadata.dst_node_id]) for message in sent]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    new, _ = strategy.aggregate_train(server_round, replies)
    return new, sent, replies


def test_every_site_trains_and_uploads_on_the_one_mask_the_server_sent(tiny_sites: Path) -> None:
    """FedKLPR's server prunes the global model; in the next round both sites receive it sparse,
    train on its mask and upload exactly its positions: after the round the masks agree across
    sites by construction (overlap 1.0), and both directions shrink."""
    from reid.divergence import KLLConfig
    from reid.pruning import PruningConfig
    from strategies.fedklpr import FedKLPR
    from strategies.pruning_plan import PruningSchedule
    from strategies.sparse_records import decode_record
    from strategies.transfer import ModelTransfer

    spec = SiteRunSpec(model=SPEC.model, train=SPEC.train, bn_stats="local", kll=KLLConfig(enabled=True, start_round=1),
                       pruning=PruningConfig(enabled=True))
    strategy = FedKLPR(min_sites=2, transfer=ModelTransfer(sparse_downlink=True),
                       pruning=PruningSchedule(enabled=True, target=0.5, ramp_rounds=1, start_round=1, start_accuracy=0))
    folders = sorted(p for p in tiny_sites.iterdir() if p.is_dir())[:2]
    sites = {node: Context(run_id=1, node_id=node, node_config={"data-root": str(f), "dataset": f.name},
                           state=RecordDict(), run_config={}) for node, f in zip((11, 12), folders)}
    dense = _global(spec)
    values = {k: a.numpy().copy() for k, a in dense.items()}
    strategy.plan.advance(1, values, {}, train_accuracy=1.0)  # the server's first pruning step, on round 0's model
    strategy.masks = dict(strategy.plan.masks)
    pruned = ArrayRecord({k: Array(v) for k, v in values.items()})
    agreed = {k: m.copy() for k, m in strategy.masks.items()}
    assert strategy.plan.ratio == pytest.approx(0.5)

    _, sent, replies = _federate(strategy, sites, spec, pruned, 2)
    shapes = {k: tuple(dense[k].shape) for k in dense.keys()}
    uploads = [decode_record(unpack_record(r.content["arrays"]), shapes) for r in replies]
    for upload in uploads:  # identical across the sites: exactly the server's mask
        for key, mask in agreed.items():
            np.testing.assert_array_equal(upload[key].mask, mask)
            assert not upload[key].values[~mask].any()
    assert set(strategy.last_train.accepted) == {f.name for f in folders}
    assert strategy.last_train.notes["pruning"]["mask_overlap"] == 1.0
    assert all(r.content["metrics"]["kept-fraction"] == pytest.approx(0.5, abs=0.01) for r in replies)
    dense_down = message_wire_bytes(Message(content=RecordDict({"arrays": pack_record(dense), "config": ConfigRecord()}),
                                            dst_node_id=11, message_type="train"))
    assert all(message_wire_bytes(m) < 0.6 * dense_down for m in [*sent, *replies])  # down and up


def test_compressed_changes_both_ways_with_error_feedback_kept_on_the_site(tiny_site: Path) -> None:
    """Round 1 sends the whole model, round 2 its 8-bit change from the version the site holds; each
    upload is the site's 8-bit change and the residual it left out is in context.state. The server
    rebuilds every upload on its copy of what that site holds, which is the site's, bit for bit."""
    from dataclasses import replace

    from clients.kept import RESIDUAL_KEY, load_held, save_held
    from strategies.fedpav import FedPav
    from strategies.transfer import UPDATE_BASE_KEY, CompressedTransfer
    from strategies.update_codec import CompressionSpec

    compression = CompressionSpec(enabled=True, bits=8)
    strategy = FedPav(min_sites=1, transfer=CompressedTransfer(compression))
    site = Context(run_id=1, node_id=21, node_config={"data-root": str(tiny_site), "dataset": "tiny"},
                   state=RecordDict(), run_config={})
    config = ConfigRecord({**SPEC.to_flat(), **compression.to_config()})

    def federate(arrays: ArrayRecord, server_round: int) -> tuple[ArrayRecord, Message, Message]:
        (sent,) = strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), _Nodes([21]))
        reply = app(sent, site)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return strategy.aggregate_train(server_round, [reply])[0], sent, reply

    dense = _global(SPEC)
    after_one, first_sent, first = federate(dense, 1)
    assert UPDATE_BASE_KEY not in first_sent.content["config"]  # nothing held yet: the whole model
    dense_bytes = message_wire_bytes(first_sent)
    assert message_wire_bytes(first) < 0.3 * dense_bytes  # a change up
    residual = site.state[RESIDUAL_KEY]["backbone.conv1.weight"].numpy()
    assert 0 < np.abs(residual).max()  # error feedback carries something to round 2
    after_two, second_sent, second = federate(after_one, 2)
    assert second_sent.content["config"][UPDATE_BASE_KEY] == first_sent.content["config"]["update-version"]
    assert message_wire_bytes(second_sent) < 0.3 * dense_bytes  # a change down
    assert list(strategy.last_train.accepted) == ["tiny"]
    held = load_held(site.state)
    assert held is not None and held.version == second_sent.content["config"]["update-version"]
    server_copy = strategy.transfer.versions[strategy.transfer.held[21]]
    for key, values in held.values.items():  # the server's copy is the site's, bit for bit
        np.testing.assert_array_equal(server_copy.values[key], values)
    gap = np.abs(held.values["backbone.conv1.weight"] - after_one["backbone.conv1.weight"].numpy()).max()
    assert gap < 1e-2  # the site holds the global model up to the quantisation the next change sends
    assert np.isfinite(after_two["backbone.conv1.weight"].numpy()).all()

    # A site that did not answer round 3 gets the whole model in round 4: the server cannot know
    # whether it holds round 3's version.
    (third,) = strategy.configure_train(3, after_two, ConfigRecord(dict(config)), _Nodes([21]))
    assert UPDATE_BASE_KEY in third.content["config"]
    assert strategy.aggregate_train(3, []) == (None, None)
    (fourth,) = strategy.configure_train(4, after_two, ConfigRecord(dict(config)), _Nodes([21]))
    assert UPDATE_BASE_KEY not in fourth.content["config"]
    save_held(site.state, replace(held, version="another"))  # as if it had moved on without us
    with pytest.raises(ValueError, match="it needs the whole model"):  # Flower answers the server with it
        app(third, site)  # a change from a version the site does not hold is refused


@pytest.mark.parametrize("algorithm", ["fedureid", "feddg"])
def test_every_algorithm_uploads_compressed_changes_with_its_own_records(tiny_site: Path, algorithm: str) -> None:
    """FedUReID, and the FedDG method with RAF on, reply under compressed transfers with 8-bit changes
    of every weight tensor from the model they received (decoded here as the server does) and keep
    their residual; feddg's style record travels beside them as before."""
    from clients.kept import RESIDUAL_KEY
    from server.config import compose_config, compression_spec, site_run_spec
    from strategies.transfer import UPDATE_VERSION_KEY
    from strategies.update_codec import decode_record_change, is_update

    overrides = ("model=small train.batch_size=16 algorithm.unsupervised.epochs_first=1 algorithm.raf.scales=[0.5] "
                 f"algorithm.compression.enabled=true algorithm.raf.enabled={algorithm == 'feddg'}")
    cfg = compose_config({"algorithm": algorithm, "overrides": overrides})
    spec = site_run_spec(cfg)
    arrays = _global(spec)
    config = ConfigRecord({**spec.to_flat(), **compression_spec(cfg).to_config(), "server-round": 1,
                           UPDATE_VERSION_KEY: "v1"})
    context = _context(tiny_site)
    reply = app(Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=7,
                        message_type="train"), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    record = unpack_record(reply.content["arrays"]) if is_packed(reply.content["arrays"]) else reply.content["arrays"]
    weights = [k for k in arrays.keys() if arrays[k].numpy().ndim >= 2]
    assert weights and all(is_update(record[k].numpy()) for k in weights)
    sent = {k: a.numpy() for k, a in arrays.items()}
    rebuilt = decode_record_change(record, sent, {k: tuple(a.shape) for k, a in arrays.items()})
    moved = [k for k in weights if not np.array_equal(rebuilt[k].values, sent[k])]
    assert len(moved) > len(weights) / 2  # the site trained, and its change came through
    assert message_wire_bytes(reply) < 0.3 * sum(a.numpy().nbytes for a in arrays.values())
    assert RESIDUAL_KEY in context.state.array_records
    assert ("style" in reply.content.keys()) == (algorithm == "feddg")
    if algorithm == "feddg":  # RAF's passes at half resolution ran too
        assert reply.content["metrics"]["image-passes"] == 2 * (reply.content["metrics"]["num-examples"] // 16) * 16
