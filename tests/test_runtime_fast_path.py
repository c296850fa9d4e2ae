"""Runtime API requests skip the Control API's pass-through middleware (server/runtime_fast_path.py):
Flower's real SuperLink app answers them as before, Control requests still cross every layer, and
the event-log layer is kept whenever an event-log plugin is configured."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server import runtime_fast_path
from tests.asgi_server import serving

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Each of the four classes' dispatch records the paths it sees; patches are undone afterwards."""
    import flwr.superlink.routers.control.middlewares as middlewares

    seen: dict[str, list[str]] = {}
    for name in (*runtime_fast_path.PASS_THROUGH, runtime_fast_path.EVENT_LOG):
        cls = getattr(middlewares, name)
        monkeypatch.setattr(cls, "__call__", cls.__call__)  # install() replaces it: restored after the test
        dispatch = cls.dispatch

        async def recording(self: Any, request: Any, call_next: Any, _name: str = name, _dispatch: Any = dispatch) -> Any:
            seen.setdefault(_name, []).append(request.url.path)
            return await _dispatch(self, request, call_next)

        monkeypatch.setattr(cls, "dispatch", recording)
    return seen


def _answers(app: Any, paths: list[str]) -> list[tuple[int, bytes]]:
    with serving(app) as url:
        return [(r.status_code, r.content) for r in
                (httpx.post(f"{url}{path}", content=b"", headers=PROTOBUF, timeout=30) for path in paths)]


PATHS = ["/v1/runtime/pull-messages", "/v1/control/list-runs"]


def test_runtime_requests_skip_the_four_layers_and_are_answered_as_before(counted: dict[str, list[str]]) -> None:
    from flwr.superlink.main import create_app

    before = _answers(create_app(), PATHS)
    assert all(paths == PATHS for paths in counted.values()) and len(counted) == 4  # every layer saw both
    counted.clear()
    runtime_fast_path.install()
    runtime_fast_path.install()  # twice: still one wrapper
    after = _answers(create_app(), PATHS)
    assert after[0] == before[0] and before[0][0] == 401  # the runtime request is still checked and refused alike
    assert after[1][0] == before[1][0] == 200  # the Control request still answered (its body holds the time)
    assert all(paths == ["/v1/control/list-runs"] for paths in counted.values()) and len(counted) == 4


def test_with_an_event_log_plugin_the_event_log_layer_sees_runtime_requests(counted: dict[str, list[str]]) -> None:
    from flwr.superlink.main import create_app

    runtime_fast_path.install()
    app = create_app()
    app.state.control_event_log_plugin = object()  # configured: its layer must not be skipped
    _answers(app, PATHS[:1])
    assert counted == {runtime_fast_path.EVENT_LOG: [PATHS[0]]}
