"""PACS priors: what was last asked of the PACS per patient, modality and model (a lease
while a worker asks, a retry schedule while it cannot), the priors held, and the results
that wait for them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.models import (
    GalleryEntry,
    GalleryOrigin,
    Instance,
    PriorFetch,
    PriorFetchState,
    Result,
    utcnow,
)


@dataclass(frozen=True)
class PriorsKey:
    """Priors are held per patient, modality (as the models name it) and model version."""

    patient_id: str
    modality: str
    model_version: str


@dataclass(frozen=True)
class PriorsHeld:
    entries: int  # gallery entries of the patient under the model, of any origin
    state: str | None  # the last fetch's PriorFetchState; None where never asked
    fetched_at: dt.datetime | None
    next_attempt_at: dt.datetime | None
    last_error: str | None


def priors_held(session: Session, *, key: PriorsKey) -> PriorsHeld:
    entries = session.scalar(
        select(func.count(GalleryEntry.id)).where(
            GalleryEntry.patient_id == key.patient_id,
            GalleryEntry.model_version == key.model_version,
        )
    )
    fetch = _fetch_row(session, key)
    return PriorsHeld(
        entries=int(entries or 0),
        state=fetch.state if fetch else None,
        fetched_at=_aware(fetch.fetched_at) if fetch else None,
        next_attempt_at=_aware(fetch.next_attempt_at) if fetch else None,
        last_error=fetch.last_error if fetch else None,
    )


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _fetch_row(session: Session, key: PriorsKey, *, lock: bool = False) -> PriorFetch | None:
    stmt = select(PriorFetch).where(
        PriorFetch.patient_id == key.patient_id,
        PriorFetch.modality == key.modality,
        PriorFetch.model_version == key.model_version,
    )
    return session.scalars(stmt.with_for_update() if lock else stmt).one_or_none()


def take_fetch_lease(
    session: Session, *, key: PriorsKey, lease_s: float, now: dt.datetime | None = None
) -> bool:
    """Take the right to ask the PACS for these priors for ``lease_s``; False where another
    worker holds it (it is asking now)."""
    now = now or utcnow()
    row = _fetch_row(session, key, lock=True)
    until = now + dt.timedelta(seconds=lease_s)
    if row is None:
        try:
            with session.begin_nested():
                session.add(
                    PriorFetch(
                        patient_id=key.patient_id,
                        modality=key.modality,
                        model_version=key.model_version,
                        state=PriorFetchState.FETCHING,
                        lease_until=until,
                        studies=0,
                        images=0,
                        attempts=0,
                    )
                )
            return True
        except IntegrityError:
            return False  # another worker inserted it first
    lease = _aware(row.lease_until)
    if row.state == PriorFetchState.FETCHING and lease is not None and lease > now:
        return False
    row.state, row.lease_until, row.updated_at = PriorFetchState.FETCHING, until, now
    session.flush()
    return True


def fetch_succeeded(
    session: Session, *, key: PriorsKey, studies: int, images: int, now: dt.datetime | None = None
) -> None:
    now = now or utcnow()
    row = _fetch_row(session, key, lock=True)
    if row is None:
        row = PriorFetch(
            patient_id=key.patient_id, modality=key.modality, model_version=key.model_version
        )
        session.add(row)
    row.state = PriorFetchState.FETCHED
    row.studies, row.images, row.attempts = studies, images, 0
    row.fetched_at, row.updated_at = now, now
    row.next_attempt_at = row.lease_until = None
    row.last_error = None
    session.flush()


def fetch_failed(
    session: Session,
    *,
    key: PriorsKey,
    error: str,
    retry_s: float,
    retry_max_s: float,
    max_attempts: int,
    now: dt.datetime | None = None,
) -> PriorFetchState:
    """Record a failed fetch: asked again after ``retry_s``, doubling up to ``retry_max_s``,
    until ``max_attempts`` failures in a row, then given up. Returns the new state."""
    now = now or utcnow()
    row = _fetch_row(session, key, lock=True)
    if row is None:
        row = PriorFetch(
            patient_id=key.patient_id,
            modality=key.modality,
            model_version=key.model_version,
            studies=0,
            images=0,
            attempts=0,
        )
        session.add(row)
    row.attempts = (row.attempts or 0) + 1
    row.last_error, row.updated_at, row.lease_until = error, now, None
    if row.attempts >= max_attempts:
        row.state, row.next_attempt_at = PriorFetchState.GAVE_UP, None
    else:
        wait = min(retry_max_s, retry_s * 2 ** (row.attempts - 1))
        row.state = PriorFetchState.UNAVAILABLE
        row.next_attempt_at = now + dt.timedelta(seconds=wait)
    session.flush()
    return PriorFetchState(row.state)


def waiting_pairs(session: Session, *, limit: int = 20) -> list[tuple[str, str]]:
    """(patient, modality) pairs whose results wait for priors, longest-waiting first."""
    first = func.min(Result.id)
    rows = session.execute(
        select(Instance.patient_id, Result.routed_to)
        .join(Instance, Instance.id == Result.instance_id)
        .where(Result.awaiting_priors.is_(True))
        .group_by(Instance.patient_id, Result.routed_to)
        .order_by(first)
        .limit(limit)
    ).all()
    return [(str(p), str(m)) for p, m in rows if p is not None and m is not None]


def held_prior_uids(session: Session, *, patient_id: str, model_version: str) -> set[str]:
    """SOP Instance UIDs of the patient's PACS priors already in the gallery under the model."""
    return {
        str(uid)
        for uid in session.scalars(
            select(GalleryEntry.prior_sop_uid).where(
                GalleryEntry.patient_id == patient_id,
                GalleryEntry.model_version == model_version,
                GalleryEntry.prior_sop_uid.is_not(None),
            )
        )
    }


