"""What may leave a site, built and checked in one place: every reply the site sends is made here.

A reply holds exactly

* ``arrays``: the SHARED part of the site's model, the keys and shapes of the model the server
  declared (pruned tensors in the sparse encoding, or under compressed transfers each weight
  tensor as its quantised change from the received model; packed when the server sent its model
  packed);
* ``metrics`` (and ``evaluation``): numbers whose names are in ``REPLY_METRICS`` (or of the form
  ``mAP@s`` / ``rank1@s`` for a query resolution s), each a finite int or float;
* ``site``: the site's name, as its operator configured it;
* ``timing``: when the site's work on the message started and ended, and its evaluation's part of
  it (``TIMING_METRICS``, seconds since the epoch), so the server can say where a round's time went;
* ``style`` (feddg with sharing): one [cameras, 33] array, each row a camera's pixel mean, colour
  covariance and per-channel octiles averaged over its training images (reid/style.py);
* ``bn-stats`` (added by clients/site.py while a run ranks held-out sites source-only): the
  BatchNorm running means and variances, nothing of the classifier.

Anything else (a file's bytes, a string, an array of another key or shape) is refused with an
error before it could be sent, whoever asked for it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies.packing import TRANSPORT_DTYPE_KEY, pack_record
from strategies.sparse_records import encode_record
from strategies.update_codec import CompressionSpec, encode_record_change
from strategies.validation import EVALUATION_KEY, STYLE_KEY, TIMING_KEY, check_style

SITE_KEY = "site"
TRAINING_METRICS = frozenset({
    "num-examples", "num-identities", "corrupt-images",  # the site's data, counted
    "train-loss", "train-accuracy", "train-seconds", "images-per-second", "epochs",  # local training
    "image-passes", "feature-passes", "gpu-peak-mb",  # its cost
    "cdw-distance", "kl-divergence",  # how far the model moved (CDW, KLPWA)
    "kept-fraction", "holdout-map", "holdout-map-se", "holdout-queries", "holdout-identities",  # FedKLPR
    "clusters", "clusters-merged", "cluster-nmi", "cluster-precision", "cluster-recall", "cluster-f",  # FedUReID
    "restyled-images",  # feddg
    "style-bytes",  # feddg: what its style statistics take
})
EVALUATION_METRICS = frozenset({"rank1", "rank5", "rank10", "mAP", "mAP-market", "mINP", "num-queries",
                                "num-gallery", "drift-gap"})
REPLY_METRICS = TRAINING_METRICS | EVALUATION_METRICS
TIMING_METRICS = frozenset({"work-start", "work-end", "eval-start", "eval-end"})  # time.time() of each
_AT_SCALE = re.compile(r"(mAP|rank1)@[0-9.]+")


class OutgoingRefused(ValueError):
    """A reply would carry something a site does not send."""


def metric_record(metrics: Mapping[str, object]) -> MetricRecord:
    """``metrics`` as a MetricRecord, once every name is a documented one and every value a finite number."""
    for name, value in metrics.items():
        if name not in REPLY_METRICS and not _AT_SCALE.fullmatch(name):
            raise OutgoingRefused(f"metric {name!r} is not one a site reports (clients/outgoing.py REPLY_METRICS)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OutgoingRefused(f"metric {name!r} must be a finite number, not {value!r}")
    return MetricRecord(dict(metrics))  # type: ignore[arg-type]


def timing_record(times: Mapping[str, float]) -> MetricRecord:
    """The site's work spans as a MetricRecord: only ``TIMING_METRICS``, each a finite time of day."""
    unknown = sorted(set(times) - TIMING_METRICS)
    if unknown:
        raise OutgoingRefused(f"timing {unknown[0]!r} is not one a site reports (clients/outgoing.py TIMING_METRICS)")
    if not all(isinstance(v, float) and math.isfinite(v) for v in times.values()):
        raise OutgoingRefused(f"timings must be finite floats, not {dict(times)}")
    return MetricRecord(dict(times))  # type: ignore[arg-type]


