"""What a camera site does with a message: local training (FedPav / FedReID / FedKLPR) and on-site evaluation.

Pure functions of the message's content and the site's ``Context``, so that the same code runs
inside the ClientApp (simulation, ``--no-worker``) and inside the long-lived site worker
(clients/worker.py) that a deployed site hands its messages to.

What leaves the site: the SHARED arrays of its model (pruned tensors in the sparse encoding), a
few numbers (image count, loss, timings, model-change measures, Rank-k/mAP) and its name. What
stays: images, the identity classifier, under the FedBN-style policy the BatchNorm running
statistics, and the pruning masks; those live in ``context.state`` between rounds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from clients.prune_state import load_prune_state, save_prune_state
from clients.site import SiteLocation, load_site, locate_site
from clients.site_state import RUN_TAG_KEY, image_cache_dir, persist_site_state, restore_site_state, state_file
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData
from reid.data.tensor_cache import training_images
from reid.device import pick_device
from reid.divergence import (
    accuracy,
    cosine_logit_distance,
    eval_outputs,
    eval_logits,
    feature_kl,
    fixed_batch,
    kl_regulariser,
)
from reid.evaluate import evaluate_model
from reid.models import ReIDNet, build_model, load_shared_state, split_state
from reid.pruning import (
    PruneState,
    apply_masks,
    cross_round_check,
    kept_fraction,
    mask_keeper,
    masks_to,
    masks_to_numpy,
    prune_step,
)
from reid.seeding import stable_seed
from reid.train import train_local
from strategies.packing import TRANSPORT_DTYPE_KEY, is_packed, pack_record, unpack_record  # the wire format
from strategies.sparse_records import decode_record, encode_record
from strategies.validation import EVALUATE_ROUND_KEY, EVALUATION_KEY

LOCAL_STATE_KEY = "local-state"  # classifier head (+ BN statistics under bn_stats=local)
PROBE_BATCH = 32  # images of the fixed per-round batch on which the model's change (CDW, KL) is measured
VALIDATION_BATCH = 256  # images of the fixed batch whose accuracy is Cross-Round Recovery's signal (noise ~0.03)
log = logging.getLogger("clients")


def _prepare(content: RecordDict, context: Context) -> tuple[SiteRunSpec, SiteLocation, ReIDData, torch.device]:
    spec = SiteRunSpec.from_flat(dict(content["config"]))
    location = locate_site(context.node_config, context.run_config)
    restore_site_state(context, _state_file(content, context))  # a restarted SuperNode: head and masks from disk
    data = load_site(location, spec.verify_images)
    gpu = context.node_config.get("gpu")
    return spec, location, data, pick_device(None if gpu in (None, "") else int(gpu))


def _state_file(content: RecordDict, context: Context) -> Path | None:
    return state_file(context, str(content["config"].get(RUN_TAG_KEY, "")))


def _restore_local_state(model: ReIDNet, context: Context, site: str) -> None:
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


def _site_record(location: SiteLocation) -> ConfigRecord:
    return ConfigRecord({"name": location.name})


def _load_received(model: ReIDNet, content: RecordDict, bn_stats: str) -> dict[str, torch.Tensor]:
    """Decode the received global arrays (packed or not, dense or sparse-encoded) into ``model``;
    return them."""
    expected = split_state(model.state_dict(), bn_stats)[0]
    record = unpack_record(content["arrays"])
    shapes = {k: tuple(expected[k].shape) for k in record.keys() if k in expected}
    received = {k: torch.from_numpy(t.values) for k, t in decode_record(record, shapes).items()}
    received.update({k: torch.from_numpy(record[k].numpy()) for k in record.keys() if k not in expected})
    load_shared_state(model, received, bn_stats)  # refuses unexpected or missing keys
    return received


def _prune(model: ReIDNet, prune: PruneState, spec: SiteRunSpec, signal: float, server_round: int,
           received: dict[str, torch.Tensor], site: str) -> None:
    """Cross-Round Recovery check of the last pruning step, then the scheduled pruning step."""
    reopened = cross_round_check(prune, signal, server_round, spec.crr, site)
    if reopened:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for key, positions in reopened.items():  # re-opened weights start from the global model
                params[key][positions.to(params[key].device)] = received[key].to(params[key].device)[positions]
    shared = split_state(model.state_dict(), spec.bn_stats)[0]
    if prune_step(prune, shared, signal, server_round, spec.pruning):
        apply_masks(model, prune.masks)
        log.info("%s round %d: pruned to ratio %.2f", site, server_round, prune.ratio)


def train_site(content: RecordDict, context: Context) -> RecordDict:
    """Load the global SHARED arrays and this site's head, train locally; the reply carries the
    SHARED arrays (pruned ones in the sparse encoding; packed when they came packed)."""
    spec, location, data, device = _prepare(content, context)
    site, server_round = location.name, int(content["config"]["server-round"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(stable_seed(spec.seed, site))  # a fresh head is the same in every run
    model = build_model(spec.model, num_classes=data.num_train_ids)
    received = _load_received(model, content, spec.bn_stats)
    _restore_local_state(model, context, site)
    model.to(device)
    evaluation = None
    if EVALUATE_ROUND_KEY in content["config"]:  # the received model is the global one of that round:
        evaluation = _evaluation(model, data, spec, device, context, site)  # rank with it before training
    prune = load_prune_state(context.state) if spec.pruning.enabled else PruneState()
    prune.masks, prune.previous_masks = masks_to(prune.masks, device), masks_to(prune.previous_masks, device)
    if prune.masks:
        apply_masks(model, prune.masks)
    images = training_images(data, spec.model.height, spec.model.width, image_cache_dir(context),
                             spec.train.num_workers)
    probe, _ = fixed_batch(images, PROBE_BATCH, seed=stable_seed(spec.seed, site, server_round, "probe"))
    before, before_features = eval_outputs(model, probe, device)  # received backbone, this site's previous head
    regulariser = kl_regulariser(model, spec.kll) if spec.kll.enabled and server_round >= spec.kll.start_round else None
    torch.manual_seed(stable_seed(spec.seed, site, server_round, "train"))  # dropout (augmentation has its own)
    stats = train_local(model, images, spec.train, device, seed=stable_seed(spec.seed, site, server_round),
                        augment=spec.augment, extra_loss=regulariser,
                        after_step=mask_keeper(model, prune.masks) if prune.masks else None,
                        label=f"[{site} round {server_round}]")
    after, after_features = eval_outputs(model, probe, device)
    metrics = {
        "num-examples": len(images),
        "num-identities": data.num_train_ids,
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second,
        "corrupt-images": data.num_corrupt,
        "cdw-distance": cosine_logit_distance(before, after),
        "kl-divergence": feature_kl(before_features, after_features),
    }
    if spec.pruning.enabled:
        batch, targets = fixed_batch(images, VALIDATION_BATCH, seed=stable_seed(spec.seed, site, "validation"))
        signal = accuracy(eval_logits(model, batch, device), targets)
        _prune(model, prune, spec, signal, server_round, received, site)
        save_prune_state(context.state, prune)
        metrics.update({"validation-accuracy": signal, "pruning-ratio": prune.ratio,
                        "crr-recoveries": prune.recoveries})
    metrics["kept-fraction"] = kept_fraction(prune.masks)
    if device.type == "cuda":  # what this site's GPU must hold, for operators sizing their boxes
        metrics["gpu-peak-mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    shared, local = split_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, spec.bn_stats)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(local)
    persist_site_state(context, _state_file(content, context))
    arrays = encode_record({k: v.numpy() for k, v in shared.items()}, masks_to_numpy(prune.masks),
                           spec.pruning.value_dtype)
    if is_packed(content["arrays"]):  # answer in the form the server chose
        arrays = pack_record(arrays, str(content["config"].get(TRANSPORT_DTYPE_KEY, "float32")))
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "site": _site_record(location)})
    if evaluation is not None:
        reply[EVALUATION_KEY] = evaluation
    return reply


def evaluate_site(content: RecordDict, context: Context) -> RecordDict:
    """Rank this site's gallery for its own queries with the global backbone; only numbers leave."""
    spec, location, data, device = _prepare(content, context)
    model = build_model(spec.model, num_classes=0)
    _load_received(model, content, spec.bn_stats)
    _restore_local_state(model, context, location.name)
    metrics = _evaluation(model, data, spec, device, context, location.name)
    return RecordDict({"metrics": metrics, "site": _site_record(location)})


def _evaluation(model: ReIDNet, data: ReIDData, spec: SiteRunSpec, device: torch.device, context: Context,
                site: str) -> MetricRecord:
    """Rank-1/5/10, mAP (both conventions) and mINP of ``model`` on this site's query/gallery split."""
    result = evaluate_model(model, data, device, spec.eval_batch_size, image_cache_dir(context),
                            spec.train.num_workers, spec.train.device_cache_mb)
    log.info("[%s] Rank-1 %.3f mAP %.3f over %d queries", site, result.rank(1), result.mAP,
             result.num_valid_queries)
    return MetricRecord({
        "rank1": result.rank(1), "rank5": result.rank(5), "rank10": result.rank(10),
        "mAP": result.mAP, "mAP-market": result.mAP_market, "mINP": result.mINP,
        "num-queries": result.num_valid_queries, "num-gallery": len(data.gallery),
    })


Handler = Callable[[RecordDict, Context], RecordDict]
HANDLERS: dict[str, Handler] = {"train": train_site, "evaluate": evaluate_site}  # by message kind
