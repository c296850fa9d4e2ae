"""Where a run's time goes: each round's wall time split into the sites' training, their evaluation,
the server's aggregation, and the framework (everything else: sending, transfers, waiting for a
site to pick its message up, the checkpoint and plots, process start-up).

The sites say when they worked: each reply carries a ``timing`` record (clients/outgoing.py) with
the start and end of the site's work on the message and of its evaluation inside it, as times of
day. A round's training is the time during which at least one site was training (the union of the
sites' work spans, evaluation taken out), its evaluation the time during which at least one site was
evaluating; so nine sites training side by side on two cores count once, not nine times. Each span
is clipped to the exchange it answered (from the server pushing the messages to the last reply),
which bounds what a site with a wrong clock can claim; sites on other machines need synchronised
clocks (NTP) for the split to be exact, a deployment on one box or a simulation always has them.

The server's own work on a reply as it arrives (checking and decoding a training upload while other
sites still train) counts as aggregation only where no site was working meanwhile: the checks of
all but the last reply overlap training, which already counts that time; the last one's does not.

Windows tile the run: a round's window runs from the end of the previous round's window to the
moment its ``metrics.jsonl`` line is written or the next round starts, whichever comes first (a
round whose evaluation rides on the next round's training is written after that training, which
belongs to the next round, and so does the evaluation it carried). So the windows' seconds add up to the run's time.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from flwr.app import Message, MetricRecord

from strategies.validation import TIMING_KEY

Span = tuple[float, float]


def union_seconds(spans: Iterable[Span]) -> float:
    """Length of the union of ``spans`` (overlaps counted once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _clipped(start: object, end: object, window: Span) -> Span | None:
    try:
        start, end = max(float(start), window[0]), min(float(end), window[1])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return (start, end) if math.isfinite(start) and math.isfinite(end) and end > start else None


def reply_spans(replies: Iterable[Message], window: Span) -> tuple[list[Span], list[Span]]:
    """(work spans, evaluation spans) the replies report, clipped to ``window``; a reply without a
    well-formed timing record reports none."""
    work: list[Span] = []
    evaluation: list[Span] = []
    for reply in replies:
        if reply.has_error() or TIMING_KEY not in reply.content.keys():
            continue
        record = reply.content[TIMING_KEY]
        if not isinstance(record, MetricRecord):
            continue
        span = _clipped(record.get("work-start"), record.get("work-end"), window)
        if span is not None:
            work.append(span)
        if "eval-start" in record:
            span = _clipped(record.get("eval-start"), record.get("eval-end"), window)
            if span is not None:
                evaluation.append(span)
    return work, evaluation


@dataclass
class Window:
    """One round's share of the run: its wall clock, the sites' spans and the server's own phases."""

    start: float = field(default_factory=time.time)
    work: list[Span] = field(default_factory=list)
    evaluation: list[Span] = field(default_factory=list)
    checks: list[Span] = field(default_factory=list)  # the server's work on replies as they arrived
    phases: dict[str, float] = field(default_factory=dict)
    end: float | None = None

    def split(self) -> dict[str, float]:
        """Seconds of the window: ``round_s`` = ``training_s`` + ``evaluation_s`` + ``aggregation_s``
        + ``framework_s``; ``recording_s`` (checkpoint, model file, plots) is part of the framework."""
        end = self.end if self.end is not None else time.time()
        evaluation = union_seconds(self.evaluation)
        sites = union_seconds(self.work + self.evaluation)
        training = max(sites - evaluation, 0.0)
        checking_alone = union_seconds(self.work + self.evaluation + self.checks) - sites
        aggregation = self.phases.get("aggregation", 0.0) + checking_alone
        wall = end - self.start
        return {"round_s": wall, "training_s": training, "evaluation_s": evaluation, "aggregation_s": aggregation,
                "framework_s": max(wall - training - evaluation - aggregation, 0.0),
                "recording_s": self.phases.get("recording", 0.0)}


class RunClock:
    """The windows of a run's rounds (see the module's docstring), fed by the round loop."""

    def __init__(self, first_pending: int | None) -> None:
        self.open = Window()
        self.pending = first_pending  # the round whose window is open and whose line is not written yet
        self.closed: dict[int, Window] = {}

    def round_started(self, server_round: int) -> None:
        """A round's training begins: an open window of an earlier round whose line is still to come
        (its evaluation rides on this round's training) ends here."""
        if self.pending is not None and self.pending != server_round:
            self.closed[self.pending] = self._close()
        self.pending = server_round

    def exchanged(self, replies: Iterable[Message], started: float, ended: float,
                  checks: Iterable[Span] = ()) -> None:
        """An exchange's replies, and the spans of the server's checks of them as they arrived."""
        work, evaluation = reply_spans(replies, (started, ended))
        self.open.work.extend(work)
        self.open.evaluation.extend(evaluation)
        self.open.checks.extend(span for check in checks if (span := _clipped(*check, (started, ended))))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the server's own ``name`` phase ("aggregation", "recording") into the open window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.open.phases[name] = self.open.phases.get(name, 0.0) + time.perf_counter() - start

    def line_written(self, server_round: int) -> dict[str, float]:
        """The split of ``server_round``'s window, whose line is being written now."""
        if server_round in self.closed:
            return self.closed.pop(server_round).split()
        if self.pending == server_round:
            self.pending = None
        return self._close().split()

    def _close(self) -> Window:
        window, self.open = self.open, Window()
        window.end = self.open.start
        return window


def run_split(rounds: Iterable[dict]) -> dict[str, float]:
    """The run's totals of every round's ``time_split`` (``metrics.jsonl`` lines), with each part's
    share of the run in ``share``."""
    totals: dict[str, float] = {}
    for record in rounds:
        for key, value in (record.get("time_split") or {}).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    wall = totals.get("round_s", 0.0)
    return {**totals, "share": {key[:-2]: value / wall for key, value in totals.items()
                                if key != "round_s" and wall > 0}}  # type: ignore[dict-item]
