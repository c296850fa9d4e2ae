"""FedPav (Federated Partial Averaging, Zhuang et al., ACM MM'20) and its FedReID optimisations, as a
Flower Message-API strategy.

Sites train a shared backbone and keep their own identity classifiers, whose sizes differ from
site to site. Sites therefore send only their SHARED arrays (the split rule lives with the model),
and the server averages exactly the arrays it sent. Options, each combinable with the others:

* ``weighting="size"`` (FedPav): weights = training images per site;
  ``weighting="cdw"``: weights = each site's reported cosine distance (how much its model moved),
  normalised, data size ignored (FedReID's CDW).
* ``refine``: a server-side step after aggregation, e.g. knowledge distillation on public images
  (FedReID's KD), every ``refine_every`` rounds; it sees the uploaded models, so no extra bytes travel.
* ``clustering``: group the sites by an embedding of their uploads, aggregate within each group and
  send each site its group's model (FedReID journal version); ``singletons`` = every site alone,
  i.e. local training under the same runner.
* ``weighting="klpwa"`` (FedKLPR): weights = KLAW x PRAW from each site's reported KL divergence
  and kept fraction (see strategies/weighting.py).

Uploads may carry pruned tensors in the sparse encoding; they are decoded while being checked,
and every weight is averaged only over the sites that kept it (a weight nobody kept stays zero).
With ``sparse_downlink`` the server sends zero-holding tensors encoded too, when that is smaller.

Every reply is checked first (keys, shapes, dtypes, finite values, required metrics); a bad one
is logged with its reason and left out while the round goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.averaging import masked_weighted_average, normalise_weights
from strategies.clustering import CLUSTER_METHODS, cluster_sites, named_partition
from strategies.sparse_records import Tensor, dense_record, encode_record
from strategies.validation import (
    METRICS_KEY,
    SITE_KEY,
    ArraySpec,
    check_evaluate_reply,
    check_train_reply,
    expected_specs,
)
from strategies.weighting import WEIGHTINGS, KLPWASpec, klpwa_weights

NUM_EXAMPLES = "num-examples"
CDW_DISTANCE = "cdw-distance"
KL_DIVERGENCE = "kl-divergence"
KEPT_FRACTION = "kept-fraction"
EVAL_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
OPTIONAL_EVAL_METRICS = ("mAP-market",)  # Market-1501's trapezoid mAP over all queries
REQUIRED_METRICS = {"size": (), "cdw": (CDW_DISTANCE,), "klpwa": (KL_DIVERGENCE, KEPT_FRACTION)}

Refiner = Callable[[int, ArrayRecord, list[ArrayRecord]], ArrayRecord]
"""(round, aggregated arrays, the uploads aggregated into it) -> refined arrays."""
Embedder = Callable[[list[ArrayRecord]], np.ndarray]
"""uploads -> one embedding row per upload."""


def site_name(message: Message) -> str:
    """The site's self-reported name, or its node id when it sent none."""
    content = message.content if not message.has_error() else None
    if content is not None and SITE_KEY in content.config_records:
        return str(content.config_records[SITE_KEY].get("name", message.metadata.src_node_id))
    return f"node-{message.metadata.src_node_id}"


@dataclass(frozen=True)
class ClusteringSpec:
    """How sites are grouped: none, threshold (first-neighbour links), kmeans, or singletons."""

    method: str = "none"
    max_distance: float = 0.9
    k: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CLUSTER_METHODS:
            raise ValueError(f"unknown clustering method {self.method!r}; choose one of {CLUSTER_METHODS}")

    @property
    def needs_embeddings(self) -> bool:
        return self.method in ("threshold", "kmeans")


@dataclass
class RoundLog:
    """Who took part in the last aggregation, with what weight, and who was turned away and why."""

    accepted: dict[str, float] = field(default_factory=dict)  # site -> normalised weight
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    clusters: list[list[str]] = field(default_factory=list)
    refined: bool = False


@dataclass(frozen=True)
class Upload:
    """An accepted training reply: who sent it, the message, and its decoded tensors."""

    site: str
    message: Message
    tensors: dict[str, Tensor]

    @property
    def node(self) -> int:
        return self.message.metadata.src_node_id

    @property
    def arrays(self) -> ArrayRecord:
        """The tensors as a dense ArrayRecord (what server-side model steps load)."""
        return dense_record(self.tensors)


