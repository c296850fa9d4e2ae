"""The site worker as its SuperNode's executor: it takes each task from the SuperNode's Runtime API
and runs it in this long-lived process, with installed code only.

``flower-supernode --isolation process`` starts nothing itself; it waits for an executor to call
``AcquireTask`` on its Runtime API. Flower's own executor (``flower-superexec``) then starts a
fresh ``flwr-clientapp`` per task, which installs and imports the submitted app (FAB) and runs its
ClientApp beside the site's images. This module is the other executor: per task it

1. acquires the task and its token (``AcquireTask``, signed with the SuperExec secret that only
   this site's ``fedreid-client`` holds),
2. starts the task's heartbeat and pulls its input (message, context, run, FAB: ``pull_input``,
   Flower's ``pull_task_input`` with a short backoff),
3. asks ``accept(run, fab)`` whether the app is one this site runs; a refusal is answered with an
   error reply that says why (the FAB is only read, as a zip, never installed or imported),
4. calls ``handle(message, context)``, installed code, for the reply content,
5. pushes the reply (``push_message``) and the updated context with the task's final status
   (``push_task_output``), exactly what ``flwr-clientapp`` sends; an exception becomes an error
   reply and a failed task, and the worker serves on.

A worker that dies mid-task (killed, out of memory) cannot answer; so that the round does not wait
for Flower's heartbeat to expire (60 s), every task leaves a file in the state folder while it runs
(clients/answer_on_death.py): the token and a ready error reply. The next worker, started again by
``fedreid-client``, sends that reply first (``answer_left_over``), and the server names the site as
failed at once.

Everything from Flower used here is listed in ``FLOWER_RUNTIME_API``; a test checks it against the
installed Flower, so a change under the ``flwr==1.39.*`` pin fails loudly instead of at a site.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, message_from_proto, message_to_proto, run_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullPendingTasksRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.constant import PULL_MAX_TIME
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
    pull_objects,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from clients.answer_on_death import AnswerOnDeath
from clients.public_errors import public_reason
from strategies.wire import LOCAL_PULL_BACKOFF_CAP_S, PULL_BACKOFF_S

log = logging.getLogger("clients.executor")

COMPONENT = "fedreid-site-worker"  # how this executor introduces itself to the Runtime API
# The methods Flower's SuperExec signs with the shared secret (flwr/supercore/superexec/run_superexec.py).
SIGNED_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
                            "/flwr.proto.Runtime/ClaimTask"})
IDLE_POLL_CAP_S = 0.25  # the longest wait between AcquireTask calls (the SuperNode's own default pull)
IDLE_AFTER_S = 5.0  # without a task this long, the worker starts waiting longer between calls
ABANDONED_CHECK_S = 2.0  # while a part is missing, how often to look whether the SuperNode moved on

# What this module takes from Flower 1.39 (checked by tests/test_site_runtime.py against the installed Flower).
FLOWER_RUNTIME_API = {
    "flwr.supercore.runtime.RuntimeHttpClient": ["AcquireTask", "PullTaskInput", "PullMessages", "PushMessages",
                                                 "PushObject", "PullObject", "PushTaskOutput", "SendTaskHeartbeat",
                                                 "ConfirmMessageReceived", "PullPendingTasks", "from_server_address",
                                                 "close"],
    "flwr.proto.runtime_pb2.PullTaskInputResponse": ["context", "run", "fab", "task_id"],
    "flwr.proto.runtime_pb2.PullAppMessagesResponse": ["messages_list", "message_object_trees"],
    "flwr.supercore.inflatable.inflatable_utils.pull_and_inflate_object_from_tree": [
        "object_tree", "pull_object_fn", "confirm_object_received_fn", "return_type", "max_tries_per_object",
        "initial_backoff", "backoff_cap"],
    "flwr.supercore.inflatable.inflatable_protobuf_utils.make_pull_object_fn_protobuf": [
        "pull_object_protobuf", "node", "run_id"],
    "flwr.supercore.inflatable.inflatable_protobuf_utils.make_confirm_message_received_fn_protobuf": [
        "confirm_message_received_protobuf", "node", "run_id"],
    "flwr.supercore.task_identity.TaskIdentity": ["task_id", "run_id", "node_id"],
    "flwr.supernode.runtime.run_clientapp.push_message": ["client", "message", "context"],
    "flwr.supernode.runtime.run_clientapp.push_task_output": ["client", "context", "sub_status", "details"],
    "flwr.proto.runtime_pb2.AcquireTaskRequest": ["supported_task_types", "agentapp_fab_hashes"],
    "flwr.proto.runtime_pb2.AcquireTaskResponse": ["task", "token"],
    "flwr.proto.task_pb2.Task": ["task_id", "type", "run_id", "fab_hash"],
    "flwr.supercore.heartbeat.HeartbeatSender": ["start", "stop", "is_running"],
    "flwr.proto.runtime_pb2.PullPendingTasksResponse": ["tasks"],
}

Acceptor = Callable[[Run, Fab], "str | None"]  # None: run it; otherwise the reason for refusing
Handler = Callable[[Message, Context], RecordDict]  # the reply content; context.state updated in place


class TaskRefused(Exception):
    """The task's app is not one this site runs; the message is the reason the server is told."""


