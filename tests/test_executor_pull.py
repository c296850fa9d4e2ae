"""A site worker takes a task's input from its SuperNode without keeping it busy: until the
SuperNode holds the message (Flower's SuperNode stores a message's objects all at once, after the
last one arrived), the worker asks for one object only, then for every other object once."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    ConfirmMessageReceivedResponse,
    PullObjectResponse,
)
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
from flwr.supercore.run import Run

from clients.executor import iter_object_ids, pull_input, wait_for_object


class SuperNodeStandIn:
    """The Runtime API calls ``pull_input`` makes; the message's objects stay unavailable for the
    first ``held`` object requests, as while a SuperNode is still receiving them."""

    def __init__(self, message: Message, held: int) -> None:
        self.message, self.held = message, held
        self.tree = get_object_tree(message)
        self.contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
        self.asked: list[str] = []

    def PullTaskInput(self, request: object) -> PullTaskInputResponse:  # noqa: N802 - Flower's method names
        context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
        return PullTaskInputResponse(task_id=5, run=run_to_proto(Run.create_empty(7)),
                                     context=context_to_proto(context), fab=fab_to_proto(Fab("0" * 64, b"", {})))

    def PullMessages(self, request: object) -> PullAppMessagesResponse:  # noqa: N802
        return PullAppMessagesResponse(messages_list=[message_to_proto(self.message)],
                                       message_object_trees=[self.tree])

    def PullObject(self, request: object) -> PullObjectResponse:  # noqa: N802
        self.asked.append(request.object_id)
        if len(self.asked) <= self.held:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=self.contents[request.object_id])

    def ConfirmMessageReceived(self, request: object) -> ConfirmMessageReceivedResponse:  # noqa: N802
        return ConfirmMessageReceivedResponse()


def _message() -> Message:
    weights = np.arange(3 * 1024 * 1024, dtype=np.float32)  # 12 MB: three of Flower's 5 MiB chunks
    content = RecordDict({"arrays": ArrayRecord({"w": Array(weights), "b": Array(np.ones(4, np.float32))}),
                          "config": ConfigRecord({"server-round": 2})})
    return Message(content=content, dst_node_id=3, message_type="train")


def test_while_the_supernode_receives_the_worker_asks_for_one_object_then_for_each_other_once() -> None:
    standin = SuperNodeStandIn(_message(), held=6)
    message, context, run, _ = pull_input(standin)  # type: ignore[arg-type]
    probe = next(iter_object_ids(standin.tree))
    assert standin.asked[:7] == [probe] * 7  # six refusals and the answer, all for the one object
    rest = standin.asked[7:]
    assert sorted(rest) == sorted(set(standin.contents) - {probe})  # then every other object, once
    np.testing.assert_array_equal(message.content["arrays"]["w"].numpy(), np.arange(3 * 1024 * 1024, dtype=np.float32))
    assert message.content["config"]["server-round"] == 2 and context.node_id == 3 and run.run_id == 7


def test_the_wait_for_an_object_is_bounded_and_ends_on_a_pull_error() -> None:
    answers = iter([ObjectUnavailableError("x")] * 4 + [b"content"])

    def pull(object_id: str) -> bytes:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for_object("x", pull) == b"content"  # asked again until it came

    def never(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    started = time.monotonic()
    with pytest.raises(ObjectPullError, match="timeout"):
        wait_for_object("x", never, max_time=0.3)  # the SuperNode never gets it: the wait ends
    assert time.monotonic() - started < 5

    def abandoned(object_id: str) -> bytes:
        raise ObjectPullError(object_id, "the SuperNode abandoned this message")

    with pytest.raises(ObjectPullError, match="abandoned"):
        wait_for_object("x", abandoned)
