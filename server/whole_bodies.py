"""Hand a request's body to Flower's HTTP APIs in one piece instead of in socket-sized pieces.

Flower 1.39 serves its Runtime and Control APIs (the ServerApp's link to the SuperLink, a site
worker's link to its SuperNode) with FastAPI behind Starlette ``BaseHTTPMiddleware`` layers: five
on the SuperLink, two on the SuperNode. uvicorn hands a request body to the app in the pieces it
reads from the socket (tens of kB each), and every layer passes each piece on through its own
anyio task and memory stream, so a 5 MiB chunk of a model arrives as hundreds of messages, each
crossing every layer. Measured on this 2-core box (``bench/http_body.py``): a 5 MiB ``push-object``
took 31-35 ms through the SuperLink's stack against 16-20 ms when the body came as one piece, and
a round pushes four such chunks from the ServerApp and four from each site's worker.

:class:`WholeRequestBody`, outermost, reads the body first and hands it on as one message; what
the app reads after it (a disconnect) still comes from the connection. Nothing else changes: the
app reads the whole body anyway (Flower parses each request as one protobuf message), so the peak
memory is the same. ``install`` wraps the ``create_app`` of Flower's SuperLink or SuperNode module
before Flower's own main function builds the app.
"""

from __future__ import annotations

import importlib
from typing import Any, Awaitable, Callable, MutableMapping

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

FLOWER_APP_MODULES = ("flwr.superlink.main", "flwr.supernode.main")  # each has create_app(...) -> FastAPI


class WholeRequestBody:
    """ASGI middleware: an HTTP request's body reaches ``app`` as one ``http.request`` message."""

    def __init__(self, app: App) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:  # Flower and uvicorn read attributes of the FastAPI app (state, ...)
        if name == "app":  # not set yet (a copy being built): no endless lookup
            raise AttributeError(name)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pieces: list[bytes] = []
        message = await receive()
        while message["type"] == "http.request":
            pieces.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
            message = await receive()
        if message["type"] != "http.request":  # the client went away mid-body: the app sees that, as before
            first: Message = message
        else:
            first = {"type": "http.request", "body": b"".join(pieces), "more_body": False}
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return first
            return await receive()

        await self.app(scope, replay, send)


def install(module_name: str) -> None:
    """Make ``module_name``'s ``create_app`` return its app wrapped in :class:`WholeRequestBody`."""
    if module_name not in FLOWER_APP_MODULES:
        raise ValueError(f"{module_name} is not one of Flower's app modules {FLOWER_APP_MODULES}")
    module = importlib.import_module(module_name)
    create_app = getattr(module, "create_app", None)
    if create_app is None:
        raise RuntimeError(f"the installed Flower's {module_name} has no create_app; pin flwr==1.39.*")
    if getattr(create_app, "fedreid_whole_bodies", False):
        return

    def create_wrapped_app(*args: Any, **kwargs: Any) -> WholeRequestBody:
        return WholeRequestBody(create_app(*args, **kwargs))

    create_wrapped_app.fedreid_whole_bodies = True  # type: ignore[attr-defined]
    module.create_app = create_wrapped_app  # type: ignore[attr-defined]