EXIT_TASK_LOST = 75  # the worker ended itself: the SuperNode gave its task up (fedreid-client restarts it)
EXIT_OVER_BUDGET = 76  # the worker ended itself: its task ran past --max-task-seconds


class TaskWatchdog:
    """Ends this worker's process when its task outlives the site's time budget or is given up by the
    SuperNode: a task cannot be interrupted safely inside torch, and a new worker starts in seconds.
    ``end`` is ``os._exit`` in the worker (tests give another)."""

    def __init__(self, record: AnswerOnDeath, budget_s: float | None, end: Callable[[int], None]) -> None:
        self.record, self.budget_s, self.end = record, budget_s, end
        self._timer: threading.Timer | None = None
        self._answering = False  # the reply is being sent: the task's end is no longer the SuperNode's loss

    def start(self) -> None:
        if self.budget_s is not None:
            self._timer = threading.Timer(self.budget_s, self.over_budget)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        """The task's work is over (its answer is next): neither the budget nor a heartbeat that finds
        the finished task gone ends the worker any more."""
        self._answering = True
        if self._timer is not None:
            self._timer.cancel()

    def over_budget(self) -> None:
        log.error("the task has run past this site's %g-s budget (--max-task-seconds); the worker stops it and "
                  "starts again", self.budget_s)
        self.record.mark_over_budget()
        self.end(EXIT_OVER_BUDGET)

    def lost(self) -> None:
        if self._answering:
            return
        log.warning("the SuperNode gave this task up while it ran (its run stopped or its heartbeat expired); the "
                    "worker stops it and starts again")
        self.record.disarm()  # nobody waits for its answer
        self.end(EXIT_TASK_LOST)


@dataclass(frozen=True)
class RuntimeAddress:
    """Where the SuperNode's Runtime API listens (always this box: fedreid-client binds it to loopback)."""

    address: str  # host:port
    secret: bytes  # the SuperExec shared secret

    def client(self, token: str | None = None, patient: bool = True) -> RuntimeHttpClient:
        """A Runtime API client: signed for acquiring tasks, or bound to one task's ``token``;
        ``patient=False``: one try per call (Flower's default retries while the SuperNode is away)."""
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
        if token is None:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                                             protected_methods=SIGNED_METHODS))
        else:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        retry = make_simple_http_retry_invoker()
        if not patient:
            retry.max_tries = 1
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True,
                                                     root_certificates=None, interceptors=interceptors,
                                                     retry_invoker=retry)


def _heartbeat(client: RuntimeHttpClient, on_lost: Callable[[], None]) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a task the SuperNode no longer knows calls ``on_lost``
    (``flwr-clientapp`` raises SIGINT in itself; this long-lived worker ends its own process, so
    that nothing the SuperNode gave up on keeps the site busy, and fedreid-client starts a new one)."""
    import httpx

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (503, 504):
                return False
            raise
        if not response.success:
            on_lost()
        return True

    return beat


class AbandonedTask:
    """Whether the SuperNode gave up receiving this task's message (checked at most every 2 s).

    The SuperNode receives one message at a time: it creates the task, then pulls the message's
    parts from the SuperLink. When the run stops being RUNNING meanwhile (a SuperLink restarted
    mid-round finishes the old runs), Flower 1.39 leaves that task open with parts that will never
    arrive, and a worker asking for them would wait for ever. A newer pending task means the
    SuperNode has moved on, so this task's parts are not coming."""

    def __init__(self, pending: Callable[[], list[int]], task_id: int) -> None:
        self.pending, self.task_id, self.checked = pending, task_id, 0.0

    def __call__(self) -> bool:
        if time.monotonic() - self.checked < ABANDONED_CHECK_S:
            return False
        self.checked = time.monotonic()
        return any(task != self.task_id for task in self.pending())