def prior_studies(session: Session, *, patient_id: str, model_version: str) -> list[dict[str, Any]]:
    """The patient's PACS prior studies in the gallery under the model, newest first."""
    rows = session.execute(
        select(
            GalleryEntry.prior_study_uid,
            GalleryEntry.prior_study_date,
            GalleryEntry.prior_node,
            func.count(GalleryEntry.id),
        )
        .where(
            GalleryEntry.patient_id == patient_id,
            GalleryEntry.model_version == model_version,
            GalleryEntry.origin == GalleryOrigin.PACS_PRIOR,
        )
        .group_by(
            GalleryEntry.prior_study_uid, GalleryEntry.prior_study_date, GalleryEntry.prior_node
        )
    ).all()
    studies = [
        {"study_instance_uid": uid, "study_date": date, "node": node, "images": int(n)}
        for uid, date, node, n in rows
    ]
    return sorted(studies, key=lambda s: s["study_date"] or "", reverse=True)


@dataclass(frozen=True)
class AwaitingResult:
    """A result judged unverifiable for want of priors, with what it takes to judge again."""

    result_id: int
    job_id: int
    instance_id: int
    spool_path: str
    sop_instance_uid: str
    patient_id: str | None
    study_instance_uid: str | None
    modality: str | None


def awaiting_results(
    session: Session, *, patient_id: str, modality: str, limit: int = 1000
) -> list[AwaitingResult]:
    rows = session.execute(
        select(
            Result.id,
            Result.job_id,
            Instance.id,
            Instance.spool_path,
            Instance.sop_instance_uid,
            Instance.patient_id,
            Instance.study_instance_uid,
            Instance.modality,
        )
        .join(Instance, Instance.id == Result.instance_id)
        .where(
            Result.awaiting_priors.is_(True),
            Instance.patient_id == patient_id,
            Result.routed_to == modality,
        )
        .order_by(Result.id)
        .limit(limit)
    ).all()
    return [AwaitingResult(*row) for row in rows]


def stop_waiting(session: Session, *, result_id: int, reason: str) -> int:
    """A waiting result keeps its unverifiable verdict, with ``reason``, and waits no more."""
    done = session.execute(
        update(Result)
        .where(Result.id == result_id, Result.awaiting_priors.is_(True))
        .values(awaiting_priors=False, identity_reason=reason, judged_again_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(done.rowcount or 0)  # type: ignore[attr-defined]
