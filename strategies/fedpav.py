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

Every reply is checked first (keys, shapes, dtypes, finite values, required metrics), then
screened against the round's other replies (a change far larger than theirs, an unbelievable
training-set size: strategies/screening.py); a bad one is logged with its reason and left out
while the round goes on. A reply counts under the name its node was registered with
(strategies/naming.py), and a name two nodes claim is turned away.

Sites are sampled with a seeded generator (seed, round), so a run with the same connected nodes
samples the same sites.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.averaging import masked_weighted_average, normalise_weights
from strategies.clustering import CLUSTER_METHODS, cluster_sites, named_partition
from strategies.naming import SiteNames
from strategies.packing import TransportSpec, pack_record
from strategies.screening import ExampleLedger, ScreenSpec, change_norm, clip_change, judge_norms
from strategies.sparse_records import Tensor, dense_record, encode_record
from strategies.validation import (
    EVALUATION_KEY,
    METRICS_KEY,
    STYLE_BANK_KEY,
    ArraySpec,
    check_carried_evaluation,
    check_evaluate_reply,
    check_train_reply,
    expected_specs,
    reply_style,
)
from strategies.weighting import WEIGHTINGS, KLPWASpec, klpwa_weights

NUM_EXAMPLES = "num-examples"
CDW_DISTANCE = "cdw-distance"
KL_DIVERGENCE = "kl-divergence"
KEPT_FRACTION = "kept-fraction"
EVAL_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
COUNT_METRICS = ("num-queries", "num-gallery")  # kept per site, not averaged
# Beyond EVAL_METRICS, every metric all sites report is averaged too: Market-1501's trapezoid mAP
# ("mAP-market"), and under resolution drift "mAP@0.5", "rank1@0.25", ..., "drift-gap".
REQUIRED_METRICS = {"size": (), "cdw": (CDW_DISTANCE,), "klpwa": (KL_DIVERGENCE, KEPT_FRACTION)}

Refiner = Callable[[int, ArrayRecord, list[ArrayRecord]], ArrayRecord]
"""(round, aggregated arrays, the uploads aggregated into it) -> refined arrays."""
Embedder = Callable[[list[ArrayRecord]], np.ndarray]
"""uploads -> one embedding row per upload."""
SCREEN_SCORE = "screen-score"  # the server's change-norm score of an accepted upload (metrics.jsonl)


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


def reject(rejected: dict[str, str], name: str, node: int, reason: str) -> None:
    """Record and log one turned-away reply."""
    rejected[name] = reason
    log(WARNING, "rejected reply from %s (node %s): %s", name, node, reason)


def screen(replies: Iterable[tuple[str, Message]], check: Callable[[Message], tuple[object, str | None]]
           ) -> tuple[list[tuple[str, Message, object]], dict[str, str]]:
    """Split named replies into (name, message, checked payload) and {site: reason} for the rest,
    logging each rejection."""
    accepted, rejected = [], {}
    for name, message in replies:
        payload, reason = check(message)
        if reason is None:
            accepted.append((name, message, payload))
        else:
            reject(rejected, name, message.metadata.src_node_id, reason)
    return accepted, rejected


def metric_dict(message: Message) -> dict[str, float]:
    """The reply's metrics as plain floats (lists are left out)."""
    return {k: float(v) for k, v in message.content[METRICS_KEY].items() if not isinstance(v, list)}


