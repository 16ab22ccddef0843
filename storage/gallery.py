"""The re-identification gallery and the activated models."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import (
    ActiveModel,
    GalleryEntry,
    GalleryOrigin,
    utcnow,
)


@dataclass(frozen=True)
class NewGalleryEntry:
    patient_id: str
    modality: str
    model_version: str
    embedding: bytes  # float32, little-endian
    source_instance_id: int | None
    source_path: str | None
    enrolled_by: str
    prior: PriorReference | None = None  # a PACS prior's reference, instead of a source


@dataclass(frozen=True)
class PriorReference:
    """Where a PACS prior came from: enough to fetch it again."""

    node: str  # AE@host:port
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    study_date: str | None  # DICOM DA


def add_gallery_entries(session: Session, *, entries: list[NewGalleryEntry]) -> int:
    session.add_all(
        GalleryEntry(
            patient_id=e.patient_id,
            modality=e.modality,
            model_version=e.model_version,
            embedding=e.embedding,
            source_instance_id=e.source_instance_id,
            source_path=e.source_path,
            enrolled_by=e.enrolled_by,
            origin=GalleryOrigin.ENROLLED if e.prior is None else GalleryOrigin.PACS_PRIOR,
            prior_node=e.prior.node if e.prior else None,
            prior_study_uid=e.prior.study_instance_uid if e.prior else None,
            prior_series_uid=e.prior.series_instance_uid if e.prior else None,
            prior_sop_uid=e.prior.sop_instance_uid if e.prior else None,
            prior_study_date=e.prior.study_date if e.prior else None,
        )
        for e in entries
    )
    session.flush()
    return len(entries)


def gallery_after(
    session: Session, *, model_version: str, after_id: int
) -> list[tuple[int, str, bytes]]:
    """Entries of one model version newer than ``after_id``: (id, patient, embedding)."""
    rows = session.execute(
        select(GalleryEntry.id, GalleryEntry.patient_id, GalleryEntry.embedding)
        .where(GalleryEntry.model_version == model_version, GalleryEntry.id > after_id)
        .order_by(GalleryEntry.id)
    ).all()
    return [(int(i), str(p), bytes(e)) for i, p, e in rows]


def active_models(session: Session) -> dict[str, tuple[str, str]]:
    """slot -> (version, path) of the activated models."""
    rows = session.execute(select(ActiveModel.slot, ActiveModel.version, ActiveModel.path)).all()
    return {str(slot): (str(version), str(path)) for slot, version, path in rows}


def activate_model(session: Session, *, slot: str, version: str, path: str, by: str) -> None:
    existing = session.get(ActiveModel, slot)
    if existing is None:
        session.add(ActiveModel(slot=slot, version=version, path=path, activated_by=by))
    else:
        existing.version, existing.path, existing.activated_by = version, path, by
        existing.activated_at = utcnow()
    session.flush()
