"""One camera site in one run: everything a site does, and everything it keeps, starts here.

A ``Site`` lives as long as its process serves the run: in a deployment, the site worker keeps one
per run (clients/worker.py); in a simulation, each Ray actor keeps one per partition
(clients/app.py). It holds what is expensive to rebuild and safe to lose:

* where its data is (clients/location.py) and the scanned, checked file list with the folder's
  fingerprint (rescanned when a file is added, removed or rewritten);
* the decoded images (reid/data/tensor_cache.py, in memory and under ``<state-dir>/image-cache``);
* its device (``gpu`` in node_config, else the first GPU, else the CPU);
* the state folder (``state-dir``), where the state file and the image cache live.

What must survive a restart is never held here but in the ``state`` each call is given
(``context.state``, the one source of truth, kept by the SuperNode) and mirrored in the state file
(clients/kept.py): the classifier head, BatchNorm statistics, pruning masks, FedUReID clusters.

``evaluate(content, state)`` answers one evaluation message; a training message is answered by
clients/rounds.py, which picks the round (clients/supervised.py for FedPav / FedReID / FedKLPR /
RAF / FedDG, clients/unsupervised.py for FedUReID) and gives it this site. Every reply is built and checked by clients/outgoing.py; knobs that would run code on
a deployed site are checked by clients/trust.py first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from clients import outgoing
from clients.kept import (LOCAL_STATE_KEY, HeldModel, load_held, load_residual, persist_site_state,
                          restore_local_state, restore_site_state, save_held, save_residual, state_file)
from clients.disk import CACHE_FILES_KEPT, fingerprint_cache, prune_newest
from clients.location import SiteLocation, folder_fingerprint, locate_site
from clients.policy import SitePolicy
from clients.trust import check_backbone_factory
from reid.config import SiteRunSpec
from reid.data.dataset import ReIDData, load_reid_data
from reid.data.resolution import parse_scales
from reid.data.tensor_cache import load_images
from reid.device import pick_device
from reid.evaluate import evaluate_at_scales
from reid.features import adapt_batchnorm
from reid.models import ReIDNet, build_model, load_shared_state, split_state
from reid.saved_model import SITE_MODELS_DIR, ModelInfo, save_model
from strategies.packing import is_packed, unpack_record
from strategies.sparse_records import Tensor, decode_record
from strategies.transfer import UPDATE_BASE_KEY, UPDATE_VERSION_KEY
from strategies.update_codec import CompressionSpec, decode_record_change
from strategies.validation import (ALGORITHM_KEY, BN_STATS_KEY, BN_STATS_SUFFIXES, EVALUATE_ROUND_KEY, RUN_FOLDER_KEY,
                                   RUN_TAG_KEY, SHARE_BN_KEY, SOURCE_ONLY, TARGET_ADAPTED, UNSEEN_PROTOCOL_KEY)

log = logging.getLogger("clients")
ADAPTED_MODELS_KEPT = 16  # received models whose AdaBN statistics a site keeps (a few KB each)


@dataclass
class Received:
    """The global model a message brought, decoded into the site's model."""

    tensors: dict[str, torch.Tensor]  # as received (dense values)
    declared: dict[str, tuple[int, ...]]  # the SHARED keys and shapes of the model: all a reply may carry
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned tensors: the positions kept

    def values(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.tensors.items()}

    def numpy_masks(self) -> dict[str, np.ndarray]:
        return {k: m.numpy() for k, m in self.masks.items()}


def model_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of a received model's tensors (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class TaskTimes:
    """When this site's work on the current message started, and when its evaluation ran (``time.time()``):
    sent with the reply so that the server can split a round's time (server/timing.py). Times of
    day only; nothing of the data."""

    work_start: float = field(default_factory=time.time)
    evaluation: tuple[float, float] | None = None

    def record(self, all_evaluation: bool = False) -> dict[str, float]:
        """The spans as a reply carries them; ``all_evaluation``: the whole work was evaluation."""
        times = {"work-start": self.work_start, "work-end": time.time()}
        if all_evaluation:
            times["eval-start"], times["eval-end"] = times["work-start"], times["work-end"]
        elif self.evaluation is not None:
            times["eval-start"], times["eval-end"] = self.evaluation
        return times


