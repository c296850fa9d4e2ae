"""What a camera site does with a message: local training (FedPav / FedReID / FedKLPR; FedUReID's
unsupervised rounds in clients/unsupervised_site.py) and on-site evaluation.

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
from typing import Callable

import torch
from flwr.app import Context, MetricRecord, RecordDict

from clients.prune_state import load_prune_state, save_prune_state
from clients.site_state import image_cache_dir
from clients.site_steps import (
    LOCAL_STATE_KEY,
    evaluation,
    load_received,
    prepare,
    restore_local_state,
    site_record,
    training_reply,
)
from clients.unsupervised_site import train_unsupervised
from reid.config import SiteRunSpec
from reid.data.tensor_cache import training_images
from reid.divergence import (
    accuracy,
    cosine_logit_distance,
    eval_outputs,
    eval_logits,
    feature_kl,
    fixed_batch,
    kl_regulariser,
)
from reid.models import ReIDNet, build_model, split_state
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
from reid.raf import MultiResolution
from reid.seeding import stable_seed
from reid.train import train_local
from strategies.validation import EVALUATE_ROUND_KEY

__all__ = ["HANDLERS", "LOCAL_STATE_KEY", "Handler"]
PROBE_BATCH = 32  # images of the fixed per-round batch on which the model's change (CDW, KL) is measured
VALIDATION_BATCH = 256  # images of the fixed batch whose accuracy is Cross-Round Recovery's signal (noise ~0.03)
log = logging.getLogger("clients")


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
    SHARED arrays (pruned ones in the sparse encoding; packed when they came packed). An
    unsupervised run (FedUReID) trains on pseudo-labels instead (clients/unsupervised_site.py)."""
    spec, location, data, device = prepare(content, context)
    if spec.unsupervised.enabled:
        return train_unsupervised(content, context, spec, location, data, device)
    site, server_round = location.name, int(content["config"]["server-round"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(stable_seed(spec.seed, site))  # a fresh head is the same in every run
    model = build_model(spec.model, num_classes=data.num_train_ids)
    received = load_received(model, content, spec.bn_stats)
    restore_local_state(model, context, site)
    model.to(device)
    evaluated = None
    if EVALUATE_ROUND_KEY in content["config"]:  # the received model is the global one of that round:
        evaluated = evaluation(model, data, spec, device, context, site)  # rank with it before training
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
    multires = MultiResolution(spec.raf) if spec.raf.enabled else None
    stats = train_local(model, images, spec.train, device, seed=stable_seed(spec.seed, site, server_round),
                        augment=spec.augment, extra_loss=regulariser,
                        after_step=mask_keeper(model, prune.masks) if prune.masks else None,
                        label=f"[{site} round {server_round}]", multires=multires)
    after, after_features = eval_outputs(model, probe, device)
    metrics = {
        "num-examples": len(images),
        "num-identities": data.num_train_ids,
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second,
        "image-passes": stats.images * (multires.passes_per_image if multires else 1),  # forward + backward
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
    return training_reply(model, content, context, spec, location, metrics, evaluated, masks_to_numpy(prune.masks))


def evaluate_site(content: RecordDict, context: Context) -> RecordDict:
    """Rank this site's gallery for its own queries with the global backbone; only numbers leave."""
    spec, location, data, device = prepare(content, context)
    model = build_model(spec.model, num_classes=0)
    load_received(model, content, spec.bn_stats)
    restore_local_state(model, context, location.name)
    metrics = evaluation(model, data, spec, device, context, location.name)
    return RecordDict({"metrics": metrics, "site": site_record(location)})


Handler = Callable[[RecordDict, Context], RecordDict]
HANDLERS: dict[str, Handler] = {"train": train_site, "evaluate": evaluate_site}  # by message kind
