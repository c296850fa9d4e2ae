"""Checks on what a site sends back, so one bad update is rejected with a reason, not aggregated.

A reply is checked against the arrays the server sent that round: same keys, same shapes, the same
dtype (or a well-formed sparse encoding), finite values, plus the records the protocol expects.
The first problem found is returned as a sentence for the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies.packing import PackingError, unpack_record
from strategies.sparse_codec import SparseFormatError
from strategies.sparse_records import Tensor, decode_record
from strategies.update_codec import UpdateFormatError

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
SITE_KEY = "site"
EVALUATION_KEY = "evaluation"  # a training reply's evaluation of the model it received, when asked for
TIMING_KEY = "timing"  # a reply's wall-clock spans of the site's work (server/timing.py); optional
EVALUATE_ROUND_KEY = "evaluate-round"  # round config: evaluate the received model (of that round) first
RUN_TAG_KEY = "run-tag"  # round config: names the run (the server's output folder); sites key their saved state by it
RUN_FOLDER_KEY = "run-folder"  # round config: the run folder, where a simulated site writes its model (deployed: ignored)
ALGORITHM_KEY = "algorithm"  # round config: the preset's name, recorded in each site's model
STYLE_KEY = "style"  # a training reply's shared style statistics (feddg): one [cameras, D] array
STYLE_BANK_KEY = "style-bank"  # a training message's styles of the other sites: one [rows, D] array
MAX_STYLE_ROWS = 256  # cameras a site's style may describe
MAX_STYLE_WIDTH = 4096
BN_STATS_KEY = "bn-stats"  # a training reply's BatchNorm running statistics, for source-only held-out evaluation
SHARE_BN_KEY = "share-bn-stats"  # round config: send them (the run ranks held-out sites source-only)
BN_STATS_SUFFIXES = (".running_mean", ".running_var")
UNSEEN_PROTOCOL_KEY = "unseen-protocol"  # a held-out site's evaluate config: how it ranks (below)
SOURCE_ONLY = "source-only"  # no target data before ranking: BatchNorm statistics from the federation
TARGET_ADAPTED = "target-adapted"  # AdaBN on the held-out site's own unlabelled training images first
UNSEEN_PROTOCOLS = (SOURCE_ONLY, TARGET_ADAPTED)


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype one array must have."""

    shape: tuple[int, ...]
    dtype: np.dtype


def expected_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """What every reply must match: the keys, shapes and dtypes of the arrays sent out."""
    return {key: ArraySpec(tuple(array.shape), np.dtype(array.dtype)) for key, array in arrays.items()}


