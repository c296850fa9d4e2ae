"""A supervised training round on a site (FedPav, FedReID's CDW/KD/clustering, FedKLPR, RAF).

The site loads the global SHARED arrays and its own head, optionally ranks its gallery with the
received model first (when the round carries the previous round's evaluation), trains locally,
measures how far its model moved on a fixed probe batch (CDW's cosine distance, KLPWA's KL
divergence), prunes on FedKLPR's schedule with Cross-Round Recovery, and replies.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from flwr.app import RecordDict

from clients.kept import load_prune_state, restore_local_state, save_prune_state
from clients.site import Site
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData
from reid.data.tensor_cache import training_images
from reid.divergence import accuracy, cosine_logit_distance, eval_logits, eval_outputs, feature_kl, fixed_batch, \
    kl_regulariser
from reid.models import ReIDNet, build_model, split_state
from reid.pruning import (PruneState, apply_masks, cross_round_check, kept_fraction, mask_keeper, masks_to,
                          masks_to_numpy, prune_step)
from reid.raf import MultiResolution
from reid.seeding import stable_seed
from reid.train import train_local
from reid.style import StyleMixer
from strategies.validation import EVALUATE_ROUND_KEY, STYLE_BANK_KEY, check_style

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


def train_supervised(site: Site, content: RecordDict, state: RecordDict, spec: SiteRunSpec,
                     data: ReIDData) -> RecordDict:
    """One supervised round; the reply carries the SHARED arrays (pruned ones sparse-encoded)."""
    name, device, server_round = site.name, site.device, int(content["config"]["server-round"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(stable_seed(spec.seed, name))  # a fresh head is the same in every run
    model = build_model(spec.model, num_classes=data.num_train_ids)
    received = site.load_received(model, content, spec.bn_stats)
    restore_local_state(model, state, name)
    model.to(device)
    evaluated = None
    if EVALUATE_ROUND_KEY in content["config"]:  # the received model is the global one of that round:
        evaluated = site.evaluation(model, data, spec)  # rank with it before training
        site.keep_model(model, content, state, spec, evaluated)
    prune = load_prune_state(state) if spec.pruning.enabled else PruneState()
    prune.masks, prune.previous_masks = masks_to(prune.masks, device), masks_to(prune.previous_masks, device)
    if prune.masks:
        apply_masks(model, prune.masks)
    images = training_images(data, spec.model.height, spec.model.width, site.image_cache_dir, spec.train.num_workers)
    probe, _ = fixed_batch(images, PROBE_BATCH, seed=stable_seed(spec.seed, name, server_round, "probe"))
    before, before_features = eval_outputs(model, probe, device)  # received backbone, this site's previous head
    regulariser = kl_regulariser(model, spec.kll) if spec.kll.enabled and server_round >= spec.kll.start_round else None
    torch.manual_seed(stable_seed(spec.seed, name, server_round, "train"))  # dropout (augmentation has its own)
    multires = MultiResolution(spec.raf) if spec.raf.enabled else None
    mixer = style_mixer(model, content, spec, stable_seed(spec.seed, name, server_round, "style"))
    with mixer or nullcontext():
        stats = train_local(model, images, spec.train, device, seed=stable_seed(spec.seed, name, server_round),
                            augment=spec.augment, extra_loss=regulariser,
                            after_step=mask_keeper(model, prune.masks) if prune.masks else None,
                            label=f"[{name} round {server_round}]", multires=multires)
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
        batch, targets = fixed_batch(images, VALIDATION_BATCH, seed=stable_seed(spec.seed, name, "validation"))
        signal = accuracy(eval_logits(model, batch, device), targets)
        _prune(model, prune, spec, signal, server_round, received.tensors, name)
        save_prune_state(state, prune)
        metrics.update({"validation-accuracy": signal, "pruning-ratio": prune.ratio,
                        "crr-recoveries": prune.recoveries})
    metrics["kept-fraction"] = kept_fraction(prune.masks)
    if mixer is not None:
        metrics["restyled-images"] = mixer.restyled
    if device.type == "cuda":  # what this site's GPU must hold, for operators sizing their boxes
        metrics["gpu-peak-mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    return site.training_reply(model, content, state, spec, received, metrics, evaluated,
                               masks_to_numpy(prune.masks),
                               style=mixer.site_style() if mixer is not None and spec.style.share else None)


def style_mixer(model: ReIDNet, content: RecordDict, spec: SiteRunSpec, seed: int) -> StyleMixer | None:
    """feddg_ccst's restyling for this round, with the other sites' styles the server sent (none yet
    in the first round: the batch's own images stand in), or None when the preset has no style sharing."""
    if not spec.style.enabled:
        return None
    bank = content[STYLE_BANK_KEY][STYLE_BANK_KEY].numpy() if STYLE_BANK_KEY in content.array_records else None
    if bank is not None and (bank.ndim != 3 or any(check_style(row) for row in bank)):
        raise ValueError(f"the server's style bank is malformed (shape {list(bank.shape)}): "
                         f"{next((check_style(row) for row in bank if check_style(row)), 'not [sites, 4, C]')}")
    return StyleMixer(model, spec.style, bank if spec.style.share else None, seed)
