"""The ClientApp a camera site runs: local FedPav training and on-site evaluation.

What leaves the site: the SHARED arrays of its model, a few numbers (image count, loss, timings,
Rank-k/mAP) and its name. What stays: images, the identity classifier and, under the FedBN-style
policy, BatchNorm running statistics; those live in ``context.state`` between rounds.
"""

from __future__ import annotations

import logging
import sys

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.site import SiteLocation, load_site, locate_site
from reid.config import SiteRunSpec
from reid.data.dataset import ImageDataset, ReIDData
from reid.data.transforms import test_transform, train_transform
from reid.device import pick_device
from reid.divergence import cosine_logit_distance, eval_logits, fixed_batch
from reid.evaluate import evaluate_model
from reid.models import ReIDNet, build_model, load_shared_state, split_state
from reid.seeding import stable_seed
from reid.train import train_local

LOCAL_STATE_KEY = "local-state"  # classifier head (+ BN statistics under bn_stats=local)
PROBE_BATCH = 32  # images of the fixed per-round batch on which the model's change (CDW) is measured
log = logging.getLogger("clients")


def _configure_logging() -> None:
    """Training progress goes to stderr, which the SuperNode (or Ray, in simulation) shows."""
    for name in ("clients", "reid"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


_configure_logging()
app = ClientApp()


def _prepare(msg: Message, context: Context) -> tuple[SiteRunSpec, SiteLocation, ReIDData, torch.device]:
    spec = SiteRunSpec.from_flat(dict(msg.content["config"]))
    location = locate_site(context.node_config, context.run_config)
    data = load_site(location, spec.verify_images)
    gpu = context.node_config.get("gpu")
    return spec, location, data, pick_device(None if gpu in (None, "") else int(gpu))


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global SHARED arrays and this site's head, train locally, send back SHARED arrays."""
    spec, location, data, device = _prepare(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    torch.manual_seed(stable_seed(spec.seed, location.name))  # a fresh head is the same in every run
    model = build_model(spec.model, num_classes=data.num_train_ids)
    load_shared_state(model, msg.content["arrays"].to_torch_state_dict(), spec.bn_stats)
    _restore_local_state(model, context, location.name)
    dataset = ImageDataset.for_training(data, train_transform(spec.augment, spec.model.height, spec.model.width))
    probe = fixed_batch(ImageDataset.for_training(data, test_transform(spec.model.height, spec.model.width)),
                        PROBE_BATCH, seed=stable_seed(spec.seed, location.name, server_round, "probe"))
    before = eval_logits(model, probe, device)  # received backbone with this site's previous head
    torch.manual_seed(stable_seed(spec.seed, location.name, server_round, "train"))  # augmentation, dropout
    stats = train_local(model, dataset, spec.train, device, seed=stable_seed(spec.seed, location.name, server_round),
                        label=f"[{location.name} round {server_round}]")
    cdw = cosine_logit_distance(before, eval_logits(model, probe, device))
    shared, local = split_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, spec.bn_stats)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(local)
    metrics = MetricRecord({
        "num-examples": len(dataset),
        "num-identities": data.num_train_ids,
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": stats.seconds,
        "images-per-second": stats.images_per_second,
        "corrupt-images": data.num_corrupt,
        "cdw-distance": cdw,
    })
    content = RecordDict({"arrays": ArrayRecord(shared), "metrics": metrics, "site": _site_record(location)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Rank this site's gallery for its own queries with the global backbone; only numbers leave."""
    spec, location, data, device = _prepare(msg, context)
    model = build_model(spec.model, num_classes=0)
    load_shared_state(model, msg.content["arrays"].to_torch_state_dict(), spec.bn_stats)
    _restore_local_state(model, context, location.name)
    result = evaluate_model(model, data, device, spec.eval_batch_size, spec.train.num_workers)
    log.info("[%s] Rank-1 %.3f mAP %.3f over %d queries", location.name, result.rank(1), result.mAP,
             result.num_valid_queries)
    metrics = MetricRecord({
        "rank1": result.rank(1), "rank5": result.rank(5), "rank10": result.rank(10),
        "mAP": result.mAP, "mINP": result.mINP,
        "num-queries": result.num_valid_queries, "num-gallery": len(data.gallery),
    })
    return Message(content=RecordDict({"metrics": metrics, "site": _site_record(location)}), reply_to=msg)