class Site:
    """One site in one run (see the module's docstring)."""

    def __init__(self, location: SiteLocation, node_config: Mapping[str, object]) -> None:
        self.location = location
        self.node_config = dict(node_config)
        folder = str(node_config.get("state-dir", "") or "")
        self.state_dir = Path(folder).expanduser() if folder else None
        gpu = node_config.get("gpu")
        self.device = pick_device(None if gpu in (None, "") else int(gpu))  # type: ignore[arg-type]
        self._scans: dict[tuple[bool, bool], tuple[str, ReIDData]] = {}  # (verify, labelled) -> (fingerprint, scan)
        self._kept_models: dict[Path, tuple[int, float]] = {}  # model file -> (round, mAP) last written
        self._fingerprint = ""  # of the data folder, as last scanned
        self._image_cache: Path | None = None  # its image cache folder (chosen once per fingerprint)
        self._sizes_seen: set[tuple[str, int, int]] = set()  # (fingerprint, height, width) already decoded
        self.times = TaskTimes()  # of the message being handled (restarted by round_inputs)
        self._adapted: dict[tuple[str, int, int, str], dict[str, torch.Tensor]] = {}  # AdaBN statistics per model
        # the site worker's limits (clients/policy.py, from its command line); a simulation has none
        self.policy = SitePolicy.from_node_config(node_config)

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def image_cache_dir(self) -> Path | None:
        """``<state-dir>/image-cache/<data fingerprint>``: decoded images survive a restart of the worker
        or the box; the caches of data the folder no longer holds are removed (clients/disk.py)."""
        if self.state_dir is not None and self._image_cache is None:
            self._image_cache = fingerprint_cache(self.state_dir / "image-cache", self._fingerprint or "unscanned")
        return self._image_cache

    # -- one message each ------------------------------------------------------------------------

    def evaluate(self, content: RecordDict, state: RecordDict) -> RecordDict:
        """Rank this site's gallery for its own queries with the global backbone; only numbers leave."""
        spec, data = self.round_inputs(content, state)
        protocol = content["config"].get(UNSEEN_PROTOCOL_KEY)  # only a held-out site's request has one
        model = build_model(spec.model, num_classes=0)
        received = self.load_received(model, content, state, spec.bn_stats)
        if protocol == SOURCE_ONLY:  # no image of this site before ranking (strategies/held_out.py)
            if spec.bn_stats == "local":
                load_federation_bn_stats(model, content)
        else:
            restore_local_state(model, state, self.name)
            if protocol == TARGET_ADAPTED or (spec.bn_stats == "local" and LOCAL_STATE_KEY not in state.array_records):
                self.adapt_batchnorm(model, data, spec, received)
        metrics = self.evaluation(model, data, spec)
        if protocol != SOURCE_ONLY:  # the model a site would search with is the adapted one
            self.keep_model(model, content, state, spec, metrics, received.masks)
        self.tidy_disk(content)
        return outgoing.evaluation_reply(self.name, metrics, self.times.record(all_evaluation=True))

    def adapt_batchnorm(self, model: ReIDNet, data: ReIDData, spec: SiteRunSpec, received: Received) -> None:
        """A site that never trained (held out, or not yet) has no BatchNorm statistics of its own
        under ``bn_stats=local``: it computes them on its own training images, labels unused
        (AdaBN), as a site joining a federation would before searching its cameras. The statistics
        are kept per received model (and image size), so a model sent again costs no second pass."""
        key = (model_digest(received.tensors), spec.model.height, spec.model.width, self._fingerprint)
        if key in self._adapted:
            model.load_state_dict(self._adapted[key], strict=False)
            self._adapted[key] = self._adapted.pop(key)  # most recently used last
            log.info("%s: BatchNorm statistics of this model reused (computed when it was last received)", self.name)
            return
        images = load_images([s.path for s in data.train], spec.model.height, spec.model.width,
                             self.image_cache_dir, spec.train.num_workers, label=self.name)
        adapt_batchnorm(model, images, self.device)
        self._adapted[key] = {k: v.detach().cpu().clone() for k, v in split_state(model.state_dict(), "local")[1].items()}
        while len(self._adapted) > ADAPTED_MODELS_KEPT:
            del self._adapted[next(iter(self._adapted))]
        log.info("%s: BatchNorm statistics computed on its %d training images (labels unused)", self.name,
                 len(images))

    # -- the steps both kinds of training share --------------------------------------------------

    def round_inputs(self, content: RecordDict, state: RecordDict) -> tuple[SiteRunSpec, ReIDData]:
        """The round's settings (refused when they would run code this site did not allow) and the
        site's data (training images unlabelled when the run is unsupervised); a state that a fresh
        SuperNode does not have yet is first read back from the state file."""
        self.times = TaskTimes()
        spec = SiteRunSpec.from_flat(dict(content["config"]))
        if self.policy is not None:
            self.policy.check_spec(spec)
        check_backbone_factory(spec.model.backbone_factory, self.node_config, self.location.deployed)
        restore_site_state(state, self.state_file(content))
        data = self.data(spec.verify_images, labelled=not spec.unsupervised.enabled)
        if self.policy is not None:
            self.check_resources(spec, data)
        return spec, data

    def shares_bn_stats(self) -> bool:
        """Whether this site sends its BatchNorm running statistics when a run ranks held-out sites
        source-only: a simulated site does; a deployed one only under ``--require-bn-stats any``."""
        if self.policy is None or self.policy.require_bn_stats != "local":
            return True
        log.info("%s: keeps its BatchNorm statistics (--require-bn-stats local); source-only rankings of held-out "
                 "sites go without them", self.name)
        return False

    def check_resources(self, spec: SiteRunSpec, data: ReIDData) -> None:
        """Refuse a round whose decoded images would not fit this box's memory, or whose files would
        take its state disk below the operator's floor (a first decode at a size writes its cache)."""
        assert self.policy is not None
        count, height, width = len(data.train) + len(data.query) + len(data.gallery), spec.model.height, spec.model.width
        self.policy.check_memory(count, height, width)
        if self.state_dir is not None:
            size = (self._fingerprint, height, width)
            self.policy.check_disk(self.state_dir, 0 if size in self._sizes_seen else count * 3 * height * width)
            self._sizes_seen.add(size)

    def tidy_disk(self, content: RecordDict) -> None:
        """After a message: only the newest runs' state and model files, and the most recently used
        image caches, stay on a deployed site's disk (clients/disk.py)."""
        if self.policy is None or self.state_dir is None:
            return
        current = {p for p in (self.state_file(content), self.model_file(content)) if p is not None}
        removed = prune_newest(list(self.state_dir.glob("*.state")), self.policy.keep_runs, current)
        removed += prune_newest(list((self.state_dir / "models").glob("*.pt")), self.policy.keep_runs, current)
        removed += prune_newest(list(self.image_cache_dir.glob("*.pt")), CACHE_FILES_KEPT)  # type: ignore[union-attr]
        if removed:
            log.info("%s: removed %d older state, model and image cache files (--keep-runs %d)", self.name,
                     len(removed), self.policy.keep_runs)

    def data(self, verify: bool = True, labelled: bool = True) -> ReIDData:
        """Scan (and check) the site's images once; later messages reuse the scan while the folder's
        fingerprint is unchanged. ``labelled=False``: training crops may be named in any form."""
        fingerprint = folder_fingerprint(self.location.root)
        cached = self._scans.get((verify, labelled))
        if fingerprint != self._fingerprint:  # other data: its own image cache folder (chosen on next use)
            self._fingerprint, self._image_cache = fingerprint, None
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        if cached is not None:
            log.info("%s: the data folder %s changed since the last message; scanning it again", self.name,
                     self.location.root)
        start = time.perf_counter()
        data = load_reid_data(self.location.root, name=self.name, verify=verify, labelled_train=labelled)
        log.info("%s: scanned and checked %d images in %.1f s", self.name,
                 len(data.train) + len(data.query) + len(data.gallery), time.perf_counter() - start)
        self._scans[(verify, labelled)] = (fingerprint, data)
        return data

    def model_file(self, content: RecordDict) -> Path | None:
        """Where this site keeps its deployable model of the run: ``<state-dir>/models/<run>.pt`` on a
        deployed site (it never leaves the site); in a simulation, ``<run folder>/site-models/<site>.pt``."""
        config = content["config"]
        if self.location.deployed:
            run_file = state_file(self.state_dir, str(config.get(RUN_TAG_KEY, "")))
            return run_file.parent / "models" / run_file.with_suffix(".pt").name if run_file is not None else None
        folder = str(config.get(RUN_FOLDER_KEY, "") or "")
        return Path(folder) / SITE_MODELS_DIR / f"{self.name}.pt" if folder else None

    def keep_model(self, model: ReIDNet, content: RecordDict, state: RecordDict, spec: SiteRunSpec,
                   metrics: MetricRecord, masks: Mapping[str, torch.Tensor] | None = None) -> Path | None:
        """Save the model this site just evaluated: the global SHARED weights with its own LOCAL
        parts (BatchNorm statistics under ``bn_stats=local``, FedKLPR masks) and its own mAP. Written
        after every evaluation, so an interrupted run leaves the latest; within one round the best of
        several models (a held-out site under ``local`` ranks every site's) is kept."""
        path = self.model_file(content)
        if path is None:
            return None
        config = content["config"]
        evaluated_round = int(config.get(EVALUATE_ROUND_KEY, config.get("server-round", 0)))
        score = float(metrics["mAP"])
        kept = self._kept_models.get(path)
        if kept is not None and kept[0] == evaluated_round and kept[1] >= score:
            return path
        info = ModelInfo(spec=spec.model, algorithm=str(config.get(ALGORITHM_KEY, "")), round=evaluated_round,
                         bn_stats=spec.bn_stats, site=self.name, run=str(config.get(RUN_TAG_KEY, "")), mAP=score,
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                         eval_batch_size=spec.eval_batch_size, masks=dict(masks or {}))
        save_model(path, model.state_dict(), info)
        self._kept_models[path] = (evaluated_round, score)
        log.info("%s: its model of round %d (mAP %.3f on its own cameras) is in %s", self.name, evaluated_round,
                 score, path)
        return path

    def state_file(self, content: RecordDict) -> Path | None:
        return state_file(self.state_dir, str(content["config"].get(RUN_TAG_KEY, "")))

    @staticmethod
    def load_received(model: ReIDNet, content: RecordDict, state: RecordDict, bn_stats: str) -> Received:
        """Decode the received global arrays into ``model``: packed or not, dense or sparse-encoded,
        or (compressed transfers) a change from the model this site holds, which a training
        message's new version then replaces in ``state``."""
        expected = split_state(model.state_dict(), bn_stats)[0]
        record = unpack_record(content["arrays"])
        shapes = {k: tuple(expected[k].shape) for k in record.keys() if k in expected}
        config = content["config"]
        tensors = _decoded(record, shapes, config, state)
        if UPDATE_VERSION_KEY in config:  # a training message: this is now the model the site holds
            save_held(state, HeldModel(str(config[UPDATE_VERSION_KEY]), {k: t.values for k, t in tensors.items()},
                                       {k: t.mask for k, t in tensors.items() if t.mask is not None}))
        received = {k: torch.from_numpy(np.array(t.values, order="C")) for k, t in tensors.items()}  # writable copies
        received.update({k: torch.from_numpy(record[k].numpy()) for k in record.keys() if k not in expected})
        load_shared_state(model, received, bn_stats)  # refuses unexpected or missing keys
        masks = {k: torch.from_numpy(t.mask) for k, t in tensors.items() if t.mask is not None}
        return Received(received, {k: tuple(v.shape) for k, v in expected.items()}, masks)

    def evaluation(self, model: ReIDNet, data: ReIDData, spec: SiteRunSpec) -> MetricRecord:
        """Rank-1/5/10, mAP (both conventions) and mINP of ``model`` on this site's query/gallery split;
        with ``eval_query_scales`` also mAP@s and rank1@s with the queries at s × the resolution, and
        the drift gap (native mAP minus mAP at the lowest of them)."""
        scales = parse_scales(spec.eval_query_scales)
        started = time.time()
        results = evaluate_at_scales(model, data, self.device, scales, spec.eval_batch_size, self.image_cache_dir,
                                     spec.train.num_workers, spec.train.device_cache_mb)
        result = results[1.0]
        log.info("[%s] Rank-1 %.3f mAP %.3f over %d queries", self.name, result.rank(1), result.mAP,
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
            log.info("[%s] mAP at query resolution %s: %s", self.name, " / ".join(f"{s:g}" for s in scales),
                     " / ".join(f"{results[s].mAP:.3f}" for s in scales))
        self.times.evaluation = (started, time.time())
        return MetricRecord(metrics)  # checked where the reply is built (clients/outgoing.py)

    def training_reply(self, model: ReIDNet, content: RecordDict, state: RecordDict, spec: SiteRunSpec,
                       received: Received, metrics: dict[str, float], evaluated: MetricRecord | None,
                       keep_shared_as: str | None = None, style: np.ndarray | None = None) -> RecordDict:
        """Keep the LOCAL part of the trained model in ``state`` (and on disk), and answer with the
        SHARED part, on the received masks; under compressed transfers as its change from the
        received model, keeping what the change left out for the next round. ``keep_shared_as``:
        also keep the SHARED part under that key (FedUReID's ema); ``style``: the site's shared
        style statistics (feddg)."""
        shared, local = split_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, spec.bn_stats)
        state[LOCAL_STATE_KEY] = ArrayRecord(local)
        if keep_shared_as is not None:
            state[keep_shared_as] = ArrayRecord(shared)
        compression = CompressionSpec.from_config(content["config"])
        change = None
        if compression.enabled:
            change = outgoing.ChangeFrom(received.values(), received.numpy_masks(), compression, load_residual(state))
        reply = outgoing.training_reply(self.name, shared, received.declared, content["config"],
                                        is_packed(content["arrays"]), metrics, evaluated, received.numpy_masks(),
                                        spec.pruning.value_dtype, style, change, self.times.record())
        if content["config"].get(SHARE_BN_KEY) and spec.bn_stats == "local" and self.shares_bn_stats():
            reply.content[BN_STATS_KEY] = ArrayRecord({k: v for k, v in local.items() if k.endswith(BN_STATS_SUFFIXES)})
        if reply.residual is not None:
            save_residual(state, reply.residual)
        persist_site_state(state, self.state_file(content))
        self.tidy_disk(content)
        return reply.content


