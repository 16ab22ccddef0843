"""Repositories on SQLite and PostgreSQL (rollback fixture), and the job queue's claims."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from storage import audit
from storage.audit_trail import AuditFilter, append_audit, query_audit
from storage.instances import (
    InstanceFilter,
    NewInstance,
    add_instance_with_job,
    list_instances,
    stored_versions,
)
from storage.jobs import JobOutcome, claim_jobs, finish_job, release_jobs_of
from storage.models import AuditEvent, Instance, Job, JobState, Result
from tests.conftest import VARIANT, Database

pytestmark = pytest.mark.db


def new_instance(uid: str = "1.2.3.4", sha: str = "a" * 64, patient: str = "P1") -> NewInstance:
    return NewInstance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        patient_id=patient,
        modality="CT",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size_bytes=1000,
        sha256=sha,
        calling_ae="STORESCU",
        peer_host="127.0.0.1",
        association_id=None,
    )


OK = JobOutcome(ok=True, parameters={"clahe": {}}, timings_ms={"decode": 1.0}, shape=[1, 2, 2])


def test_an_instance_is_recorded_with_one_pending_job(session: Session) -> None:
    instance = add_instance_with_job(session, new=new_instance(), version=1, spool_path="a/b")
    jobs = session.scalars(select(Job).where(Job.instance_id == instance.id)).all()
    assert [j.state for j in jobs] == [JobState.PENDING]
    assert stored_versions(session, sop_instance_uid="1.2.3.4") == {"a" * 64: 1}
    assert stored_versions(session, sop_instance_uid="9.9") == {}


def test_the_same_content_cannot_be_recorded_twice(session: Session) -> None:
    add_instance_with_job(session, new=new_instance(), version=1, spool_path="a/1")
    with pytest.raises(IntegrityError), session.begin_nested():
        add_instance_with_job(session, new=new_instance(), version=2, spool_path="a/2")


def test_new_content_for_a_uid_is_a_new_version(session: Session) -> None:
    add_instance_with_job(session, new=new_instance(sha="a" * 64), version=1, spool_path="v1")
    add_instance_with_job(session, new=new_instance(sha="b" * 64), version=2, spool_path="v2")
    versions = session.scalars(
        select(Instance.version).where(Instance.sop_instance_uid == "1.2.3.4")
    ).all()
    assert sorted(versions) == [1, 2]


def test_claim_finish_and_exactly_one_result(session: Session) -> None:
    instance = add_instance_with_job(session, new=new_instance(), version=1, spool_path="x")
    claimed = claim_jobs(session, worker="w1", limit=10, lease_s=60, max_attempts=3)
    assert [c.instance_id for c in claimed] == [instance.id]
    assert claimed[0].attempt == 1
    # while leased, nobody else gets it
    assert claim_jobs(session, worker="w2", limit=10, lease_s=60, max_attempts=3) == []
    assert finish_job(session, job=claimed[0], worker="w1", outcome=OK)
    # a second finish (a duplicate delivery) changes nothing
    assert not finish_job(session, job=claimed[0], worker="w1", outcome=OK)
    assert session.scalar(select(func.count()).select_from(Result)) == 1
    assert session.get(Instance, instance.id).state == "processed"  # type: ignore[union-attr]


def test_an_expired_lease_is_claimed_again_and_the_late_worker_loses(session: Session) -> None:
    add_instance_with_job(session, new=new_instance(), version=1, spool_path="x")
    first = claim_jobs(session, worker="w1", limit=1, lease_s=60, max_attempts=3)[0]
    session.execute(
        update(Job).values(lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    )
    second = claim_jobs(session, worker="w2", limit=1, lease_s=60, max_attempts=3)[0]
    assert second.job_id == first.job_id and second.attempt == 2
    assert not finish_job(session, job=first, worker="w1", outcome=OK)
    assert finish_job(session, job=second, worker="w2", outcome=OK)
    results = session.scalars(select(Result)).all()
    assert [r.worker for r in results] == ["w2"]


def test_a_job_that_keeps_killing_its_worker_is_failed(session: Session) -> None:
    instance = add_instance_with_job(session, new=new_instance(), version=1, spool_path="x")
    for _ in range(2):
        claim_jobs(session, worker="w", limit=1, lease_s=60, max_attempts=2)
        release_jobs_of(session, claimant_prefix="w")
    assert claim_jobs(session, worker="w", limit=1, lease_s=60, max_attempts=2) == []
    result = session.scalars(select(Result).where(Result.instance_id == instance.id)).one()
    assert result.status == "failed" and "abandoned" in (result.failure_reason or "")


def test_release_only_touches_the_named_node(session: Session) -> None:
    add_instance_with_job(session, new=new_instance("1.1"), version=1, spool_path="a")
    add_instance_with_job(session, new=new_instance("1.2"), version=1, spool_path="b")
    claim_jobs(session, worker="hostA:104/1/0", limit=1, lease_s=60, max_attempts=3)
    claim_jobs(session, worker="hostB:104/1/0", limit=1, lease_s=60, max_attempts=3)
    assert release_jobs_of(session, claimant_prefix="hostA:104/") == 1
    states = session.scalars(select(Job.state).order_by(Job.id)).all()
    assert states == [JobState.PENDING, JobState.RUNNING]


def test_failed_outcome_records_stage_and_reason(session: Session) -> None:
    add_instance_with_job(session, new=new_instance(), version=1, spool_path="x")
    job = claim_jobs(session, worker="w", limit=1, lease_s=60, max_attempts=3)[0]
    failed = JobOutcome(
        ok=False,
        parameters={},
        timings_ms={"read": 0.1},
        failed_stage="decode",
        failure_reason="the dataset has no Pixel Data",
    )
    assert finish_job(session, job=job, worker="w", outcome=failed)
    rows = list_instances(session, where=InstanceFilter(state="failed"))
    assert len(rows) == 1
    assert rows[0][1] is not None and rows[0][1].failure_reason == "the dataset has no Pixel Data"


def test_every_field_of_an_outcome_lands_in_its_result_row(session: Session) -> None:
    """The worker's outcome is the row: each field (``ok`` is the status) is a column of the
    same name, stored as it is."""
    add_instance_with_job(session, new=new_instance(), version=1, spool_path="x")
    job = claim_jobs(session, worker="w", limit=1, lease_s=60, max_attempts=3)[0]
    full = JobOutcome(
        ok=True,
        parameters={"clahe": {"clip_limit": 2.0}},
        timings_ms={"read": 0.1, "decode": 1.5},
        shape=[1, 4, 4],
        frames_total=1,
        frames_analysed=[0],
        photometric="MONOCHROME2",
        stats_decoded={"mean": 1.0},
        stats_clahe={"mean": 0.5},
        predicted_modality="ct",
        modality_scores={"ct": 0.9, "other": 0.1},
        modality_verdict="agree",
        routed_to="ct",
        top_matches=[{"patient_id": "P1", "score": 0.8}],
        identity_threshold=0.5,
        identity_header_score=0.8,
        identity_verdict="consistent",
        matched_patient_id="P1",
        model_versions={"compa": "compa-v1"},
    )
    assert finish_job(session, job=job, worker="w", outcome=full)
    row = session.scalars(select(Result)).one()
    assert row.status == "ok" and row.worker == "w"
    for name, value in full.columns().items():
        assert getattr(row, name) == value, name
    assert set(full.columns()) <= set(Result.__table__.columns.keys())


def test_audit_query_filters(session: Session) -> None:
    append_audit(
        session,
        record=audit.AuditRecord(
            kind=audit.ASSOCIATION_REJECTED,
            outcome=audit.Outcome.MINOR_FAILURE,
            actor_ae="ROGUE",
            actor_host="10.9.9.9",
            detail={"reason": "calling AE title not recognised"},
        ),
    )
    append_audit(
        session,
        record=audit.AuditRecord(
            kind=audit.INSTANCES_TRANSFERRED,
            actor_ae="CT1",
            actor_host="127.0.0.1",
            patient_id="P7",
            study_instance_uid="1.2.3",
            detail={"instances": 3},
        ),
    )
    everything = query_audit(session, where=AuditFilter())
    assert [e.actor_ae for e in everything] == ["ROGUE", "CT1"]
    by_event = query_audit(session, where=AuditFilter(event="security alert"))
    assert [e.actor_ae for e in by_event] == ["ROGUE"]
    by_type = query_audit(session, where=AuditFilter(event="Association Rejected"))
    assert [e.actor_ae for e in by_type] == ["ROGUE"]
    assert [e.actor_ae for e in query_audit(session, where=AuditFilter(patient="P7"))] == ["CT1"]
    assert query_audit(session, where=AuditFilter(study="1.2.3"))[0].detail == {"instances": 3}
    failures = query_audit(session, where=AuditFilter(outcome=audit.Outcome.MINOR_FAILURE))
    assert [e.actor_host for e in failures] == ["10.9.9.9"]
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert query_audit(session, where=AuditFilter(since=future)) == []
    assert len(query_audit(session, where=AuditFilter(until=future))) == 2


def test_audit_events_are_append_only(database: Database) -> None:
    with database.sessions.begin() as session:
        append_audit(session, record=audit.AuditRecord(kind=audit.APPLICATION_START))
    with pytest.raises(DBAPIError, match="append-only"), database.sessions.begin() as session:
        session.execute(update(AuditEvent).values(outcome=12))
    with pytest.raises(DBAPIError, match="append-only"), database.sessions.begin() as session:
        session.execute(delete(AuditEvent))
    with database.sessions.begin() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 1


def test_concurrent_claimers_never_share_a_job(database: Database) -> None:
    """Four threads, each with its own connection, claim 200 committed jobs."""
    with database.sessions.begin() as session:
        for i in range(200):
            add_instance_with_job(
                session, new=new_instance(f"1.5.{i}", sha=f"{i:064d}"), version=1, spool_path="x"
            )
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        mine: list[int] = []
        try:
            while True:
                with database.sessions.begin() as session:
                    jobs = claim_jobs(session, worker=name, limit=7, lease_s=60, max_attempts=3)
                if not jobs:
                    break
                mine += [j.job_id for j in jobs]
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        claimed[name] = mine

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    every = [job for jobs in claimed.values() for job in jobs]
    assert len(every) == 200 and len(set(every)) == 200


def test_postgres_claims_skip_locked_rows(database: Database) -> None:
    if database.backend != "postgresql":
        pytest.skip(
            f"{VARIANT} FOR UPDATE SKIP LOCKED is the PostgreSQL path; SQLite serialises writers"
        )
    with database.sessions.begin() as session:
        for i in range(4):
            add_instance_with_job(
                session, new=new_instance(f"1.6.{i}", sha=f"{i:064d}"), version=1, spool_path="x"
            )
    holder = database.sessions()
    holder.begin()
    held = claim_jobs(holder, worker="slow", limit=2, lease_s=60, max_attempts=3)
    # 'slow' has not committed: its two rows stay locked, and another claimer skips them
    # instead of waiting.
    with database.sessions.begin() as session:
        session.execute(text("SET LOCAL lock_timeout = '2s'"))
        other = claim_jobs(session, worker="fast", limit=4, lease_s=60, max_attempts=3)
    holder.commit()
    holder.close()
    assert {j.job_id for j in held}.isdisjoint({j.job_id for j in other})
    assert len(other) == 2
