"""Retrieval and verification metrics over embeddings with identity labels.

Retrieval is leave-one-out: every item queries all the others. P@1 and mAP@R follow
pytorch-metric-learning's definitions (Musgrave et al., "A Metric Learning Reality Check",
2020): R is the number of other items with the query's label, and queries whose label has no
other item are left out. Verification uses every pair of distinct items: genuine when the
labels agree, impostor otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.vectors import l2_normalise

Matrix = npt.NDArray[np.floating]


def cosine_similarity(vectors: Matrix) -> npt.NDArray[np.float32]:
    unit = l2_normalise(vectors)
    return np.asarray(unit @ unit.T, dtype=np.float32)


@dataclass(frozen=True)
class RetrievalScores:
    p_at_1: float
    map_at_r: float
    queries: int


def retrieval_scores(
    similarity: Matrix, labels: Sequence[str], exclude: npt.NDArray[np.bool_] | None = None
) -> RetrievalScores:
    """Leave-one-out P@1 and mAP@R. ``exclude[i, j]`` hides item j from query i."""
    sim = np.array(similarity, dtype=np.float64)
    n = len(labels)
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    hidden = np.eye(n, dtype=bool) if exclude is None else (exclude | np.eye(n, dtype=bool))
    sim[hidden] = -np.inf
    p1: list[float] = []
    ap: list[float] = []
    for i in range(n):
        relevant = (codes == codes[i]) & ~hidden[i]
        r = int(relevant.sum())
        if r == 0:
            continue
        order = np.argsort(-sim[i], kind="stable")[:r]
        hits = relevant[order]
        p1.append(float(hits[0]))
        precision_at_k = np.cumsum(hits) / np.arange(1, r + 1)
        ap.append(float((precision_at_k * hits).sum() / r))
    if not p1:
        return RetrievalScores(float("nan"), float("nan"), 0)
    return RetrievalScores(float(np.mean(p1)), float(np.mean(ap)), len(p1))


@dataclass(frozen=True)
class VerificationScores:
    roc_auc: float
    eer: float
    eer_threshold: float
    genuine_pairs: int
    impostor_pairs: int


def pair_scores(
    similarity: Matrix, labels: Sequence[str]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The similarity of every pair i < j, and whether the pair is genuine."""
    n = len(labels)
    rows, cols = np.triu_indices(n, k=1)
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    return np.asarray(similarity, dtype=np.float64)[rows, cols], codes[rows] == codes[cols]


