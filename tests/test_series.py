"""Series verdicts: the pure aggregation on hand-made findings, and the worker closing quiet
series on each database backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from medreid.series import SeriesPolicy
from medreid.worker import Worker
from pipeline.analysis import Analysis
from pipeline.runner import PipelineConfig
from pipeline.series import ImageFinding, SeriesVerdict, aggregate_series, pooled_matches
from pipeline.verdicts import DEFAULT_TAG_MAP, IdentityDecision, IdentityVerdict, ModalityVerdict
from storage.models import AuditEvent, Result, SeriesVerdictRow
from support.dicom_factory import encode, make_dataset
from tests.conftest import Database
from tests.test_worker import enqueue


def finding(
    predicted: str | None = "ct",
    matches: list[tuple[str, float]] | None = None,
    header_score: float | None = None,
    verdict: str | None = "consistent",
    threshold: float | None = 0.5,
    margin: float | None = None,
) -> ImageFinding:
    return ImageFinding(
        predicted_modality=predicted,
        identity_verdict=verdict,
        header_score=header_score,
        top_matches=[{"patient_id": p, "score": s} for p, s in (matches or [])],
        threshold=threshold,
        margin=margin,
    )


def test_pooled_matches_stand_in_the_lowest_listed_score_for_a_missing_patient() -> None:
    pooled = pooled_matches(
        [
            finding(matches=[("A", 0.9), ("B", 0.4)]),
            finding(matches=[("B", 0.8), ("C", 0.2)]),
        ]
    )
    # A: (0.9 + 0.2) / 2; B: (0.4 + 0.8) / 2; C: (0.4 + 0.2) / 2
    assert [(m.patient_id, round(m.score, 6)) for m in pooled] == [
        ("B", 0.6),
        ("A", 0.55),
        ("C", 0.3),
    ]


def test_one_odd_slice_neither_raises_nor_hides_a_series_alarm() -> None:
    # Two slices look like the header's patient P1, one looks like P2: consistent as a series.
    consistent = aggregate_series(
        [
            finding(matches=[("P1", 0.8), ("P2", 0.3)], header_score=0.8),
            finding(matches=[("P1", 0.7), ("P2", 0.2)], header_score=0.7),
            finding(matches=[("P2", 0.6), ("P1", 0.4)], header_score=0.4, verdict="mismatch"),
        ],
        header_patient="P1",
        header_modality="CT",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert consistent.identity_verdict is IdentityVerdict.CONSISTENT
    assert consistent.header_score == pytest.approx((0.8 + 0.7 + 0.4) / 3, abs=1e-5)
    assert consistent.best_other_score == pytest.approx((0.3 + 0.2 + 0.6) / 3, abs=1e-5)
    assert consistent.modality_verdict is ModalityVerdict.AGREE
    assert (consistent.images, consistent.images_analysed) == (3, 3)

    # All slices look like P2, though one slice alone passed for P1: a series mismatch.
    swapped = aggregate_series(
        [
            finding(matches=[("P2", 0.8), ("P1", 0.3)], header_score=0.3, verdict="mismatch"),
            finding(matches=[("P2", 0.7), ("P1", 0.55)], header_score=0.55),
            finding(matches=[("P2", 0.9), ("P1", 0.2)], header_score=0.2, verdict="mismatch"),
        ],
        header_patient="P1",
        header_modality="CT",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert swapped.identity_verdict is IdentityVerdict.MISMATCH
    assert swapped.matched_patient_id == "P2"


def test_a_series_whose_patient_passes_but_another_matches_far_better_is_a_mismatch() -> None:
    # Every slice passes the threshold (0.5) for the header's P1, and matches P2 better: the
    # margin decides, on the series' mean scores (P1 0.6, P2 0.75).
    slices = [
        finding(matches=[("P2", 0.8), ("P1", 0.6)], header_score=0.6),
        finding(matches=[("P2", 0.7), ("P1", 0.6)], header_score=0.6),
    ]
    judged = {
        margin: aggregate_series(
            slices,
            header_patient="P1",
            header_modality="MR",
            tag_map=DEFAULT_TAG_MAP,
            margin=margin,
        )
        for margin in (None, 0.1, 0.2)
    }
    assert judged[None].identity_verdict is IdentityVerdict.CONSISTENT
    assert judged[0.1].identity_verdict is IdentityVerdict.MISMATCH
    assert judged[0.1].matched_patient_id == "P2"
    assert judged[0.2].identity_verdict is IdentityVerdict.CONSISTENT


def test_the_models_calibrated_margin_judges_the_series_where_every_image_had_it() -> None:
    # P2 beats the header's P1 on the mean (0.55 against 0.4), P2 above the threshold 0.5
    # and P1 below it: the settings' rule calls that a mismatch.
    def slices(margins: tuple[float | None, float | None]) -> list[ImageFinding]:
        return [
            finding(matches=[("P2", 0.6), ("P1", 0.4)], header_score=0.4, margin=margins[0]),
            finding(matches=[("P2", 0.5), ("P1", 0.4)], header_score=0.4, margin=margins[1]),
        ]

    def judged(margins: tuple[float | None, float | None]) -> SeriesVerdict:
        return aggregate_series(
            slices(margins),
            header_patient="P1",
            header_modality="MR",
            tag_map=DEFAULT_TAG_MAP,
            margin=0.1,
        )

    assert judged((None, None)).identity_verdict is IdentityVerdict.MISMATCH
    assert judged((None, None)).margin is None
    # the models' margin (the larger of the images'): a gap of 0.15 is below 0.2
    calibrated = judged((0.2, 0.18))
    assert calibrated.identity_verdict is IdentityVerdict.UNVERIFIABLE
    assert calibrated.margin == 0.2
    assert judged((0.12, 0.12)).identity_verdict is IdentityVerdict.MISMATCH
    # an image judged without one: the settings' rule for the series
    mixed = judged((0.2, None))
    assert mixed.identity_verdict is IdentityVerdict.MISMATCH and mixed.margin is None


def test_series_modality_is_the_majority_of_its_images() -> None:
    verdict = aggregate_series(
        [finding("mri"), finding("mri"), finding("ct"), finding(None, verdict=None)],
        header_patient="P1",
        header_modality="CT",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert verdict.predicted_modality == "mri"
    assert verdict.modality_agreement == pytest.approx(2 / 3, abs=1e-4)
    assert verdict.modality_verdict is ModalityVerdict.MISMATCH
    assert (verdict.images, verdict.images_analysed) == (4, 3)


def test_other_abstains_unless_no_image_is_recognised() -> None:
    end_slices = aggregate_series(
        [finding("other"), finding("other"), finding("ct")],
        header_patient="P1",
        header_modality="CT",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert end_slices.predicted_modality == "ct"
    assert end_slices.modality_verdict is ModalityVerdict.AGREE
    assert end_slices.modality_agreement == pytest.approx(1 / 3, abs=1e-4)
    nothing_known = aggregate_series(
        [finding("other"), finding("other")],
        header_patient="P1",
        header_modality="CT",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert nothing_known.predicted_modality == "other"
    assert nothing_known.modality_verdict is ModalityVerdict.MISMATCH


def test_new_patient_and_unverifiable_series() -> None:
    new = aggregate_series(
        [finding(matches=[("P9", 0.2)], header_score=None, verdict="new_patient")],
        header_patient="P1",
        header_modality="MR",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert new.identity_verdict is IdentityVerdict.NEW_PATIENT
    empty_gallery = aggregate_series(
        [finding(matches=[], verdict="unverifiable")],
        header_patient="P1",
        header_modality="MR",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert empty_gallery.identity_verdict is IdentityVerdict.UNVERIFIABLE
    no_models = aggregate_series(
        [finding(None, verdict=None, threshold=None)],
        header_patient="P1",
        header_modality="MR",
        tag_map=DEFAULT_TAG_MAP,
    )
    assert no_models.identity_verdict is None and no_models.modality_verdict is None


class SwappedSeriesAnalyser:
    """Every image looks like patient P2 although the header says P1; COMPA says MRI."""

    def refresh(self) -> None:
        pass

    def analyse(self, images: list[np.ndarray], headers: list[object]) -> list[Analysis]:
        return [
            Analysis(
                predicted_modality="mri",
                modality_scores={"mri": 0.99},
                modality_verdict=ModalityVerdict.MISMATCH,
                routed_to="mri",
                top_matches=[
                    {"patient_id": "P2", "score": 0.9},
                    {"patient_id": "P1", "score": 0.1},
                ],
                identity=IdentityDecision(IdentityVerdict.MISMATCH, "P2", 0.9, 0.1),
                threshold=0.5,
                versions={"compa": "compa-x", "reid:mri": "reid-mri-x"},
                margin=0.3,
            )
            for _ in images
        ]


@pytest.mark.db
def test_worker_judges_a_quiet_complete_series_once_and_revises_it_on_a_late_image(
    database: Database, tmp_path: Path
) -> None:
    def send(n: int) -> None:
        ds = make_dataset(np.full((8, 8), 100 + n, dtype=np.uint16))
        enqueue(database, tmp_path, f"{n}.dcm", encode(ds), ds.SOPInstanceUID)

    def worker(quiet_s: float) -> Worker:
        return Worker(
            sessions=database.sessions,
            config=PipelineConfig(),
            name="test/1/0",
            spool_root=tmp_path,
            analyser=SwappedSeriesAnalyser(),  # type: ignore[arg-type]
            series=SeriesPolicy(modalities=("CT",), quiet_s=quiet_s, tag_map=DEFAULT_TAG_MAP),
        )

    for n in range(3):
        send(n)
    quick = worker(0.0)
    assert quick.close_quiet_series() == 0  # jobs still pending: the series is not complete
    assert quick.run_once() == 3
    assert worker(3600.0).close_quiet_series() == 0  # not quiet for an hour yet
    assert quick.close_quiet_series() == 1
    assert quick.close_quiet_series() == 0  # judged as it stands

    with database.sessions.begin() as session:
        row = session.scalars(select(SeriesVerdictRow)).one()
        assert (row.series_instance_uid, row.patient_id, row.header_modality) == (
            "1.2.3.4",
            "P1",
            "CT",
        )
        assert (row.images, row.images_analysed, row.revision) == (3, 3, 1)
        assert (row.modality_verdict, row.predicted_modality) == ("mismatch", "mri")
        assert (row.identity_verdict, row.matched_patient_id) == ("mismatch", "P2")
        assert row.header_score == pytest.approx(0.1)
        assert row.margin == pytest.approx(0.3)  # the images' stored margin, read back
        assert [r.identity_margin for r in session.scalars(select(Result))] == [0.3] * 3
        alerts = [
            a for a in session.scalars(select(AuditEvent)) if a.detail.get("scope") == "series"
        ]
        assert sorted(str(a.event_type) for a in alerts) == [
            "Modality Mismatch",
            "Patient Mismatch",
        ]
        assert all(a.detail["series_instance_uid"] == "1.2.3.4" for a in alerts)

    send(3)  # a late image: the series is judged again, as revision 2
    assert quick.run_once() == 1
    assert quick.close_quiet_series() == 1
    with database.sessions.begin() as session:
        row = session.scalars(select(SeriesVerdictRow)).one()
        assert (row.images, row.revision) == (4, 2)
