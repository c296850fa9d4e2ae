"""FedPav (Federated Partial Averaging, Zhuang et al., ACM MM'20) and FedReID's options, as a Flower
Message-API strategy: the base every strategy of this project extends.

Sites train a shared backbone and keep their own identity classifiers, whose sizes differ from
site to site. Sites therefore send only their SHARED arrays (the split rule lives with the model),
and the server averages exactly the arrays it sent. FedReID's options, each combinable:

* ``weighting="size"`` (FedPav): weights = training images per site;
  ``weighting="cdw"``: weights = each site's reported cosine distance (how much its model moved),
  normalised, data size ignored (FedReID's CDW).
* ``refine``: a server-side step after aggregation, e.g. knowledge distillation on public images
  (FedReID's KD), every ``refine_every`` rounds; it sees the uploaded models, so no extra bytes travel.
* ``clustering``: group the sites by an embedding of their uploads, aggregate within each group and
  send each site its group's model (FedReID journal version); ``singletons`` = every site alone,
  i.e. local training under the same runner.

Where the rest lives: FedKLPR (KLPWA, server-coordinated pruning, Cross-Round Recovery) extends
this class in strategies/fedklpr.py; how models travel, whole or as compressed changes, is
strategies/transfer.py; held-out sites strategies/held_out.py; the style bank of feddg
strategies/style_bank.py; reply checks strategies/validation.py and strategies/screening.py.

Every reply is checked first (keys, shapes, dtypes, encodings, finite values, required metrics),
then screened against the round's other replies (a change far larger than theirs, an
unbelievable training-set size); a bad one is logged with its reason and left out while the
round goes on. A reply counts under the name its node was registered with (strategies/naming.py),
and a name two nodes claim is turned away. Sites are sampled with a seeded generator (seed,
round), so a run with the same connected nodes samples the same sites.
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.averaging import masked_weighted_average, normalise_weights
from strategies.clustering import ClusteringSpec, cluster_sites, named_partition, update_embeddings
from strategies.held_out import HeldOutSites
from strategies.naming import SiteNames
from strategies.ndarrays import to_array, values_of
from strategies.packing import TransportSpec
from strategies.replies import (COUNT_METRICS, EVAL_METRICS, RoundLog, Upload, checked_metrics, metric_dict, reject,
                                screen)
from strategies.screening import ExampleLedger, ScreenSpec, change_norm, clip_change, judge_norms
from strategies.style_bank import StyleBank
from strategies.transfer import ModelTransfer
from strategies.validation import (EVALUATION_KEY, METRICS_KEY, UNSEEN_PROTOCOLS, ArraySpec,
                                   check_carried_evaluation, check_evaluate_reply, check_train_reply, expected_specs)

NUM_EXAMPLES = "num-examples"
CDW_DISTANCE = "cdw-distance"
WEIGHTINGS = ("size", "cdw")
REQUIRED_METRICS = {"size": (), "cdw": (CDW_DISTANCE,)}
SCREEN_SCORE = "screen-score"  # the server's change-norm score of an accepted upload (metrics.jsonl)

Refiner = Callable[[int, ArrayRecord, list[ArrayRecord]], ArrayRecord]
"""(round, aggregated arrays, the uploads aggregated into it) -> refined arrays."""
Embedder = Callable[[list[ArrayRecord]], np.ndarray]
"""uploads -> one embedding row per upload."""
__all__ = ["ClusteringSpec", "FedPav", "NUM_EXAMPLES", "RoundLog", "Upload"]


def average(uploads: list[Upload], weights: np.ndarray) -> ArrayRecord:
    """The mask-aware weighted average of the uploads' tensors."""
    averaged = masked_weighted_average([u.tensors for u in uploads], weights)
    return ArrayRecord({k: to_array(v) for k, v in averaged.items()})


