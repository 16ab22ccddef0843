"""Series verdicts (application layer): which series are judged, the row a verdict
becomes, and the alerts it raises."""

from __future__ import annotations

import datetime as dt
import functools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline.series import SeriesVerdict
from pipeline.verdicts import DEFAULT_MISMATCH_MARGIN, IdentityVerdict, ModalityVerdict
from storage import audit
from storage.models import Instance, SeriesVerdictRow, utcnow


@dataclass(frozen=True)
class SeriesPolicy:
    """Which series get a series verdict, and how long a series must be quiet first."""

    modalities: tuple[str, ...] = ("CT", "MR")
    quiet_s: float = 30.0
    tag_map: Mapping[str, str] | None = None
    mismatch_margin: float | None = DEFAULT_MISMATCH_MARGIN  # as AnalysisSettings'


def mismatch_alerts(
    alert: Callable[..., audit.AuditRecord],
    *,
    modality_verdict: str | None,
    identity_verdict: str | None,
    modality: Mapping[str, object],
    identity: Mapping[str, object],
) -> list[audit.AuditRecord]:
    """The Security Alerts of a judgement, an image's or a series': one for a modality
    mismatch, one for a patient mismatch, each with what a reviewer needs to see."""
    records = []
    if modality_verdict == ModalityVerdict.MISMATCH:
        records.append(alert(audit.MODALITY_MISMATCH, **modality))
    if identity_verdict == IdentityVerdict.MISMATCH:
        records.append(alert(audit.PATIENT_MISMATCH, **identity))
    return records


def worker_event(
    kind: audit.EventKind,
    *,
    worker: str,
    patient_id: str | None,
    study_instance_uid: str | None,
    **detail: object,
) -> audit.AuditRecord:
    """An audit event the worker raises about what it found (a minor failure: a person must
    look), with the patient and the study it concerns."""
    return audit.AuditRecord(
        kind=kind,
        outcome=audit.Outcome.MINOR_FAILURE,
        actor_user=worker,
        patient_id=patient_id,
        study_instance_uid=study_instance_uid,
        detail=detail,
    )


def series_audit_records(row: SeriesVerdictRow, worker: str) -> list[audit.AuditRecord]:
    """A series judged a mismatch as a whole is a Security Alert of its own."""
    alert = functools.partial(
        worker_event,
        worker=worker,
        patient_id=row.patient_id,
        study_instance_uid=row.study_instance_uid,
        scope="series",
        series_instance_uid=row.series_instance_uid,
        images=row.images,
        revision=row.revision,
    )
    return mismatch_alerts(
        alert,
        modality_verdict=row.modality_verdict,
        identity_verdict=row.identity_verdict,
        modality={
            "header_modality": row.header_modality,
            "predicted": row.predicted_modality,
            "agreement": row.modality_agreement,
        },
        identity={
            "header_patient": row.patient_id,
            "looks_like": row.matched_patient_id,
            "header_score": row.header_score,
            "best_other_score": row.best_other_score,
            "threshold": row.threshold,
            "margin": row.margin,
        },
    )


def _most_common(values: list[str | None]) -> str | None:
    present = [v for v in values if v]
    return Counter(present).most_common(1)[0][0] if present else None


@dataclass(frozen=True)
class SeriesHeader:
    """What most images of a series say in their headers."""

    series_instance_uid: str | None
    study_instance_uid: str | None
    patient_id: str | None
    modality: str | None

    @classmethod
    def of(cls, images: list[Instance]) -> SeriesHeader:
        return cls(
            series_instance_uid=images[0].series_instance_uid,
            study_instance_uid=_most_common([i.study_instance_uid for i in images]),
            patient_id=_most_common([i.patient_id for i in images]),
            modality=_most_common([i.modality for i in images]),
        )


def series_row(
    header: SeriesHeader, verdict: SeriesVerdict, last: dt.datetime, worker: str
) -> SeriesVerdictRow:
    return SeriesVerdictRow(
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        patient_id=header.patient_id,
        header_modality=header.modality,
        images=verdict.images,
        images_analysed=verdict.images_analysed,
        predicted_modality=verdict.predicted_modality,
        modality_agreement=verdict.modality_agreement,
        modality_verdict=verdict.modality_verdict,
        identity_verdict=verdict.identity_verdict,
        matched_patient_id=verdict.matched_patient_id,
        header_score=verdict.header_score,
        best_other_score=verdict.best_other_score,
        threshold=verdict.threshold,
        margin=verdict.margin,
        last_received_at=last,
        decided_at=utcnow(),
        decided_by=worker,
        revision=1,
    )
