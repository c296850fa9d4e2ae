"""A FedUReID training round on a site that holds no identity labels (reid/unsupervised.py).

The site's pseudo-labels and cluster memory, its place in the merge schedule and (with the
``ema`` update) its previous local model stay in the site's state (clients/kept.py), so a
restarted site continues its clustering. They are keyed by the training files' fingerprint: a
site whose training images changed starts clustering again, and says so.

What leaves: the SHARED arrays (backbone and bottleneck; there is no classifier) and numbers:
images, loss, clusters, cluster purity where file names happen to carry identities (reporting
only), epochs run and image passes (the computation FedUReID's personalisation saves).
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from clients.kept import PREVIOUS_LOCAL_KEY, load_cluster_state, restore_local_state, save_cluster_state
from clients.location import IMAGES_PER_IDENTITY
from clients.site import Site
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData
from reid.data.tensor_cache import cache_key, load_images
from reid.models import fresh_models
from reid.raf import MultiResolution
from reid.seeding import stable_seed
from reid.unsupervised import blend_states, purity_metrics, run_round
from strategies.validation import EVALUATE_ROUND_KEY


def train_unsupervised(site: Site, content: RecordDict, state: RecordDict, spec: SiteRunSpec,
                       data: ReIDData) -> RecordDict:
    """One FedUReID round: personalised start, cluster, train with the memory, reply."""
    name, device, server_round = site.name, site.device, int(content["config"]["server-round"])
    cfg = spec.unsupervised
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(stable_seed(spec.seed, name))
    model = fresh_models.build(spec.model, num_classes=0)
    received = site.load_received(model, content, state, spec.bn_stats)
    restore_local_state(model, state, name)
    model.to(device)
    evaluated = None
    if EVALUATE_ROUND_KEY in content["config"]:  # the global model of that round, before any local change
        evaluated = site.evaluation(model, data, spec)
        site.keep_model(model, content, state, spec, evaluated)
    paths = [sample.path for sample in data.train]  # the images only: no pid is read for training
    fingerprint = cache_key(paths, spec.model.height, spec.model.width)
    clusters = load_cluster_state(state, fingerprint, name)
    if cfg.update == "ema" and clusters is not None and PREVIOUS_LOCAL_KEY in state.array_records:
        previous = state[PREVIOUS_LOCAL_KEY].to_torch_state_dict()
        model.load_state_dict(blend_states(received.tensors, previous, cfg.ema_local), strict=False)
    images = load_images(paths, spec.model.height, spec.model.width, site.image_cache_dir,
                         spec.train.num_workers, label=name, key=fingerprint)
    own_estimate = site.node_config.get(IMAGES_PER_IDENTITY)
    torch.manual_seed(stable_seed(spec.seed, name, server_round, "train"))  # dropout (augmentation has its own)
    clusters, report = run_round(model, images, clusters, cfg, spec.train, device,
                                 seed=stable_seed(spec.seed, name, server_round), augment=spec.augment,
                                 images_per_identity=float(own_estimate) if own_estimate else None,  # type: ignore[arg-type]
                                 label=f"[{name} round {server_round}]",
                                 multires=MultiResolution(spec.raf) if spec.raf.enabled else None)
    save_cluster_state(state, clusters, fingerprint)
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
    return site.training_reply(model, content, state, spec, received, metrics, evaluated,
                               keep_shared_as=PREVIOUS_LOCAL_KEY if cfg.update == "ema" else None)
