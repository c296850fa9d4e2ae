"""A site's private state (classifier head, BN statistics, pruning masks) saved on the site's own disk.

Flower keeps ``context.state`` in the SuperNode's memory only, so a restarted edge box would forget
its head and masks and rejoin as a new site. When the SuperNode's ``node_config`` names a
``state-dir`` (``fedreid-client`` always sets one), the ClientApp writes ``context.state`` there
after every training round and reads it back when a fresh SuperNode has none.

The file is keyed by the run tag the server sends (its output folder name), so a server resumed
with ``resume`` finds the same state while a new run starts fresh. Writes are atomic: a crash
leaves the previous round's file.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

log = logging.getLogger("clients.site_state")  # "clients" is the logger the ClientApp process shows

RUN_TAG_KEY = "run-tag"


def record_bytes(record: RecordDict) -> bytes:
    """A RecordDict as Flower's own protobuf bytes (the state file, the worker's channel)."""
    return recorddict_to_proto(record).SerializeToString()


def record_from_bytes(blob: bytes) -> RecordDict:
    """Inverse of ``record_bytes``; raises on bytes that are not a RecordDict."""
    proto = ProtoRecordDict()
    proto.ParseFromString(blob)
    return recorddict_from_proto(proto)


def image_cache_dir(context: Context) -> Path | None:
    """Where this site keeps its decoded images between rounds (``<state-dir>/image-cache``), or None.

    A deployment starts one ClientApp process per message, so without it every round decodes again."""
    folder = str(context.node_config.get("state-dir", "") or "")
    return Path(folder).expanduser() / "image-cache" if folder else None


def state_file(context: Context, run_tag: str) -> Path | None:
    """Where this site keeps the state of this run, or None when no state-dir is configured."""
    folder = str(context.node_config.get("state-dir", "") or "")
    if not folder or not run_tag:
        return None
    safe_tag = re.sub(r"[^A-Za-z0-9_.-]", "_", run_tag)
    return Path(folder).expanduser() / f"{safe_tag}.state"


def restore_site_state(context: Context, path: Path | None) -> bool:
    """Fill an empty ``context.state`` from ``path``; True when something was restored."""
    if path is None or not path.is_file() or len(context.state) > 0:
        return False
    try:
        saved = record_from_bytes(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - a damaged file must not stop the site
        log.warning("ignoring unreadable site state %s (%s); this site starts with a fresh head", path, error)
        return False
    for key, record in saved.items():
        context.state[key] = record
    log.info("restored this site's head and masks from %s", path)
    return True


def persist_site_state(context: Context, path: Path | None) -> None:
    """Write ``context.state`` to ``path`` atomically (temporary file, fsync, rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        handle.write(record_bytes(context.state))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
