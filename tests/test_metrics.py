"""evaluate_rank on hand-worked cases, edge cases, and against the per-query loop on random data."""

from __future__ import annotations

import numpy as np
import pytest

from reid.metrics import evaluate_rank, evaluate_rank_reference

BOTH = pytest.mark.parametrize("evaluate", [evaluate_rank, evaluate_rank_reference], ids=["vectorised", "loop"])


@BOTH
def test_hand_worked_single_query(evaluate) -> None:
    # kept ranking after removing the same-pid same-camera entry g1: g0(-), g2(+), g3(-), g4(+)
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    g_pids = np.array([2, 1, 1, 3, 1])
    g_cams = np.array([2, 1, 2, 1, 3])
    result = evaluate(distmat, np.array([1]), g_pids, np.array([1]), g_cams)
    np.testing.assert_allclose(result.cmc, [0, 1, 1, 1, 1])  # max_rank lowered to the gallery size
    assert result.rank(1) == 0.0 and result.rank(5) == 1.0 and result.rank(10) == 1.0
    assert result.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert result.mINP == pytest.approx(2 / 4)
    # Market-1501 trapezoid: each hit adds 1/2 x (precision before + precision at) / 2
    assert result.mAP_market == pytest.approx(0.5 * (0 + 1 / 2) / 2 + 0.5 * (1 / 3 + 2 / 4) / 2)


@BOTH
def test_cmc_and_map_average_over_valid_queries_only(evaluate) -> None:
    distmat = np.array([
        [0.1, 0.9, 0.5, 0.7],  # pid 1: positive first
        [0.1, 0.2, 0.3, 0.4],  # pid 2: positive (g3) third after g0, g1 (g2 same cam removed)
        [0.4, 0.3, 0.2, 0.1],  # pid 9: not in the gallery -> skipped
    ], dtype=np.float32)
    q_pids, q_cams = np.array([1, 2, 9]), np.array([1, 1, 1])
    g_pids, g_cams = np.array([1, 5, 2, 2]), np.array([2, 2, 1, 3])
    result = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    assert result.num_valid_queries == 2 and result.num_skipped_queries == 1
    np.testing.assert_allclose(result.cmc, [0.5, 0.5, 1.0])
    assert result.mAP == pytest.approx((1.0 + 1 / 3) / 2)
    assert result.mINP == pytest.approx((1.0 + 1 / 3) / 2)
    assert result.mAP_market == pytest.approx((1.0 + (0 + 1 / 3) / 2 + 0.0) / 3)  # the skipped query counts 0


@BOTH
def test_short_kept_list_is_padded_with_its_last_value(evaluate) -> None:
    # two of three gallery entries are same-pid same-camera: the query keeps a list of length 1
    distmat = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]], dtype=np.float32)
    q_pids, q_cams = np.array([1, 4]), np.array([1, 2])
    g_pids, g_cams = np.array([1, 1, 1]), np.array([1, 1, 2])
    result = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    assert result.num_valid_queries == 1
    np.testing.assert_allclose(result.cmc, [1, 1, 1])
    assert result.mAP == pytest.approx(1.0)


@BOTH
def test_no_valid_query_is_a_clear_error(evaluate) -> None:
    distmat = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="no valid query"):
        evaluate(distmat, np.array([1, 9]), np.array([1, 2, 3]), np.array([1, 1]), np.array([1, 5, 5]))


def test_inputs_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="q_pids must have shape"):
        evaluate_rank(np.zeros((2, 3)), np.array([1]), np.array([1, 2, 3]), np.array([1, 1]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(np.zeros(3), np.array([1]), np.array([1, 2, 3]), np.array([1]), np.array([1, 2, 3]))


@pytest.mark.parametrize("chunk_elements", [7, 1000, 1 << 24])
def test_vectorised_equals_loop_on_random_problems_with_ties(chunk_elements: int) -> None:
    rng = np.random.default_rng(3)
    num_q, num_g = 60, 400
    q_pids, g_pids = rng.integers(0, 40, num_q), rng.integers(0, 40, num_g)
    q_cams, g_cams = rng.integers(1, 5, num_q), rng.integers(1, 5, num_g)
    distmat = rng.integers(0, 30, (num_q, num_g)).astype(np.float32)  # many exact ties
    fast = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, chunk_elements=chunk_elements)
    slow = evaluate_rank_reference(distmat, q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_array_equal(fast.cmc, slow.cmc)
    assert fast.mAP == pytest.approx(slow.mAP, abs=1e-12)
    assert fast.mINP == pytest.approx(slow.mINP, abs=1e-12)
    assert fast.mAP_market == pytest.approx(slow.mAP_market, abs=1e-12)
    assert fast.num_valid_queries == slow.num_valid_queries


def test_perfect_and_reversed_rankings() -> None:
    q_pids, q_cams = np.array([1, 2]), np.array([1, 1])
    g_pids, g_cams = np.array([1, 2, 3, 4]), np.array([2, 2, 2, 2])
    perfect = np.array([[0, 1, 2, 3], [1, 0, 2, 3]], dtype=np.float32)
    assert evaluate_rank(perfect, q_pids, g_pids, q_cams, g_cams).mAP == 1.0
    worst = np.array([[3, 0, 1, 2], [0, 3, 1, 2]], dtype=np.float32)
    result = evaluate_rank(worst, q_pids, g_pids, q_cams, g_cams)
    assert result.rank(1) == 0.0 and result.rank(3) == 0.0 and result.rank(4) == 1.0
    assert result.mAP == pytest.approx(0.25) and result.mINP == pytest.approx(0.25)
