"""The round loop's fault handling, on a fake Grid: sites that do not answer, federation.min_sites."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.config import FederationSettings
from server.rounds import FederationRunner
from strategies.fedpav import FedPav

SITES = {1: "mall", 2: "station", 3: "campus"}


class FlakyGrid:
    """Every connected node answers with its arrays + 1, except those in ``silent``."""

    def __init__(self, silent: set[int]) -> None:
        self.silent = silent

    def get_node_ids(self) -> list[int]:
        return list(SITES)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            arrays = ArrayRecord({k: Array(a.numpy() + 1.0) for k, a in message.content["arrays"].items()})
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10}),
                                  "site": ConfigRecord({"name": SITES[node]})})
            replies.append(Message(content=content, reply_to=message))
        return replies


def _runner(silent: set[int], min_sites: int) -> FederationRunner:
    settings = FederationSettings(rounds=1, eval_every=0, eval_at_start=False, min_sites=min_sites,
                                  fraction_train=1.0, fraction_evaluate=1.0, round_timeout_s=1.0)
    return FederationRunner(FlakyGrid(silent), FedPav(min_sites=1), settings, ConfigRecord({}),
                            on_round=lambda *_: None)


def _start() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})


def test_a_silent_site_is_named_as_failed_and_the_round_aggregates_the_others() -> None:
    runner = _runner(silent=set(), min_sites=2)
    runner.train_round(1, _start())  # every site answers once: the runner learns their names
    runner.grid = FlakyGrid(silent={3})
    arrays, record = runner.train_round(2, _start())
    assert record["failed"] == ["campus"] and sorted(record["sites"]) == ["mall", "station"]
    assert record["aggregated"] and np.array_equal(arrays["w"].numpy(), np.ones(3, dtype=np.float32))
    assert record["bytes_per_site"]["campus"]["received"] == 0 and record["bytes_per_site"]["campus"]["sent"] > 0


def test_fewer_usable_updates_than_min_sites_leave_the_global_model_unchanged() -> None:
    start = _start()
    arrays, record = _runner(silent={2, 3}, min_sites=2).train_round(1, start)
    assert arrays is start and not record["aggregated"]
    assert record["failed"] == ["node-2", "node-3"]  # never answered: known by node id only
    assert list(record["sites"]) == ["mall"]
