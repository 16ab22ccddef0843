"""A database holding known results, and a console client that can log in, for console tests."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from console.app import ConsoleConfig, ConsoleContext, create_app
from console.passwords import hash_password
from pipeline.runner import PipelineConfig
from storage.accounts import add_user
from storage.alerts import FlaggedImage, raise_image_alerts
from storage.instances import NewInstance, add_instance_with_job
from storage.models import AuditEvent, Instance, Job, JobState, Result, SeriesVerdictRow
from storage.results import save_series_verdict
from support.dicom_factory import encode, make_dataset
from tests.conftest import Database

PASSWORD = "correct horse battery"
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@dataclass
class Clock:
    now: dt.datetime = NOW

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@dataclass
class Hospital:
    """Result ids by name, and the pending job's instance."""

    results: dict[str, int] = field(default_factory=dict)
    pending_instance: int = 0


def _instance(
    db: Database,
    spool: Path,
    name: str,
    *,
    patient: str,
    modality: str,
    ae: str,
    study: str,
    received: dt.datetime,
) -> tuple[int, int]:
    pixels = (np.arange(96 * 80, dtype=np.uint16) * 7 % 4096).reshape(96, 80)
    ds = make_dataset(pixels, patient_id=patient, modality=modality, study_uid=study)
    data = encode(ds)
    (spool / f"{name}.dcm").write_bytes(data)
    with db.sessions.begin() as session:
        instance = add_instance_with_job(
            session,
            new=NewInstance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=study,
                series_instance_uid=str(ds.SeriesInstanceUID),
                patient_id=patient,
                modality=modality,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size_bytes=len(data),
                sha256=f"{abs(hash(data)):064d}"[:64],
                calling_ae=ae,
                peer_host="10.1.2.3",
                association_id=None,
            ),
            version=1,
            spool_path=f"{name}.dcm",
        )
        session.execute(
            update(Instance).where(Instance.id == instance.id).values(received_at=received)
        )
        job_id = instance.jobs[0].id
        return instance.id, job_id


