"""The federated round loop: train, aggregate, evaluate every k rounds, record, checkpoint.

Written out instead of using ``Strategy.start`` because a re-ID run needs what ``start`` has no
hook for: evaluation only every k rounds, a metrics line and a checkpoint after every round, and
the bytes that really crossed the wire, per site and direction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from server.config import FederationSettings
from strategies.fedpav import FedPav, site_name
from strategies.wire import message_wire_bytes

RoundHook = Callable[[int, ArrayRecord, dict[str, Any]], None]


@dataclass
class Exchange:
    """One send-and-receive: the replies, and the bytes each way per site."""

    replies: list[Message]
    bytes_per_site: dict[str, dict[str, int]]
    seconds: float
    failed: list[str]  # sites that were asked but did not answer in time

    def totals(self) -> dict[str, int]:
        return {"sent": sum(b["sent"] for b in self.bytes_per_site.values()),
                "received": sum(b["received"] for b in self.bytes_per_site.values())}


def exchange(grid: Grid, messages: list[Message], timeout: float, names: dict[int, str]) -> Exchange:
    """Send, wait for replies (up to ``timeout``), and measure every message's serialised size.

    ``names`` maps node ids to the site names they reported before; it is updated from the replies
    so that a site that stops answering is still named.
    """
    start = time.perf_counter()
    sent = {m.metadata.dst_node_id: message_wire_bytes(m) for m in messages}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    names.update({r.metadata.src_node_id: site_name(r) for r in replies})
    label = {node: names.get(node, f"node-{node}") for node in sent}  # never answered: known by id only
    answered = {r.metadata.src_node_id for r in replies}
    failed = sorted(label[node] for node in sent if node not in answered)
    per_site = {label[node]: {"sent": size, "received": 0} for node, size in sent.items()}
    for reply in replies:
        per_site.setdefault(names[reply.metadata.src_node_id], {"sent": 0, "received": 0})
        per_site[names[reply.metadata.src_node_id]]["received"] += message_wire_bytes(reply)
    if failed:
        log(WARNING, "%s did not answer within %.0f s; going on without them", ", ".join(failed), timeout)
    return Exchange(replies, per_site, time.perf_counter() - start, failed)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


class FederationRunner:
    """Runs rounds with a FedPav-family strategy and reports each one to ``on_round``."""

    def __init__(self, grid: Grid, strategy: FedPav, settings: FederationSettings, site_config: ConfigRecord,
                 on_round: RoundHook) -> None:
        self.grid = grid
        self.strategy = strategy
        self.settings = settings
        self.site_config = site_config
        self.on_round = on_round
        self.site_names: dict[int, str] = {}  # node id -> site name, learnt from replies

    def _config(self) -> ConfigRecord:
        return ConfigRecord(dict(self.site_config))  # strategies write the round into it: fresh copy

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """Federated evaluation: every site ranks its own gallery with the global model."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, self._config(), self.grid))
        if not messages:
            return None
        result = exchange(self.grid, messages, self.settings.round_timeout_s, self.site_names)
        mean = self.strategy.aggregate_evaluate(server_round, result.replies)
        if mean is not None:
            log(INFO, "round %d evaluation: mean Rank-1 %.1f%%, mAP %.1f%% over %d sites", server_round,
                100 * mean["rank1"], 100 * mean["mAP"], len(self.strategy.last_evaluate.site_metrics))
        return {"sites": self.strategy.last_evaluate.site_metrics, "mean": dict(mean) if mean else None,
                "rejected": self.strategy.last_evaluate.rejected, "bytes": result.totals(),
                "seconds": result.seconds}

    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
        """One training round; the global arrays stay as they were when no reply is usable."""
        messages = list(self.strategy.configure_train(server_round, arrays, self._config(), self.grid))
        result = exchange(self.grid, messages, self.settings.round_timeout_s, self.site_names)
        aggregation_start = time.perf_counter()
        new_arrays, metrics = self.strategy.aggregate_train(server_round, result.replies)
        aggregation_seconds = time.perf_counter() - aggregation_start
        usable = len(self.strategy.last_train.accepted)
        if new_arrays is None:
            log(WARNING, "round %d: no usable update; the global model is unchanged", server_round)
        elif usable < self.settings.min_sites:
            log(WARNING, "round %d: only %d usable update(s), fewer than federation.min_sites=%d; the global "
                "model is unchanged", server_round, usable, self.settings.min_sites)
            new_arrays = None
        new_arrays = arrays if new_arrays is None else new_arrays
        log(INFO, "round %d/%d trained: %d sites, %s down, %s up, %.1f s", server_round, self.settings.rounds,
            len(self.strategy.last_train.accepted), _megabytes(result.totals()["sent"]),
            _megabytes(result.totals()["received"]), result.seconds)
        record = {
            "sites": {name: {**m, "weight": self.strategy.last_train.accepted[name]}
                      for name, m in self.strategy.last_train.site_metrics.items()},
            "rejected": self.strategy.last_train.rejected,
            "failed": result.failed,
            "aggregated": new_arrays is not arrays,
            "aggregation_seconds": aggregation_seconds,
            "clusters": self.strategy.last_train.clusters or None,
            "refined": self.strategy.last_train.refined,
            "aggregate": dict(metrics) if metrics else None,
            "bytes": result.totals(),
            "bytes_per_site": result.bytes_per_site,
            "seconds": result.seconds,
        }
        return new_arrays, record

    def run(self, arrays: ArrayRecord, first_round: int = 1, start_evaluated: bool = False) -> ArrayRecord:
        """Rounds ``first_round``..R; each one is reported before the next starts. Round 0 (the
        untrained model) is evaluated first unless disabled or already done (``start_evaluated``)."""
        if first_round == 1 and self.settings.eval_at_start and not start_evaluated:
            self.on_round(0, arrays, {"round": 0, "train": None, "evaluate": self.evaluate(0, arrays)})
        for server_round in range(first_round, self.settings.rounds + 1):
            start = time.perf_counter()
            arrays, train_record = self.train_round(server_round, arrays)
            evaluation = self.evaluate(server_round, arrays) if self.settings.evaluates_after(server_round) else None
            self.on_round(server_round, arrays, {
                "round": server_round, "train": train_record, "evaluate": evaluation,
                "seconds": time.perf_counter() - start,
            })
        return arrays
