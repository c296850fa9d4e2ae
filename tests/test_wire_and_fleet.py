"""How messages are counted and moved: wire sizes without a second serialisation, prompt pulls on
the ServerApp's side, and the SuperLink's SQLite bookkeeping written less often (the patched
SuperLink itself runs in every deployment test; its Flower names are checked in
tests/test_resume_and_state.py)."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from server.link_bookkeeping import AtMostEvery, RunningStatusCache, TrafficBuffer
from strategies.wire import message_wire_bytes, pull_promptly


def _flower_wire_bytes(message: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@pytest.mark.parametrize("sizes", [(3,), (1_400_001, 7), (3_000_000, 3_000_000, 5)])
def test_wire_bytes_equal_flowers_serialised_objects_without_serialising_chunks_again(sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": Array(rng.standard_normal(n).astype(np.float32)) for i, n in enumerate(sizes)}
    arrays["zeros"] = Array(np.zeros(2_700_000, np.float32))  # chunks with equal content: counted once
    arrays["zeros_again"] = Array(np.zeros(2_700_000, np.float32))
    message = Message(content=RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"round": 3})}),
                      dst_node_id=7, message_type="train")
    assert message_wire_bytes(message) == _flower_wire_bytes(message)
    assert message_wire_bytes(message) == _flower_wire_bytes(message)  # and again, ids cached


def test_pull_promptly_asks_again_within_its_cap_and_keeps_a_callers_own_backoff() -> None:
    module = types.SimpleNamespace(__name__="fake_grid", pull_objects=pull_objects)
    pull_promptly(module, backoff_cap_s=0.1)
    pull_promptly(module, backoff_cap_s=0.1)  # a second install does not wrap twice
    asked: list[float] = []

    def pull_object(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < 5:
            raise ObjectUnavailableError(object_id)
        return b"chunk"

    start = time.monotonic()
    assert module.pull_objects(["a"], pull_object_fn=pull_object) == {"a": b"chunk"}
    gaps = np.diff(asked)
    assert len(asked) == 5 and gaps.max() < 0.2, gaps  # 0.05, 0.1, 0.1, 0.1; Flower's own: 1, 2, 4, 8 s
    assert time.monotonic() - start < 1.0
    with pytest.raises(RuntimeError, match="no pull_objects"):
        pull_promptly(types.SimpleNamespace(__name__="other"))


def test_a_running_run_is_believed_running_for_a_moment_and_a_stopped_one_is_asked_every_time() -> None:
    now = [100.0]
    statuses = {1: None, 2: "Run is finished."}
    calls: list[int] = []

    def check(run_id: int, abort: list[str], state: object) -> str | None:
        calls.append(run_id)
        return statuses[run_id]

    cache = RunningStatusCache(check, ttl_s=0.5, clock=lambda: now[0])
    assert [cache(1, ["FINISHED"], None) for _ in range(5)] == [None] * 5
    assert calls == [1]  # one database read for five transfers
    assert [cache(2, ["FINISHED"], None) for _ in range(3)] == ["Run is finished."] * 3
    assert calls == [1, 2, 2, 2]  # a run that is not running is checked every time
    statuses[1] = "Run is finished."
    now[0] += 0.4
    assert cache(1, ["FINISHED"], None) is None  # still within the half second
    now[0] += 0.2
    assert cache(1, ["FINISHED"], None) == "Run is finished."  # noticed once it has passed
    assert cache(1, ["FINISHED"], None) == "Run is finished."
    assert calls == [1, 2, 2, 2, 1, 1]


def test_traffic_is_added_up_and_written_once_per_run_per_interval() -> None:
    written: list[tuple[int, int, int]] = []
    buffer = TrafficBuffer(lambda run, sent, received: written.append((run, sent, received)), every_s=0.2)
    threads = [threading.Thread(target=lambda: [buffer.add(9, 100, 0) for _ in range(50)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    buffer.add(9, 0, 7)
    buffer.add(4, 1, 0)
    assert written == []  # nothing written per object
    deadline = time.monotonic() + 5
    while len(written) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(written) == [(4, 1, 0), (9, 20_000, 7)]
    with pytest.raises(ValueError, match="Negative"):
        buffer.add(9, -1, 0)


def test_token_expiry_upkeep_runs_at_most_every_half_second_per_state_and_still_runs() -> None:
    now = [0.0]
    ran: list[str] = []

    class State:
        def __init__(self, name: str) -> None:
            self.name = name

        def upkeep(self) -> None:
            ran.append(self.name)

    State.upkeep = AtMostEvery(State.upkeep, every_s=0.5, clock=lambda: now[0])  # type: ignore[method-assign]
    first, second = State("a"), State("b")
    for _ in range(10):  # ten task polls within 0.1 s
        first.upkeep()
        now[0] += 0.01
    second.upkeep()
    assert ran == ["a", "b"]  # once per state object
    now[0] += 0.45
    first.upkeep()
    assert ran == ["a", "b", "a"]  # and again once the half second has passed