def fill(db: Database, spool: Path) -> Hospital:
    """Five results and one pending job:

    ok      CT  CT1  P1      agree/consistent                  2026-11-20
    swap    CT  CT1  P2      agree/mismatch (looks like P3)    today
    wrong   DX  XR2  P4      mismatch (pixels: ct)/consistent  today
    broken  MR  MR3  P5      failed at decode                  yesterday
    script  DX  XR2  <script>  agree/new_patient               today
    """
    spool.mkdir(parents=True, exist_ok=True)
    hospital = Hospital()
    rows = [
        ("ok", "P1", "CT", "CT1", "1.2.826.1", NOW - dt.timedelta(days=6), "agree", "consistent"),
        ("swap", "P2", "CT", "CT1", "1.2.826.2", NOW - dt.timedelta(hours=1), "agree", "mismatch"),
        (
            "wrong",
            "P4",
            "DX",
            "XR2",
            "1.2.826.3",
            NOW - dt.timedelta(hours=2),
            "mismatch",
            "consistent",
        ),
        ("broken", "P5", "MR", "MR3", "1.2.826.4", NOW - dt.timedelta(days=1), None, None),
        (
            "script",
            "<script>alert(1)</script>",
            "DX",
            "XR2",
            "1.2.826.5",
            NOW - dt.timedelta(hours=3),
            "agree",
            "new_patient",
        ),
    ]
    for name, patient, modality, ae, study, received, mod_verdict, id_verdict in rows:
        instance_id, job_id = _instance(
            db,
            spool,
            name,
            patient=patient,
            modality=modality,
            ae=ae,
            study=study,
            received=received,
        )
        failed = name == "broken"
        matched = {"swap": "P3", "ok": "P1", "wrong": "P4"}.get(name)
        result = Result(
            job_id=job_id,
            instance_id=instance_id,
            status="failed" if failed else "ok",
            failed_stage="decode" if failed else None,
            failure_reason="Pixel Data is shorter than its header says" if failed else None,
            shape=None if failed else [1, 96, 80],
            parameters={},
            timings_ms={"read": 1.0, "decode": 2.0} if failed else {"read": 1.0, "models": 9.5},
            worker="test/1/0",
            created_at=received + dt.timedelta(seconds=2),
            predicted_modality=None if failed else ("ct" if name != "script" else "xray"),
            modality_scores=None if failed else {"ct": 0.93, "xray": 0.05, "mri": 0.02},
            modality_verdict=mod_verdict,
            routed_to=None if failed else "ct",
            top_matches=None
            if failed
            else [
                {"patient_id": matched or "P9", "score": 0.91},
                {"patient_id": "P7", "score": 0.4},
            ],
            identity_threshold=None if failed else 0.62,
            identity_margin=0.25 if name == "swap" else None,  # the model's calibrated one
            identity_header_score=0.3 if name == "swap" else None,
            identity_verdict=id_verdict,
            matched_patient_id=matched if id_verdict in ("mismatch", "consistent") else None,
            model_versions=None if failed else {"compa": "compa-v1", "reid:ct": "reid-ct-v1"},
        )
        with db.sessions.begin() as session:
            session.add(result)
            session.flush()
            instance = session.get(Instance, instance_id)
            assert instance is not None
            raise_image_alerts(  # as finish_job does
                session,
                result=result,
                image=FlaggedImage(
                    patient_id=instance.patient_id,
                    study_instance_uid=instance.study_instance_uid,
                    series_instance_uid=instance.series_instance_uid,
                    sop_instance_uid=instance.sop_instance_uid,
                    header_modality=instance.modality,
                ),
                by="test/1/0",
            )
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state=JobState.FAILED if failed else JobState.DONE, finished_at=received)
            )
            session.flush()
            hospital.results[name] = result.id
    with db.sessions.begin() as session:
        for name, verdict, matched, decided in (
            ("swap", "mismatch", "P3", NOW - dt.timedelta(minutes=50)),
            ("ok", "consistent", "P1", NOW - dt.timedelta(days=6)),
        ):
            judged = session.get(Result, hospital.results[name])
            assert judged is not None
            instance = session.get(Instance, judged.instance_id)
            assert instance is not None and instance.series_instance_uid
            save_series_verdict(  # and its alerts
                session,
                row=SeriesVerdictRow(
                    series_instance_uid=instance.series_instance_uid,
                    study_instance_uid=instance.study_instance_uid,
                    patient_id=instance.patient_id,
                    header_modality="CT",
                    images=1,
                    images_analysed=1,
                    predicted_modality="ct",
                    modality_agreement=1.0,
                    modality_verdict="agree",
                    identity_verdict=verdict,
                    matched_patient_id=matched,
                    threshold=0.62,
                    last_received_at=instance.received_at,
                    decided_at=decided,
                    decided_by="test/1/0",
                ),
            )
    hospital.pending_instance, _ = _instance(
        db,
        spool,
        "waiting",
        patient="P6",
        modality="CT",
        ae="CT1",
        study="1.2.826.6",
        received=NOW - dt.timedelta(minutes=5),
    )
    return hospital


def add_console_user(
    db: Database, name: str = "admin", password: str = PASSWORD, role: str = "viewer"
) -> None:
    with db.sessions.begin() as session:
        user = add_user(session, username=name, password_hash=hash_password(password), by="test")
        user.role = role


def console_client(
    db: Database, spool: Path, clock: Clock, config: ConsoleConfig | None = None
) -> TestClient:
    app = create_app(
        ConsoleContext(
            sessions=db.sessions,
            spool_root=spool,
            pipeline=PipelineConfig(),
            config=config or ConsoleConfig(),
            version="test",
            clock=clock,
        )
    )
    return TestClient(app, follow_redirects=False)


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def login(client: TestClient, name: str = "admin", password: str = PASSWORD) -> int:
    """Log in through the form as a browser would; the response's status."""
    form = client.get("/login")
    match = CSRF.search(form.text)
    assert match, form.text
    answer = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": match.group(1), "next": "/"},
    )
    return answer.status_code


def page_csrf(client: TestClient) -> str:
    match = CSRF.search(client.get("/").text)
    assert match
    return match.group(1)


def audit_rows(db: Database, **where: str) -> list[AuditEvent]:
    with db.sessions.begin() as session:
        stmt = select(AuditEvent).order_by(AuditEvent.id)
        for column, value in where.items():
            stmt = stmt.where(getattr(AuditEvent, column) == value)
        return list(session.scalars(stmt))


def api_token(db: Database, name: str) -> str:
    """A bearer token of the user, as `medreid users token` makes one."""
    from console.passwords import new_token, token_digest
    from storage.accounts import find_user, open_session
    from storage.models import SessionKind

    token = new_token()
    with db.sessions.begin() as session:
        user = find_user(session, username=name)
        assert user is not None
        open_session(
            session,
            user=user,
            kind=SessionKind.API,
            token_sha256=token_digest(token),
            csrf_token=None,
            client_host=None,
            now=NOW,
            expires_at=NOW + dt.timedelta(days=1),
        )
    return token