def load_federation_bn_stats(model: ReIDNet, content: RecordDict) -> None:
    """A source-only ranking's BatchNorm running statistics, from the message (the federation's):
    exactly this model's running means and variances, or a clear error."""
    if BN_STATS_KEY not in content.array_records:
        raise ValueError("a source-only evaluation under bn_stats=local needs the federation's BatchNorm statistics; "
                         "the message has none")
    expected = {k: v for k, v in model.state_dict().items() if k.endswith(BN_STATS_SUFFIXES)}
    received = {k: torch.from_numpy(np.array(a.numpy(), dtype=np.float32)) for k, a in content[BN_STATS_KEY].items()}
    if set(received) != set(expected) or any(received[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"the federation's BatchNorm statistics do not fit {model.spec.backbone}: "
                         f"{len(received)} tensors for its {len(expected)}")
    model.load_state_dict(received, strict=False)


def _decoded(record: ArrayRecord, shapes: dict[str, tuple[int, ...]], config: Mapping[str, object],
             state: RecordDict) -> dict[str, Tensor]:
    """The received tensors: the whole model, or a change applied to the model this site holds."""
    base = config.get(UPDATE_BASE_KEY)
    if not base:
        return decode_record(record, shapes)
    held = load_held(state)
    if held is None or held.version != base:
        raise ValueError(f"the server sent a change from model version {base}, but this site holds "
                         f"{held.version if held else 'none'}; it needs the whole model once (the next round)")
    return decode_record_change(record, held.values, shapes, held.masks)


_SITES: dict[tuple[int, str], Site] = {}  # (run, node config) -> its Site, in this process


def site_for(run_id: int, node_config: Mapping[str, object], run_config: Mapping[str, object]) -> Site:
    """This process's ``Site`` for the run and the node (a Ray actor may serve several partitions);
    the Sites of other runs are let go."""
    key = (run_id, json.dumps(dict(node_config), sort_keys=True, default=str))
    if key not in _SITES:
        for stale in [k for k in _SITES if k[0] != run_id]:
            del _SITES[stale]
        _SITES[key] = Site(locate_site(node_config, run_config), node_config)
    return _SITES[key]
