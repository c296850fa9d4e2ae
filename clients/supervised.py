"""A supervised training round on a site (FedPav, FedReID's CDW/KD/clustering, FedKLPR, RAF, FedDG).

The site loads the global SHARED arrays and its own head, optionally ranks its gallery with the
received model first (when the round carries the previous round's evaluation), trains locally,
measures how far its model moved on a fixed probe batch (CDW's cosine distance, KLPWA's KL
divergence), and replies. A model that arrives pruned (FedKLPR: the server's one mask, carried by
the sparse encoding) stays pruned: its mask is re-applied after every step and the upload keeps
exactly its positions. Under FedKLPR with Cross-Round Recovery a large enough site trains without
a few of its identities and reports how well its trained model re-identifies them (reid/holdout.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from flwr.app import RecordDict

from clients.kept import restore_local_state
from clients.site import Site
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData
from reid.data.tensor_cache import LabelledImages, load_images, training_images
from reid.divergence import cosine_logit_distance, eval_outputs, feature_kl, fixed_batch, kl_regulariser
from reid.holdout import HeldBack, distractor_choice, held_back_score, hold_back
from reid.models import ReIDNet, fresh_models
from reid.pruning import apply_masks, kept_fraction, mask_keeper, masks_to
from reid.raf import MultiResolution
from reid.seeding import stable_seed
from reid.style import STYLE_WIDTH, StyleSharing, camera_styles
from reid.train import train_local
from strategies.validation import EVALUATE_ROUND_KEY, STYLE_BANK_KEY, check_style

PROBE_BATCH = 32  # images of the fixed per-round batch on which the model's change (CDW, KL) is measured


def train_supervised(site: Site, content: RecordDict, state: RecordDict, spec: SiteRunSpec,
                     data: ReIDData) -> RecordDict:
    """One supervised round; the reply carries the SHARED arrays (pruned ones sparse-encoded)."""
    name, device, server_round = site.name, site.device, int(content["config"]["server-round"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    held = hold_back(data, spec.crr, stable_seed(spec.seed, name, "holdout")) if spec.pruning.enabled else \
        HeldBack(data, [])
    torch.manual_seed(stable_seed(spec.seed, name))  # a fresh head is the same in every run
    model = fresh_models.build(spec.model, num_classes=held.training.num_train_ids)
    received = site.load_received(model, content, state, spec.bn_stats)
    restore_local_state(model, state, name)
    model.to(device)
    masks = masks_to(received.masks, device)
    if masks:
        apply_masks(model, masks)
    evaluated = None
    if EVALUATE_ROUND_KEY in content["config"]:  # the received model is the global one of that round:
        evaluated = site.evaluation(model, data, spec)  # rank with it before training
        site.keep_model(model, content, state, spec, evaluated, received.masks)
    images = training_images(held.training, spec.model.height, spec.model.width, site.image_cache_dir,
                             spec.train.num_workers)
    probe = None
    if spec.measure_change:
        probe, _ = fixed_batch(images, PROBE_BATCH, seed=stable_seed(spec.seed, name, server_round, "probe"))
        before, before_features = eval_outputs(model, probe, device)  # received backbone, this site's previous head
    regulariser = kl_regulariser(model, spec.kll) if spec.kll.enabled and server_round >= spec.kll.start_round else None
    torch.manual_seed(stable_seed(spec.seed, name, server_round, "train"))  # dropout (augmentation has its own)
    multires = MultiResolution(spec.raf) if spec.raf.enabled else None
    sharing = style_sharing(content, spec, stable_seed(spec.seed, name, server_round, "style"))
    with sharing.clean_running_stats(model) if sharing is not None else nullcontext():
        stats = train_local(model, images, spec.train, device, seed=stable_seed(spec.seed, name, server_round),
                            augment=spec.augment, extra_loss=regulariser,
                            after_step=mask_keeper(model, masks) if masks else None,
                            label=f"[{name} round {server_round}]", multires=multires, restyle=sharing)
    metrics = {
        "num-examples": len(images),
        "num-identities": held.training.num_train_ids,
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second,
        "image-passes": stats.images * (multires.passes_per_image if multires else 1),  # forward + backward
        "corrupt-images": data.num_corrupt,
        "kept-fraction": kept_fraction(received.masks, model),
    }
    if probe is not None:
        after, after_features = eval_outputs(model, probe, device)
        metrics["cdw-distance"] = cosine_logit_distance(before, after)
        metrics["kl-divergence"] = feature_kl(before_features, after_features)
    if held.samples:
        metrics.update(held_back_metrics(site, model, held, images, spec, stable_seed(spec.seed, name, "distractors")))
    style = None
    if sharing is not None:
        metrics["restyled-images"] = sharing.restyled
        if spec.style.share:  # this site's camera styles, for the others (numbers, never an image)
            style = camera_styles(images.images, np.array([s.camid for s in held.training.train]))
            metrics["style-bytes"] = style.nbytes
    if device.type == "cuda":  # what this site's GPU must hold, for operators sizing their boxes
        metrics["gpu-peak-mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    return site.training_reply(model, content, state, spec, received, metrics, evaluated, style=style)


def held_back_metrics(site: Site, model: ReIDNet, held: HeldBack, images: LabelledImages, spec: SiteRunSpec,
                      seed: int) -> dict[str, float]:
    """How the trained model re-identifies the held-back identities (Cross-Round Recovery's signal)."""
    pictures = load_images([s.path for s in held.samples], spec.model.height, spec.model.width,
                           site.image_cache_dir, spec.train.num_workers, label=f"{site.name} held back")
    chosen = distractor_choice(held.training.train, seed)
    score = held_back_score(model, pictures, held.samples, images.images[chosen],
                            [held.training.train[i] for i in chosen], site.device, spec.eval_batch_size)
    return {"holdout-map": score.mAP, "holdout-map-se": score.se, "holdout-queries": score.queries,
            "holdout-identities": held.identities}


def style_sharing(content: RecordDict, spec: SiteRunSpec, seed: int) -> StyleSharing | None:
    """feddg's restyling for this round, with the other sites' camera styles the server sent (none
    yet in the first round: the batch's own images stand in), or None when the preset has none."""
    if not spec.style.enabled:
        return None
    bank = content[STYLE_BANK_KEY][STYLE_BANK_KEY].numpy() if STYLE_BANK_KEY in content.array_records else None
    if bank is not None and (reason := check_style(bank, STYLE_WIDTH)):
        raise ValueError(f"the server's style bank is malformed: {reason}")
    return StyleSharing(spec.style, bank if spec.style.share else None, seed)
