"""Alerts as rows: one per flagged image or series and kind, raised with the verdict, open
until a reviewer confirms or dismisses it (with a reason), every decision audited."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from medreid.cli import main
from storage.alerts import AlertQuery, AlertReviewError, list_alerts, review_alert
from storage.instances import add_instance_with_job
from storage.jobs import JobOutcome, claim_jobs, finish_job
from storage.models import Alert, AlertState, AuditEvent, SeriesVerdictRow
from storage.results import save_series_verdict
from tests.conftest import Database
from tests.test_storage import new_instance

pytestmark = pytest.mark.db

SWAPPED = JobOutcome(
    ok=True,
    parameters={},
    timings_ms={},
    predicted_modality="ct",
    modality_verdict="agree",
    identity_verdict="mismatch",
    matched_patient_id="P9",
    top_matches=[{"patient_id": "P9", "score": 0.91}],
    identity_threshold=0.6,
    identity_header_score=0.2,
)
BOTH = JobOutcome(
    ok=True,
    parameters={},
    timings_ms={},
    predicted_modality="xray",
    modality_verdict="mismatch",
    identity_verdict="mismatch",
    matched_patient_id="P7",
)
AGREE = JobOutcome(
    ok=True, parameters={}, timings_ms={}, modality_verdict="agree", identity_verdict="consistent"
)


def finished(session: Session, uid: str, outcome: JobOutcome, patient: str = "P1") -> None:
    add_instance_with_job(
        session,
        new=new_instance(uid, sha=uid.ljust(64, "0"), patient=patient),
        version=1,
        spool_path=uid,
    )
    (job,) = claim_jobs(session, worker="w", limit=1, lease_s=60, max_attempts=3)
    assert finish_job(session, job=job, worker="w", outcome=outcome)


def test_each_flagged_image_has_one_alert_per_mismatch(session: Session) -> None:
    finished(session, "1.1", SWAPPED)
    finished(session, "1.2", BOTH, patient="P2")
    finished(session, "1.3", AGREE)
    alerts = session.scalars(select(Alert).order_by(Alert.id)).all()
    assert [(a.sop_instance_uid, a.kind) for a in alerts] == [
        ("1.1", "patient_mismatch"),
        ("1.2", "modality_mismatch"),
        ("1.2", "patient_mismatch"),
    ]
    swap = alerts[0]
    assert (swap.state, swap.scope, swap.patient_id, swap.suspected_patient_id) == (
        "open",
        "image",
        "P1",
        "P9",
    )
    assert swap.series_instance_uid == "1.2.3.1" and swap.header_modality == "CT"
    assert swap.detail["top_matches"] == [{"patient_id": "P9", "score": 0.91}]
    assert (alerts[1].header_modality, alerts[1].predicted_modality) == ("CT", "xray")


def series_verdict(identity: str, revision_time: int) -> SeriesVerdictRow:
    return SeriesVerdictRow(
        series_instance_uid="1.9.1",
        study_instance_uid="1.9",
        patient_id="P1",
        header_modality="CT",
        images=3 + revision_time,
        images_analysed=3 + revision_time,
        predicted_modality="ct",
        modality_verdict="agree",
        identity_verdict=identity,
        matched_patient_id="P5",
        last_received_at=dt.datetime(2026, 12, 1, 8, revision_time, tzinfo=dt.UTC),
        decided_by="w",
    )


def test_a_series_judged_again_updates_its_open_alert_and_raises_no_second(
    session: Session,
) -> None:
    assert save_series_verdict(session, row=series_verdict("mismatch", 0)) is not None
    assert save_series_verdict(session, row=series_verdict("mismatch", 5)) is not None
    (alert,) = session.scalars(select(Alert)).all()
    assert (alert.scope, alert.kind, alert.state) == ("series", "patient_mismatch", "open")
    assert alert.detail["revision"] == 2 and alert.detail["images"] == 8
    assert alert.suspected_patient_id == "P5"
    # decided, then judged again: the reviewer's decision stands, no new alert
    review_alert(
        session, alert_id=alert.id, decision=AlertState.CONFIRMED, reviewer="qa", reason=None
    )
    assert save_series_verdict(session, row=series_verdict("mismatch", 9)) is not None
    (kept,) = session.scalars(select(Alert)).all()
    assert kept.state == "confirmed" and kept.detail["revision"] == 2


def test_reviews_close_an_alert_once_and_a_dismissal_needs_a_reason(session: Session) -> None:
    finished(session, "2.1", SWAPPED)
    finished(session, "2.2", SWAPPED)
    first, second = session.scalars(select(Alert).order_by(Alert.id)).all()
    with pytest.raises(AlertReviewError, match="needs a reason"):
        review_alert(
            session, alert_id=first.id, decision=AlertState.DISMISSED, reviewer="qa", reason=" "
        )
    when = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.UTC)
    review_alert(
        session,
        alert_id=first.id,
        decision=AlertState.DISMISSED,
        reviewer="qa",
        reason="same patient, new scanner",
        now=when,
    )
    assert (first.state, first.reviewed_by, first.review_reason) == (
        "dismissed",
        "qa",
        "same patient, new scanner",
    )
    with pytest.raises(AlertReviewError, match="was dismissed by qa"):
        review_alert(
            session, alert_id=first.id, decision=AlertState.CONFIRMED, reviewer="other", reason=None
        )
    with pytest.raises(AlertReviewError, match="no alert"):
        review_alert(
            session, alert_id=999_999, decision=AlertState.CONFIRMED, reviewer="qa", reason=None
        )
    listed, total = list_alerts(session, where=AlertQuery())
    assert total == 2 and [a.id for a in listed] == [second.id, first.id]  # open first
    listed, total = list_alerts(session, where=AlertQuery(state=AlertState.OPEN, patient="P9"))
    assert (total, [a.id for a in listed]) == (1, [second.id])


def test_the_worklist_from_the_command_line_with_every_decision_audited(
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MEDREID_DATABASE_URL", database.url)
    with database.sessions.begin() as session:
        finished(session, "3.1", SWAPPED)
        finished(session, "3.2", BOTH, patient="P2")

    def cli(*args: str) -> Any:
        assert main(["alerts", *args]) == 0
        return capsys.readouterr().out

    listed = json.loads(cli("list", "--format", "json"))
    assert len(listed) == 3 and {a["state"] for a in listed} == {"open"}
    swap = next(a for a in listed if a["sop_instance_uid"] == "3.1")
    assert json.loads(cli("show", str(swap["id"])))["suspected_patient_id"] == "P9"
    assert "confirmed" in cli("confirm", str(swap["id"]), "--reason", "misfiled at the CT desk")
    others = [a["id"] for a in listed if a["id"] != swap["id"]]
    assert "dismissed" in cli("dismiss", str(others[0]), "--reason", "known artefact")
    with pytest.raises(SystemExit, match="was confirmed by"):
        main(["alerts", "dismiss", str(swap["id"]), "--reason", "changed my mind"])
    assert len(json.loads(cli("list", "--format", "json"))) == 1  # one still open
    assert len(json.loads(cli("list", "--state", "all", "--format", "json"))) == 3
    with database.sessions.begin() as session:
        reviewed = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "Alert Reviewed")
        ).all()
        assert [(e.detail["alert_id"], e.detail["decision"]) for e in reviewed] == [
            (swap["id"], "confirmed"),
            (others[0], "dismissed"),
        ]
        assert reviewed[0].patient_id == "P1" and reviewed[0].detail["reason"] == (
            "misfiled at the CT desk"
        )


def test_a_dismissed_mismatch_enrolled_under_its_header_patient_is_consistent_next_time(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole loop, with the real analyser and gallery over a stand-in embedder: an image
    of P1 looks like P9 (alert); the reviewer dismisses it and enrolls it under P1; P1's next
    image is consistent. A confirmed alert, or a modality one, never enrolls."""
    import numpy as np

    from medreid.registry import SqlModelRegistry
    from medreid.worker import Worker
    from pipeline import modelstore
    from pipeline.analysis import AnalysisSettings
    from pipeline.modelstore import Analyser, embedding_bytes
    from pipeline.runner import PipelineConfig
    from storage.gallery import NewGalleryEntry, add_gallery_entries
    from storage.models import GalleryEntry, Result
    from support.dicom_factory import encode, make_dataset
    from tests.test_modelstore import model_folder
    from tests.test_worker import enqueue

    class SameFace:
        threshold = 0.9
        margin = None
        margins = None
        stranger_thresholds = None

        def __init__(self, folder: Path) -> None:
            self.version = folder.name

        def embed(self, images: list[Any]) -> np.ndarray:
            return np.tile(np.array([0.6, 0.8], dtype=np.float32), (len(images), 1))

    monkeypatch.setattr(modelstore, "load_model", lambda slot, folder: SameFace(folder))
    models = tmp_path / "models"
    folder = model_folder(models, "reid-ct-v1", "2026-01-01T00:00:00+00:00")
    (folder / "model.json").write_text(  # a CT model
        json.dumps({"kind": "reid", "modality": "ct", "version": "reid-ct-v1", "created": "x"})
    )
    with database.sessions.begin() as session:
        add_gallery_entries(
            session,
            entries=[
                NewGalleryEntry(
                    "P9",
                    "ct",
                    "reid-ct-v1",
                    embedding_bytes(np.array([0.6, 0.8])),
                    None,
                    None,
                    "admin",
                )
            ],
        )
    worker = Worker(
        sessions=database.sessions,
        config=PipelineConfig(),
        name="test/1/0",
        spool_root=tmp_path,
        analyser=Analyser(SqlModelRegistry(database.sessions), models, AnalysisSettings()),
    )
    first = make_dataset(np.full((8, 8), 100, dtype=np.uint16))
    enqueue(database, tmp_path, "first.dcm", encode(first), first.SOPInstanceUID)
    assert worker.run_once() == 1
    with database.sessions.begin() as session:
        (alert,) = session.scalars(select(Alert)).all()
        assert (alert.kind, alert.patient_id, alert.suspected_patient_id) == (
            "patient_mismatch",
            "P1",
            "P9",
        )
        assert alert.embedding_model == "reid-ct-v1" and alert.embedding_modality == "ct"
        with pytest.raises(AlertReviewError, match="only a dismissed alert"):
            review_alert(
                session,
                alert_id=alert.id,
                decision=AlertState.CONFIRMED,
                reviewer="qa",
                reason=None,
                enroll=True,
            )
        review_alert(
            session,
            alert_id=alert.id,
            decision=AlertState.DISMISSED,
            reviewer="qa",
            reason="P1's own image: new scanner",
            enroll=True,
        )
        (entry,) = session.scalars(select(GalleryEntry).where(GalleryEntry.patient_id == "P1"))
        assert (entry.enrolled_by, entry.model_version) == ("qa", "reid-ct-v1")
    second = make_dataset(np.full((8, 8), 120, dtype=np.uint16))
    enqueue(database, tmp_path, "second.dcm", encode(second), second.SOPInstanceUID)
    assert worker.run_once() == 1
    with database.sessions.begin() as session:
        newest = session.scalars(select(Result).order_by(Result.id.desc())).first()
        assert newest is not None and newest.identity_verdict == "consistent"
        assert len(session.scalars(select(Alert)).all()) == 1
