"""One FedUReID round on a site (Zhuang, Wen, Zhang, ACM MM 2021): bottom-up clustering (reid/buc.py)
between rounds, memory-based training in them, and the three personalisations. No labels are read.

A round, given the model the site starts from (the received global one, or its personalised blend):

1. First round: every image is its own cluster (pseudo-labels = image indices), and the memory's
   slots are the images' features. Later rounds with ``relabel=global``: merge clusters now, with
   features of the model just received.
2. Train ``epochs`` epochs with the memory as the classifier (softmax over slot similarities at
   temperature ``tau``, slots updated with momentum after each step).
3. With ``relabel=local`` (the reference's default): merge clusters with features of the model just
   trained; the next round trains on those labels.

After a merge, every cluster's slot starts from its members' mean feature (the reference starts
from zeros; the mean is what the slots converge to, and gives a useful classifier from the first
step). Clustering features are the evaluation's: eval mode, image + flipped image, L2-normalised.

Personalisation (each a switch; ``fedureid_no_personalization`` turns all three off):

* **Epochs** (``epochs_first`` / ``epochs_later``, ``dynamic_epochs``): many epochs in a site's
  first round (the reference: 20), where the model learns to tell images apart, then few, at
  ``later_lr_mult`` x the lr (the reference: 0.1 -> 0.01). Dynamic (the reference's personalised
  epoch): a site stops after the first epoch whose memory-classification accuracy on its
  pseudo-labels reaches ``stop_accuracy`` (0.95), so a site whose clusters are already learnt
  spends less. The reference also stops on a single batch at 100 %, which with batches of 16 is
  chance as much as saturation; we use the whole epoch.
* **Clustering** (``merge: fixed | personalized``): fixed merges ``merge_percent`` x the site's
  images after each round and stops after 1/merge_percent - 1 merges (the reference, which then
  assumes 1/merge_percent rounds). Personalized spreads the merges a site still needs evenly over
  the rounds it has left: from its cluster count down to images / ``images_per_identity`` (a
  site's own estimate may come from its node config), finishing in the last round whatever the
  number of rounds or the site's size.
* **Update** (``update: none | ema``): before re-clustering, the site blends the received global
  model with its own previous local model, w = (1 - ema_local) x global + ema_local x local
  (an exponential moving average across rounds). It runs on the site rather than in the cloud so
  the server keeps no per-site models and nothing extra travels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from reid.buc import ClusterMemory, merge_closest
from reid.cluster_quality import cluster_quality
from reid.data.tensor_cache import LabelledImages
from reid.data.transforms import AugmentSpec
from reid.features import extract_features
from reid.models import ReIDNet
from reid.raf import MultiResolution
from reid.train import TrainConfig, TrainStats, train_local

log = logging.getLogger(__name__)

MERGE_SCHEDULES = ("fixed", "personalized")
RELABEL_MODELS = ("local", "global")
UPDATE_RULES = ("none", "ema")
FLIP_PASSES = 2  # a clustering feature is image + flipped image: two forward passes


@dataclass(frozen=True)
class UnsupervisedConfig:
    """FedUReID's site-side knobs; defaults are the reference's where it has one."""

    enabled: bool = False
    tau: float = 0.1  # memory softmax temperature (the reference's t = 10 = 1/tau)
    memory_momentum: float = 0.5
    size_penalty: float = 0.003  # lambda of the BUC distance (FedUReID's config; BUC's paper 0.005)
    merge: str = "fixed"
    merge_percent: float = 0.05
    images_per_identity: float = 8.0  # personalized merging: the clusters aimed at = images / this
    relabel: str = "local"
    epochs_first: int = 20
    epochs_later: int = 1
    later_lr_mult: float = 0.1
    dynamic_epochs: bool = False
    stop_accuracy: float = 0.95
    update: str = "none"
    ema_local: float = 0.5
    rounds: int = 0  # the run's number of rounds; the server fills it in (personalized merging needs it)

    def __post_init__(self) -> None:
        for name, value, allowed in (("merge", self.merge, MERGE_SCHEDULES), ("relabel", self.relabel, RELABEL_MODELS),
                                     ("update", self.update, UPDATE_RULES)):
            if value not in allowed:
                raise ValueError(f"unsupervised.{name} must be one of {allowed}, got {value!r}")
        if not 0 < self.merge_percent < 1 or self.images_per_identity < 1 or self.epochs_first < 1 \
                or self.epochs_later < 1 or not 0 <= self.ema_local < 1 or self.tau <= 0:
            raise ValueError(f"unsupervised settings out of range: {self}")


@dataclass(frozen=True)
class ClusterState:
    """What a site keeps between rounds: its pseudo-labels, its memory and where it is in the schedule."""

    labels: torch.Tensor  # int64 [N], clusters 0..C-1
    slots: torch.Tensor  # float32 [C, D], L2-normalised
    rounds_trained: int = 0
    merges_done: int = 0

    @property
    def num_clusters(self) -> int:
        return int(self.labels.max()) + 1


@dataclass(frozen=True)
class RoundReport:
    """What a round did, for the site's reply: training stats, merging, computation."""

    stats: TrainStats
    passes_per_image: int  # training passes per image and epoch: 1, plus one per RAF scale
    merged: int  # clusters removed by this round's merge
    feature_passes: int  # forward-only image passes spent on clustering features


