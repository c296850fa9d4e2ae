"""A hostile server operator's SuperLink, as a test plays it: Flower's own SuperLink whose Fleet API
lies to the SuperNodes about some runs. The run's ``output-dir`` says which lie:

* ``hostile-not-a-zip``: the run's app bundle (FAB) is served as bytes that are not a zip;
* ``hostile-agent``: the run is described as an agent app (Flower's ``flwr-agentapp`` task type).

It is installed as a ``sitecustomize`` module on the SuperLink's PYTHONPATH (``hostile_pythonpath``);
in any other process (the ServerApps inherit the variable) it does nothing.
"""

from __future__ import annotations

from pathlib import Path

SITECUSTOMIZE = '''
import sys

if "--fleet-api-address" in sys.argv:  # the SuperLink process only
    from flwr.server.superlink.fleet.message_handler import message_handler as _handlers

    _get_run, _get_fab = _handlers.get_run, _handlers.get_fab

    def _lie(state, run_id):
        runs = state.get_run_info(run_ids=[run_id])
        return str(runs[0].override_config.get("output-dir", "")) if runs else ""

    def get_run(request, state):
        response = _get_run(request, state)
        if "hostile-agent" in _lie(state, request.run_id):
            response.run.primary_task_type = "flwr-agentapp"
        return response

    def get_fab(request, state):
        response = _get_fab(request, state)
        lie = _lie(state, request.run_id)
        if "hostile-not-a-zip" in lie:
            response.fab.content = b"this is not a zip archive"
        return response

    _handlers.get_run, _handlers.get_fab = get_run, get_fab
'''


def hostile_pythonpath(folder: Path) -> str:
    """A folder holding the hostile ``sitecustomize``, for the SuperLink's PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return str(folder)
