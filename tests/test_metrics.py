"""The evaluators on hand-worked cases, edge cases, and against the per-query loop that sorts every row."""

from __future__ import annotations

import numpy as np
import pytest

import torch

from reid.metrics import evaluate_features, evaluate_rank, evaluate_rank_reference

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


def _labelled_problem(rng: np.random.Generator, num_q: int, num_g: int, cameras: int) -> tuple[np.ndarray, ...]:
    """Integer-valued features (so 1 - q.g is exact in float32 and equal distances are common), the
    gallery with junk (-1) and distractor (0) identities beside the queries' own."""
    q_feats = rng.integers(0, 3, (num_q, 4)).astype(np.float32)
    g_feats = rng.integers(0, 3, (num_g, 4)).astype(np.float32)
    q_pids = rng.integers(1, 15, num_q)
    g_pids = np.where(rng.random(num_g) < 0.2, rng.integers(-1, 1, num_g), rng.integers(1, 15, num_g))
    return q_feats, g_feats, q_pids, g_pids, rng.integers(1, cameras + 1, num_q), rng.integers(1, cameras + 1, num_g)


@pytest.mark.parametrize("cameras", [1, 2, 5])  # one camera: a query of that camera has nothing to find
@pytest.mark.parametrize("chunk_elements", [5, 900, 1 << 24])
def test_ranking_only_the_matches_equals_sorting_every_row_with_ties_junk_and_one_camera(
        cameras: int, chunk_elements: int) -> None:
    """evaluate_features (distances from the features, chunk by chunk) and evaluate_rank (a given
    matrix) against the per-query loop that sorts every row, on problems full of exact ties."""
    rng = np.random.default_rng(cameras)
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = _labelled_problem(rng, 70, 300, cameras)
    if cameras == 1:
        q_cams[: len(q_cams) // 2] = 2  # half the queries from a camera the gallery does not have
    distmat = 1.0 - q_feats @ g_feats.T
    assert len(np.unique(distmat)) < 20  # ties everywhere
    loop = evaluate_rank_reference(distmat, q_pids, g_pids, q_cams, g_cams)
    for result in (evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, chunk_elements=chunk_elements),
                   evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, chunk_elements=chunk_elements),
                   evaluate_features(torch.from_numpy(q_feats), torch.from_numpy(g_feats), q_pids, g_pids, q_cams,
                                     g_cams)):
        np.testing.assert_array_equal(result.cmc, loop.cmc)
        assert (result.num_valid_queries, result.num_skipped_queries) == (loop.num_valid_queries,
                                                                        loop.num_skipped_queries)
        for metric in ("mAP", "mINP", "mAP_market"):
            assert getattr(result, metric) == pytest.approx(getattr(loop, metric), abs=1e-12), metric
    if cameras == 1:
        assert loop.num_skipped_queries >= len(q_cams) // 2


def test_equal_distances_rank_the_earlier_gallery_entry_first() -> None:
    """The tie rule: at exactly the same distance the smaller gallery index comes first, so a
    match tied with a non-match before it ranks second, and after it, first."""
    distmat = np.array([[0.5, 0.5, 0.9], [0.5, 0.5, 0.9]], dtype=np.float32)
    g_pids, g_cams = np.array([7, 1, 1]), np.array([2, 2, 2])
    q_pids, q_cams = np.array([1, 7]), np.array([1, 1])
    for evaluate in (evaluate_rank, evaluate_rank_reference):
        result = evaluate(distmat, q_pids, g_pids, q_cams, g_cams)
        assert result.rank(1) == 0.5  # query 0's first match (g1) is second; query 1's (g0) is first
        assert result.mAP == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1.0) / 2)
    negative_zero = evaluate_rank(np.array([[0.0, -0.0]], dtype=np.float32), np.array([1]), np.array([2, 1]),
                                  np.array([1]), np.array([2, 2]))
    assert negative_zero.rank(1) == 0.0  # -0.0 equals 0.0: a tie, and g0 comes first
