"""The alerts' DICOM Structured Reports: valid by dciodvfy (dicom3tools), and stored by the
outbox in Orthanc, in the flagged image's study, referring to it, exactly once: also when
Orthanc is down at first, and when the same report is sent twice."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from medreid.alert_reports import RejectionChannel, ReportChannel, alert_report, rejection_note
from medreid.orthanc import ORTHANC, Orthanc
from medreid.outbox import OutboxDispatcher
from medreid.outbox_settings import OutboxSettings
from storage.alerts import review_alert
from storage.instances import NewInstance, add_instance_with_job
from storage.jobs import claim_jobs, finish_job
from storage.models import Alert, AlertState, AuditEvent, Delivery
from storage.outbox import ClaimedDelivery, event_with_alert
from support.dicom_factory import encode, make_dataset
from support.service import free_port
from tests.conftest import Database
from tests.test_alerts import SWAPPED

pytestmark = pytest.mark.db
DCIODVFY = shutil.which("dciodvfy")


def flagged_image(database: Database, spool: Path) -> bytes:
    """A CT image received, judged a patient mismatch; its bytes."""
    ds = make_dataset(np.full((16, 16), 300, dtype=np.uint16), patient_id="P1")
    data = encode(ds)
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "ct.dcm").write_bytes(data)
    with database.sessions.begin() as session:
        add_instance_with_job(
            session,
            new=NewInstance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                patient_id="P1",
                modality="CT",
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                calling_ae="CT1",
                peer_host="127.0.0.1",
                association_id=None,
            ),
            version=1,
            spool_path="ct.dcm",
        )
        (job,) = claim_jobs(session, worker="w", limit=1, lease_s=60, max_attempts=3)
        assert finish_job(session, job=job, worker="w", outcome=SWAPPED)
    return data


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed (Debian: dicom3tools)")
def test_a_report_passes_the_dicom_validator(database: Database, tmp_path: Path) -> None:
    data = flagged_image(database, tmp_path / "spool")
    source = dcmread(tmp_path / "spool" / "ct.dcm", stop_before_pixels=True)
    with database.sessions.begin() as session:
        (alert,) = session.scalars(select(Alert)).all()
        report = alert_report(alert, [source], sop_instance_uid="2.25.42", version="test")
    assert report.StudyInstanceUID == source.StudyInstanceUID and data
    path = tmp_path / "report.dcm"
    report.save_as(path, enforce_file_format=True)
    checked = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    output = checked.stdout + checked.stderr
    assert "ComprehensiveSR" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output
    referenced = report.CurrentRequestedProcedureEvidenceSequence[0]
    series = referenced.ReferencedSeriesSequence[0]
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    with database.sessions.begin() as session:
        (alert,) = session.scalars(select(Alert)).all()
        note = rejection_note(alert, [source], sop_instance_uid="2.25.43")
    note.save_as(tmp_path / "note.dcm", enforce_file_format=True)
    checked = subprocess.run(
        [str(DCIODVFY), str(tmp_path / "note.dcm")], capture_output=True, text=True, timeout=60
    )
    output = checked.stdout + checked.stderr
    assert "KeyObjectSelectionDocument" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [], output
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113037", "DCM")


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)")
def test_reports_reach_orthanc_in_the_flagged_study_once(
    database: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    data = flagged_image(database, spool)
    pacs_port = free_port()
    settings = OutboxSettings(
        report_destinations=(f"ORTHANC@127.0.0.1:{pacs_port}",),
        send_rejection_notes=True,
        backoff_s=0.0,
        report_timeout_s=5.0,
    )
    channel = ReportChannel(settings, spool, "test-node", "test")
    rejection = RejectionChannel(settings, spool, "test-node")
    dispatcher = OutboxDispatcher(database.sessions, settings, [channel, rejection], "test/outbox")
    assert dispatcher.run_once() == 1  # the PACS is down: tried, to be retried
    with database.sessions.begin() as session:
        (delivery,) = session.scalars(select(Delivery)).all()
        assert delivery.state == "pending" and "association" in (delivery.last_error or "")
    orthanc = Orthanc(tmp_path / "orthanc", medreid_port=free_port(), dicom_port=pacs_port)
    try:
        orthanc.post("/instances", data)  # the image the PACS already holds
        for _ in range(5):
            if not dispatcher.run_once():
                break
        study = ct_study(orthanc, dcmread(spool / "ct.dcm").StudyInstanceUID)
        series = orthanc.get(f"/studies/{study}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "SR"]
        (report_series,) = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
        (sr_id,) = report_series["Instances"]
        tags: dict[str, Any] = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        evidence = tags["CurrentRequestedProcedureEvidenceSequence"][0]
        referenced = evidence["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"][0]
        assert referenced["ReferencedSOPInstanceUID"] == dcmread(spool / "ct.dcm").SOPInstanceUID
        # sent again (a service killed before it recorded the send): the same instance
        with database.sessions.begin() as session:
            (delivery,) = session.scalars(select(Delivery)).all()
            assert delivery.state == "sent" and delivery.attempts == 2
            found = event_with_alert(session, event_id=delivery.event_id)
            assert found is not None
            claimed = ClaimedDelivery(delivery.id, delivery.event_id, "x", 2)
            again = channel.prepare(session, claimed, *found)
        channel.send(settings.report_destinations[0], again)
        assert len(orthanc.get(f"/studies/{study}/instances")) == 2
        # a reviewer confirms the wrong patient: the images are rejected in the PACS (IOCM)
        with database.sessions.begin() as session:
            (alert,) = session.scalars(select(Alert)).all()
            review_alert(
                session,
                alert_id=alert.id,
                decision=AlertState.CONFIRMED,
                reviewer="qa",
                reason="misfiled",
            )
        dispatcher.run_once()
        series = orthanc.get(f"/studies/{study}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "KO", "SR"]
    finally:
        orthanc.stop()
    with database.sessions.begin() as session:
        sent = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "Report Sent"))
        assert [e.detail["attempts"] for e in sent] == [2]
        noted = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "Rejection Note Sent")
        ).all()
        assert len(noted) == 1


def ct_study(orthanc: Orthanc, study_uid: str) -> str:
    (found,) = orthanc.post("/tools/lookup", study_uid.encode())
    assert found["Type"] == "Study"
    return str(found["ID"])
