"""bench/feddg_benchmark.py's numbers from run histories: the protocols and the two groups of held-out
sites kept apart, and differences paired per (data seed, training seed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import feddg_benchmark  # noqa: E402

from reid.data import fedreid9  # noqa: E402


def _history(source_only: float, adapted: float, train: float) -> list[dict]:
    def sites(value: float) -> dict:
        return {name: {"mAP": value + (0.1 if name in fedreid9.OUT_OF_RANGE else 0.0), "rank1": value}
                for name in fedreid9.HELD_OUT}

    last = {"round": 20, "evaluate": {"sites": {"market": {"mAP": train}, "duke": {"mAP": train + 0.2}}},
            "unseen": {"source-only": {"sites": sites(source_only)}, "target-adapted": {"sites": sites(adapted)},
                       "failed": []}}
    return [{"round": 15, "evaluate": {"sites": {"market": {"mAP": 0.0}}}}, last, {"round": 21, "evaluate": None}]


def test_the_summary_keeps_protocols_and_groups_apart_and_differences_are_paired() -> None:
    base = [feddg_benchmark.summary(_history(0.2, 0.3, 0.5)), feddg_benchmark.summary(_history(0.25, 0.3, 0.5))]
    other = [feddg_benchmark.summary(_history(0.24, 0.3, 0.5)), feddg_benchmark.summary(_history(0.25, 0.35, 0.6))]
    first = base[0]
    assert first["round"] == 20 and first["train"] == pytest.approx(0.6)
    assert first["in/source-only"] == pytest.approx(0.2) and first["out/source-only"] == pytest.approx(0.3)
    assert first["in/target-adapted"] == pytest.approx(0.3) and first["out/target-adapted"] == pytest.approx(0.4)
    # +4 and 0 points in-distribution source-only: mean +2.0, sd 2.8, range +0.0 to +4.0
    assert feddg_benchmark.paired(base, other, "in", "source-only") == "+2.0 ± 2.8 (+0.0 to +4.0)"
    text = feddg_benchmark.table({"fedpav": base, "feddg": other}, [(0, 0), (0, 1)], 20)
    assert "| feddg - fedpav | +5.0 ± 7.1" in text and "in-distribution, source-only" in text