def _describe(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


Decoder = Callable[[ArrayRecord, dict[str, tuple[int, ...]]], dict[str, Tensor]]
"""(unpacked arrays, expected shapes) -> decoded tensors; raises with the reason when they do not decode."""


def check_arrays(arrays: ArrayRecord, expected: dict[str, ArraySpec],
                 decode: Decoder = decode_record) -> tuple[dict[str, Tensor] | None, str | None]:
    """Decode the arrays and check them against ``expected`` (keys, shapes, dtypes, finiteness).

    Returns (decoded tensors, None) or (None, the first problem as a sentence). The record may come
    packed (strategies/packing.py); a tensor may come dense, sparse-encoded (a uint8 blob) when it
    was pruned, or as a compressed change that ``decode`` rebuilds on the model the node was sent.
    """
    try:
        arrays = unpack_record(arrays)
    except PackingError as error:
        return None, f"malformed packed arrays: {error}"
    missing = expected.keys() - arrays.keys()
    if missing:
        return None, f"missing arrays: {_describe(missing)}"
    extra = arrays.keys() - expected.keys()
    if extra:
        return None, f"unexpected arrays: {_describe(extra)}"
    for key, spec in expected.items():
        array = arrays[key]
        if np.dtype(array.dtype) != np.uint8 and tuple(array.shape) != spec.shape:
            return None, f"array {key} has shape {tuple(array.shape)}, expected {spec.shape}"
    try:
        tensors = decode(arrays, {key: spec.shape for key, spec in expected.items()})
    except UpdateFormatError as error:
        return None, f"malformed compressed change: {error}"
    except (SparseFormatError, ValueError) as error:
        return None, f"undecodable arrays: {error}"
    for key, spec in expected.items():
        values = tensors[key].values
        if tensors[key].mask is None and values.dtype != spec.dtype:
            return None, f"array {key} has dtype {values.dtype}, expected {spec.dtype}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return None, f"array {key} holds non-finite values"
    return tensors, None


def check_metrics(metrics: MetricRecord, required: Iterable[str], positive: Iterable[str] = ()) -> str | None:
    """Reason a metric record lacks a required finite scalar (or a required positive one), or None."""
    for key in required:
        if key not in metrics:
            return f"metric {key!r} missing"
        value = metrics[key]
        if isinstance(value, list) or not np.isfinite(float(value)):
            return f"metric {key!r} is not a finite scalar: {value!r}"
    for key in positive:
        if float(metrics[key]) <= 0:
            return f"metric {key!r} must be positive, got {metrics[key]!r}"
    return None


def check_record_names(content: RecordDict, allowed: set[str], required: set[str]) -> str | None:
    """Reason the reply carries unknown records or lacks required ones, or None."""
    unknown = set(content.keys()) - allowed
    if unknown:
        return f"unexpected records in reply: {_describe(unknown)}"
    absent = required - set(content.keys())
    if absent:
        return f"reply lacks records: {_describe(absent)}"
    return None


def check_train_reply(
    message: Message, expected: dict[str, ArraySpec], weight_key: str, required_metrics: Iterable[str] = (),
    decode: Decoder = decode_record,
) -> tuple[dict[str, Tensor] | None, str | None]:
    """Everything a training reply must satisfy: (decoded tensors, None) or (None, the first violation)."""
    if message.has_error():
        return None, f"the site reported an error: {message.error.reason}"
    content = message.content
    reason = check_record_names(content, {ARRAYS_KEY, METRICS_KEY, SITE_KEY, EVALUATION_KEY, STYLE_KEY, TIMING_KEY,
                                          BN_STATS_KEY}, {ARRAYS_KEY, METRICS_KEY})
    if reason:
        return None, reason
    if not isinstance(content[ARRAYS_KEY], ArrayRecord) or not isinstance(content[METRICS_KEY], MetricRecord):
        return None, "records 'arrays'/'metrics' have the wrong record types"
    reason = check_metrics(content[METRICS_KEY], [weight_key, *required_metrics], positive=[weight_key])
    if reason:
        return None, reason
    return check_arrays(content[ARRAYS_KEY], expected, decode)


def check_evaluate_reply(message: Message, required_metrics: Iterable[str]) -> str | None:
    """Everything an evaluation reply must satisfy; the first violation as a sentence."""
    if message.has_error():
        return f"the site reported an error: {message.error.reason}"
    content = message.content
    reason = check_record_names(content, {METRICS_KEY, SITE_KEY, TIMING_KEY}, {METRICS_KEY})
    if reason:
        return reason
    if not isinstance(content[METRICS_KEY], MetricRecord):
        return "record 'metrics' has the wrong record type"
    return check_metrics(content[METRICS_KEY], required_metrics)


def check_carried_evaluation(message: Message, required_metrics: Iterable[str]) -> str | None:
    """What a training reply's carried evaluation must satisfy; the first violation as a sentence."""
    if message.has_error():
        return f"the site reported an error: {message.error.reason}"
    record = message.content.get(EVALUATION_KEY) if EVALUATION_KEY in message.content.keys() else None
    if record is None:
        return "the training reply carries no evaluation of the model it was sent"
    if not isinstance(record, MetricRecord):
        return f"record {EVALUATION_KEY!r} has the wrong record type"
    return check_metrics(record, required_metrics)


def check_style(style: np.ndarray, width: int | None = None) -> str | None:
    """Why ``style`` is not a well-formed shared style ([rows, D] finite floats, one row per camera,
    D as the other sites' when given), or None. What the numbers mean is the site code's business."""
    if style.ndim != 2 or not 0 < style.shape[0] <= MAX_STYLE_ROWS or not 0 < style.shape[1] <= MAX_STYLE_WIDTH:
        return f"a style is a [cameras <= {MAX_STYLE_ROWS}, D] array, got shape {list(style.shape)}"
    if width is not None and style.shape[1] != width:
        return f"a style has the other sites' width {width}, not {style.shape[1]}"
    if not np.issubdtype(style.dtype, np.floating) or not np.isfinite(style).all():
        return "a style holds finite floats only"
    return None


def reply_bn_stats(message: Message) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(the training reply's BatchNorm running statistics, None), (None, None) when it carries none,
    or (None, why they are malformed): running means and variances only, finite, variances >= 0."""
    if BN_STATS_KEY not in message.content.keys():
        return None, None
    record = message.content[BN_STATS_KEY]
    if not isinstance(record, ArrayRecord) or not len(record):
        return None, f"record {BN_STATS_KEY!r} must be a non-empty ArrayRecord"
    stats = {}
    for key, array in record.items():
        if not key.endswith(BN_STATS_SUFFIXES):
            return None, f"{key!r} is not a BatchNorm running statistic"
        values = array.numpy()
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
            return None, f"{key!r} must be a 1-D array of finite floats"
        if key.endswith(".running_var") and (values < 0).any():
            return None, f"{key!r} holds a negative variance"
        stats[key] = values
    return stats, None


def reply_style(message: Message) -> tuple[np.ndarray | None, str | None]:
    """(the training reply's style, None), (None, None) when it carries none, or (None, why it is malformed)."""
    if STYLE_KEY not in message.content.keys():
        return None, None
    record = message.content[STYLE_KEY]
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [STYLE_KEY]:
        return None, f"record {STYLE_KEY!r} must be an ArrayRecord holding one array {STYLE_KEY!r}"
    style = record[STYLE_KEY].numpy()
    reason = check_style(style)
    return (None, reason) if reason else (style, None)
