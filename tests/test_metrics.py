"""Metrics against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    EnrolledScores,
    cosine_similarity,
    equal_error_rate,
    pair_scores,
    retrieval_scores,
    roc_auc,
    threshold_for_false_match_rate,
    verification_scores,
)

# Four items: a, a, b, b; R = 1 for every query, so AP@R equals P@1.
#  item 0 ranks 2(b) 0.9, 1(a) 0.8, 3(b) 0.1 -> miss
#  item 1 ranks 0(a) 0.8, 3(b) 0.7, 2(b) 0.3 -> hit
#  item 2 ranks 0(a) 0.9, 3(b) 0.6, 1(a) 0.3 -> miss
#  item 3 ranks 1(a) 0.7, 2(b) 0.6, 0(a) 0.1 -> miss
SIM = np.array(
    [
        [1.0, 0.8, 0.9, 0.1],
        [0.8, 1.0, 0.3, 0.7],
        [0.9, 0.3, 1.0, 0.6],
        [0.1, 0.7, 0.6, 1.0],
    ]
)
LABELS = ["a", "a", "b", "b"]


def test_precision_at_one_and_map_at_r() -> None:
    scores = retrieval_scores(SIM, LABELS)
    assert scores.p_at_1 == pytest.approx(0.25)
    assert scores.map_at_r == pytest.approx(0.25)
    assert scores.queries == 4


def test_map_at_r_counts_precision_at_each_relevant_rank() -> None:
    # three of class a: query 0 ranks 3(b), 1(a), 2(a) among R=2 -> hits [0, 1] -> AP = (1/2)/2
    sim = np.array(
        [
            [1.0, 0.5, 0.4, 0.9],
            [0.5, 1.0, 0.8, 0.0],
            [0.4, 0.8, 1.0, 0.0],
            [0.9, 0.0, 0.0, 1.0],
        ]
    )
    labels = ["a", "a", "a", "b"]
    scores = retrieval_scores(sim, labels)
    # query 0: AP 0.25, P@1 0; query 1: ranks 2(a),0(a) -> AP 1; query 2: ranks 1,0 -> AP 1;
    # query 3: no other b -> left out
    assert scores.queries == 3
    assert scores.p_at_1 == pytest.approx(2 / 3)
    assert scores.map_at_r == pytest.approx((0.25 + 1 + 1) / 3)


def test_excluded_items_are_hidden_from_queries() -> None:
    exclude = np.zeros((4, 4), dtype=bool)
    # hide each query's best impostor: every query then finds its own class first
    exclude[0, 2] = exclude[2, 0] = exclude[3, 1] = True
    scores = retrieval_scores(SIM, LABELS, exclude=exclude)
    assert scores.p_at_1 == pytest.approx(1.0)


def test_roc_auc_by_hand() -> None:
    scores, genuine = pair_scores(SIM, LABELS)
    # genuine pairs: (0,1)=0.8, (2,3)=0.6; impostors: 0.9, 0.1, 0.3, 0.7
    # P(genuine > impostor): 0.8 beats 3 of 4, 0.6 beats 2 of 4 -> 5/8
    assert sorted(scores[genuine].tolist()) == [0.6, 0.8]
    assert roc_auc(scores, genuine) == pytest.approx(5 / 8)
    ties = np.array([0.5, 0.5])
    assert roc_auc(ties, np.array([True, False])) == pytest.approx(0.5)


def test_equal_error_rate_separable_and_not() -> None:
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    genuine = np.array([True, True, False, False])
    eer, threshold = equal_error_rate(scores, genuine)
    assert eer == pytest.approx(0.0)
    assert 0.2 < threshold <= 0.8
    flipped_eer, _ = equal_error_rate(scores, ~genuine)
    assert flipped_eer == pytest.approx(1.0)
    half = verification_scores(SIM, LABELS)
    assert half.genuine_pairs == 2 and half.impostor_pairs == 4
    assert 0.0 <= half.eer <= 1.0


def test_threshold_for_a_false_match_rate() -> None:
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    genuine = np.array([True, False, False, False, False, False])
    # five impostors: a 20% rate allows one above the threshold
    t = threshold_for_false_match_rate(scores, genuine, 0.2)
    assert (scores[~genuine] >= t).sum() == 1
    assert threshold_for_false_match_rate(scores, genuine, 0.0) > 0.9


def test_cosine_similarity_is_scale_free() -> None:
    vectors = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    sim = cosine_similarity(vectors)
    np.testing.assert_allclose(sim, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-6)


def test_the_margin_flags_at_most_the_asked_share_of_correctly_filed_images() -> None:
    from training.metrics import margin_for_gaps, misfiling_gaps

    def margin_for_false_alarm_rate(
        similarity: np.ndarray, labels: list[str], rate: float
    ) -> float:
        return margin_for_gaps(misfiling_gaps(similarity, labels), rate)

    # Other identity's best minus the own identity's best: 0.1, -0.1, 0.3, 0.1.
    labels = ["a", "a", "b", "b"]
    gaps = np.array([0.9 - 0.8, 0.7 - 0.8, 0.9 - 0.6, 0.7 - 0.6])

    def flagged(rate: float) -> int:
        return int((gaps >= margin_for_false_alarm_rate(SIM, labels, rate)).sum())

    assert margin_for_false_alarm_rate(SIM, labels, 0.25) == pytest.approx(0.1)
    assert flagged(0.25) == 1  # item 2 alone
    assert flagged(0.0) == 0
    # Ties stay on the safe side: flagging both 0.1 gaps would be 3 in 4.
    assert flagged(0.5) == 1
    with pytest.raises(ValueError, match="two images"):
        margin_for_false_alarm_rate(np.eye(2), ["a", "b"], 0.01)


def test_gaps_pooled_from_two_sets_give_the_margin_of_the_pooled_share() -> None:
    from training.metrics import margin_for_gaps, misfiling_gaps

    labels = ["a", "a", "b", "b"]
    np.testing.assert_allclose(sorted(misfiling_gaps(SIM, labels)), [-0.1, 0.1, 0.1, 0.3])
    pooled = np.r_[misfiling_gaps(SIM, labels), [-0.5, -0.4, -0.3, -0.2]]
    # 1 in 8 may reach the margin: the highest gap alone
    assert margin_for_gaps(pooled, 1 / 8) == pytest.approx(0.1)
    assert (pooled >= margin_for_gaps(pooled, 1 / 8)).sum() == 1
    with pytest.raises(ValueError, match="two images"):
        margin_for_gaps([], 0.01)


def test_stranger_thresholds_hold_the_best_of_a_gallery_to_the_rate() -> None:
    import math

    from training.metrics import stranger_thresholds, threshold_for_false_match_rate

    rng = np.random.default_rng(0)
    impostors = rng.normal(0.0, 0.1, 200_000)
    found = stranger_thresholds(impostors, 0.01)
    sizes, scores = found["gallery_sizes"], found["scores"]
    assert sizes[:4] == [1, 2, 5, 10] and scores == sorted(scores)
    assert found["stranger_pairs"] == 200_000
    # a gallery of one is the per-pair threshold
    genuine = np.zeros(len(impostors), bool)
    assert scores[0] == threshold_for_false_match_rate(impostors, genuine, 0.01)
    # the best of 100 other strangers passes the threshold for 100 about 1% of the time
    best = rng.normal(0.0, 0.1, (20_000, 100)).max(axis=1)
    assert 0.006 < (best >= scores[sizes.index(100)]).mean() < 0.014
    # 200,000 pairs measure a per-pair rate down to 1 in 200,000, a gallery of about 2,010:
    # there the largest pair is the threshold, and no larger gallery is listed
    assert sizes[-2:] == [2_000, int(math.log(0.99) / math.log1p(-1 / 200_000))]
    assert scores[-1] > impostors.max()
    with pytest.raises(ValueError, match="two identities"):
        stranger_thresholds([], 0.01)


def test_margins_hold_the_best_of_a_gallery_of_strangers_to_the_rate() -> None:
    from training.metrics import margin_for_gaps, margins_by_gallery_size

    rng = np.random.default_rng(1)
    # each image's own patient scores about 0.6, strangers about 0.1
    enrolled = EnrolledScores(rng.normal(0.6, 0.1, 4_000), rng.normal(0.1, 0.1, 200_000))
    found = margins_by_gallery_size(enrolled, 0.01)
    sizes, margins = found["gallery_sizes"], found["margins"]
    assert sizes[:4] == [1, 2, 5, 10] and margins == sorted(margins)
    assert found["own_scores"] == 4_000 and found["stranger_pairs"] == 200_000
    gaps: dict[int, np.ndarray] = {}
    for size in (1, 20, 500):
        # fresh images, each against a fresh gallery of that many strangers
        fresh_own = rng.normal(0.6, 0.1, 20_000)
        gaps[size] = rng.normal(0.1, 0.1, (20_000, size)).max(axis=1) - fresh_own
        alarms = (gaps[size] >= margins[sizes.index(size)]).mean()
        assert 0.007 < alarms < 0.013, (size, alarms)
    # a margin read off the gaps in galleries of 20 is about the margin for 20, and in
    # galleries of 500 it raises several times the alarms it was chosen for
    for_twenty = margin_for_gaps(gaps[20], 0.01)
    assert for_twenty == pytest.approx(margins[sizes.index(20)], abs=0.02)
    assert (gaps[500] >= for_twenty).mean() > 0.04
    with pytest.raises(ValueError, match="two images"):
        margins_by_gallery_size(EnrolledScores(np.zeros(0), enrolled.strangers), 0.01)


def test_a_calibration_pool_is_judged_as_the_service_judges() -> None:
    """The first image of each identity is enrolled; every other image is compared with its
    own identity's enrolled image (not the best of its identity's images) and with the other
    identities' enrolled images. Pairs of two images that are not enrolled, and the images of
    identities with one image, are no image's strangers."""
    #             a0    a1    b0    a2    c0    b1
    similarity = [
        [1.00, 0.50, 0.10, 0.70, 0.20, 0.30],  # a0 (enrolled)
        [0.50, 1.00, 0.40, 0.90, 0.15, 0.25],  # a1
        [0.10, 0.40, 1.00, 0.05, 0.35, 0.60],  # b0 (enrolled)
        [0.70, 0.90, 0.05, 1.00, 0.45, 0.80],  # a2
        [0.20, 0.15, 0.35, 0.45, 1.00, 0.55],  # c0 (enrolled, alone)
        [0.30, 0.25, 0.60, 0.80, 0.55, 1.00],  # b1
    ]
    pool = EnrolledScores.of(np.asarray(similarity), ["a", "a", "b", "a", "c", "b"])
    np.testing.assert_allclose(pool.own, [0.50, 0.70, 0.60])  # a1, a2, b1: with a0, a0, b0
    # a1 with b0 and c0, a2 with b0 and c0, b1 with a0 and c0
    np.testing.assert_allclose(pool.strangers, [0.40, 0.15, 0.05, 0.45, 0.30, 0.55])
    both = EnrolledScores.joined([pool, pool])
    assert len(both.own) == 6 and len(both.strangers) == 12
    alone = EnrolledScores.of(np.eye(2), ["a", "a"])  # one identity: no strangers
    assert len(alone.own) == 0 and len(alone.strangers) == 0