def roc_auc(scores: npt.NDArray[np.float64], genuine: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve: P(genuine score > impostor score), ties counting half."""
    positives, negatives = int(genuine.sum()), int((~genuine).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = float(ranks[genuine].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def roc_curve(
    scores: npt.NDArray[np.float64], genuine: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """False-match rate, true-match rate and the thresholds (score >= threshold is a match)."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    hits = genuine[order].astype(np.float64)
    distinct = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    tp = np.cumsum(hits)[distinct]
    fp = np.cumsum(1 - hits)[distinct]
    tpr = np.r_[0.0, tp / max(hits.sum(), 1)]
    fpr = np.r_[0.0, fp / max((1 - hits).sum(), 1)]
    thresholds = np.r_[np.inf, sorted_scores[distinct]]
    return fpr, tpr, thresholds


def equal_error_rate(
    scores: npt.NDArray[np.float64], genuine: npt.NDArray[np.bool_]
) -> tuple[float, float]:
    """The rate where false matches equal false non-matches, and the threshold there."""
    fpr, tpr, thresholds = roc_curve(scores, genuine)
    fnr = 1.0 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    return float((fpr[i] + fnr[i]) / 2.0), float(thresholds[i])


def threshold_for_false_match_rate(
    scores: npt.NDArray[np.float64], genuine: npt.NDArray[np.bool_], rate: float
) -> float:
    """The lowest threshold whose false-match rate on these pairs is at most ``rate``."""
    impostors = np.sort(scores[~genuine])[::-1]
    if len(impostors) == 0:
        return float(scores.min())
    allowed = int(np.floor(rate * len(impostors)))
    if allowed >= len(impostors):
        return float(impostors[-1])
    # strictly above the (allowed+1)-th highest impostor score
    return float(np.nextafter(impostors[allowed], np.inf))


def misfiling_gaps(similarity: Matrix, labels: Sequence[str]) -> npt.NDArray[np.float64]:
    """For each image with another of its identity, as a query against all the others: the
    best score of any other identity minus its own identity's best. A correctly filed image
    is called misfiled when its gap reaches the margin."""
    sim = np.asarray(similarity, np.float64).copy()
    np.fill_diagonal(sim, -np.inf)
    names = np.asarray(labels)
    same = names[:, None] == names[None, :]
    own = np.where(same, sim, -np.inf).max(axis=1)
    other = np.where(same, -np.inf, sim).max(axis=1)
    usable = np.isfinite(own) & np.isfinite(other)
    return np.asarray(other[usable] - own[usable])


@dataclass(frozen=True)
class EnrolledScores:
    """A pool of calibration images judged as the service judges a hospital's: the first
    image of each identity enrolled, every other image compared with the enrolled ones. Per
    compared image: its score with its own identity's enrolled image, and its scores with the
    other identities' enrolled images (its strangers), pooled."""

    own: npt.NDArray[np.float64]  # one per compared image
    strangers: npt.NDArray[np.float64]  # every compared image's, with every other identity

    @classmethod
    def of(cls, similarity: Matrix, labels: Sequence[str]) -> EnrolledScores:
        """From one pool's similarity matrix, its images in the order they were listed."""
        sim = np.asarray(similarity, np.float64)
        names = np.asarray(labels)
        _, first = np.unique(names, return_index=True)
        enrolled = np.sort(first)  # one image per identity, the first listed
        owner = names[enrolled]
        compared = np.setdiff1d(np.arange(len(names)), enrolled)
        if len(enrolled) < 2:  # nobody to be a stranger
            compared = compared[:0]
        rows = sim[np.ix_(compared, enrolled)]
        own_column = owner[None, :] == names[compared][:, None]
        return cls(rows[own_column], rows[~own_column])

    @classmethod
    def joined(cls, pools: Iterable[EnrolledScores]) -> EnrolledScores:
        """Several pools as one (each scored under its own projection)."""
        listed = list(pools)
        return cls(
            np.concatenate([np.zeros(0)] + [pool.own for pool in listed]),
            np.concatenate([np.zeros(0)] + [pool.strangers for pool in listed]),
        )


def margin_for_gaps(gaps: npt.ArrayLike, rate: float) -> float:
    """The lowest margin that at most ``rate`` of these gaps reach."""
    ordered = np.sort(np.asarray(gaps, np.float64))[::-1]
    if not len(ordered):
        raise ValueError("a margin needs identities with two images and at least two identities")
    allowed = int(np.floor(rate * len(ordered)))
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(ordered[allowed], np.inf))


# Gallery sizes (enrolled images) at which the stranger thresholds are calibrated; the
# service interpolates between them on the logarithm of the size.
GALLERY_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000)


def _calibrated_sizes(pairs: int, rate: float, sizes: Sequence[int]) -> list[tuple[int, float]]:
    """The gallery sizes a calibration on this many stranger pairs speaks for, each with the
    per-pair rate 1 - (1 - rate)^(1/N) at which the best of N independent strangers passes for
    ``rate`` of the queries. Where that rate asks for less than one pair, the size at which it
    asks for one comes last, with a rate of 0: the largest pair measured."""
    kept: list[tuple[int, float]] = []
    for size in sorted(sizes):
        per_pair = 1.0 - (1.0 - rate) ** (1.0 / size)
        if int(np.floor(per_pair * pairs)) < 1:
            limit = max(1, int(np.log(1.0 - rate) / np.log1p(-1.0 / pairs)))
            if not kept or limit > kept[-1][0]:
                kept.append((limit, 0.0))
            break
        kept.append((size, per_pair))
    return kept