def pull_input(client: RuntimeHttpClient,
               pending: Callable[[], list[int]] | None = None) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``pull_task_input`` (flwr/supernode/runtime/run_clientapp.py), step for step, except
    that a part of the message the SuperNode has not received yet is asked for again after 0.05 s
    (doubling up to 0.1 s: the SuperNode is on this box), not after 1 s (up to 10 s), and that the
    wait ends when the SuperNode has abandoned the message (``pending`` lists the ids of tasks
    waiting; see AbandonedTask). A long-lived executor takes a task the moment the SuperNode
    creates it, which is before the SuperNode has the message's arrays; with Flower's backoff that
    cost 1.3 s per round (bench/round_overhead.py)."""
    response = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = response.task_id, response.run.run_id
    TaskIdentity.node_id = response.context.node_id
    context, run, fab = context_from_proto(response.context), run_from_proto(response.run), fab_from_proto(response.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's Runtime API handed over no message for this task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
    abandoned = AbandonedTask(pending or (lambda: []), response.task_id)

    def pull_unless_abandoned(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except ObjectUnavailableError:
            if abandoned():
                raise ObjectPullError(object_id, f"the SuperNode abandoned this message (run {run.run_id} is "
                                                 "no longer running, or it moved on to a newer task)") from None
            raise

    # Flower's SuperNode stores a message's objects all at once, after it has pulled the last of
    # them: until then, asking for every object (four at a time) only keeps it busy while it is
    # receiving. One object is asked for until it comes; then the rest are there.
    probe = next(iter_object_ids(tree))
    first = wait_for_object(probe, pull_unless_abandoned)
    message = pull_and_inflate_object_from_tree(
        tree, lambda object_id: first if object_id == probe else pull_unless_abandoned(object_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_tries_per_object=None, initial_backoff=PULL_BACKOFF_S,
        backoff_cap=LOCAL_PULL_BACKOFF_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # a pulled message does not carry its own id
    return message, context, run, fab


def iter_object_ids(tree: ObjectTree) -> Iterator[str]:
    """The ids of a message's objects, leaves first (Flower's post-order)."""
    return (node.object_id for node in iterate_object_tree(tree))


def wait_for_object(object_id: str, pull: Callable[[str], bytes], max_time: float = PULL_MAX_TIME) -> bytes:
    """``pull(object_id)`` through Flower's own ``pull_objects`` (one object, one at a time): asked
    again after ``PULL_BACKOFF_S`` doubling to ``LOCAL_PULL_BACKOFF_CAP_S`` while it is unavailable,
    for at most ``max_time`` seconds (the bound the rest of the message is pulled under); ``pull``
    ends the wait early by raising anything else (ObjectPullError)."""
    return pull_objects([object_id], pull, max_concurrent_pulls=1, max_time=max_time, max_tries_per_object=None,
                        initial_backoff=PULL_BACKOFF_S, backoff_cap=LOCAL_PULL_BACKOFF_CAP_S)[object_id]


def _serialised(error: Error, message: Message) -> bytes:
    return message_to_proto(Message(error, reply_to=message)).SerializeToString()


def answer_left_over(record: AnswerOnDeath, runtime: RuntimeAddress) -> bool:
    """Send the error reply a dead worker left for its task; True when the SuperNode took it."""
    saved = record.saved()
    if saved is None or saved.get("phase") != AnswerOnDeath.RUNNING:
        record.disarm()  # nothing left, or a half-sent reply: fedreid-client restarted the SuperNode
        return False
    try:
        proto = ProtoMessage()
        proto.ParseFromString(record.reply(saved))
        reply = message_from_proto(proto)
        client = runtime.client(str(saved["token"]), patient=False)  # a stale token must not hold us up
    except (ValueError, KeyError) as error:
        log.warning("ignoring an unreadable %s (%s)", record.path, error)
        record.disarm()
        return False
    context = Context(run_id=int(saved["run_id"]), node_id=int(saved["node_id"]),  # type: ignore[arg-type]
                      node_config={}, state=RecordDict(), run_config={})
    try:
        push_message(client, reply, context)
        push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reply.error.reason)
        log.warning("answered for the task the previous site worker died in: %s", reply.error.reason)
        return True
    except Exception as error:  # noqa: BLE001 - the SuperNode may have moved on (restarted, expired)
        log.info("the task the previous site worker died in is no longer open (%s)", error)
        return False
    finally:
        client.close()
        record.disarm()


class TaskLoop:
    """Acquire tasks one at a time and run each with ``handle`` once ``accept`` lets it."""

    def __init__(self, runtime: RuntimeAddress, accept: Acceptor, handle: Handler, state_dir: Path,
                 poll_s: float = 0.05, max_task_seconds: float | None = None,
                 end: Callable[[int], None] = os._exit) -> None:  # noqa: SLF001 - see TaskWatchdog
        self.runtime, self.accept, self.handle, self.poll_s = runtime, accept, handle, poll_s
        self.answer_on_death = AnswerOnDeath(state_dir)
        self.max_task_seconds, self.end = max_task_seconds, end

    def serve_forever(self) -> None:
        """Take every task the SuperNode creates, of any type: one this worker does not run (an agent
        app, say) is answered with an error instead of waiting at the SuperNode for ever."""
        acquirer = self.runtime.client()
        request = AcquireTaskRequest(supported_task_types=[str(kind) for kind in TaskType], agentapp_fab_hashes=[])
        wait, idle_since = self.poll_s, time.monotonic()
        while True:
            asked = time.monotonic()
            response = acquirer.AcquireTask(request)
            if response.HasField("task") and response.token:
                self.run_task(response.token, response.task.type)
                wait, idle_since = self.poll_s, time.monotonic()  # a run's next task follows soon: ask often
            else:  # fedreid's SuperNode held the ask until a task came or a second passed (server/long_polls.py):
                time.sleep(max(0.0, wait - (time.monotonic() - asked)))  # no sleep on top; Flower's answers at once
                if time.monotonic() - idle_since > IDLE_AFTER_S:  # no run going: ask less often (20 sites on
                    wait = min(wait * 2, IDLE_POLL_CAP_S)  # one box at 0.05 s kept both cores busy)

    def pending_tasks(self) -> list[int]:
        """Ids of the tasks waiting at the SuperNode (a signed call, like AcquireTask)."""
        client = self.runtime.client()
        try:
            return [task.task_id for task in client.PullPendingTasks(PullPendingTasksRequest()).tasks]
        finally:
            client.close()

    def run_task(self, token: str, task_type: str = TaskType.CLIENT_APP) -> None:
        """One task, end to end; never raises (a failure is the task's, not the worker's)."""
        client = self.runtime.client(token)
        watchdog = TaskWatchdog(self.answer_on_death, self.max_task_seconds, self.end)
        heartbeat = HeartbeatSender(_heartbeat(client, watchdog.lost))
        heartbeat.start()
        context: Context | None = None
        message: Message | None = None
        started = time.perf_counter()
        try:
            message, context, run, fab = pull_input(client, self.pending_tasks)
            pulled = time.perf_counter()
            kind = message.metadata.message_type
            self.answer_on_death.arm(token, _serialised(Error(ErrorCode.CLIENT_APP_CRASHED, (
                f"the site worker died while handling this {kind} message (run {run.run_id}); fedreid-client "
                "starts it again for the next one")), message), context.run_id, context.node_id,
                _serialised(Error(ErrorCode.CLIENT_APP_CRASHED, (
                    f"the {kind} message (run {run.run_id}) ran past the site's time budget of "
                    f"{self.max_task_seconds or 0:g} s (fedreid-client --max-task-seconds) and was stopped")), message),
                None if self.max_task_seconds is None else time.time() + self.max_task_seconds)
            watchdog.start()
            if task_type != TaskType.CLIENT_APP:
                raise TaskRefused(f"this site runs {TaskType.CLIENT_APP} tasks only; run {run.run_id} asked for "
                                  f"a {task_type} task")
            refusal = self.accept(run, fab)
            if refusal is not None:
                raise TaskRefused(refusal)
            reply = Message(self.handle(message, context), reply_to=message)
            worked = time.perf_counter()
            watchdog.cancel()
            self.answer_on_death.mark_replying()
            push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=SubStatus.COMPLETED, details="")
            done = time.perf_counter()
            log.info("%s message handled in %.2f s: input %.2f s, work %.2f s, reply %.2f s (run %d)", kind,
                     done - started, pulled - started, worked - pulled, done - worked, run.run_id)
        except TaskRefused as refusal:
            log.warning("refused a task: %s", refusal)
            watchdog.cancel()
            self._fail(client, message, context, ErrorCode.INVALID_FAB, str(refusal))
        except Exception as error:  # noqa: BLE001 - reported to the server; the worker serves on
            log.error("task failed:\n%s", traceback.format_exc())
            watchdog.cancel()
            self._fail(client, message, context, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, public_reason(error))
        finally:
            watchdog.cancel()
            self.answer_on_death.disarm()
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    @staticmethod
    def _fail(client: RuntimeHttpClient, message: Message | None, context: Context | None, code: int,
              reason: str) -> None:
        """An error reply (when the message was pulled) and the task's failed status; the SuperNode's
        copy of the context stays as it was before the task."""
        try:
            if message is not None and context is not None:
                push_message(client, Message(Error(code, reason), reply_to=message), context)
            push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reason)
        except Exception as error:  # noqa: BLE001 - nothing more can be done for this task
            log.error("could not report the failed task to the SuperNode: %s", error)
