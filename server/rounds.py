"""The federated round loop: train, aggregate, evaluate every k rounds, record, checkpoint.

Written out instead of using ``Strategy.start`` because a re-ID run needs what ``start`` has no
hook for: evaluation only every k rounds, a metrics line and a checkpoint after every round, and
the bytes that really crossed the wire, per site and direction.

Every wait here has a bound. Waiting for sites to connect and waiting for replies both end after
``federation.round_timeout_s``; sites that did not answer by then are named in the round's
``failed`` list and the run goes on with the next round; so are sites whose process died mid-task
(the reply says so). A training round that no site answered at all (none connected, or the
SuperLink answering "unavailable" for each) is not counted but tried again, so a resumed run whose
sites are still coming back loses no round. While it waits, the loop says in its log, by name,
which sites it is still waiting for (every
``federation.report_every_s``). Replies are pulled every ``federation.poll_interval_s``, or at once
again when fedreid's SuperLink held the empty pull (server/long_polls.py); Flower's own
``send_and_receive`` sleeps 3 s between pulls and treats a message the SuperLink refused as one
still to come, which waits out the whole timeout. Each round's line says where its time went
(``time_split``: training, evaluation, aggregation, framework; server/timing.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Collection, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore import log

from server.bounded import call_within
from server.config import FederationSettings
from server.timing import RunClock
from strategies.fedpav import FedPav
from strategies.held_out import Request, unseen_results
from strategies.naming import SiteNames
from strategies.validation import EVALUATE_ROUND_KEY
from strategies.wire import message_wire_bytes

RoundHook = Callable[[int, ArrayRecord, dict[str, Any]], None]
# A site's error replies that say its process died mid-task (Flower's heartbeat expiry, or fedreid's
# site worker answering for the worker before it): the site failed, it did not reject the round.
DIED = frozenset({ErrorCode.CLIENT_APP_CRASHED})
RETRY_PAUSE_S = 5.0  # between two tries of a training round that no site answered


@dataclass
class Exchange:
    """One send-and-receive: the replies, and the bytes each way per site."""

    replies: list[Message]
    bytes_per_site: dict[str, dict[str, int]]
    seconds: float
    failed: list[str]  # sites that were asked but did not answer in time
    started: float = 0.0  # time.time() when the messages were pushed
    ended: float = 0.0  # and when the last reply (or the timeout) came
    checks: list[tuple[float, float]] = field(default_factory=list)  # time.time() spans of on_reply (the server's work)

    def totals(self) -> dict[str, int]:
        return {"sent": sum(b["sent"] for b in self.bytes_per_site.values()),
                "received": sum(b["received"] for b in self.bytes_per_site.values())}

    def split(self, site_of: Callable[[Message], str], apart: Collection[str]) -> tuple["Exchange", "Exchange"]:
        """(the other sites' part, the ``apart`` sites' part) of one exchange that asked two groups of
        sites at once; the server's on-arrival checks stay with the first part."""
        def part(inside: bool) -> Exchange:
            return Exchange([r for r in self.replies if (site_of(r) in apart) == inside],
                            {s: b for s, b in self.bytes_per_site.items() if (s in apart) == inside}, self.seconds,
                            [s for s in self.failed if (s in apart) == inside], self.started, self.ended,
                            [] if inside else list(self.checks))
        return part(False), part(True)


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Clock:
    """A deadline plus a reminder: ``due()`` turns true once every ``report_every`` seconds."""

    def __init__(self, timeout: float, report_every: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.report_every = report_every
        self.next_report = self.start + report_every

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def due(self) -> bool:
        if time.monotonic() < self.next_report:
            return False
        self.next_report = time.monotonic() + self.report_every
        return True


class NodeSnapshot:
    """The grid as one exchange's preparation sees it: the connected nodes asked for once.

    Naming the sites, finding unnamed ones and sampling each asked the SuperLink for its node list
    again (an HTTP request each, 10-40 ms on a busy 2-core server, three times a round); within one
    exchange's preparation the list does not change in any way that matters, so it is taken from
    the last answer ``wait_for_sites`` got. Everything else is the grid's own."""

    def __init__(self, grid: Grid, nodes: list[Any]) -> None:
        self._grid, self._nodes = grid, nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_nodes(self) -> list[Any]:
        return list(self._nodes)

    def get_node_ids(self) -> list[int]:
        return [node.node_id for node in self._nodes]


def wait_for_sites(grid: Grid, count: int, settings: FederationSettings, names: SiteNames,
                   label: str) -> NodeSnapshot:
    """Return once ``count`` sites are connected or ``round_timeout_s`` has passed, naming in the log
    the known sites that are not connected while it waits; the grid with the node list last seen."""
    clock = Clock(settings.round_timeout_s, settings.report_every_s)
    report = True  # at once, then every report_every_s
    while True:
        nodes = list(grid.get_nodes())
        connected = {node.node_id for node in nodes}
        if len(connected) >= count:
            break
        if clock.left() <= 0:
            log(WARNING, "%s: only %d of the %d sites needed are connected after %.0f s; going on with them",
                label, len(connected), count, clock.elapsed())
            break
        if report or clock.due():
            absent = [names.of_node(node) for node in names.known_nodes() if node not in connected]
            log(INFO, "%s: waiting for sites to connect: %d of at least %d%s (%.0f s of %.0f s)", label,
                len(connected), count, f"; not connected: {_listing(absent)}" if absent else "", clock.elapsed(),
                settings.round_timeout_s)
            report = False
        time.sleep(max(min(1.0, settings.report_every_s, clock.left()), 0.0))
    return NodeSnapshot(grid, nodes)


def exchange(grid: Grid, messages: list[Message], settings: FederationSettings, names: SiteNames,
             label: str, on_reply: Callable[[Message], None] | None = None) -> Exchange:
    """Send, pull replies until every site answered or ``round_timeout_s`` passed, and measure every
    message's serialised size; ``on_reply`` sees each site's reply as it arrives."""
    clock = Clock(settings.round_timeout_s, settings.report_every_s)
    started = time.time()
    # measured before the push: in a simulation the engine's threads read the pushed messages' objects meanwhile
    # (measuring after the push saved hashing 20 MB once more, but raced them: "dictionary changed size")
    sent = {m.metadata.dst_node_id: message_wire_bytes(m) for m in messages}
    pushed = call_within(lambda: list(grid.push_messages(messages)), clock.deadline)
    stored = set(pushed.value or []) - {""}
    pending = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in stored}
    refused = sorted(names.of_node(m.metadata.dst_node_id) for m in messages if m.metadata.message_id not in stored)
    if refused:
        log(WARNING, "%s: the SuperLink did not accept the messages for %s; going on without them", label,
            _listing(refused))
    replies: list[Message] = []
    received: dict[int, int] = {}  # id(reply) -> its bytes, counted as it arrives (not after the last)
    checks: list[tuple[float, float]] = []
    unreachable: dict[int, str] = {}  # node -> why the SuperLink answered in its place
    while pending:
        asked = time.monotonic()
        pulled = call_within(lambda: list(grid.pull_messages(list(pending))), clock.deadline)
        if not pulled.finished:
            log(WARNING, "%s: the SuperLink did not hand over the replies before the round's %.0f s ran out (a site "
                "that died while uploading leaves a reply Flower keeps fetching)", label, settings.round_timeout_s)
            break
        for reply in pulled.value or []:
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error() and (reply.metadata.src_node_id != node or reply.error.code in DIED):
                unreachable[node] = reply.error.reason
            else:
                replies.append(reply)
                received[id(reply)] = message_wire_bytes(reply)
                if on_reply is not None:
                    check_start = time.time()
                    on_reply(reply)
                    checks.append((check_start, time.time()))
        if not pending or clock.left() <= 0:
            break
        if clock.due():
            log(INFO, "%s: %d of %d sites answered; waiting for %s (%.0f s of %.0f s)", label, len(replies),
                len(messages), _listing(names.of_node(n) for n in pending.values()), clock.elapsed(),
                settings.round_timeout_s)
        # fedreid's SuperLink held an empty ask until a reply came or a second passed (server/long_polls.py):
        # no sleep on top of that; a SuperLink that answers at once is asked every poll_interval_s
        time.sleep(min(max(settings.poll_interval_s - (time.monotonic() - asked), 0.0), max(clock.left(), 0.0)))
    for node, reason in unreachable.items():
        log(WARNING, "%s: %s did not answer: %s", label, names.of_node(node), reason)
    by_node = {r.metadata.src_node_id: names.of(r) for r in replies}
    failed = sorted({names.of_node(node) for node in [*pending.values(), *unreachable]} | set(refused))
    per_site = {by_node.get(node, names.of_node(node)): {"sent": size, "received": 0} for node, size in sent.items()}
    for reply in replies:
        per_site.setdefault(by_node[reply.metadata.src_node_id], {"sent": 0, "received": 0})
        per_site[by_node[reply.metadata.src_node_id]]["received"] += received[id(reply)]
    if pending:
        log(WARNING, "%s: %s did not answer within %.0f s; going on without them", label,
            _listing(names.of_node(n) for n in pending.values()), settings.round_timeout_s)
    return Exchange(replies, per_site, clock.elapsed(), failed, started, time.time(), checks)


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
        self.last_exchange = Exchange([], {}, 0.0, [])  # of the latest training round
        self.clock = RunClock(None)  # where each round's time goes (server/timing.py); reset by run()
        self.carried_unseen: dict[str, Any] | None = None  # the held-out sites' record the last training carried

    @property
    def names(self) -> SiteNames:
        return self.strategy.names

    def _config(self) -> ConfigRecord:
        return ConfigRecord(dict(self.site_config))  # strategies write the round into it: fresh copy

    def _send(self, label: str, configure: Callable[[Grid], Iterable[Message]],
              on_reply: Callable[[Message], None] | None = None) -> Exchange | None:
        """Wait (bounded) for enough sites, refresh their registered names (and ask unnamed nodes for
        theirs when some sites are held out), build the messages, exchange."""
        grid = wait_for_sites(self.grid, self.settings.min_sites + len(self.strategy.held_out), self.settings,
                              self.names, label)
        self.names.learn_registrations(grid.get_nodes())
        unnamed = self.strategy.unnamed(grid.get_node_ids())
        if unnamed:
            asked = self._exchange(self.strategy.configure_query(unnamed), f"{label}: site names")
            self.strategy.learn_names(asked.replies)
            log(INFO, "%s: %d node(s) named themselves: %s; held out (never trained): %s", label,
                len(asked.replies), _listing(self.names.of(r) for r in asked.replies), _listing(self.strategy.held_out))
        messages = list(configure(grid))  # type: ignore[arg-type] - a Grid in all it is asked for
        if not messages:
            return None
        return self._exchange(messages, label, on_reply)

    def _exchange(self, messages: list[Message], label: str,
                  on_reply: Callable[[Message], None] | None = None) -> Exchange:
        result = exchange(self.grid, messages, self.settings, self.names, label, on_reply)
        self.clock.exchanged(result.replies, result.started, result.ended, result.checks)
        return result

    def _report(self, server_round: int, arrays: ArrayRecord, record: dict[str, Any]) -> None:
        """Hand a round's record, with where its time went, to ``on_round`` (the line, the checkpoint)."""
        record = {**record, "time_split": self.clock.line_written(server_round)}
        with self.clock.phase("recording"):
            self.on_round(server_round, arrays, record)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """Federated evaluation: every site ranks its own gallery with the global model."""
        result = self._send(f"round {server_round} evaluation", lambda grid: self.strategy.configure_evaluate(
            server_round, arrays, self._config(), grid))
        if result is None:
            return None
        with self.clock.phase("aggregation"):
            mean = self.strategy.aggregate_evaluate(server_round, result.replies)
        if mean is not None:
            log(INFO, "round %d evaluation: mean Rank-1 %.1f%%, mAP %.1f%% over %d sites", server_round,
                100 * mean["rank1"], 100 * mean["mAP"], len(self.strategy.last_evaluate.site_metrics))
        return {**self._evaluation_record(mean, result.failed, result.totals(), result.seconds),
                "bytes_per_site": result.bytes_per_site}

    def evaluate_unseen(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """The held-out sites rank their own galleries with round ``server_round``'s model (under
        ``local``: with every training site's model, keeping the best), under each protocol
        (strategies/held_out.py), in an exchange of their own; None without held-out sites."""
        if not self.strategy.held_out:
            return None
        requests: list[Request] = []

        def configure(grid: Grid) -> list[Message]:
            requests.extend(self.strategy.configure_unseen(server_round, arrays, self._config(), grid))
            return [message for message, _, _ in requests]

        result = self._send(f"round {server_round} evaluation of held-out sites", configure)
        return self._unseen_record(server_round, result, requests)

    def _unseen_record(self, server_round: int, result: Exchange | None,
                       requests: list[Request]) -> dict[str, Any] | None:
        """The ``unseen`` record of the held-out sites' replies to ``requests``, and its log lines."""
        if result is None or not requests:
            log(WARNING, "round %d: no held-out site (%s) is connected; none evaluated", server_round,
                _listing(self.strategy.held_out))
            return None
        asked = {m.metadata.message_id: (label, protocol) for m, label, protocol in requests}
        with self.clock.phase("aggregation"):
            unseen = self.strategy.aggregate_unseen(result.replies, asked) or {}
        for protocol in self.strategy.unseen_protocols:
            results = unseen_results(unseen, protocol)
            mean, sites = results["mean"], results["sites"]
            if mean:
                log(INFO, "round %d held-out sites, %s: mean Rank-1 %.1f%%, mAP %.1f%% over %d sites (%s)", server_round,
                    protocol, 100 * mean["rank1"], 100 * mean["mAP"], len(sites),
                    ", ".join(f"{site} {100 * m['mAP']:.1f}" for site, m in sites.items()))
        return {**unseen, "failed": result.failed, "bytes": result.totals(), "seconds": result.seconds}

    def _evaluation_record(self, mean: Any, failed: list[str], sent_received: dict[str, int],
                           seconds: float) -> dict[str, Any]:
        """An evaluation as ``metrics.jsonl`` keeps it, from the strategy's latest evaluation log."""
        return {"sites": self.strategy.last_evaluate.site_metrics, "mean": dict(mean) if mean else None,
                "rejected": self.strategy.last_evaluate.rejected, "failed": failed,
                "bytes": sent_received, "seconds": seconds}

    def carries_evaluation(self, server_round: int) -> bool:
        """Whether the evaluation after ``server_round`` rides on the next round's training messages
        (every site is trained and evaluated, and a next round exists) instead of an exchange of its own."""
        settings = self.settings
        return (settings.evaluate_with_next_round and server_round < settings.rounds
                and settings.fraction_train >= 1.0 and settings.fraction_evaluate >= 1.0)

    def _carried_evaluation(self, evaluated_round: int, result: Exchange) -> dict[str, Any]:
        """The evaluation of round ``evaluated_round``'s model from the training replies that carried it."""
        with self.clock.phase("aggregation"):
            mean = self.strategy.aggregate_carried_evaluations(evaluated_round, result.replies)
        if mean is not None:
            log(INFO, "round %d evaluation (carried by round %d's training): mean Rank-1 %.1f%%, mAP %.1f%% over "
                "%d sites", evaluated_round, evaluated_round + 1, 100 * mean["rank1"], 100 * mean["mAP"],
                len(self.strategy.last_evaluate.site_metrics))
        return {**self._evaluation_record(mean, result.failed, {"sent": 0, "received": 0}, 0.0),
                "carried_by_round": evaluated_round + 1}

    def train_round(self, server_round: int, arrays: ArrayRecord, evaluate_round: int | None = None,
                    unseen_round: int | None = None) -> tuple[ArrayRecord, dict[str, Any]]:
        """One training round; the global arrays stay as they were when too few replies are usable.
        With ``evaluate_round`` every site first evaluates the model it receives (that round's); with
        ``unseen_round`` the held-out sites rank that same model in the same exchange (their record
        is left in ``carried_unseen``): one hand-over to the sites instead of two."""
        config = self._config()
        if evaluate_round is not None:
            config[EVALUATE_ROUND_KEY] = evaluate_round
        riding = unseen_round if self.strategy.held_out else None  # the held-out ranking this exchange carries
        unseen: list[Request] = []

        def configure(grid: Grid) -> list[Message]:
            if riding is not None:
                unseen.extend(self.strategy.configure_unseen(riding, arrays, self._config(), grid))
            return [*self.strategy.configure_train(server_round, arrays, config, grid),
                    *(message for message, _, _ in unseen)]

        def check_early(reply: Message) -> None:
            if self.names.of(reply) not in self.strategy.held_out:
                self.strategy.check_train_reply_early(reply)

        label = f"round {server_round} training" + (
            f" (and round {riding}'s evaluation of held-out sites)" if riding is not None else "")
        result = self._send(label, configure, on_reply=check_early) or Exchange([], {}, 0.0, [])
        result, unseen_part = result.split(self.names.of, self.strategy.held_out)
        self.last_exchange = result
        if riding is not None:
            self.carried_unseen = self._unseen_record(riding, unseen_part, unseen)
        aggregation_start = time.perf_counter()
        with self.clock.phase("aggregation"):
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
            usable, _megabytes(result.totals()["sent"]), _megabytes(result.totals()["received"]), result.seconds)
        record = {
            "sites": {name: {**m, "weight": self.strategy.last_train.accepted[name]}
                      for name, m in self.strategy.last_train.site_metrics.items()},
            "rejected": self.strategy.last_train.rejected,
            "failed": result.failed,
            "nodes": {self.names.of(r): r.metadata.src_node_id for r in result.replies},
            "aggregated": new_arrays is not arrays,
            "aggregation_seconds": aggregation_seconds,
            "clusters": self.strategy.last_train.clusters or None,
            "refined": self.strategy.last_train.refined,
            **self.strategy.last_train.notes,
            "aggregate": dict(metrics) if metrics else None,
            "bytes": result.totals(),
            "bytes_per_site": result.bytes_per_site,
            "seconds": result.seconds,
        }
        return new_arrays, record

    def _with_unseen(self, record: dict[str, Any], server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """``record`` plus the held-out sites' evaluation of this round's model, when there are any."""
        unseen = self.evaluate_unseen(server_round, arrays)
        return {**record, "unseen": unseen} if unseen is not None else record

    def run(self, arrays: ArrayRecord, first_round: int = 1, start_evaluated: bool = False) -> ArrayRecord:
        """Rounds ``first_round``..R; each one is reported before the next starts, except that a round
        whose evaluation the next round's training carries is reported right after that training.
        Round 0 (the untrained model) is evaluated first unless disabled or already done
        (``start_evaluated``)."""
        waiting: tuple[int, ArrayRecord, dict[str, Any]] | None = None  # a round whose evaluation rides along
        evaluate_start = first_round == 1 and self.settings.eval_at_start and not start_evaluated
        self.clock = RunClock(0 if evaluate_start else None)
        if evaluate_start:
            if self.carries_evaluation(0):  # the held-out sites' ranking rides along too
                waiting = (0, arrays, {"round": 0, "train": None})
            else:
                start = self._with_unseen({"round": 0, "train": None}, 0, arrays)
                self._report(0, arrays, {**start, "evaluate": self.evaluate(0, arrays)})
        for server_round in range(first_round, self.settings.rounds + 1):
            self.clock.round_started(server_round)
            start_time = time.perf_counter()
            evaluate_round = waiting[0] if waiting else None
            self.carried_unseen = None
            new_arrays, train_record = self.train_round(server_round, arrays, evaluate_round, evaluate_round)
            while not train_record["sites"] and not train_record["rejected"]:  # nobody answered at all
                log(WARNING, "round %d: no site answered (%s); trying round %d again in %.0f s", server_round,
                    _listing(train_record["failed"]) or "none connected", server_round, RETRY_PAUSE_S)
                time.sleep(RETRY_PAUSE_S)
                new_arrays, train_record = self.train_round(  # the held-out sites again only if they did not answer
                    server_round, arrays, evaluate_round, evaluate_round if self.carried_unseen is None else None)
            if waiting is not None:
                evaluated_round, evaluated_arrays, record = waiting
                if self.carried_unseen is not None:
                    record = {**record, "unseen": self.carried_unseen}
                self._report(evaluated_round, evaluated_arrays,
                             {**record, "evaluate": self._carried_evaluation(evaluated_round, self.last_exchange)})
                waiting = None
            arrays = new_arrays
            record = {"round": server_round, "train": train_record, "seconds": time.perf_counter() - start_time}
            if not self.settings.evaluates_after(server_round):
                self._report(server_round, arrays, {**record, "evaluate": None})
                continue
            if self.carries_evaluation(server_round):
                waiting = (server_round, arrays, record)
            else:
                record = self._with_unseen(record, server_round, arrays)
                evaluation = self.evaluate(server_round, arrays)
                self._report(server_round, arrays, {**record, "evaluate": evaluation,
                                                    "seconds": time.perf_counter() - start_time})
        return arrays
