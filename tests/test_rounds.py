"""The round loop's fault handling, on a fake Grid: sites that do not answer, messages the SuperLink
refuses, sites that are not connected, federation.min_sites, and every wait bounded."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.bounded import call_within
from server.config import FederationSettings
from server.rounds import FederationRunner
from strategies.fedpav import FedPav
from strategies.packing import unpack_record

SITES = {11: "mall", 12: "station", 13: "campus"}  # node 1 is the SuperLink itself
SETTINGS = FederationSettings(rounds=1, eval_every=0, eval_at_start=False, min_sites=1, fraction_train=1.0,
                              fraction_evaluate=1.0, round_timeout_s=1.0, poll_interval_s=0.05, report_every_s=0.2)


@dataclass
class Node:
    node_id: int
    name: str = ""


class FakeGrid:
    """A SuperLink stand-in: every connected node answers with its arrays + 1, except the ``silent``
    ones; nodes in ``refused`` get no message stored (Flower's push returns "" for them)."""

    def __init__(self, silent: set[int] = frozenset(), refused: set[int] = frozenset(),
                 connected: set[int] | None = None, registered: dict[int, str] | None = None,
                 unavailable: set[int] = frozenset(), no_evaluation: set[int] = frozenset()) -> None:
        self.silent, self.refused, self.unavailable = silent, refused, unavailable
        self.no_evaluation = no_evaluation  # nodes whose training replies leave out the evaluation asked for
        self.sent: list[tuple[str, int, dict]] = []  # (message type, node, config) of every stored message
        self.connected = set(SITES) if connected is None else connected
        self.registered = registered or {}
        self.replies: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self) -> list[int]:
        return sorted(self.connected)

    def get_nodes(self) -> list[Node]:
        return [Node(n, self.registered.get(n, "")) for n in self.get_node_ids()]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for index, message in enumerate(messages):
            message_id = f"m{index}-{message.metadata.dst_node_id}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            if node in self.refused:
                ids.append("")
                continue
            ids.append(message_id)
            if node in self.unavailable:  # the SuperLink answers for a node it has lost, as Flower does
                reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 1
                self.replies[message_id] = reply
            elif node not in self.silent:
                self.replies[message_id] = Message(content=self._answer(message), reply_to=message)
            self.sent.append((message.metadata.message_type, node, dict(message.content["config"])))
        return ids

    def _answer(self, message: Message) -> RecordDict:
        """Training: arrays + 1 (and, when asked, an evaluation whose Rank-1 is the round it
        evaluated / 10); evaluation: Rank-1 = the message's round / 10."""
        node, config = message.metadata.dst_node_id, message.content["config"]
        site = ConfigRecord({"name": SITES[node]})
        if message.metadata.message_type == "evaluate":
            return RecordDict({"metrics": _ranks(int(config["server-round"])), "site": site})
        received = unpack_record(message.content["arrays"])
        arrays = ArrayRecord({k: Array(a.numpy() + 1.0) for k, a in received.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10}), "site": site})
        if "evaluate-round" in config and node not in self.no_evaluation:
            content["evaluation"] = _ranks(int(config["evaluate-round"]))
        return content

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        self.pulls += 1
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


def _ranks(server_round: int) -> MetricRecord:
    return MetricRecord({"rank1": server_round / 10, "rank5": 0.5, "rank10": 0.6, "mAP": 0.3, "mINP": 0.1})


def _runner(grid: FakeGrid, min_sites: int = 1, **settings: float) -> FederationRunner:
    return FederationRunner(grid, FedPav(min_sites=1), replace(SETTINGS, min_sites=min_sites, **settings),
                            ConfigRecord({}), on_round=lambda *_: None)


def _start() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})


def test_a_silent_site_is_named_as_failed_and_the_round_aggregates_the_others() -> None:
    runner = _runner(FakeGrid(), min_sites=2)
    runner.train_round(1, _start())  # every site answers once: the runner learns their names
    runner.grid = FakeGrid(silent={13})
    arrays, record = runner.train_round(2, _start())
    assert record["failed"] == ["campus"] and sorted(record["sites"]) == ["mall", "station"]
    assert record["nodes"] == {"mall": 11, "station": 12}
    assert record["aggregated"] and np.array_equal(arrays["w"].numpy(), np.ones(3, dtype=np.float32))
    assert record["bytes_per_site"]["campus"]["received"] == 0 and record["bytes_per_site"]["campus"]["sent"] > 0


def test_fewer_usable_updates_than_min_sites_leave_the_global_model_unchanged() -> None:
    start = _start()
    arrays, record = _runner(FakeGrid(silent={12, 13}), min_sites=2).train_round(1, start)
    assert arrays is start and not record["aggregated"]
    assert record["failed"] == ["node-12", "node-13"]  # never answered: known by node id only
    assert list(record["sites"]) == ["mall"]


