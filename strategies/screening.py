"""Turning away updates that are well-formed but absurd: a model change far larger than the other
sites' (every weight x1e6, a site whose loss diverged), or a training-set size no site could have.

Validation (strategies/validation.py) catches what is malformed: wrong keys, shapes, dtypes, NaN.
This module catches what is finite and well-shaped but wild, by comparing each upload with the
other uploads of the same round:

* **change norm**: s_k = ||x_k - g_k|| / sqrt(n_k), the L2 distance between site k's upload and the
  model the server sent it (over float tensors; a pruned tensor counts only its kept elements),
  per square root of its training images. Site k is turned away when s_k exceeds ``max_norm_ratio``
  times the median of the *other* sites' scores (leave-one-out, so one wild site cannot raise
  its own bar, and two sites check each other). Dividing by sqrt(n_k) keeps big and small honest
  sites comparable: on the FedReID benchmark one local epoch is 7 steps on iLIDS and 1,019 on
  MSMT17, and the change grows with the number of steps. Honest sites still differ by up to 25x
  under partial participation: a site's first round starts from a fresh classifier (std 0.001)
  that passes little gradient to the backbone, a returning site's classifier passes a lot
  (measured: 100 tiny simulated sites, a tenth per round, 15 rounds). The default bound, 100x,
  sits above that and far below what a wild update scores (x1e6 weights, a diverged loss: 1e4x
  and more).
* **num-examples**: over ``max_examples``, or more than ``examples_growth`` times the most the same
  site has reported before, is turned away (that number sets how much a site counts).

With ``action="clip"`` a site over the norm bound is not turned away but pulled back onto it:
x = g + (x - g) * bound / s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from strategies.sparse_records import Tensor

SCREEN_ACTIONS = ("reject", "clip")


@dataclass(frozen=True)
class ScreenSpec:
    """How wild an update may be before it is turned away (``algorithm.screen`` in conf/)."""

    enabled: bool = True
    max_norm_ratio: float = 100.0
    action: str = "reject"
    max_examples: int = 10_000_000
    examples_growth: float = 1.1

    def __post_init__(self) -> None:
        if self.action not in SCREEN_ACTIONS:
            raise ValueError(f"screen action must be one of {SCREEN_ACTIONS}, got {self.action!r}")
        if self.max_norm_ratio <= 1 or self.examples_growth < 1 or self.max_examples < 1:
            raise ValueError(f"screen bounds must be max_norm_ratio > 1, examples_growth >= 1, max_examples >= 1; "
                             f"got {self}")


NORM_BLOCK = 1 << 16  # elements per block: a block's float64 difference stays in the CPU cache


def change_norm(tensors: Mapping[str, "Tensor"], sent: Mapping[str, np.ndarray]) -> float:
    """||upload - sent|| over every float tensor, in float64; a pruned tensor counts only the
    elements its site kept (the pruned ones are not an update, they are absent).

    Block by block: a whole-tensor float64 difference of a 5 M-value model is 40 MB that leaves the
    cache before it is summed; in blocks the same sum took 13 ms instead of 59 (this box). Squared
    and summed with ufuncs, not ``np.dot``: OpenBLAS's threads busy-wait after every dot product,
    and on the 2-core test server they burned about half a CPU-second a round (perf)."""
    total = 0.0
    scratch = np.empty(NORM_BLOCK, dtype=np.float64)
    for key, tensor in tensors.items():
        values = tensor.values
        if values.dtype.kind != "f":
            continue
        flat, base = np.ascontiguousarray(values).reshape(-1), np.ascontiguousarray(sent[key]).reshape(-1)
        kept = None if tensor.mask is None else np.ascontiguousarray(tensor.mask).reshape(-1).astype(bool, copy=False)
        for start in range(0, flat.size, NORM_BLOCK):
            stop = min(start + NORM_BLOCK, flat.size)
            difference = np.subtract(flat[start:stop], base[start:stop], out=scratch[: stop - start],
                                     dtype=np.float64)  # no float64 copies of the inputs
            if kept is not None:
                difference = difference[kept[start:stop]]
            np.multiply(difference, difference, out=difference)
            total += float(difference.sum())  # not np.dot: BLAS's threads spun 0.5 CPU-s a round after it
    return float(np.sqrt(total))


def leave_one_out_medians(scores: Sequence[float]) -> list[float | None]:
    """For each score, the median of all the others (None when there is no other)."""
    values = list(scores)
    return [float(np.median(values[:k] + values[k + 1:])) if len(values) > 1 else None for k in range(len(values))]


@dataclass(frozen=True)
class NormVerdict:
    """What screening decided for one upload: keep it, clip it by ``scale``, or turn it away."""

    score: float
    bound: float | None  # None: nothing to compare with (a round with one upload)
    reason: str | None = None  # set: turned away
    scale: float = 1.0  # < 1: the change is pulled back onto the bound


def judge_norms(scores: Sequence[float], spec: ScreenSpec) -> list[NormVerdict]:
    """Each upload's verdict against the median of the other uploads' scores."""
    verdicts = []
    for score, median in zip(scores, leave_one_out_medians(scores)):
        if median is None or median <= 0:  # alone, or the others did not move: nothing to compare with
            verdicts.append(NormVerdict(score, None))
            continue
        bound = spec.max_norm_ratio * median
        if score <= bound or not spec.enabled:
            verdicts.append(NormVerdict(score, bound))
        elif spec.action == "clip":
            verdicts.append(NormVerdict(score, bound, scale=bound / score))
        else:
            verdicts.append(NormVerdict(score, bound, reason=(
                f"update too large: its change from the model sent is {score / median:.3g} x the median of the other "
                f"sites' (per sqrt of training images; at most {spec.max_norm_ratio:g} x is accepted)")))
    return verdicts


def clip_change(tensors: Mapping[str, "Tensor"], sent: Mapping[str, np.ndarray], scale: float) -> dict[str, "Tensor"]:
    """The upload pulled towards what was sent: g + (x - g) * scale on float tensors (kept elements only)."""
    from strategies.sparse_records import Tensor

    clipped = {}
    for key, tensor in tensors.items():
        if tensor.values.dtype.kind != "f":
            clipped[key] = tensor
            continue
        base = np.asarray(sent[key], dtype=tensor.values.dtype)
        values = base + (tensor.values - base) * tensor.values.dtype.type(scale)
        if tensor.mask is not None:
            values = np.where(tensor.mask.astype(bool), values, 0).astype(tensor.values.dtype)
        clipped[key] = Tensor(values, tensor.mask)
    return clipped


class ExampleLedger:
    """The most training images each site has reported, so that a sudden claim stands out."""

    def __init__(self, spec: ScreenSpec) -> None:
        self.spec = spec
        self.most: dict[str, float] = {}

    def check(self, site: str, count: float) -> str | None:
        """Why ``count`` is not believable for ``site``, or None."""
        if not self.spec.enabled:
            return None
        if count > self.spec.max_examples:
            return f"claims {count:g} training images, more than the configured maximum {self.spec.max_examples}"
        before = self.most.get(site)
        if before is not None and count > self.spec.examples_growth * before:
            return (f"claims {count:g} training images, more than {self.spec.examples_growth:g} x the {before:g} "
                    f"it reported before")
        return None

    def record(self, site: str, count: float) -> None:
        self.most[site] = max(count, self.most.get(site, 0.0))