def _checked_metrics(message: Message, key: str, check: Callable[[Message, Iterable[str]], str | None]
                     ) -> tuple[MetricRecord | None, str | None]:
    """(the evaluation record under ``key``, None) when ``check`` passes, else (None, its reason)."""
    reason = check(message, EVAL_METRICS)
    return (None, reason) if reason else (message.content[key], None)  # type: ignore[return-value]


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
        transport: TransportSpec | None = None,
        screen: ScreenSpec | None = None,
        held_out: Iterable[str] = (),
        share_styles: bool = False,
        seed: int = 0,
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
        self.transport = transport or TransportSpec()
        self.screen = screen or ScreenSpec()
        self.examples = ExampleLedger(self.screen)
        self.names = SiteNames()
        self.seed = seed
        self.min_sites = min_sites
        self.held_out = frozenset(held_out)  # sites that never train; only the unseen evaluation reaches them
        self.share_styles = share_styles  # feddg_ccst: keep each site's latest style, send each the others'
        self.styles: dict[str, np.ndarray] = {}
        self.required_train_metrics = REQUIRED_METRICS[weighting]
        self._expected: dict[str, ArraySpec] = {}
        self._sent: dict[int, dict[str, np.ndarray]] = {}  # node -> the arrays it was sent to train from
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

    def sample(self, grid: Grid, fraction: float, server_round: int, kind: str) -> list[int]:
        """A seeded sample of the connected nodes: ``fraction`` of them, at least ``min_sites`` (or all
        there are; the runner has already waited, within its bound, for enough to connect)."""
        nodes = self.training_sites(grid.get_node_ids())
        if fraction <= 0 or not nodes:
            return []
        size = min(len(nodes), max(int(len(nodes) * fraction), self.min_sites))
        chosen = sorted(random.Random(f"{self.seed}/{kind}/{server_round}").sample(nodes, size))
        log(INFO, "round %d %s: sampled %d of %d connected sites", server_round, kind, len(chosen), len(nodes))
        return chosen

    # ----- held-out sites -------------------------------------------------------------------------

    def training_sites(self, nodes: Iterable[int]) -> list[int]:
        """The nodes that may train and be evaluated as training sites: all of them, or with held-out
        sites those known by a name that is not held out (an unnamed node trains only once it has
        answered the query for its name)."""
        nodes = sorted(nodes)
        if not self.held_out:
            return nodes
        known = set(self.names.known_nodes())
        return [n for n in nodes if n in known and self.names.of_node(n) not in self.held_out]

    def unnamed(self, nodes: Iterable[int]) -> list[int]:
        """Connected nodes whose site name the server does not know yet (asked only with held-out sites)."""
        known = set(self.names.known_nodes())
        return sorted(n for n in nodes if n not in known) if self.held_out else []

    def configure_query(self, nodes: Iterable[int]) -> list[Message]:
        """A query for each node's site name: its reply holds the name and nothing else."""
        return [Message(content=RecordDict({self.configrecord_key: ConfigRecord({"ask": "site-name"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]

    def learn_names(self, replies: Iterable[Message]) -> None:
        """Remember under which name each node answered the query (registered names take precedence)."""
        self.names.resolve([r for r in replies if not r.has_error()])

    def configure_unseen(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> list[tuple[Message, str]]:
        """(evaluate message, which model it carries) for every connected held-out site: the global
        model, or under ``singletons`` clustering (``local``) each training site's own model."""
        nodes = [n for n in sorted(grid.get_node_ids()) if self.names.of_node(n) in self.held_out]
        models = (sorted(self.site_models.items()) if self.clustering.method == "singletons" and self.site_models
                  else [("global", arrays)])
        config["server-round"] = server_round
        out = []
        for label, model in models:
            record = RecordDict({self.arrayrecord_key: self._outgoing(model), self.configrecord_key: config})
            out += [(Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE), label)
                    for node in nodes]
        return out

    def aggregate_unseen(self, replies: Iterable[Message], labels: dict[str, str]) -> dict[str, object] | None:
        """Per held-out site its Rank-k/mAP with the model that ranks best there (``model``: which one),
        each model's mAP when there were several, and the mean over the held-out sites.
        ``labels``: message id -> the model its request carried."""
        named, rejected = self.names.resolve(replies)
        accepted, malformed = screen(named, lambda m: _checked_metrics(m, METRICS_KEY, check_evaluate_reply))
        rejected.update(malformed)
        by_site: dict[str, dict[str, dict[str, float]]] = {}
        for name, message, metrics in accepted:
            label = labels.get(message.metadata.reply_to_message_id, "global")
            by_site.setdefault(name, {})[label] = {k: float(v) for k, v in metrics.items()  # type: ignore[union-attr]
                                                   if not isinstance(v, list)}
        if not by_site:
            return {"sites": {}, "mean": None, "rejected": rejected} if rejected else None
        sites = {}
        for name, results in sorted(by_site.items()):
            best = max(sorted(results), key=lambda label: results[label]["mAP"])
            sites[name] = {**results[best], "model": best}
            if len(results) > 1:
                sites[name]["mAP-by-model"] = {label: r["mAP"] for label, r in sorted(results.items())}
        mean = {k: float(np.mean([m[k] for m in sites.values()])) for k in EVAL_METRICS}
        return {"sites": sites, "mean": mean, "rejected": rejected}

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                  fraction: float, message_type: str) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = self.sample(grid, fraction, server_round, message_type)
        return self._construct_messages(record, nodes, message_type)

    def _outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays as they travel: pruned (zero-holding) tensors encoded when that is smaller, then
        packed into one flat array (in the transport precision) unless packing is off."""
        if self.sparse_downlink:
            arrays = encode_record({k: a.numpy() for k, a in arrays.items()}, sparse_zeros=True)
        return pack_record(arrays, self.transport.dtype) if self.transport.pack else arrays

    def _personalise(self, messages: Iterable[Message], remember: bool = False) -> list[Message]:
        """Give each site its cluster's model (when it has one), in its travelling form; with
        ``remember``, keep what each node was sent (its upload's change is measured against it)."""
        out, encoded, plain = [], {}, {}
        if remember:
            self._sent = {}
        for message in messages:
            node = message.metadata.dst_node_id
            arrays = self.node_models.get(node, message.content[self.arrayrecord_key])
            if remember:
                if id(arrays) not in plain:
                    plain[id(arrays)] = {k: a.numpy() for k, a in arrays.items()}
                self._sent[node] = plain[id(arrays)]
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
        """Sample the sites and remember what each was sent, so replies can be checked against it."""
        self._expected = expected_specs(arrays)
        messages = self._messages(server_round, arrays, config, grid, self.fraction_train, MessageType.TRAIN)
        return self._with_style_banks(self._personalise(messages, remember=True))

    def _with_style_banks(self, messages: list[Message]) -> list[Message]:
        """With style sharing, each training message also carries the other sites' latest styles
        (anonymous rows, the receiving site's own left out)."""
        if not self.share_styles or not self.styles:
            return messages
        out = []
        for message in messages:
            site = self.names.of_node(message.metadata.dst_node_id)
            others = [self.styles[name] for name in sorted(self.styles) if name != site]
            if others:
                content = RecordDict({**dict(message.content.items()),
                                      STYLE_BANK_KEY: ArrayRecord({STYLE_BANK_KEY: Array(np.stack(others))})})
                message = Message(content=content, dst_node_id=message.metadata.dst_node_id,
                                  message_type=message.metadata.message_type)
            out.append(message)
        return out

    def _keep_styles(self, uploads: list[Upload]) -> None:
        """Take each accepted upload's style into the bank; a malformed one (or one of another width
        than the bank's) is left out with a warning, the update itself still counts."""
        for upload in uploads:
            style, reason = reply_style(upload.message)
            width = next(iter(self.styles.values())).shape[1] if self.styles else None
            if style is not None and width is not None and style.shape[1] != width:
                reason = f"its style has {style.shape[1]} channels, the bank's {width}"
            if reason:
                log(WARNING, "style of %s (node %s) left out of the bank: %s", upload.site, upload.node, reason)
            elif style is not None:
                self.styles[upload.site] = style.astype(np.float32)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Each site is evaluated with the model it trains from (its cluster's, when clustering)."""
        messages = self._messages(server_round, arrays, config, grid, self.fraction_evaluate, MessageType.EVALUATE)
        return self._personalise(messages)

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

    def _screen_wild(self, uploads: list[Upload], rejected: dict[str, str]) -> tuple[list[Upload], dict[str, float]]:
        """Turn away (or clip) uploads whose training-set size or model change is absurd next to the
        round's others; returns the kept uploads and every judged site's change score."""
        believable = []
        for upload in uploads:
            reason = self.examples.check(upload.site, float(upload.message.content[METRICS_KEY][NUM_EXAMPLES]))
            if upload.node not in self._sent:
                reason = "this node was not sent a model to train this round"
            if reason:
                reject(rejected, upload.site, upload.node, reason)
            else:
                believable.append(upload)
        sent = [self._sent[u.node] for u in believable]
        scores = [change_norm(u.tensors, g) / np.sqrt(float(u.message.content[METRICS_KEY][NUM_EXAMPLES]))
                  for u, g in zip(believable, sent)]
        kept = []
        for upload, base, verdict in zip(believable, sent, judge_norms(scores, self.screen)):
            if verdict.reason:
                reject(rejected, upload.site, upload.node, verdict.reason)
                continue
            if verdict.scale < 1:
                log(WARNING, "clipped the update of %s (node %s) to %.3g x its change", upload.site, upload.node,
                    verdict.scale)
                upload = Upload(upload.site, upload.message, clip_change(upload.tensors, base, verdict.scale))
            kept.append(upload)
        for upload in kept:
            self.examples.record(upload.site, float(upload.message.content[METRICS_KEY][NUM_EXAMPLES]))
        return kept, {u.site: s for u, s in zip(believable, scores)}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, weight and average (per cluster when clustering); None when no reply was acceptable."""
        replies = list(replies)
        named, rejected = self.names.resolve(replies)
        checked, malformed = screen(named, lambda m: check_train_reply(
            m, self._expected, NUM_EXAMPLES, self.required_train_metrics))
        rejected.update(malformed)
        self.last_train = RoundLog(rejected=rejected)
        # replies arrive in any order; a fixed summation order makes runs repeatable
        uploads = sorted((Upload(name, m, tensors) for name, m, tensors in checked), key=lambda u: u.site)
        uploads, scores = self._screen_wild(uploads, rejected) if uploads else ([], {})
        log(INFO, "round %d: aggregating %d of %d replies", server_round, len(uploads), len(replies))
        if not uploads:
            return None, None
        if self.share_styles:
            self._keep_styles(uploads)
        weights = normalise_weights(self.aggregation_weights(uploads))
        for upload, weight in zip(uploads, weights):
            self.last_train.accepted[upload.site] = float(weight)
            self.last_train.site_metrics[upload.site] = {**metric_dict(upload.message), SCREEN_SCORE: scores[upload.site]}
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
        named, rejected = self.names.resolve(replies)
        accepted, malformed = screen(named, lambda m: _checked_metrics(m, METRICS_KEY, check_evaluate_reply))
        rejected.update(malformed)
        return self._keep_evaluations(accepted, rejected)

    def aggregate_carried_evaluations(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The same for evaluations that training replies carried (of the model they were sent);
        a reply without one, or with a malformed one, is rejected for the evaluation only."""
        named, rejected = self.names.resolve(replies)
        accepted, malformed = screen(named, lambda m: _checked_metrics(m, EVALUATION_KEY, check_carried_evaluation))
        rejected.update(malformed)
        return self._keep_evaluations(accepted, rejected)

    def _keep_evaluations(self, accepted: list[tuple[str, Message, object]],
                          rejected: dict[str, str]) -> MetricRecord | None:
        self.last_evaluate = RoundLog(rejected=rejected)
        if not accepted:
            return None
        for name, _, metrics in accepted:
            self.last_evaluate.site_metrics[name] = {k: float(v) for k, v in metrics.items()  # type: ignore[union-attr]
                                                     if not isinstance(v, list)}
        per_site = self.last_evaluate.site_metrics.values()
        common = set.intersection(*(set(m) for m in per_site)) - set(EVAL_METRICS) - set(COUNT_METRICS)
        keys = [*EVAL_METRICS, *sorted(common)]
        return MetricRecord({key: float(np.mean([m[key] for m in per_site])) for key in keys})