def check_shared(shared: Mapping[str, torch.Tensor], declared: Mapping[str, tuple[int, ...]]) -> None:
    """The arrays to send are exactly the declared SHARED keys, each of its declared shape."""
    if set(shared) != set(declared):
        extra, missing = sorted(set(shared) - set(declared)), sorted(set(declared) - set(shared))
        raise OutgoingRefused(f"the reply's arrays are not the declared SHARED keys (extra {extra[:3]}, "
                              f"missing {missing[:3]})")
    wrong = [k for k, v in shared.items() if tuple(v.shape) != tuple(declared[k])]
    if wrong:
        raise OutgoingRefused(f"array {wrong[0]} has shape {tuple(shared[wrong[0]].shape)}, declared "
                              f"{tuple(declared[wrong[0]])}")


def site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


def name_reply(name: str) -> RecordDict:
    """The answer to the server's query for the site's name: the name, nothing else."""
    return RecordDict({SITE_KEY: site_record(name)})


def evaluation_reply(name: str, metrics: MetricRecord, timing: Mapping[str, float] | None = None) -> RecordDict:
    reply = RecordDict({"metrics": metric_record(dict(metrics)), SITE_KEY: site_record(name)})
    if timing is not None:
        reply[TIMING_KEY] = timing_record(timing)
    return reply


@dataclass(frozen=True)
class ChangeFrom:
    """Under compressed transfers: the received model (and masks) the upload is a change from, and
    the residual earlier uploads did not send (error feedback; empty when it is off)."""

    base: Mapping[str, np.ndarray]
    masks: Mapping[str, np.ndarray]
    spec: CompressionSpec
    residual: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class TrainingReply:
    """The reply, and under compressed transfers with error feedback what it did not send."""

    content: RecordDict
    residual: dict[str, np.ndarray] | None = None


def training_reply(name: str, shared: Mapping[str, torch.Tensor], declared: Mapping[str, tuple[int, ...]],
                   received_config: ConfigRecord, received_packed: bool, metrics: Mapping[str, float],
                   evaluated: MetricRecord | None, masks: Mapping[str, np.ndarray], value_dtype: str,
                   style: np.ndarray | None = None, change: ChangeFrom | None = None,
                   timing: Mapping[str, float] | None = None) -> TrainingReply:
    """The SHARED arrays (sparse-encoded where pruned, or as a compressed change; packed when the
    server sent its model packed), the metrics, when the round asked for it the evaluation of the
    received model, the site's style statistics when it shares them, and its work's timing."""
    check_shared(shared, declared)
    if style is not None and (reason := check_style(style)):
        raise OutgoingRefused(f"the style statistics are not sent: {reason}")
    values = {k: v.numpy() for k, v in shared.items()}
    residual = None
    if change is not None:
        encoded = encode_record_change(values, change.base, change.spec, dict(masks), dict(change.masks),
                                       change.residual if change.spec.error_feedback else None)
        arrays: ArrayRecord = encoded.record
        residual = encoded.residual if change.spec.error_feedback else None
    else:
        arrays = encode_record(values, dict(masks), value_dtype)
    if received_packed:  # answer in the form the server chose
        arrays = pack_record(arrays, str(received_config.get(TRANSPORT_DTYPE_KEY, "float32")))
    reply = RecordDict({"arrays": arrays, "metrics": metric_record(metrics), SITE_KEY: site_record(name)})
    if evaluated is not None:
        reply[EVALUATION_KEY] = metric_record(dict(evaluated))
    if style is not None:
        reply[STYLE_KEY] = ArrayRecord({STYLE_KEY: Array(np.ascontiguousarray(style, dtype=np.float32))})
    if timing is not None:
        reply[TIMING_KEY] = timing_record(timing)
    return TrainingReply(reply, residual)
