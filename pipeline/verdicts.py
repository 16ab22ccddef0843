"""Verdicts: what the pixels say against what the header says. Pure functions."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Header Modality (0008,0060) codes -> the modality the models know.
DEFAULT_TAG_MAP: Mapping[str, str] = {
    "CR": "xray",
    "DX": "xray",
    "RG": "xray",
    "CT": "ct",
    "MR": "mri",
    "DMS": "dermoscopy",
    "XC": "dermoscopy",
}


class ModalityVerdict(enum.StrEnum):
    AGREE = "agree"
    MISMATCH = "mismatch"
    TAG_MISSING = "tag_missing"
    UNSUPPORTED = "unsupported"


class IdentityVerdict(enum.StrEnum):
    CONSISTENT = "consistent"
    MISMATCH = "mismatch"
    NEW_PATIENT = "new_patient"
    UNVERIFIABLE = "unverifiable"


def modality_verdict(
    predicted: str, header_modality: str | None, tag_map: Mapping[str, str]
) -> ModalityVerdict:
    """Compare COMPA's prediction with the header's Modality through the tag map."""
    code = (header_modality or "").strip().upper()
    if not code:
        return ModalityVerdict.TAG_MISSING
    expected = tag_map.get(code)
    if expected is None:
        return ModalityVerdict.UNSUPPORTED
    return ModalityVerdict.AGREE if expected == predicted else ModalityVerdict.MISMATCH


def route(
    predicted: str,
    header_modality: str | None,
    verdict: ModalityVerdict,
    tag_map: Mapping[str, str],
    *,
    on_disagreement: str = "prediction",
) -> str | None:
    """The re-identification model to use, or None to hold the image.

    Agreeing images go to their modality's model. Where the tag is missing or disagrees,
    ``on_disagreement`` decides: "prediction" routes by what the pixels show, "hold" routes
    nowhere (the image waits for a person)."""
    if verdict is ModalityVerdict.AGREE:
        return predicted
    if verdict is ModalityVerdict.UNSUPPORTED and predicted not in tag_map.values():
        return None
    if on_disagreement == "hold":
        return None
    return predicted if predicted in set(tag_map.values()) else None


@dataclass(frozen=True)
class Match:
    patient_id: str
    score: float


@dataclass(frozen=True)
class IdentityDecision:
    verdict: IdentityVerdict
    matched_patient: str | None
    best_score: float | None
    header_score: float | None


@dataclass(frozen=True)
class ByGallerySize:
    """A value calibrated at a few gallery sizes (enrolled images) on identities the model
    never saw, and read at the gallery's size. A model has two:

    - its stranger thresholds: the score the best of a gallery of strangers reaches for a
      known share of queries (the model's false-match rate). A per-pair threshold of 1% false
      matches is crossed by some stranger for almost every image once a thousand are
      enrolled: an image of a patient who is not enrolled is compared with the best of them;
    - its margins: how far the best of a gallery of strangers beats an image's own patient's
      score for that share of correctly filed images.

    Both grow with the gallery."""

    gallery_sizes: tuple[int, ...]  # increasing
    scores: tuple[float, ...]  # one per size, non-decreasing

    def __post_init__(self) -> None:
        if not self.gallery_sizes or len(self.gallery_sizes) != len(self.scores):
            raise ValueError("a value by gallery size needs one score per gallery size")
        if any(b <= a for a, b in zip(self.gallery_sizes, self.gallery_sizes[1:], strict=False)):
            raise ValueError("the gallery sizes must increase")

    @classmethod
    def of(
        cls, described: Mapping[str, Sequence[float]] | None, values: str = "scores"
    ) -> ByGallerySize | None:
        """From a model description's ``stranger_thresholds`` (``values``: ``scores``) or
        ``margins`` (``margins``); None where it has none."""
        if not described:
            return None
        return cls(
            tuple(int(n) for n in described["gallery_sizes"]),
            tuple(float(x) for x in described[values]),
        )

    def at(self, gallery_size: int) -> float:
        """The value for a gallery of this many images: interpolated on the logarithm of the
        size between the calibrated sizes, the nearest beyond them."""
        sizes, scores = self.gallery_sizes, self.scores
        if gallery_size <= sizes[0]:
            return scores[0]
        for i in range(1, len(sizes)):
            if gallery_size <= sizes[i]:
                span = math.log(sizes[i]) - math.log(sizes[i - 1])
                share = (math.log(gallery_size) - math.log(sizes[i - 1])) / span
                return scores[i - 1] + share * (scores[i] - scores[i - 1])
        return scores[-1]


# How much better another patient must match than the header's patient, both above the
# threshold, for a mismatch (a cosine difference; chosen on generated hospital seed 125, see
# docs/pipeline.md).
DEFAULT_MISMATCH_MARGIN = 0.1


def identity_verdict(
    matches: Sequence[Match],
    header_patient: str | None,
    threshold: float,
    *,
    header_enrolled: bool,
    header_score: float | None = None,
    margin: float | None = None,
    margin_calibrated: bool = False,
) -> IdentityDecision:
    """Decide from the gallery's best matches (best first, one per patient).

    - consistent: the header's patient matches (at or above the threshold), and no other
      patient matches better by ``margin`` or more;
    - mismatch: another enrolled patient matches and the header's patient does not, or matches
      worse by at least ``margin``: a possible wrong-patient error (two patients can both pass
      a threshold calibrated per pair; the image is then the better one's);
    - new_patient: nobody matches and the header's patient is not enrolled;
    - unverifiable: nobody matches although the header's patient is enrolled, or there is no
      gallery or header patient to compare with.

    With ``margin_calibrated``, the margin is the model's own, calibrated on identities it
    never saw to flag a known share of correctly filed images: for an enrolled header
    patient, another patient scoring at least ``margin`` above the header's is then a
    mismatch whatever the threshold, and nothing else is: with a gallery of a thousand, some
    stranger passes a per-pair threshold for almost every image (docs/models.md, the
    verdicts on real images).
    """
    best = matches[0] if matches else None
    if header_score is None and header_patient is not None:
        header_score = next((m.score for m in matches if m.patient_id == header_patient), None)
    best_score = best.score if best else None
    if margin_calibrated and margin is not None and header_score is not None:
        other = next((m for m in matches if m.patient_id != header_patient), None)
        if other is not None and other.score - header_score >= margin:
            return IdentityDecision(
                IdentityVerdict.MISMATCH, other.patient_id, best_score, header_score
            )
        if header_score >= threshold:
            return IdentityDecision(
                IdentityVerdict.CONSISTENT, header_patient, best_score, header_score
            )
        return IdentityDecision(IdentityVerdict.UNVERIFIABLE, None, best_score, header_score)
    if header_score is not None and header_score >= threshold:
        other = next((m for m in matches if m.patient_id != header_patient), None)
        if (
            margin is not None
            and other is not None
            and other.score >= threshold
            and other.score - header_score >= margin
        ):
            return IdentityDecision(
                IdentityVerdict.MISMATCH, other.patient_id, best_score, header_score
            )
        return IdentityDecision(
            IdentityVerdict.CONSISTENT, header_patient, best_score, header_score
        )
    if best is not None and best.score >= threshold and best.patient_id != header_patient:
        return IdentityDecision(IdentityVerdict.MISMATCH, best.patient_id, best_score, header_score)
    if not header_enrolled and header_patient:
        return IdentityDecision(IdentityVerdict.NEW_PATIENT, None, best_score, header_score)
    return IdentityDecision(IdentityVerdict.UNVERIFIABLE, None, best_score, header_score)
