"""A FedUReID training round on a site that holds no identity labels (reid/unsupervised.py).

The site's pseudo-labels and cluster memory, its place in the merge schedule and (with the
``ema`` update) its previous local model stay in ``context.state`` and the site's state file, so a
restarted site continues its clustering. They are keyed by the training files' fingerprint: a
site whose training images changed starts clustering again, and says so.

What leaves: the SHARED arrays (backbone and bottleneck; there is no classifier) and numbers:
images, loss, clusters, cluster purity where file names happen to carry identities (reporting
only), epochs run and image passes (the computation FedUReID's personalisation saves).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from clients.site import SiteLocation
from clients.site_state import image_cache_dir
from clients.site_steps import evaluation, load_received, restore_local_state, training_reply
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData
from reid.data.tensor_cache import cache_key, load_images
from reid.models import build_model
from reid.raf import MultiResolution
from reid.seeding import stable_seed
from reid.unsupervised import ClusterState, blend_states, purity_metrics, run_round
from strategies.validation import EVALUATE_ROUND_KEY

CLUSTERS_KEY = "buc-clusters"  # ArrayRecord: labels [N] int64, slots [C, D] float32
PROGRESS_KEY = "buc-progress"  # ConfigRecord: rounds trained, merges done, the training files' fingerprint
PREVIOUS_LOCAL_KEY = "buc-previous-local"  # ArrayRecord: the SHARED arrays this site trained last round (ema)
IMAGES_PER_IDENTITY = "images-per-identity"  # node_config: this site's own estimate (personalized merging)
log = logging.getLogger("clients")


def load_cluster_state(state: RecordDict, fingerprint: str, site: str) -> ClusterState | None:
    """The saved clustering, or None when there is none or it belongs to other training files."""
    if CLUSTERS_KEY not in state.array_records or PROGRESS_KEY not in state.config_records:
        return None
    progress = state[PROGRESS_KEY]
    if progress["fingerprint"] != fingerprint:
        log.warning("%s: the training images changed since the last round; clustering starts again", site)
        return None
    arrays = state[CLUSTERS_KEY]
    return ClusterState(labels=torch.from_numpy(arrays["labels"].numpy().copy()),
                        slots=torch.from_numpy(arrays["slots"].numpy().copy()),
                        rounds_trained=int(progress["rounds-trained"]), merges_done=int(progress["merges-done"]))


def save_cluster_state(state: RecordDict, clusters: ClusterState, fingerprint: str) -> None:
    state[CLUSTERS_KEY] = ArrayRecord({"labels": Array(clusters.labels.numpy()),
                                       "slots": Array(clusters.slots.float().numpy())})
    state[PROGRESS_KEY] = ConfigRecord({"rounds-trained": clusters.rounds_trained,
                                        "merges-done": clusters.merges_done, "fingerprint": fingerprint})


def train_unsupervised(content: RecordDict, context: Context, spec: SiteRunSpec, location: SiteLocation,
                       data: ReIDData, device: torch.device) -> RecordDict:
    """One FedUReID round: personalised start, cluster, train with the memory, reply."""
    site, server_round = location.name, int(content["config"]["server-round"])
    cfg = spec.unsupervised
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(stable_seed(spec.seed, site))
    model = build_model(spec.model, num_classes=0)
    received = load_received(model, content, spec.bn_stats)
    restore_local_state(model, context, site)
    model.to(device)
    evaluated = None
    if EVALUATE_ROUND_KEY in content["config"]:  # the global model of that round, before any local change
        evaluated = evaluation(model, data, spec, device, context, site)
    paths = [sample.path for sample in data.train]  # the images only: no pid is read for training
    fingerprint = cache_key(paths, spec.model.height, spec.model.width)
    clusters = load_cluster_state(context.state, fingerprint, site)
    if cfg.update == "ema" and clusters is not None and PREVIOUS_LOCAL_KEY in context.state.array_records:
        previous = context.state[PREVIOUS_LOCAL_KEY].to_torch_state_dict()
        model.load_state_dict(blend_states(received, previous, cfg.ema_local), strict=False)
    images = load_images(paths, spec.model.height, spec.model.width, image_cache_dir(context),
                         spec.train.num_workers, label=site, key=fingerprint)
    own_estimate = context.node_config.get(IMAGES_PER_IDENTITY)
    torch.manual_seed(stable_seed(spec.seed, site, server_round, "train"))  # dropout (augmentation has its own)
    clusters, report = run_round(model, images, clusters, cfg, spec.train, device,
                                 seed=stable_seed(spec.seed, site, server_round), augment=spec.augment,
                                 images_per_identity=float(own_estimate) if own_estimate else None,
                                 label=f"[{site} round {server_round}]",
                                 multires=MultiResolution(spec.raf) if spec.raf.enabled else None)
    save_cluster_state(context.state, clusters, fingerprint)
    stats = report.stats
    metrics: dict[str, float] = {
        "num-examples": len(images),
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,  # of the memory classifier on the pseudo-labels
        "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second,
        "corrupt-images": data.num_corrupt,
        "clusters": clusters.num_clusters,
        "clusters-merged": report.merged,
        "epochs": stats.epochs,
        "image-passes": stats.images * report.passes_per_image,  # forward + backward
        "feature-passes": report.feature_passes,  # forward only, for clustering
        **purity_metrics(clusters.labels, [sample.pid for sample in data.train]),  # reporting only
    }
    if device.type == "cuda":
        metrics["gpu-peak-mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    return training_reply(model, content, context, spec, location, metrics, evaluated,
                          keep_shared_as=PREVIOUS_LOCAL_KEY if cfg.update == "ema" else None)
