"""What a site keeps between rounds, and where: it never leaves the site.

Kept in ``context.state`` (which the SuperNode holds for the run and hands to every task, the one
source of truth) and, after every training round, in the site's state file on its own disk, so
that a restarted box rejoins with them instead of as a new site:

* ``local-state``: the identity classifier, and the BatchNorm statistics under ``bn_stats=local``;
* ``update-*``: with compressed transfers, the model as this site holds it (the base the server's
  next change applies to), its masks and version, and the error-feedback residual of its uploads;
* ``buc-*``: FedUReID's pseudo-labels, cluster memory and merge progress, keyed by the training
  files' fingerprint, and (``update: ema``) the site's previous local model.

The state file is keyed by the run tag the server sends (its output folder name), so a server
resumed with ``resume`` finds the same state while a new run starts fresh. Writes are atomic: a
crash leaves the previous round's file.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from reid.models import ReIDNet
from reid.unsupervised import ClusterState

log = logging.getLogger("clients.kept")  # under "clients", the logger the site's log shows

LOCAL_STATE_KEY = "local-state"  # classifier head (+ BN statistics under bn_stats=local)
HELD_KEY = "update-held"  # ArrayRecord: the SHARED arrays as this site holds them (compressed transfers)
HELD_MASKS_KEY = "update-held-masks"  # ArrayRecord: their pruning masks, where they have one
HELD_VERSION_KEY = "update-held-version"  # ConfigRecord: {"version": the server's name for that model}
RESIDUAL_KEY = "update-residual"  # ArrayRecord: what this site's uploads have not yet sent (error feedback)
CLUSTERS_KEY = "buc-clusters"  # ArrayRecord: labels [N] int64, slots [C, D] float32
PROGRESS_KEY = "buc-progress"  # ConfigRecord: rounds trained, merges done, the training files' fingerprint
PREVIOUS_LOCAL_KEY = "buc-previous-local"  # ArrayRecord: the SHARED arrays this site trained last round (ema)


def record_bytes(record: RecordDict) -> bytes:
    """A RecordDict as Flower's own protobuf bytes (the state file)."""
    return recorddict_to_proto(record).SerializeToString()


def record_from_bytes(blob: bytes) -> RecordDict:
    """Inverse of ``record_bytes``; raises on bytes that are not a RecordDict."""
    proto = ProtoRecordDict()
    proto.ParseFromString(blob)
    return recorddict_from_proto(proto)


def state_file(state_dir: Path | None, run_tag: str) -> Path | None:
    """Where this site keeps the state of this run, or None when no state folder is configured."""
    if state_dir is None or not run_tag:
        return None
    return state_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run_tag)}.state"


def restore_site_state(state: RecordDict, path: Path | None) -> bool:
    """Fill an empty ``state`` from ``path``; True when something was restored."""
    if path is None or not path.is_file() or len(state) > 0:
        return False
    try:
        saved = record_from_bytes(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - a damaged file must not stop the site
        log.warning("ignoring unreadable site state %s (%s); this site starts with a fresh head", path, error)
        return False
    for key, record in saved.items():
        state[key] = record
    log.info("restored this site's head and masks from %s", path)
    return True


def persist_site_state(state: RecordDict, path: Path | None) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        handle.write(record_bytes(state))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def restore_local_state(model: ReIDNet, state: RecordDict, site: str) -> None:
    """Put back what this site kept from earlier rounds: its head, and BN stats under bn_stats=local."""
    if LOCAL_STATE_KEY not in state.array_records:
        return
    saved = state[LOCAL_STATE_KEY].to_torch_state_dict()
    own = model.state_dict()
    usable = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    stale = [k for k in saved if k in own and own[k].shape != saved[k].shape]
    if stale:
        log.warning("%s: saved %s no longer fits (identities changed?); starting it afresh", site, stale[0])
    model.load_state_dict(usable, strict=False)


@dataclass(frozen=True)
class HeldModel:
    """The model a site holds under compressed transfers: the server's changes apply to it."""

    version: str
    values: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


def load_held(state: RecordDict) -> HeldModel | None:
    if HELD_KEY not in state.array_records or HELD_VERSION_KEY not in state.config_records:
        return None
    masks = state[HELD_MASKS_KEY] if HELD_MASKS_KEY in state.array_records else ArrayRecord()
    return HeldModel(str(state[HELD_VERSION_KEY]["version"]),
                     {k: a.numpy() for k, a in state[HELD_KEY].items()},
                     {k: a.numpy().astype(bool) for k, a in masks.items()})


def save_held(state: RecordDict, held: HeldModel) -> None:
    state[HELD_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in held.values.items()})
    state[HELD_MASKS_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(m)) for k, m in held.masks.items()})
    state[HELD_VERSION_KEY] = ConfigRecord({"version": held.version})


def load_residual(state: RecordDict) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in state[RESIDUAL_KEY].items()} if RESIDUAL_KEY in state.array_records else {}


def save_residual(state: RecordDict, residual: dict[str, np.ndarray]) -> None:
    state[RESIDUAL_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32))
                                       for k, v in residual.items()})


def load_cluster_state(state: RecordDict, fingerprint: str, site: str) -> ClusterState | None:
    """The saved clustering, or None when there is none or it belongs to other training files."""
    if CLUSTERS_KEY not in state.array_records or PROGRESS_KEY not in state.config_records:
        return None
    progress = state[PROGRESS_KEY]
    if progress["fingerprint"] != fingerprint:
        log.warning("%s: the training images changed since the last round; clustering starts again", site)
        return None
    arrays = state[CLUSTERS_KEY]
    return ClusterState(labels=torch.from_numpy(arrays["labels"].numpy().copy()),
                        slots=torch.from_numpy(arrays["slots"].numpy().copy()),
                        rounds_trained=int(progress["rounds-trained"]), merges_done=int(progress["merges-done"]))


def save_cluster_state(state: RecordDict, clusters: ClusterState, fingerprint: str) -> None:
    state[CLUSTERS_KEY] = ArrayRecord({"labels": Array(clusters.labels.numpy()),
                                       "slots": Array(clusters.slots.float().numpy())})
    state[PROGRESS_KEY] = ConfigRecord({"rounds-trained": clusters.rounds_trained,
                                        "merges-done": clusters.merges_done, "fingerprint": fingerprint})
