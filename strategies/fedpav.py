"""FedPav (Federated Partial Averaging, Zhuang et al., ACM MM'20) as a Flower Message-API strategy.

Sites train a shared backbone and keep their own identity classifiers, whose sizes differ from
site to site. Sites therefore send only their SHARED arrays (the split rule lives with the model),
and the server averages exactly the arrays it sent, weighted by each site's number of training
images. Whether BatchNorm running statistics are among them is the sites' policy: the strategy
averages whatever the global record holds.

Every reply is checked first (keys, shapes, dtypes, finite values, required metrics); a bad one
is logged with its reason and left out while the round goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from strategies.averaging import normalise_weights, weighted_average
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
EVAL_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def site_name(message: Message) -> str:
    """The site's self-reported name, or its node id when it sent none."""
    content = message.content if not message.has_error() else None
    if content is not None and SITE_KEY in content.config_records:
        return str(content.config_records[SITE_KEY].get("name", message.metadata.src_node_id))
    return f"node-{message.metadata.src_node_id}"


@dataclass
class RoundLog:
    """Who took part in the last aggregation, with what weight, and who was turned away and why."""

    accepted: dict[str, float] = field(default_factory=dict)  # site -> normalised weight
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


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


class FedPav(FedAvg):
    """Partial averaging of SHARED arrays, weighted by training-set size, with per-reply screening.

    Sampling and message construction are FedAvg's; aggregation is replaced so that a malformed
    reply is rejected on its own instead of failing the round, and subclasses can change the
    weights (``aggregation_weights``) without touching the rest.
    """

    def __init__(self, *, min_sites: int = 2, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 required_train_metrics: tuple[str, ...] = ()) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites if fraction_evaluate > 0 else 0,
            min_available_nodes=min_sites,
            weighted_by_key=NUM_EXAMPLES,
        )
        self.required_train_metrics = required_train_metrics
        self._expected: dict[str, ArraySpec] = {}
        self.last_train = RoundLog()
        self.last_evaluate = RoundLog()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember what was sent, so replies can be checked against it, then sample as FedAvg."""
        self._expected = expected_specs(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregation_weights(self, replies: list[Message]) -> np.ndarray:
        """FedPav's weights: each site's number of training images."""
        return np.array([float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies])

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, weight and average the SHARED arrays; None when no reply was acceptable."""
        replies = list(replies)
        accepted, rejected = screen(replies, lambda m: check_train_reply(
            m, self._expected, NUM_EXAMPLES, self.required_train_metrics))
        self.last_train = RoundLog(rejected=rejected)
        log(INFO, "round %d: aggregating %d of %d replies", server_round, len(accepted), len(replies))
        if not accepted:
            return None, None
        accepted.sort(key=site_name)  # replies arrive in any order; a fixed summation order makes runs repeatable
        weights = normalise_weights(self.aggregation_weights(accepted))
        updates = [{k: a.numpy() for k, a in m.content[ARRAYS_KEY].items()} for m in accepted]
        averaged = weighted_average(updates, weights)
        for message, weight in zip(accepted, weights):
            self.last_train.accepted[site_name(message)] = float(weight)
            self.last_train.site_metrics[site_name(message)] = metric_dict(message)
        metrics = MetricRecord({
            "sites-accepted": len(accepted),
            "sites-rejected": len(rejected),
            "train-loss": float(np.average([metric_dict(m).get("train-loss", np.nan) for m in accepted],
                                           weights=weights)),
        })
        return ArrayRecord({k: Array(v) for k, v in averaged.items()}), metrics

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