def test_the_wait_for_replies_ends_at_the_round_timeout_and_names_who_is_missing(
        caplog: pytest.LogCaptureFixture) -> None:
    runner = _runner(FakeGrid())
    runner.train_round(1, _start())
    runner.grid = grid = FakeGrid(silent={12, 13})
    start = time.monotonic()
    _, record = runner.train_round(2, _start())
    took = time.monotonic() - start
    assert 1.0 <= took < 5.0, took  # round_timeout_s=1: bounded, and not a multiple of 3-s polls
    assert record["failed"] == ["campus", "station"] and grid.pulls > 5
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waiting and "campus, station" in waiting[0]  # by name, while it waits


def test_a_message_the_superlink_refuses_fails_at_once_instead_of_waiting_out_the_round() -> None:
    runner = _runner(FakeGrid(), round_timeout_s=60.0)
    runner.train_round(1, _start())
    runner.grid = FakeGrid(refused={12})
    start = time.monotonic()
    _, record = runner.train_round(2, _start())
    assert time.monotonic() - start < 10.0
    assert record["failed"] == ["station"] and sorted(record["sites"]) == ["campus", "mall"]


def test_too_few_connected_sites_are_waited_for_within_the_bound_and_named(caplog: pytest.LogCaptureFixture) -> None:
    runner = _runner(FakeGrid(), min_sites=3)
    runner.train_round(1, _start())
    runner.grid = FakeGrid(connected={11})
    start = _start()
    began = time.monotonic()
    arrays, record = runner.train_round(2, start)
    assert time.monotonic() - began < 5.0
    assert arrays is start and list(record["sites"]) == ["mall"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("not connected: campus, station" in m for m in messages), messages
    assert any("only 1 of the 3 sites needed are connected" in m for m in messages), messages


def test_registered_names_win_over_reported_ones_and_a_shared_name_is_turned_away(
        caplog: pytest.LogCaptureFixture) -> None:
    grid = FakeGrid(registered={11: "mall", 12: "station", 13: "station"})  # two keys registered as "station"
    _, record = _runner(grid).train_round(1, _start())
    assert list(record["sites"]) == ["mall"]
    assert "claimed by more than one node (12, 13)" in record["rejected"]["station"]
    assert any("registered as 'station' but reports the name 'campus'" in r.getMessage() for r in caplog.records)


def test_sites_the_superlink_reports_unavailable_are_failed_by_name() -> None:
    runner = _runner(FakeGrid(), min_sites=2)
    runner.train_round(1, _start())
    runner.grid = FakeGrid(unavailable={12, 13})
    _, record = runner.train_round(2, _start())
    assert record["failed"] == ["campus", "station"] and not record["rejected"] and list(record["sites"]) == ["mall"]


class ComingBack(FakeGrid):
    """No site is reachable for the first ``dark`` training messages pushed, then all are."""

    def __init__(self, dark: int) -> None:
        super().__init__(unavailable=set(SITES))
        self.dark = dark

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.dark -= 1
        if self.dark < 0:
            self.unavailable = set()
        return super().push_messages(messages)


def test_a_round_no_site_answered_is_tried_again_not_counted(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("server.rounds.RETRY_PAUSE_S", 0.01)
    records = []
    runner = FederationRunner(ComingBack(dark=2), FedPav(min_sites=1), replace(SETTINGS, rounds=2), ConfigRecord({}),
                              on_round=lambda r, _a, record: records.append(record))
    runner.run(_start())
    assert [r["round"] for r in records] == [1, 2]
    assert all(sorted(r["train"]["sites"]) == ["campus", "mall", "station"] for r in records)
    retries = [r.getMessage() for r in caplog.records if "no site answered" in r.getMessage()]
    assert len(retries) == 2 and "trying round 1 again" in retries[0]


class StuckGrid(FakeGrid):
    """A pull that never comes back, as Flower's HttpGrid fetching a reply whose upload was cut off."""

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        threading.Event().wait()
        return []


def test_a_pull_that_never_returns_cannot_hold_the_round_past_its_deadline(caplog: pytest.LogCaptureFixture) -> None:
    runner = _runner(FakeGrid())
    runner.train_round(1, _start())
    runner.grid = StuckGrid()
    began = time.monotonic()
    _, record = runner.train_round(2, _start())
    assert time.monotonic() - began < 5.0
    assert record["failed"] == ["campus", "mall", "station"]
    assert any("did not hand over the replies" in r.getMessage() for r in caplog.records)


def test_bounded_calls_return_raise_or_give_up_at_the_deadline() -> None:
    assert call_within(lambda: 7, time.monotonic() + 5).value == 7
    with pytest.raises(ZeroDivisionError):
        call_within(lambda: 1 / 0, time.monotonic() + 5)
    began = time.monotonic()
    outcome = call_within(lambda: threading.Event().wait(), time.monotonic() + 0.3)
    assert not outcome.finished and time.monotonic() - began < 2.0


def test_an_evaluation_rides_on_the_next_training_round_and_the_last_one_has_its_own_exchange() -> None:
    """Round 0's and round 2's models are ranked by the sites at the start of rounds 1 and 3; the
    reply that leaves its evaluation out is turned away for the evaluation only; the last round's
    evaluation is an exchange of its own."""
    records: list[dict] = []
    grid = FakeGrid(no_evaluation={13})
    settings = replace(SETTINGS, rounds=3, eval_every=2, eval_at_start=True)
    FederationRunner(grid, FedPav(min_sites=1), settings, ConfigRecord({}),
                     on_round=lambda _r, _a, record: records.append(record)).run(_start())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    asked = [(kind, config.get("evaluate-round")) for kind, node, config in grid.sent if node == 11]
    assert asked == [("train", 0), ("train", None), ("train", 2), ("evaluate", None)]
    assert records[1]["evaluate"] is None
    for evaluated, carrier in ((0, 1), (2, 3)):
        evaluation = records[evaluated]["evaluate"]
        assert evaluation["carried_by_round"] == carrier
        assert {site: m["rank1"] for site, m in evaluation["sites"].items()} == {"mall": evaluated / 10,
                                                                                "station": evaluated / 10}
        assert "carries no evaluation" in evaluation["rejected"]["campus"]
        assert set(records[carrier]["train"]["sites"]) == {"mall", "station", "campus"}  # training counts it
    final = records[3]["evaluate"]
    assert "carried_by_round" not in final and final["sites"]["campus"]["rank1"] == 0.3


class WithHeldOut(FakeGrid):
    """The three sites plus node 14, "night", a held-out site that only ranks; every push is kept."""

    def __init__(self) -> None:
        super().__init__(connected={*SITES, 14}, registered={**SITES, 14: "night"})
        self.pushes: list[list[tuple[str, int]]] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushes.append(sorted((m.metadata.message_type, m.metadata.dst_node_id) for m in messages))
        return super().push_messages(messages)

    def _answer(self, message: Message) -> RecordDict:
        if message.metadata.dst_node_id != 14:
            return super()._answer(message)
        assert message.metadata.message_type == "evaluate"  # never asked to train
        return RecordDict({"metrics": _ranks(int(message.content["config"]["server-round"])),
                           "site": ConfigRecord({"name": "night"})})


def test_the_held_out_ranking_rides_on_the_next_training_exchange_and_the_last_has_its_own() -> None:
    """Round 0's and round 2's models are ranked by the held-out site in the same push as rounds 1's
    and 3's training; each round keeps its own record, bytes and sites apart; the last round's
    ranking is an exchange of its own, before the training sites' last evaluation."""
    records: list[dict] = []
    grid = WithHeldOut()
    settings = replace(SETTINGS, rounds=3, eval_every=2, eval_at_start=True)
    strategy = FedPav(min_sites=1, held_out=["night"], unseen_protocols=["target-adapted"])
    FederationRunner(grid, strategy, settings, ConfigRecord({}),
                     on_round=lambda _r, _a, record: records.append(record)).run(_start())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    training = [("train", 11), ("train", 12), ("train", 13)]
    assert grid.pushes == [[("evaluate", 14), *training], training, [("evaluate", 14), *training],
                           [("evaluate", 14)], [("evaluate", 11), ("evaluate", 12), ("evaluate", 13)]]
    assert "unseen" not in records[1]
    for evaluated in (0, 2, 3):
        unseen = records[evaluated]["unseen"]
        assert unseen["target-adapted"]["sites"]["night"]["rank1"] == evaluated / 10
        assert unseen["bytes"]["sent"] > 0 and not unseen["failed"]
    for record in records[1:]:  # the training records hold the training sites only
        assert set(record["train"]["sites"]) == set(record["train"]["bytes_per_site"]) == {"mall", "station", "campus"}
        assert not record["train"]["failed"] and not record["train"]["rejected"]
    assert records[0]["evaluate"]["carried_by_round"] == 1 and set(records[0]["evaluate"]["sites"]) == {
        "mall", "station", "campus"}


def _timed_reply(request: Message, times: dict[str, float]) -> Message:
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 10}), "timing": MetricRecord(times)}),
                   reply_to=request)


