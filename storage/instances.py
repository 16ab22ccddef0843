"""Received instances, their associations, and the listing of them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from storage.models import (
    Association,
    AssociationOutcome,
    Instance,
    InstanceState,
    Job,
    JobState,
    Result,
    utcnow,
)


@dataclass(frozen=True)
class NewInstance:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    patient_id: str | None
    modality: str | None
    transfer_syntax_uid: str
    size_bytes: int
    sha256: str
    calling_ae: str
    peer_host: str
    association_id: int | None


# The receive path's statements, built once: executed with parameters, they compile once and
# skip the ORM's per-statement work (about 2 ms an instance on SQLite).
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_VERSIONS_OF_UID = select(_INSTANCES.c.sha256, _INSTANCES.c.version).where(
    _INSTANCES.c.sop_instance_uid == bindparam("uid")
)
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_JOBS: Table = Job.__table__  # type: ignore[assignment]
_INSERT_JOB = insert(_JOBS)


def stored_versions(session: Session, *, sop_instance_uid: str) -> dict[str, int]:
    """Content hash -> version of every stored version of one SOP instance (one query; the
    receive path asks it for every instance)."""
    rows = session.execute(_VERSIONS_OF_UID, {"uid": sop_instance_uid})
    return {sha256: version for sha256, version in rows}


def recorded_spool_paths(session: Session, *, sop_instance_uids: Iterable[str]) -> set[str]:
    """The spool paths recorded for any version of these SOP Instance UIDs."""
    uids = sorted(set(sop_instance_uids))
    paths: set[str] = set()
    for start in range(0, len(uids), 500):
        paths.update(
            session.scalars(
                select(Instance.spool_path).where(
                    Instance.sop_instance_uid.in_(uids[start : start + 500])
                )
            )
        )
    return paths


def record_instance(session: Session, *, new: NewInstance, version: int, spool_path: str) -> int:
    """Record a received instance version and queue its job; the new instance's id.

    Core inserts of prepared statements, not the ORM: this runs once per received instance."""
    now = utcnow()
    instance_id = session.execute(
        _INSERT_INSTANCE,
        {
            **dataclasses.asdict(new),  # its fields are the columns of the same names
            "version": version,
            "spool_path": spool_path,
            "state": InstanceState.QUEUED.value,
            "received_at": now,
        },
    ).scalar_one()
    session.execute(
        _INSERT_JOB,
        {
            "instance_id": instance_id,
            "state": JobState.PENDING.value,
            "created_at": now,
            "attempts": 0,
        },
    )
    return int(instance_id)


def add_instance_with_job(
    session: Session, *, new: NewInstance, version: int, spool_path: str
) -> Instance:
    """Record a received instance version and queue its job (one transaction, the caller's)."""
    instance = session.get(
        Instance, record_instance(session, new=new, version=version, spool_path=spool_path)
    )
    assert instance is not None
    return instance


def open_association(
    session: Session, *, calling_ae: str, called_ae: str, peer_host: str, peer_port: int
) -> int:
    row = Association(
        calling_ae=calling_ae, called_ae=called_ae, peer_host=peer_host, peer_port=peer_port
    )
    session.add(row)
    session.flush()
    return row.id


def close_association(
    session: Session,
    *,
    association_id: int,
    outcome: AssociationOutcome,
    stored: int,
    failed: int,
    bytes_stored: int,
    reason: str | None = None,
) -> None:
    session.execute(
        update(Association)
        .where(Association.id == association_id)
        .values(
            outcome=outcome,
            ended_at=utcnow(),
            instances_stored=stored,
            instances_failed=failed,
            bytes_stored=bytes_stored,
            reason=reason,
        )
    )


@dataclass(frozen=True)
class InstanceFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    state: str | None = None
    ae: str | None = None
    patient: str | None = None
    study: str | None = None
    limit: int = 1000


def list_instances(
    session: Session, *, where: InstanceFilter
) -> list[tuple[Instance, Result | None]]:
    """Instances with their latest result (if any), oldest first."""
    newer = aliased(Result)
    latest_result = (
        select(func.max(newer.id))
        .where(newer.instance_id == Instance.id)
        .correlate(Instance)
        .scalar_subquery()
    )
    stmt = select(Instance, Result).outerjoin(Result, Result.id == latest_result)
    if where.since is not None:
        stmt = stmt.where(Instance.received_at >= where.since)
    if where.until is not None:
        stmt = stmt.where(Instance.received_at < where.until)
    if where.state:
        stmt = stmt.where(Instance.state == where.state)
    if where.ae:
        stmt = stmt.where(Instance.calling_ae == where.ae)
    if where.patient:
        stmt = stmt.where(Instance.patient_id == where.patient)
    if where.study:
        stmt = stmt.where(Instance.study_instance_uid == where.study)
    stmt = stmt.order_by(Instance.id.desc()).limit(where.limit)
    rows: list[tuple[Instance, Result | None]] = [
        (inst, res) for inst, res in session.execute(stmt).all()
    ]
    rows.reverse()
    return rows