def stranger_thresholds(
    impostors: npt.ArrayLike, rate: float, sizes: Sequence[int] = GALLERY_SIZES
) -> dict[str, Any]:
    """For each gallery size N, the score the best of N strangers reaches for at most
    ``rate`` of the queries of a patient who is not enrolled: the threshold of a per-pair
    false-match rate of 1 - (1 - rate)^(1/N), as if the N comparisons were independent.
    Where that rate asks for less than one of the measured stranger pairs, the largest of
    them is the last threshold (what the calibration could measure), at the gallery size
    where that happens; larger galleries get it too."""
    scores = np.sort(np.asarray(impostors, np.float64))[::-1]
    if not len(scores):
        raise ValueError("stranger thresholds need pairs of images of two identities")
    kept = _calibrated_sizes(len(scores), rate, sizes)
    # per size, how many measured pairs may pass: the threshold lies just above the next one
    allowed = [min(int(np.floor(per_pair * len(scores))), len(scores) - 1) for _, per_pair in kept]
    return {
        "gallery_sizes": [size for size, _ in kept],
        "scores": [float(np.nextafter(scores[k], np.inf)) for k in allowed],
        "false_alarm_rate": rate,
        "stranger_pairs": len(scores),
    }


def margins_by_gallery_size(
    enrolled: EnrolledScores,
    rate: float,
    sizes: Sequence[int] = GALLERY_SIZES,
) -> dict[str, Any]:
    """For each gallery size N, the margin by which the best of N strangers beats an image's
    own identity's score for at most ``rate`` of correctly filed images: the smallest m with
    mean(1 - F(own + m)^N) <= rate over the calibration pool's own scores, F the distribution
    of its stranger scores, the N comparisons independent. Both come from the pool judged as
    the service judges (:class:`EnrolledScores`): an image's own score is that of one enrolled
    image, not the best of every other image of its identity, and its strangers are enrolled
    images. Images of identities with a single image (every stranger pair between two of them
    counts in the stranger thresholds) are judged by no own score, and can have the heavier
    tail of strangers.

    A margin read off the calibration images' gaps (:func:`margin_for_gaps`) holds for
    galleries of the calibration's size, a few hundred images; the best of a hospital's
    thousands of strangers beats more own scores. The sizes are those its stranger scores
    speak for, as the stranger thresholds' are for theirs (:func:`_calibrated_sizes`)."""
    owns = enrolled.own
    scores = np.sort(enrolled.strangers)
    if not len(owns) or not len(scores):
        raise ValueError("margins need identities with two images and pairs of two identities")
    low = float(scores[0] - owns.max()) - 1.0  # every stranger beats every own score
    high = float(np.nextafter(scores[-1] - owns.min(), np.inf))  # none does

    def false_alarms(margin: float, size: int) -> float:
        # share of stranger pairs at or above own + margin, per image
        passing = 1.0 - np.searchsorted(scores, owns + margin, side="left") / len(scores)
        return float(np.mean(-np.expm1(size * np.log1p(-np.minimum(passing, 1.0 - 1e-15)))))

    kept = _calibrated_sizes(len(scores), rate, sizes)
    margins = []
    for size, _ in kept:
        lo, hi = low, high
        for _ in range(50):  # bisection: false alarms fall as the margin grows
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if false_alarms(mid, size) > rate else (lo, mid)
        margins.append(hi)
    return {
        "gallery_sizes": [size for size, _ in kept],
        "margins": margins,
        "false_alarm_rate": rate,
        "own_scores": len(owns),
        "stranger_pairs": len(scores),
    }


def verification_scores(similarity: Matrix, labels: Sequence[str]) -> VerificationScores:
    scores, genuine = pair_scores(similarity, labels)
    eer, threshold = equal_error_rate(scores, genuine)
    return VerificationScores(
        roc_auc=roc_auc(scores, genuine),
        eer=eer,
        eer_threshold=threshold,
        genuine_pairs=int(genuine.sum()),
        impostor_pairs=int((~genuine).sum()),
    )