def test_the_time_split_counts_sites_working_side_by_side_once_and_clips_wrong_clocks() -> None:
    """Two sites train over [10, 14] and [12, 16] of an exchange from 9 to 17, one of them evaluating
    over [10, 11] first: training is the union minus evaluation (5 s), evaluation 1 s; a site whose
    clock claims work outside the exchange counts only inside it; a reply without timing counts nothing;
    the server's checks of replies count as aggregation only where no site was working."""
    from server.timing import RunClock, reply_spans, run_split, union_seconds

    assert union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert union_seconds([]) == 0
    request = Message(content=RecordDict({}), dst_node_id=11, message_type="train")
    replies = [_timed_reply(request, {"work-start": 10.0, "work-end": 14.0, "eval-start": 10.0, "eval-end": 11.0}),
               _timed_reply(request, {"work-start": 12.0, "work-end": 16.0}),
               _timed_reply(request, {"work-start": 3.0, "work-end": 9.5}),  # a clock 7 s behind: 0.5 s counted
               _timed_reply(request, {"work-start": 16.5, "work-end": 16.0}),  # ends before it starts: nothing
               Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=request)]
    work, evaluation = reply_spans(replies, (9.0, 17.0))
    assert sorted(work) == [(9.0, 9.5), (10.0, 14.0), (12.0, 16.0)] and evaluation == [(10.0, 11.0)]
    clock = RunClock(None)
    clock.round_started(1)
    clock.open.start = 8.0
    clock.exchanged(replies, 9.0, 17.0)
    clock.open.phases["aggregation"] = 0.5
    split = clock.line_written(1)
    assert split["training_s"] == pytest.approx(5.5) and split["evaluation_s"] == pytest.approx(1.0)
    assert split["aggregation_s"] == 0.5
    assert split["training_s"] + split["evaluation_s"] + split["aggregation_s"] + split["framework_s"] == \
        pytest.approx(split["round_s"])
    # the server checking replies as they arrive: over [13, 13.2] while sites train (already counted as
    # training), over [16.2, 16.5] after the last site finished (aggregation), a span outside the exchange clipped
    clock.round_started(2)
    clock.open.start = 8.0
    clock.exchanged(replies, 9.0, 17.0, [(13.0, 13.2), (16.2, 16.5), (16.9, 18.0)])
    checked = clock.line_written(2)
    assert checked["training_s"] == pytest.approx(5.5)
    assert checked["aggregation_s"] == pytest.approx(0.3 + 0.1)
    assert checked["framework_s"] == pytest.approx(checked["round_s"] - 5.5 - 1.0 - 0.4)
    total = run_split([{"time_split": split}, {"time_split": split}, {"train": None}])
    assert total["round_s"] == pytest.approx(2 * split["round_s"])
    assert sum(total["share"][k] for k in ("training", "evaluation", "aggregation", "framework")) == pytest.approx(1)


