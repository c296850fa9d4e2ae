"""Checks on what a site sends back, so one bad update is rejected with a reason, not aggregated.

A reply is checked against the arrays the server sent that round: same keys, same shapes, a
floating dtype, finite values, plus the records the protocol expects. The first problem found is
returned as a sentence for the log; None means the reply is acceptable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
SITE_KEY = "site"


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


def check_arrays(arrays: ArrayRecord, expected: dict[str, ArraySpec]) -> str | None:
    """Reason the arrays differ from ``expected`` (keys, shapes, dtypes, finiteness), or None."""
    missing = expected.keys() - arrays.keys()
    if missing:
        return f"missing arrays: {_describe(missing)}"
    extra = arrays.keys() - expected.keys()
    if extra:
        return f"unexpected arrays: {_describe(extra)}"
    for key, spec in expected.items():
        array = arrays[key]
        if tuple(array.shape) != spec.shape:
            return f"array {key} has shape {tuple(array.shape)}, expected {spec.shape}"
        try:
            values = array.numpy()
        except Exception as error:  # undecodable bytes
            return f"array {key} cannot be decoded: {error}"
        if values.dtype != spec.dtype:
            return f"array {key} has dtype {values.dtype}, expected {spec.dtype}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array {key} holds non-finite values"
    return None


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
    message: Message, expected: dict[str, ArraySpec], weight_key: str, required_metrics: Iterable[str] = ()
) -> str | None:
    """Everything a FedPav training reply must satisfy; the first violation as a sentence."""
    if message.has_error():
        return f"the site reported an error: {message.error.reason}"
    content = message.content
    reason = check_record_names(content, {ARRAYS_KEY, METRICS_KEY, SITE_KEY}, {ARRAYS_KEY, METRICS_KEY})
    if reason:
        return reason
    if not isinstance(content[ARRAYS_KEY], ArrayRecord) or not isinstance(content[METRICS_KEY], MetricRecord):
        return "records 'arrays'/'metrics' have the wrong record types"
    return (check_metrics(content[METRICS_KEY], [weight_key, *required_metrics], positive=[weight_key])
            or check_arrays(content[ARRAYS_KEY], expected))


def check_evaluate_reply(message: Message, required_metrics: Iterable[str]) -> str | None:
    """Everything an evaluation reply must satisfy; the first violation as a sentence."""
    if message.has_error():
        return f"the site reported an error: {message.error.reason}"
    content = message.content
    reason = check_record_names(content, {METRICS_KEY, SITE_KEY}, {METRICS_KEY})
    if reason:
        return reason
    if not isinstance(content[METRICS_KEY], MetricRecord):
        return "record 'metrics' has the wrong record type"
    return check_metrics(content[METRICS_KEY], required_metrics)
