"""The steps every site handler shares: read the message and the site, load the received model,
put back what the site kept, rank its gallery, and build the reply.

Used by clients/handlers.py (supervised FedPav / FedReID / FedKLPR training, evaluation) and
clients/unsupervised_site.py (FedUReID).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from clients.site import SiteLocation, load_site, locate_site
from clients.site_state import RUN_TAG_KEY, image_cache_dir, persist_site_state, restore_site_state, state_file
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData
from reid.device import pick_device
from reid.data.resolution import parse_scales
from reid.evaluate import evaluate_at_scales
from reid.models import ReIDNet, load_shared_state, split_state
from strategies.packing import TRANSPORT_DTYPE_KEY, is_packed, pack_record, unpack_record  # the wire format
from strategies.sparse_records import decode_record, encode_record
from strategies.validation import EVALUATION_KEY

LOCAL_STATE_KEY = "local-state"  # classifier head (+ BN statistics under bn_stats=local)
log = logging.getLogger("clients")


def prepare(content: RecordDict, context: Context) -> tuple[SiteRunSpec, SiteLocation, ReIDData, torch.device]:
    """The round's settings, this site's data (training images unlabelled when the run is
    unsupervised) and device; a restarted SuperNode first gets its state back from disk."""
    spec = SiteRunSpec.from_flat(dict(content["config"]))
    location = locate_site(context.node_config, context.run_config)
    restore_site_state(context, site_state_file(content, context))
    data = load_site(location, spec.verify_images, labelled_train=not spec.unsupervised.enabled)
    gpu = context.node_config.get("gpu")
    return spec, location, data, pick_device(None if gpu in (None, "") else int(gpu))


def site_state_file(content: RecordDict, context: Context) -> Path | None:
    return state_file(context, str(content["config"].get(RUN_TAG_KEY, "")))


def restore_local_state(model: ReIDNet, context: Context, site: str) -> None:
    """Put back what this site kept from earlier rounds: its head, and BN stats under bn_stats=local."""
    if LOCAL_STATE_KEY not in context.state.array_records:
        return
    saved = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    own = model.state_dict()
    usable = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    stale = [k for k in saved if k in own and own[k].shape != saved[k].shape]
    if stale:
        log.warning("%s: saved %s no longer fits (identities changed?); starting it afresh", site, stale[0])
    model.load_state_dict(usable, strict=False)


def site_record(location: SiteLocation) -> ConfigRecord:
    return ConfigRecord({"name": location.name})


def load_received(model: ReIDNet, content: RecordDict, bn_stats: str) -> dict[str, torch.Tensor]:
    """Decode the received global arrays (packed or not, dense or sparse-encoded) into ``model``;
    return them."""
    expected = split_state(model.state_dict(), bn_stats)[0]
    record = unpack_record(content["arrays"])
    shapes = {k: tuple(expected[k].shape) for k in record.keys() if k in expected}
    received = {k: torch.from_numpy(t.values) for k, t in decode_record(record, shapes).items()}
    received.update({k: torch.from_numpy(record[k].numpy()) for k in record.keys() if k not in expected})
    load_shared_state(model, received, bn_stats)  # refuses unexpected or missing keys
    return received


def evaluation(model: ReIDNet, data: ReIDData, spec: SiteRunSpec, device: torch.device, context: Context,
               site: str) -> MetricRecord:
    """Rank-1/5/10, mAP (both conventions) and mINP of ``model`` on this site's query/gallery split;
    with ``eval_query_scales`` also mAP@s and rank1@s with the queries at s × the resolution, and
    the drift gap (native mAP minus mAP at the lowest of them)."""
    scales = parse_scales(spec.eval_query_scales)
    results = evaluate_at_scales(model, data, device, scales, spec.eval_batch_size, image_cache_dir(context),
                                 spec.train.num_workers, spec.train.device_cache_mb)
    result = results[1.0]
    log.info("[%s] Rank-1 %.3f mAP %.3f over %d queries", site, result.rank(1), result.mAP,
             result.num_valid_queries)
    metrics = {
        "rank1": result.rank(1), "rank5": result.rank(5), "rank10": result.rank(10),
        "mAP": result.mAP, "mAP-market": result.mAP_market, "mINP": result.mINP,
        "num-queries": result.num_valid_queries, "num-gallery": len(data.gallery),
    }
    for scale in scales:
        metrics[f"mAP@{scale:g}"], metrics[f"rank1@{scale:g}"] = results[scale].mAP, results[scale].rank(1)
    if scales:
        metrics["drift-gap"] = result.mAP - results[min(scales)].mAP
        log.info("[%s] mAP at query resolution %s: %s", site, " / ".join(f"{s:g}" for s in scales),
                 " / ".join(f"{results[s].mAP:.3f}" for s in scales))
    return MetricRecord(metrics)


def training_reply(model: ReIDNet, content: RecordDict, context: Context, spec: SiteRunSpec, location: SiteLocation,
                   metrics: dict[str, float], evaluated: MetricRecord | None,
                   masks: dict[str, np.ndarray] | None = None, keep_shared_as: str | None = None) -> RecordDict:
    """Keep the LOCAL part of the trained model in ``context.state`` (and on disk), and answer with
    the SHARED part: pruned tensors in the sparse encoding, packed when the server sent it packed.
    ``keep_shared_as``: also keep the SHARED part in the state under that key (FedUReID's ema)."""
    shared, local = split_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, spec.bn_stats)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(local)
    if keep_shared_as is not None:
        context.state[keep_shared_as] = ArrayRecord(shared)
    persist_site_state(context, site_state_file(content, context))
    arrays = encode_record({k: v.numpy() for k, v in shared.items()}, masks or {}, spec.pruning.value_dtype)
    if is_packed(content["arrays"]):  # answer in the form the server chose
        arrays = pack_record(arrays, str(content["config"].get(TRANSPORT_DTYPE_KEY, "float32")))
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "site": site_record(location)})
    if evaluated is not None:
        reply[EVALUATION_KEY] = evaluated
    return reply
