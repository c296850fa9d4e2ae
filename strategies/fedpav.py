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

from strategies.averaging import normalise_weights, weighted_average
from strategies.clustering import CLUSTER_METHODS, cluster_sites, named_partition
from strategies.validation import (
    ARRAYS_KEY,
    METRICS_KEY,
    SITE_KEY,
    ArraySpec,
    check_evaluate_reply,
    check_train_reply,
    expected_specs,
)

NUM_EXAMPLES = "num-examples"
CDW_DISTANCE = "cdw-distance"
EVAL_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
WEIGHTINGS = ("size", "cdw")

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


def screen(replies: Iterable[Message], check: Callable[[Message], str | None]) -> tuple[list[Message], dict[str, str]]:
    """Split replies into acceptable ones and {site: reason} for the rest, logging each rejection."""
    accepted, rejected = [], {}
    for message in replies:
        reason = check(message)
        if reason is None:
            accepted.append(message)
        else:
            name = site_name(message)
            rejected[name] = reason
            log(WARNING, "rejected reply from %s (node %s): %s", name, message.metadata.src_node_id, reason)
    return accepted, rejected


def metric_dict(message: Message) -> dict[str, float]:
    """The reply's metrics as plain floats (lists are left out)."""
    return {k: float(v) for k, v in message.content[METRICS_KEY].items() if not isinstance(v, list)}


def _average(replies: list[Message], weights: np.ndarray) -> ArrayRecord:
    updates = [{k: a.numpy() for k, a in m.content[ARRAYS_KEY].items()} for m in replies]
    return ArrayRecord({k: Array(v) for k, v in weighted_average(updates, weights).items()})


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
        self.required_train_metrics = (CDW_DISTANCE,) if weighting == "cdw" else ()
        self._expected: dict[str, ArraySpec] = {}
        self.node_models: dict[int, ArrayRecord] = {}  # per-node models when clustering
        self.site_models: dict[str, ArrayRecord] = {}  # the same, by site name (for checkpoints)
        self.last_clusters: list[list[str]] = []
        self.last_train = RoundLog()
        self.last_evaluate = RoundLog()

    # ----- sending -----------------------------------------------------------------------------

    def _personalise(self, messages: Iterable[Message]) -> list[Message]:
        """Give each site its cluster's model instead of the global one, when it has one."""
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.node_models:
                content = RecordDict({self.arrayrecord_key: self.node_models[node],
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

    def aggregation_weights(self, replies: list[Message]) -> np.ndarray:
        """Training-set sizes (FedPav) or reported cosine distances (CDW), not yet normalised."""
        key = NUM_EXAMPLES if self.weighting == "size" else CDW_DISTANCE
        weights = np.array([float(m.content[METRICS_KEY][key]) for m in replies])
        if self.weighting == "cdw" and not (weights > 0).any():
            log(WARNING, "every site reported a zero cosine distance; weighting by training-set size instead")
            return np.array([float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies])
        return weights

    def _groups(self, replies: list[Message]) -> list[list[int]]:
        embeddings = self.embed([m.content[ARRAYS_KEY] for m in replies]) if self.clustering.needs_embeddings else None
        spec = self.clustering
        return cluster_sites(spec.method, embeddings, len(replies), spec.max_distance, spec.k, spec.seed)

    def _aggregate_group(self, server_round: int, replies: list[Message], weights: np.ndarray) -> ArrayRecord:
        arrays = _average(replies, weights)
        if self.refine is not None and server_round % self.refine_every == 0:
            arrays = self.refine(server_round, arrays, [m.content[ARRAYS_KEY] for m in replies])
            self.last_train.refined = True
        return arrays

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, weight and average (per cluster when clustering); None when no reply was acceptable."""
        replies = list(replies)
        accepted, rejected = screen(replies, lambda m: check_train_reply(
            m, self._expected, NUM_EXAMPLES, self.required_train_metrics))
        self.last_train = RoundLog(rejected=rejected)
        log(INFO, "round %d: aggregating %d of %d replies", server_round, len(accepted), len(replies))
        if not accepted:
            return None, None
        accepted.sort(key=site_name)  # replies arrive in any order; a fixed summation order makes runs repeatable
        names = [site_name(m) for m in accepted]
        weights = normalise_weights(self.aggregation_weights(accepted))
        for name, message, weight in zip(names, accepted, weights):
            self.last_train.accepted[name] = float(weight)
            self.last_train.site_metrics[name] = metric_dict(message)
        if self.clustering.method == "none":
            global_arrays = self._aggregate_group(server_round, accepted, weights)
        else:
            global_arrays = _average(accepted, weights)  # for the checkpoint and for sites never seen
            self._aggregate_clusters(server_round, accepted, names, weights)
        metrics = MetricRecord({
            "sites-accepted": len(accepted),
            "sites-rejected": len(rejected),
            "train-loss": float(np.average([metric_dict(m).get("train-loss", np.nan) for m in accepted],
                                           weights=weights)),
        })
        return global_arrays, metrics

    def _aggregate_clusters(self, server_round: int, accepted: list[Message], names: list[str],
                            weights: np.ndarray) -> None:
        groups = self._groups(accepted)
        previous = self.last_clusters
        for group in groups:
            members = [accepted[i] for i in group]
            model = self._aggregate_group(server_round, members, weights[group] / weights[group].sum())
            for message in members:
                self.node_models[message.metadata.src_node_id] = model
                self.site_models[site_name(message)] = model
        self.last_train.clusters = named_partition(groups, names)
        if self.clustering.method != "singletons":
            change = "" if previous in ([], self.last_train.clusters) else f" (was {previous})"
            log(INFO, "round %d clusters: %s%s", server_round, self.last_train.clusters, change)
        self.last_clusters = self.last_train.clusters

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep every site's own Rank-k/mAP/mINP and return their plain mean, as EasyFL reports."""
        accepted, rejected = screen(replies, lambda m: check_evaluate_reply(m, EVAL_METRICS))
        self.last_evaluate = RoundLog(rejected=rejected)
        if not accepted:
            return None
        for message in accepted:
            self.last_evaluate.site_metrics[site_name(message)] = metric_dict(message)
        per_site = self.last_evaluate.site_metrics.values()
        return MetricRecord({key: float(np.mean([m[key] for m in per_site])) for key in EVAL_METRICS})
