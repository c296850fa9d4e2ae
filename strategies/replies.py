"""Replies as the strategies see them: accepted uploads, turned-away replies with their reasons, and
the log of one aggregation. Shared by every strategy of the FedPav family."""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from strategies.sparse_records import Tensor, dense_record
from strategies.validation import METRICS_KEY

EVAL_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
COUNT_METRICS = ("num-queries", "num-gallery")  # kept per site, not averaged


@dataclass
class RoundLog:
    """Who took part in the last aggregation, with what weight, and who was turned away and why;
    ``notes``: what a strategy adds to the round's line in metrics.jsonl (FedKLPR's pruning)."""

    accepted: dict[str, float] = field(default_factory=dict)  # site -> normalised weight
    rejected: dict[str, str] = field(default_factory=dict)  # site -> reason
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    clusters: list[list[str]] = field(default_factory=list)
    refined: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


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

    def metric(self, key: str, default: float | None = None) -> float:
        metrics = self.message.content[METRICS_KEY]
        if key not in metrics and default is not None:
            return default
        return float(metrics[key])


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


def checked_metrics(message: Message, key: str, check: Callable[[Message, Iterable[str]], str | None]
                    ) -> tuple[MetricRecord | None, str | None]:
    """(the evaluation record under ``key``, None) when ``check`` passes, else (None, its reason)."""
    reason = check(message, EVAL_METRICS)
    return (None, reason) if reason else (message.content[key], None)  # type: ignore[return-value]