def screen(replies: Iterable[Message], check: Callable[[Message], tuple[object, str | None]]
           ) -> tuple[list[tuple[Message, object]], dict[str, str]]:
    """Split replies into (message, checked payload) pairs and {site: reason} for the rest, logging
    each rejection."""
    accepted, rejected = [], {}
    for message in replies:
        payload, reason = check(message)
        if reason is None:
            accepted.append((message, payload))
        else:
            name = site_name(message)
            rejected[name] = reason
            log(WARNING, "rejected reply from %s (node %s): %s", name, message.metadata.src_node_id, reason)
    return accepted, rejected


def metric_dict(message: Message) -> dict[str, float]:
    """The reply's metrics as plain floats (lists are left out)."""
    return {k: float(v) for k, v in message.content[METRICS_KEY].items() if not isinstance(v, list)}


def _average(uploads: list[Upload], weights: np.ndarray) -> ArrayRecord:
    averaged = masked_weighted_average([u.tensors for u in uploads], weights)
    return ArrayRecord({k: Array(v) for k, v in averaged.items()})


class FedPav(FedAvg):
    """Partial averaging of SHARED arrays with per-reply screening and the FedReID options.

    Sampling and message construction are FedAvg's; aggregation is replaced so that a malformed
    reply is rejected on its own instead of failing the round.
    """

    def __init__(
        self,
        *,
        min_sites: int = 2,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        weighting: str = "size",
        refine: Refiner | None = None,
        refine_every: int = 1,
        clustering: ClusteringSpec | None = None,
        embed: Embedder | None = None,
        klpwa: KLPWASpec | None = None,
        sparse_downlink: bool = False,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites if fraction_evaluate > 0 else 0,
            min_available_nodes=min_sites,
            weighted_by_key=NUM_EXAMPLES,
        )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.weighting = weighting
        self.refine = refine
        self.refine_every = max(1, refine_every)
        self.clustering = clustering or ClusteringSpec()
        if self.clustering.needs_embeddings and embed is None:
            raise ValueError(f"{self.clustering.method} clustering needs an embedder (public images on the server)")
        self.embed = embed
        self.klpwa = klpwa or KLPWASpec()
        self.sparse_downlink = sparse_downlink
        self.required_train_metrics = REQUIRED_METRICS[weighting]
        self._expected: dict[str, ArraySpec] = {}
        self.node_models: dict[int, ArrayRecord] = {}  # per-node models when clustering
        self.site_models: dict[str, ArrayRecord] = {}  # the same, by site name (for checkpoints)
        self.site_nodes: dict[str, int] = {}  # site name -> node id it last replied from
        self.last_clusters: list[list[str]] = []
        self.last_train = RoundLog()
        self.last_evaluate = RoundLog()

    def restore_site_models(self, site_models: dict[str, ArrayRecord], site_nodes: dict[str, int]) -> None:
        """Per-site models of a resumed run. Node ids survive a SuperLink restart when its database is
        kept (registered keys keep their ids); a site whose node id changed gets the global model once."""
        self.site_models = dict(site_models)
        self.site_nodes = dict(site_nodes)
        self.node_models = {node: site_models[site] for site, node in site_nodes.items() if site in site_models}

    # ----- sending -----------------------------------------------------------------------------

    def _outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays as they travel: pruned (zero-holding) tensors encoded when that is smaller."""
        if not self.sparse_downlink:
            return arrays
        return encode_record({k: a.numpy() for k, a in arrays.items()}, sparse_zeros=True)

    def _personalise(self, messages: Iterable[Message]) -> list[Message]:
        """Give each site its cluster's model (when it has one), in its travelling form."""
        out, encoded = [], {}
        for message in messages:
            node = message.metadata.dst_node_id
            arrays = self.node_models.get(node, message.content[self.arrayrecord_key])
            if id(arrays) not in encoded:
                encoded[id(arrays)] = self._outgoing(arrays)
            if encoded[id(arrays)] is not message.content[self.arrayrecord_key]:
                content = RecordDict({self.arrayrecord_key: encoded[id(arrays)],
                                      self.configrecord_key: message.content[self.configrecord_key]})
                message = Message(content=content, dst_node_id=node, message_type=message.metadata.message_type)
            out.append(message)
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember what was sent, so replies can be checked against it, then sample as FedAvg."""
        self._expected = expected_specs(arrays)
        return self._personalise(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Each site is evaluated with the model it trains from (its cluster's, when clustering)."""
        return self._personalise(super().configure_evaluate(server_round, arrays, config, grid))

    # ----- aggregating -------------------------------------------------------------------------

    def aggregation_weights(self, uploads: list[Upload]) -> np.ndarray:
        """Training-set sizes (FedPav), cosine distances (CDW) or KLAW x PRAW (KLPWA), not yet normalised."""
        def metric(key: str) -> np.ndarray:
            return np.array([float(u.message.content[METRICS_KEY][key]) for u in uploads])

        if self.weighting == "klpwa":
            return klpwa_weights(metric(KL_DIVERGENCE), metric(KEPT_FRACTION), self.klpwa)
        if self.weighting == "cdw":
            weights = metric(CDW_DISTANCE)
            if (weights > 0).any():
                return weights
            log(WARNING, "every site reported a zero cosine distance; weighting by training-set size instead")
        return metric(NUM_EXAMPLES)

    def _groups(self, uploads: list[Upload]) -> list[list[int]]:
        embeddings = self.embed([u.arrays for u in uploads]) if self.clustering.needs_embeddings else None
        spec = self.clustering
        return cluster_sites(spec.method, embeddings, len(uploads), spec.max_distance, spec.k, spec.seed)

    def _aggregate_group(self, server_round: int, uploads: list[Upload], weights: np.ndarray) -> ArrayRecord:
        arrays = _average(uploads, weights)
        if self.refine is not None and server_round % self.refine_every == 0:
            arrays = self.refine(server_round, arrays, [u.arrays for u in uploads])
            self.last_train.refined = True
        return arrays

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, weight and average (per cluster when clustering); None when no reply was acceptable."""
        replies = list(replies)
        checked, rejected = screen(replies, lambda m: check_train_reply(
            m, self._expected, NUM_EXAMPLES, self.required_train_metrics))
        self.last_train = RoundLog(rejected=rejected)
        log(INFO, "round %d: aggregating %d of %d replies", server_round, len(checked), len(replies))
        if not checked:
            return None, None
        # replies arrive in any order; a fixed summation order makes runs repeatable
        uploads = sorted((Upload(site_name(m), m, tensors) for m, tensors in checked), key=lambda u: u.site)
        weights = normalise_weights(self.aggregation_weights(uploads))
        for upload, weight in zip(uploads, weights):
            self.last_train.accepted[upload.site] = float(weight)
            self.last_train.site_metrics[upload.site] = metric_dict(upload.message)
        if self.clustering.method == "none":
            global_arrays = self._aggregate_group(server_round, uploads, weights)
        else:
            global_arrays = _average(uploads, weights)  # for the checkpoint and for sites never seen
            self._aggregate_clusters(server_round, uploads, weights)
        metrics = MetricRecord({
            "sites-accepted": len(uploads),
            "sites-rejected": len(rejected),
            "train-loss": float(np.average([metric_dict(u.message).get("train-loss", np.nan) for u in uploads],
                                           weights=weights)),
        })
        return global_arrays, metrics

    def _aggregate_clusters(self, server_round: int, uploads: list[Upload], weights: np.ndarray) -> None:
        groups = self._groups(uploads)
        previous = self.last_clusters
        for group in groups:
            members = [uploads[i] for i in group]
            model = self._aggregate_group(server_round, members, weights[group] / weights[group].sum())
            for upload in members:
                self.node_models[upload.node] = model
                self.site_models[upload.site] = model
                self.site_nodes[upload.site] = upload.node
        self.last_train.clusters = named_partition(groups, [u.site for u in uploads])
        if self.clustering.method != "singletons":
            change = "" if previous in ([], self.last_train.clusters) else f" (was {previous})"
            log(INFO, "round %d clusters: %s%s", server_round, self.last_train.clusters, change)
        self.last_clusters = self.last_train.clusters

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep every site's own Rank-k/mAP/mINP and return their plain mean, as EasyFL reports."""
        accepted, rejected = screen(replies, lambda m: (None, check_evaluate_reply(m, EVAL_METRICS)))
        self.last_evaluate = RoundLog(rejected=rejected)
        if not accepted:
            return None
        for message, _ in accepted:
            self.last_evaluate.site_metrics[site_name(message)] = metric_dict(message)
        per_site = self.last_evaluate.site_metrics.values()
        keys = [*EVAL_METRICS, *(k for k in OPTIONAL_EVAL_METRICS if all(k in m for m in per_site))]
        return MetricRecord({key: float(np.mean([m[key] for m in per_site])) for key in keys})
