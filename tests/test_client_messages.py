"""What a site sends: only SHARED arrays and a few numbers; its head stays in context.state.

The ClientApp is called exactly as Flower calls it (a Message and a Context), on real images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
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
    reply = app(_message("train", global_arrays, spec, 1), _context(tiny_site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
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
    assert set(reply.content.keys()) == {"metrics", "site"}
    metrics = reply.content["metrics"]
    assert {"rank1", "rank5", "rank10", "mAP", "mINP", "num-queries"} <= set(metrics.keys())
    assert 0.0 <= metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1.0
    assert message_wire_bytes(reply) < 4_000


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


def test_a_pruning_site_uploads_encoded_tensors_and_keeps_its_masks(tiny_site: Path) -> None:
    from clients.kept import MASKS_KEY
    from reid.divergence import KLLConfig
    from reid.pruning import CRRConfig, PruningConfig
    from strategies.sparse_records import decode_record

    # CRR off: a recovery would rightly re-open the pruned weights; this test is about the masks
    spec = SiteRunSpec(model=SPEC.model, train=SPEC.train, bn_stats="local", kll=KLLConfig(enabled=True, start_round=1),
                       pruning=PruningConfig(enabled=True, target=0.5, schedule="constant"),
                       crr=CRRConfig(enabled=False))
    context = _context(tiny_site)
    global_arrays = _global(spec)
    reply = app(_message("train", global_arrays, spec, 1), context)
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == set(global_arrays.keys())
    encoded = [k for k in arrays.keys() if arrays[k].numpy().dtype == np.uint8]
    assert "backbone.conv1.weight" in encoded and "bottleneck.0.weight" in encoded
    assert not any(k.endswith(("bias", "running_mean")) or ".bn" in k for k in encoded)
    shapes = {k: tuple(global_arrays[k].shape) for k in global_arrays.keys()}
    decoded = decode_record(arrays, shapes)
    conv = decoded["backbone.conv1.weight"]
    assert conv.mask.mean() == pytest.approx(0.5, abs=0.01) and (conv.values[~conv.mask] == 0).all()
    metrics = reply.content["metrics"]
    assert metrics["kept-fraction"] == pytest.approx(0.5, abs=0.01) and metrics["pruning-ratio"] == 0.5
    assert metrics["kl-divergence"] >= 0 and metrics["validation-accuracy"] >= 0
    dense_bytes = sum(a.numpy().nbytes for a in global_arrays.values())
    assert message_wire_bytes(reply) < 0.6 * dense_bytes
    masks = context.state[MASKS_KEY]
    np.testing.assert_array_equal(masks["backbone.conv1.weight"].numpy(), conv.mask)

    # next round: a dense global model arrives, yet the site's pruned weights stay zero
    second = app(_message("train", global_arrays, spec, 2), context)
    again = decode_record(second.content["arrays"], shapes)["backbone.conv1.weight"]
    assert (again.values[~conv.mask] == 0).all()


def test_a_site_answers_a_packed_message_packed_in_the_transport_precision(tiny_site: Path) -> None:
    global_arrays = _global(SPEC)
    message = _message("train", pack_record(global_arrays, "bfloat16"), SPEC, 1)
    message.content["config"]["transport-dtype"] = "bfloat16"
    reply = app(message, _context(tiny_site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    arrays = reply.content["arrays"]
    assert is_packed(arrays)
    wire = {entry["name"]: entry["wire"] for entry in json.loads(arrays["manifest"].numpy().tobytes())}
    assert {wire[k] for k in global_arrays.keys() if global_arrays[k].dtype == "float32"} == {"bfloat16"}
    restored = unpack_record(arrays)
    assert set(restored.keys()) == set(global_arrays.keys())
    assert all(restored[k].dtype == global_arrays[k].dtype for k in global_arrays.keys())
