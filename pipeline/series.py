"""One verdict per CT or MR series, from the verdicts of its images. Pure functions.

A series is judged once it is complete: no image has arrived for a quiet time (as DICOM routers
decide), and every image has a result. The series verdict pools the evidence of its images:
the modality by majority of the per-image predictions, the identity by each patient's mean
score over the images, so one poor slice neither raises nor hides an alarm on its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.verdicts import (
    IdentityVerdict,
    Match,
    ModalityVerdict,
    identity_verdict,
    modality_verdict,
)

OTHER = "other"  # COMPA's answer where no modality's references are close enough


@dataclass(frozen=True)
class ImageFinding:
    """What the pipeline said of one image of the series (a stored result)."""

    predicted_modality: str | None
    identity_verdict: str | None
    header_score: float | None
    top_matches: Sequence[Mapping[str, Any]] | None
    threshold: float | None
    margin: float | None = None  # the model's calibrated margin, where it had one


@dataclass(frozen=True)
class SeriesVerdict:
    images: int
    images_analysed: int
    predicted_modality: str | None
    modality_agreement: float | None  # the share of analysed images predicting the majority
    modality_verdict: ModalityVerdict | None
    identity_verdict: IdentityVerdict | None
    matched_patient_id: str | None
    header_score: float | None  # the header patient's mean score over the images
    best_other_score: float | None  # the best other patient's mean score
    threshold: float | None
    margin: float | None = None  # the models' calibrated margin, where every image's had one


def pooled_matches(findings: Sequence[ImageFinding]) -> list[Match]:
    """Each patient's mean score over the images, best first.

    An image's top matches list only its best few patients; for a patient missing from one
    image's list, that image's lowest listed score stands in. It is an upper bound of the
    missing score, so pooling errs towards raising an alarm, not hiding one."""
    lists = [f.top_matches for f in findings if f.top_matches]
    if not lists:
        return []
    patients = {str(m["patient_id"]) for matches in lists for m in matches}
    totals = dict.fromkeys(patients, 0.0)
    for matches in lists:
        scores = {str(m["patient_id"]): float(m["score"]) for m in matches}
        floor = min(scores.values())
        for patient in patients:
            totals[patient] += scores.get(patient, floor)
    pooled = [Match(p, total / len(lists)) for p, total in totals.items()]
    return sorted(pooled, key=lambda m: (-m.score, m.patient_id))


def aggregate_series(
    findings: Sequence[ImageFinding],
    *,
    header_patient: str | None,
    header_modality: str | None,
    tag_map: Mapping[str, str],
    margin: float | None = None,
) -> SeriesVerdict:
    """The series verdict from its images' findings (failed images count, but carry nothing)."""
    predicted = [f.predicted_modality for f in findings if f.predicted_modality]
    # "other" says COMPA recognised no modality (an end slice of a volume can look like
    # nothing): it abstains, unless no image of the series was recognised at all.
    recognised = [p for p in predicted if p != OTHER] or predicted
    majority: str | None = None
    agreement: float | None = None
    verdict: ModalityVerdict | None = None
    if recognised:
        # ties go to the alphabetically first modality, so the verdict is reproducible
        counts = Counter(recognised)
        majority = min(counts, key=lambda m: (-counts[m], m))
        agreement = round(counts[majority] / len(predicted), 4)
        verdict = modality_verdict(majority, header_modality, tag_map)

    routed = [f for f in findings if f.identity_verdict is not None and f.threshold is not None]
    identity: IdentityVerdict | None = None
    matched: str | None = None
    header_mean: float | None = None
    other_mean: float | None = None
    threshold: float | None = None
    calibrated: float | None = None
    if routed:
        threshold = max(f.threshold for f in routed if f.threshold is not None)
        # the margin calibrated per image serves the series too (the pooled means it
        # compares vary less than one image's scores)
        margins = [f.margin for f in routed]
        if all(m is not None for m in margins):
            calibrated = max(m for m in margins if m is not None)
        header_scores = [f.header_score for f in routed if f.header_score is not None]
        header_mean = sum(header_scores) / len(header_scores) if header_scores else None
        matches = pooled_matches(routed)
        others = [m for m in matches if m.patient_id != header_patient]
        other_mean = others[0].score if others else None
        if not matches and header_mean is None:
            identity = IdentityVerdict.UNVERIFIABLE  # no gallery to compare with
        else:
            decision = identity_verdict(
                matches,
                header_patient,
                threshold,
                header_enrolled=header_mean is not None,
                header_score=header_mean,
                margin=margin if calibrated is None else calibrated,
                margin_calibrated=calibrated is not None,
            )
            identity, matched = decision.verdict, decision.matched_patient
    return SeriesVerdict(
        images=len(findings),
        images_analysed=len(predicted),
        predicted_modality=majority,
        modality_agreement=agreement,
        modality_verdict=verdict,
        identity_verdict=identity,
        matched_patient_id=matched,
        header_score=None if header_mean is None else round(header_mean, 5),
        best_other_score=None if other_mean is None else round(other_mean, 5),
        threshold=threshold,
        margin=calibrated,
    )
