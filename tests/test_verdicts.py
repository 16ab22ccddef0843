"""Verdicts and the gallery index on tiny cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.gallery import GalleryIndex
from pipeline.verdicts import (
    DEFAULT_TAG_MAP,
    IdentityVerdict,
    Match,
    ModalityVerdict,
    identity_verdict,
    modality_verdict,
    route,
)


@pytest.mark.parametrize(
    ("predicted", "header", "verdict"),
    [
        ("xray", "CR", ModalityVerdict.AGREE),
        ("xray", "dx", ModalityVerdict.AGREE),
        ("ct", "MR", ModalityVerdict.MISMATCH),
        ("other", "CT", ModalityVerdict.MISMATCH),
        ("mri", None, ModalityVerdict.TAG_MISSING),
        ("mri", "  ", ModalityVerdict.TAG_MISSING),
        ("other", "US", ModalityVerdict.UNSUPPORTED),
    ],
)
def test_modality_verdict(predicted: str, header: str | None, verdict: ModalityVerdict) -> None:
    assert modality_verdict(predicted, header, DEFAULT_TAG_MAP) is verdict


def test_routing_by_prediction_or_hold() -> None:
    assert route("ct", "CT", ModalityVerdict.AGREE, DEFAULT_TAG_MAP) == "ct"
    assert route("ct", "MR", ModalityVerdict.MISMATCH, DEFAULT_TAG_MAP) == "ct"
    assert (
        route("ct", "MR", ModalityVerdict.MISMATCH, DEFAULT_TAG_MAP, on_disagreement="hold") is None
    )
    assert route("mri", None, ModalityVerdict.TAG_MISSING, DEFAULT_TAG_MAP) == "mri"
    assert route("other", "US", ModalityVerdict.UNSUPPORTED, DEFAULT_TAG_MAP) is None


def test_identity_verdicts() -> None:
    t = 0.8
    alice = [Match("A", 0.95), Match("B", 0.5)]
    assert (
        identity_verdict(alice, "A", t, header_enrolled=True).verdict is IdentityVerdict.CONSISTENT
    )
    swapped = identity_verdict(alice, "B", t, header_enrolled=True)
    assert swapped.verdict is IdentityVerdict.MISMATCH and swapped.matched_patient == "A"
    nobody = [Match("A", 0.4)]
    assert (
        identity_verdict(nobody, "C", t, header_enrolled=False).verdict
        is IdentityVerdict.NEW_PATIENT
    )
    assert (
        identity_verdict(nobody, "A", t, header_enrolled=True).verdict
        is IdentityVerdict.UNVERIFIABLE
    )
    assert (
        identity_verdict([], None, t, header_enrolled=False).verdict is IdentityVerdict.UNVERIFIABLE
    )
    # both above the threshold: the header's patient wins, unless the other matches better
    # by the margin or more
    both = [Match("B", 0.97), Match("A", 0.9)]
    assert (
        identity_verdict(both, "A", t, header_enrolled=True).verdict is IdentityVerdict.CONSISTENT
    )
    close = identity_verdict(both, "A", t, header_enrolled=True, margin=0.1)
    assert close.verdict is IdentityVerdict.CONSISTENT and close.matched_patient == "A"
    apart = identity_verdict(both, "A", t, header_enrolled=True, margin=0.05)
    assert apart.verdict is IdentityVerdict.MISMATCH and apart.matched_patient == "B"
    assert (apart.best_score, apart.header_score) == (0.97, 0.9)
    # the other must itself pass the threshold; the header's score may come from outside top-k
    low = [Match("A", 0.82), Match("B", 0.79)]
    assert (
        identity_verdict(low, "A", t, header_enrolled=True, margin=0.0).verdict
        is IdentityVerdict.CONSISTENT
    )
    assert (
        identity_verdict(
            [Match("B", 0.99)], "A", t, header_enrolled=True, header_score=0.85, margin=0.1
        ).verdict
        is IdentityVerdict.MISMATCH
    )


def test_gallery_search_returns_one_entry_per_patient_best_first() -> None:
    index = GalleryIndex(dim=3)
    index.add(
        ["A", "A", "B", "C"],
        np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32),
    )
    matches = index.search(np.array([1, 0.2, 0], dtype=np.float32), k=2)
    assert [m.patient_id for m in matches] == ["A", "B"]
    assert matches[0].score == pytest.approx(
        max(
            np.dot([1, 0, 0], [1, 0.2, 0]),
            np.dot([0.9, 0.1, 0], [1, 0.2, 0]) / np.linalg.norm([0.9, 0.1, 0]),
        )
        / np.linalg.norm([1, 0.2, 0]),
        abs=1e-5,
    )
    assert index.is_enrolled("C") and not index.is_enrolled("D")
    assert index.patient_score(np.array([0, 0, 1], np.float32), "C") == pytest.approx(1.0)
    grown = GalleryIndex(dim=2)
    for i in range(3000):
        grown.add([f"P{i}"], np.array([[np.cos(i), np.sin(i)]], dtype=np.float32))
    assert len(grown) == 3000 and len(grown.search(np.array([1, 0], np.float32), k=5)) == 5


def test_a_calibrated_margin_decides_alone_for_an_enrolled_header_patient() -> None:
    t = 0.8
    # a stranger above the threshold while the header's own patient is below it: the old
    # rule's mismatch, but a gap under the calibrated margin says nothing
    stranger = [Match("B", 0.83), Match("A", 0.78)]
    assert (
        identity_verdict(stranger, "A", t, header_enrolled=True).verdict is IdentityVerdict.MISMATCH
    )
    quiet = identity_verdict(
        stranger, "A", t, header_enrolled=True, margin=0.1, margin_calibrated=True
    )
    assert quiet.verdict is IdentityVerdict.UNVERIFIABLE and quiet.matched_patient is None
    assert (quiet.best_score, quiet.header_score) == (0.83, 0.78)
    # a gap of the margin or more is a mismatch, even with both below the threshold
    far = [Match("B", 0.6), Match("A", 0.45)]
    apart = identity_verdict(far, "A", t, header_enrolled=True, margin=0.1, margin_calibrated=True)
    assert apart.verdict is IdentityVerdict.MISMATCH and apart.matched_patient == "B"
    # the header's patient above the threshold and no one far ahead: consistent
    own = identity_verdict(
        [Match("B", 0.9), Match("A", 0.85)],
        "A",
        t,
        header_enrolled=True,
        margin=0.1,
        margin_calibrated=True,
    )
    assert own.verdict is IdentityVerdict.CONSISTENT and own.matched_patient == "A"
    # the header's score may come from outside the listed matches
    assert (
        identity_verdict(
            [Match("B", 0.99)],
            "A",
            t,
            header_enrolled=True,
            header_score=0.85,
            margin=0.1,
            margin_calibrated=True,
        ).verdict
        is IdentityVerdict.MISMATCH
    )
    # a header patient who is not enrolled has no score to compare: the threshold decides
    assert (
        identity_verdict(
            [Match("B", 0.5)], "A", t, header_enrolled=False, margin=0.1, margin_calibrated=True
        ).verdict
        is IdentityVerdict.NEW_PATIENT
    )


def test_stranger_thresholds_grow_with_the_gallery_on_the_logarithm_of_its_size() -> None:
    import math

    from pipeline.verdicts import ByGallerySize

    thresholds = ByGallerySize((1, 10, 100), (0.3, 0.5, 0.6))
    assert thresholds.at(0) == thresholds.at(1) == 0.3
    assert thresholds.at(10) == pytest.approx(0.5)
    assert thresholds.at(31) == pytest.approx(0.5 + 0.1 * math.log(3.1) / math.log(10))
    # beyond the largest calibrated gallery, the largest's
    assert thresholds.at(100) == thresholds.at(10_000) == 0.6
    assert ByGallerySize.of(None) is None
    assert ByGallerySize.of({"gallery_sizes": [1, 10, 100], "scores": [0.3, 0.5, 0.6]}) == (
        thresholds
    )
    with pytest.raises(ValueError, match="increase"):
        ByGallerySize((10, 1), (0.3, 0.5))
    with pytest.raises(ValueError, match="one score per gallery size"):
        ByGallerySize((1, 10), (0.3,))
