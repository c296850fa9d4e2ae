"""A request body reaches Flower's HTTP apps in one piece (server/whole_bodies.py): what the app
reads is the same body, a client that leaves mid-body is still seen leaving, other scopes pass
untouched, and Flower's real SuperLink app behind uvicorn answers a 5 MiB push as before."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest

from server import whole_bodies
from server.whole_bodies import WholeRequestBody
from tests.asgi_server import serving


class Recorder:
    """An ASGI app that reads everything it is handed until the request ends or the client leaves."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.receive: Any = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.receive = receive
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            self.seen.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if self.seen[-1]["type"] == "http.request":
            self.seen.append(await receive())  # what comes after the body: the connection's own


def _feed(messages: list[dict[str, Any]]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


async def _noop_send(message: dict[str, Any]) -> None:
    return None


def test_a_body_in_pieces_reaches_the_app_as_one_and_what_follows_comes_from_the_connection() -> None:
    app = Recorder()
    pieces = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "body": b"", "more_body": True},
              {"type": "http.request", "body": b"cde", "more_body": False},
              {"type": "http.disconnect"}]
    asyncio.run(WholeRequestBody(app)({"type": "http"}, _feed(pieces), _noop_send))
    assert app.seen == [{"type": "http.request", "body": b"abcde", "more_body": False}, {"type": "http.disconnect"}]


def test_a_client_that_leaves_mid_body_is_seen_leaving() -> None:
    app = Recorder()
    pieces = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]
    asyncio.run(WholeRequestBody(app)({"type": "http"}, _feed(pieces), _noop_send))
    assert app.seen == [{"type": "http.disconnect"}]


def test_other_scopes_pass_with_their_own_receive() -> None:
    app = Recorder()
    receive = _feed([])
    asyncio.run(WholeRequestBody(app)({"type": "lifespan"}, receive, _noop_send))
    assert app.receive is receive and app.seen == []


def test_install_wraps_flowers_create_app_once_and_refuses_other_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.superlink.main as superlink_main

    monkeypatch.setattr(superlink_main, "create_app", superlink_main.create_app)  # restored after the test
    whole_bodies.install("flwr.superlink.main")
    wrapped = superlink_main.create_app
    whole_bodies.install("flwr.superlink.main")
    assert superlink_main.create_app is wrapped
    assert isinstance(wrapped(), WholeRequestBody)
    with pytest.raises(ValueError, match="not one of Flower's app modules"):
        whole_bodies.install("flwr.serverapp")


def _post_5_mib(app: Any, cut: int = 0) -> tuple[int, bytes]:
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611

    body = PushObjectRequest(object_id="0" * 64, object_content=os.urandom(5 * 1024 * 1024)).SerializeToString()
    body = body[: len(body) - cut]
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/runtime/push-object", content=body, timeout=30,
                              headers={"content-type": "application/protobuf", "accept": "application/protobuf"})
    return response.status_code, response.content


def test_flowers_superlink_app_answers_a_5_mib_push_the_same_with_the_body_in_one_piece() -> None:
    from flwr.superlink.main import create_app

    plain, whole = _post_5_mib(create_app()), _post_5_mib(WholeRequestBody(create_app()))
    assert plain[0] == 401 and b"Authentication failed" in plain[1]  # parsed, then refused at the token check
    assert whole == plain
    cut = _post_5_mib(create_app(), cut=1), _post_5_mib(WholeRequestBody(create_app()), cut=1)
    assert cut[0][0] == 400 and cut[1] == cut[0]  # one byte short: both read the whole body and refuse it


def test_the_apps_own_attributes_are_read_through_the_wrapper() -> None:
    from flwr.superlink.main import create_app

    app = create_app()
    wrapped = WholeRequestBody(app)
    assert wrapped.state is app.state and wrapped.router is app.router
    with pytest.raises(AttributeError):
        WholeRequestBody.__new__(WholeRequestBody).state  # no app yet: an AttributeError, not a recursion
