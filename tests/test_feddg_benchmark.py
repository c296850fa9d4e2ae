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


def test_the_leave_one_out_table_pairs_methods_per_held_out_site_and_seed() -> None:
    """Two folds x two seeds: feddg is +2, +4 (market) and -1, +3 (duke) points source-only; the
    target-adapted pairs are all +1."""
    import fedreid9_tables

    def fold(site: str, source_only: list[float], adapted: list[float]) -> dict:
        unseen = {site: {"rank1": 0.1, "mAP": float(sum(adapted) / len(adapted))}}
        return {"unseen": unseen, "unseen_mean_seeds": adapted,
                "source-only": {"unseen": {site: {"rank1": 0.1, "mAP": float(sum(source_only) / 2)}},
                                "unseen_mean_seeds": source_only}}

    results = {"fedpav": [fold("market", [0.20, 0.20], [0.3, 0.3]), fold("duke", [0.10, 0.10], [0.2, 0.2])],
               "feddg": [fold("market", [0.22, 0.24], [0.31, 0.31]), fold("duke", [0.09, 0.13], [0.21, 0.21])]}
    text = fedreid9_tables.leave_one_out_table(results, ["market", "duke"])
    assert "feddg - fedpav, source-only, paired over 4 (held-out site, seed) pairs: +2.0 ± 2.2 mAP points " \
           "(-1.0 to +4.0)." in text
    assert "feddg - fedpav, target-adapted, paired over 4 (held-out site, seed) pairs: +1.0 ± 0.0" in text


def test_the_reason_bench_splits_the_spread_between_data_seeds_and_training_seeds() -> None:
    import feddg_reason

    # data seed 0 gains +1, +2, +3; data seed 1 gains +7, +8, +9: the data seeds' means differ by 6
    total, between, within = feddg_reason.spread_split({0: [1.0, 2.0, 3.0], 1: [7.0, 8.0, 9.0]})
    assert between == pytest.approx(6 / 2 ** 0.5) and within == pytest.approx(1.0)
    assert total == pytest.approx((58 / 5) ** 0.5)  # squared deviations from 5: 16 + 9 + 4 + 4 + 9 + 16
    assert feddg_reason.spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    assert feddg_reason.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