def test_every_line_says_where_its_round_went_and_the_windows_tile_the_run() -> None:
    """With evaluations riding on the next round's training, each round's line still covers its own
    training exchange, and the lines' seconds add up to the loop's time."""
    records: list[dict] = []
    settings = replace(SETTINGS, rounds=3, eval_every=2, eval_at_start=True)

    def on_round(_r: int, _a: ArrayRecord, record: dict) -> None:
        time.sleep(0.05)  # a checkpoint: counted as recording in the next round's window
        records.append(record)

    runner = FederationRunner(FakeGrid(), FedPav(min_sites=1), settings, ConfigRecord({}), on_round=on_round)
    started = time.time()
    runner.run(_start())
    loop = time.time() - started
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    splits = [r["time_split"] for r in records]
    assert sum(s["round_s"] for s in splits) == pytest.approx(loop - 0.05, abs=0.03)  # the last checkpoint: after
    assert all(s["recording_s"] == pytest.approx(0.05, abs=0.03) for s in splits[1:3])
    for split in splits:
        assert split["framework_s"] >= split["recording_s"] - 1e-6
        assert split["training_s"] == 0 and split["evaluation_s"] == 0  # the fake sites report no timing


def test_a_round_asks_the_superlink_for_its_node_list_once_not_once_per_step() -> None:
    class CountingGrid(FakeGrid):
        def __init__(self) -> None:
            super().__init__()
            self.node_lists = 0

        def get_nodes(self) -> list[Node]:
            self.node_lists += 1
            return [Node(n, self.registered.get(n, "")) for n in sorted(self.connected)]

        def get_node_ids(self) -> list[int]:
            self.node_lists += 1
            return sorted(self.connected)

    grid = CountingGrid()
    runner = _runner(grid, min_sites=3)
    _, record = runner.train_round(1, _start())
    assert sorted(record["sites"]) == ["campus", "mall", "station"]
    assert [node for _, node, _ in grid.sent] == [11, 12, 13]  # every connected site sampled from the one list
    assert grid.node_lists == 1  # naming, finding unnamed nodes and sampling used the list wait_for_sites got
    grid.connected = {11, 12}  # a site leaves: the next round's list is asked for afresh and reflects it
    runner.settings = replace(runner.settings, min_sites=2)
    _, record = runner.train_round(2, _start())
    assert sorted(record["sites"]) == ["mall", "station"] and grid.node_lists == 2