class FedPav(HeldOutSites, StyleBank, FedAvg):
    """Partial averaging of SHARED arrays with per-reply screening and the FedReID options.

    Sampling and message construction are FedAvg's; aggregation is replaced so that a malformed
    reply is rejected on its own instead of failing the round.
    """

    weightings: tuple[str, ...] = WEIGHTINGS

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
        transfer: ModelTransfer | None = None,
        transport: TransportSpec | None = None,
        screen: ScreenSpec | None = None,
        held_out: Iterable[str] = (),
        unseen_protocols: Iterable[str] = UNSEEN_PROTOCOLS,
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
        if weighting not in self.weightings:
            raise ValueError(f"unknown weighting {weighting!r} for {type(self).__name__}; choose one of "
                             f"{self.weightings}")
        self.weighting = weighting
        self.refine = refine
        self.refine_every = max(1, refine_every)
        self.clustering = clustering or ClusteringSpec()
        if self.clustering.needs_embeddings and embed is None:
            raise ValueError(f"{self.clustering.method} clustering needs an embedder (public images on the server)")
        self.embed = embed
        self.transfer = transfer or ModelTransfer(transport)
        self.screen = screen or ScreenSpec()
        self.examples = ExampleLedger(self.screen)
        self.names = SiteNames()
        self.seed = seed
        self.min_sites = min_sites
        self.held_out = frozenset(held_out)  # sites that never train; only the unseen evaluation reaches them
        self.unseen_protocols = tuple(unseen_protocols)  # how they rank (strategies/held_out.py)
        self.bn_stats_by_site: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        self.share_styles = share_styles  # feddg: keep each site's latest style, send each the others'
        self.styles: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}  # the global model's pruning masks (FedKLPR), key -> kept
        self._expected: dict[str, ArraySpec] = {}
        self._sent: dict[int, dict[str, np.ndarray]] = {}  # node -> the arrays it trains from this round
        self._checked_early: dict[int, tuple[Message, tuple[object, str | None]]] = {}  # id(reply) -> its check
        self._early_scores: dict[int, float] = {}  # id(reply) -> its change norm, measured on arrival
        self.node_models: dict[int, ArrayRecord] = {}  # per-node models when clustering
        self.site_models: dict[str, ArrayRecord] = {}  # the same, by site name (for checkpoints)
        self.site_nodes: dict[str, int] = {}  # site name -> node id it last replied from
        self.last_clusters: list[list[str]] = []
        self.last_train = RoundLog()
        self.last_evaluate = RoundLog()

    @property
    def required_train_metrics(self) -> tuple[str, ...]:
        return REQUIRED_METRICS[self.weighting]

    def singletons(self) -> bool:
        return self.clustering.method == "singletons"

    def restore_site_models(self, site_models: dict[str, ArrayRecord], site_nodes: dict[str, int]) -> None:
        """Per-site models of a resumed run. Node ids survive a SuperLink restart when its database is
        kept (registered keys keep their ids); a site whose node id changed gets the global model once."""
        self.site_models = dict(site_models)
        self.site_nodes = dict(site_nodes)
        self.node_models = {node: site_models[site] for site, node in site_nodes.items() if site in site_models}

    def restore_global(self, arrays: ArrayRecord, rounds: list[dict]) -> None:
        """What a resumed run's strategy knows of its global model beyond the arrays (FedKLPR: masks)."""

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

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                  fraction: float, message_type: str) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = self.sample(grid, fraction, server_round, message_type)
        return self._construct_messages(record, nodes, message_type)

    def _personalise(self, messages: Iterable[Message], training: bool = False) -> list[Message]:
        """Give each site its cluster's model (when it has one) in its travelling form (whole, or
        as a change from what the site holds); when ``training``, keep what each node trains from
        (its upload's change is measured against it)."""
        out = []
        if training:
            self._sent = {}
        for message in messages:
            node = message.metadata.dst_node_id
            arrays = self.node_models.get(node, message.content[self.arrayrecord_key])
            sent = self.transfer.outgoing(node, arrays, self.masks, training)
            if training:
                self._sent[node] = sent.held if sent.held is not None else {k: values_of(a) for k, a in arrays.items()}
            config = message.content[self.configrecord_key]
            if sent.config:
                config = ConfigRecord({**dict(config), **sent.config})
            content = RecordDict({self.arrayrecord_key: sent.record, self.configrecord_key: config})
            out.append(Message(content=content, dst_node_id=node, message_type=message.metadata.message_type))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample the sites and remember what each was sent, so replies can be checked against it."""
        self._expected = expected_specs(arrays)
        self._checked_early, self._early_scores = {}, {}
        messages = self._messages(server_round, arrays, config, grid, self.fraction_train, MessageType.TRAIN)
        return self.with_style_banks(self._personalise(messages, training=True))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Each site is evaluated with the model it trains from (its cluster's, when clustering)."""
        messages = self._messages(server_round, arrays, config, grid, self.fraction_evaluate, MessageType.EVALUATE)
        return self._personalise(messages)

    # ----- aggregating -------------------------------------------------------------------------

    def aggregation_weights(self, uploads: list[Upload]) -> np.ndarray:
        """Training-set sizes (FedPav) or cosine distances (CDW), not yet normalised."""
        sizes = np.array([u.metric(NUM_EXAMPLES) for u in uploads])
        if self.weighting == "cdw":
            weights = np.array([u.metric(CDW_DISTANCE) for u in uploads])
            if (weights > 0).any():
                return weights
            log(WARNING, "every site reported a zero cosine distance; weighting by training-set size instead")
        return sizes

    def finish_global(self, server_round: int, arrays: ArrayRecord, uploads: list[Upload]) -> ArrayRecord:
        """The step after aggregation and refinement (FedKLPR prunes here); FedPav keeps the arrays."""
        return arrays

    def _groups(self, uploads: list[Upload]) -> list[list[int]]:
        spec = self.clustering
        embeddings = None
        if spec.needs_embeddings:
            embeddings = self.embed([u.arrays for u in uploads])
        elif spec.groups_sites:
            embeddings = update_embeddings([{k: t.values - self._sent[u.node][k] for k, t in u.tensors.items()}
                                            for u in uploads])
        return cluster_sites(spec.method, embeddings, len(uploads), spec.max_distance, spec.k, spec.seed)

    def _aggregate_group(self, server_round: int, uploads: list[Upload], weights: np.ndarray) -> ArrayRecord:
        arrays = average(uploads, weights)
        if self.refine is not None and server_round % self.refine_every == 0:
            arrays = self.refine(server_round, arrays, [u.arrays for u in uploads])
            self.last_train.refined = True
        return arrays

    def _screen_wild(self, uploads: list[Upload], rejected: dict[str, str]) -> tuple[list[Upload], dict[str, float]]:
        """Turn away (or clip) uploads whose training-set size or model change is absurd next to the
        round's others; returns the kept uploads and every judged site's change score."""
        believable = []
        for upload in uploads:
            reason = self.examples.check(upload.site, upload.metric(NUM_EXAMPLES))
            if upload.node not in self._sent:
                reason = "this node was not sent a model to train this round"
            if reason:
                reject(rejected, upload.site, upload.node, reason)
            else:
                believable.append(upload)
        sent = [self._sent[u.node] for u in believable]
        early, self._early_scores = self._early_scores, {}
        norms = [early[id(u.message)] if id(u.message) in early else change_norm(u.tensors, g)
                 for u, g in zip(believable, sent)]
        scores = [norm / np.sqrt(u.metric(NUM_EXAMPLES)) for u, norm in zip(believable, norms)]
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
            self.examples.record(upload.site, upload.metric(NUM_EXAMPLES))
        return kept, {u.site: s for u, s in zip(believable, scores)}

    def check_upload(self, upload: Upload) -> str | None:
        """A strategy's own check of an otherwise well-formed upload (FedKLPR: the agreed masks)."""
        return None

    def _check_train_reply(self, reply: Message) -> tuple[object, str | None]:
        """(decoded tensors, None) or (None, why the reply is malformed)."""
        return check_train_reply(
            reply, self._expected, NUM_EXAMPLES, self.required_train_metrics,
            decode=lambda arrays, shapes: self.transfer.incoming(reply.metadata.src_node_id, arrays, shapes))

    def check_train_reply_early(self, reply: Message) -> None:
        """Check and decode a training reply as soon as it arrives, while the other sites still train,
        and measure its change from what its node was sent (screening's score); ``aggregate_train``
        then takes both instead of doing them again. With three uploads of 20 MB the check took
        0.1-0.2 s and the three change norms 0.15-0.37 s off the time between the last reply and
        the next round (bench/round_trace.py)."""
        if reply.has_error():
            return
        checked = self._check_train_reply(reply)
        self._checked_early[id(reply)] = (reply, checked)
        tensors, problem = checked
        sent = self._sent.get(reply.metadata.src_node_id)
        if problem is None and sent is not None:
            self._early_scores[id(reply)] = change_norm(tensors, sent)

    def _checked_uploads(self, replies: list[Message]) -> tuple[list[Upload], dict[str, str]]:
        named, rejected = self.names.resolve(replies)
        early, self._checked_early = self._checked_early, {}
        checked, malformed = screen(named, lambda m: early[id(m)][1] if id(m) in early else self._check_train_reply(m))
        rejected.update(malformed)
        self.transfer.settle({m.metadata.src_node_id for m in replies if not m.has_error()})
        uploads = []
        for upload in sorted((Upload(name, m, tensors) for name, m, tensors in checked), key=lambda u: u.site):
            reason = self.check_upload(upload)
            if reason:
                reject(rejected, upload.site, upload.node, reason)
            else:
                uploads.append(upload)
        return uploads, rejected

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, weight and average (per cluster when clustering); None when no reply was acceptable."""
        replies = list(replies)
        # replies arrive in any order; a fixed summation order (by site) makes runs repeatable
        uploads, rejected = self._checked_uploads(replies)
        self.last_train = RoundLog(rejected=rejected)
        uploads, scores = self._screen_wild(uploads, rejected) if uploads else ([], {})
        log(INFO, "round %d: aggregating %d of %d replies", server_round, len(uploads), len(replies))
        if not uploads:
            return None, None
        if self.share_styles:
            self.keep_styles(uploads)
        self.keep_bn_stats(uploads, NUM_EXAMPLES)
        weights = normalise_weights(self.aggregation_weights(uploads))
        for upload, weight in zip(uploads, weights):
            self.last_train.accepted[upload.site] = float(weight)
            self.last_train.site_metrics[upload.site] = {**metric_dict(upload.message), SCREEN_SCORE: scores[upload.site]}
        if self.clustering.method == "none":
            global_arrays = self._aggregate_group(server_round, uploads, weights)
        else:
            global_arrays = average(uploads, weights)  # for the checkpoint and for sites never seen
            self._aggregate_clusters(server_round, uploads, weights)
        global_arrays = self.finish_global(server_round, global_arrays, uploads)
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
        accepted, malformed = screen(named, lambda m: checked_metrics(m, METRICS_KEY, check_evaluate_reply))
        rejected.update(malformed)
        return self._keep_evaluations(accepted, rejected)

    def aggregate_carried_evaluations(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The same for evaluations that training replies carried (of the model they were sent);
        a reply without one, or with a malformed one, is rejected for the evaluation only."""
        named, rejected = self.names.resolve(replies)
        accepted, malformed = screen(named, lambda m: checked_metrics(m, EVALUATION_KEY, check_carried_evaluation))
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