def merge_count(cfg: UnsupervisedConfig, num_images: int, num_clusters: int, merges_done: int,
                images_per_identity: float) -> int:
    """How many pairs to merge now (never below one cluster)."""
    if cfg.merge == "fixed":
        total = int(round(1 / cfg.merge_percent)) - 1
        count = int(num_images * cfg.merge_percent) if merges_done < total else 0
    else:
        if cfg.rounds < 1:
            raise ValueError("personalized merging needs unsupervised.rounds (the server sets it to federation.rounds)")
        target = max(1, round(num_images / images_per_identity))
        left = (cfg.rounds - 1) - merges_done  # a merge after (local) or before (global) every round but one
        count = math.ceil((num_clusters - target) / left) if left > 0 and num_clusters > target else 0
    return max(0, min(count, num_clusters - 1))


def epochs_for(cfg: UnsupervisedConfig, rounds_trained: int) -> int:
    return cfg.epochs_first if rounds_trained == 0 else cfg.epochs_later


def blend_states(received: dict[str, torch.Tensor], previous: dict[str, torch.Tensor],
                 local_weight: float) -> dict[str, torch.Tensor]:
    """(1 - local_weight) x received + local_weight x previous for floating tensors the two share
    with the same shape; everything else as received."""
    blended = dict(received)
    for key, value in received.items():
        old = previous.get(key)
        if old is not None and value.is_floating_point() and old.shape == value.shape:
            blended[key] = (1 - local_weight) * value + local_weight * old.to(value.dtype)
    return blended


def _recluster(state: ClusterState, features: torch.Tensor, cfg: UnsupervisedConfig,
               images_per_identity: float) -> tuple[ClusterState, int]:
    count = merge_count(cfg, len(features), state.num_clusters, state.merges_done, images_per_identity)
    if count == 0:
        return state, 0
    labels = merge_closest(features, state.labels, count, cfg.size_penalty)
    merged = state.num_clusters - (int(labels.max()) + 1)
    return replace(state, labels=labels, slots=ClusterMemory.centroids(features, labels),
                   merges_done=state.merges_done + 1), merged


def run_round(model: ReIDNet, images: torch.Tensor, state: ClusterState | None, cfg: UnsupervisedConfig,
              train: TrainConfig, device: torch.device, seed: int, augment: AugmentSpec = AugmentSpec(),
              images_per_identity: float | None = None, label: str = "",
              multires: MultiResolution | None = None) -> tuple[ClusterState, RoundReport]:
    """One round of FedUReID's local learning on uint8 ``images`` [N, 3, H, W]; trains ``model`` in
    place and returns the site's next state. ``state`` None starts clustering from scratch."""
    per_identity = images_per_identity or cfg.images_per_identity
    passes, merged = 0, 0

    def features() -> torch.Tensor:
        nonlocal passes
        passes += FLIP_PASSES * len(images)
        return torch.from_numpy(extract_features(model, images, device))

    if state is None:
        state = ClusterState(labels=torch.arange(len(images)), slots=features())
    elif cfg.relabel == "global":
        state, merged = _recluster(state, features(), cfg, per_identity)
    memory = ClusterMemory.from_slots(state.slots, cfg.tau, cfg.memory_momentum).to(device)
    first = state.rounds_trained == 0
    train = replace(train, local_epochs=epochs_for(cfg, state.rounds_trained),
                    lr=train.lr * (1.0 if first else cfg.later_lr_mult))
    log.info("%s %d images in %d clusters; %d epoch(s) at lr %.4g", label, len(images), state.num_clusters,
             train.local_epochs, train.lr)
    stats = train_local(model, LabelledImages(images, state.labels), train, device, seed=seed, augment=augment,
                        label=label, head=memory, stop_accuracy=cfg.stop_accuracy if cfg.dynamic_epochs else None,
                        multires=multires)
    state = replace(state, slots=memory.slots.cpu(), rounds_trained=state.rounds_trained + 1)
    if cfg.relabel == "local":
        state, merged = _recluster(state, features(), cfg, per_identity)
    if merged:
        log.info("%s merged to %d clusters (-%d)", label, state.num_clusters, merged)
    return state, RoundReport(stats=stats, passes_per_image=multires.passes_per_image if multires else 1,
                              merged=merged, feature_passes=passes)


def purity_metrics(labels: torch.Tensor, hidden_pids: list[int]) -> dict[str, float]:
    """NMI and pairwise precision/recall/F of the clusters against identities the site happens to
    know (names in the Market layout), over the images whose identity is known; {} when none is.
    For reporting only: nothing here reaches training."""
    known = np.array([pid >= 0 for pid in hidden_pids])
    if known.sum() < 2:
        return {}
    quality = cluster_quality(labels.numpy()[known], np.array(hidden_pids)[known])
    return {"cluster-nmi": quality.nmi, "cluster-precision": quality.pairwise_precision,
            "cluster-recall": quality.pairwise_recall, "cluster-f": quality.pairwise_f}

