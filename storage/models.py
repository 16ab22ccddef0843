"""SQLAlchemy 2 models. Alembic (``migrations/``) is the only way the schema changes."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY, so big keys are plain integers there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Where "now" comes from: utcnow, or a test's clock. The console and the commands take one.
Clock = Callable[[], dt.datetime]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        dt.datetime: DateTime(timezone=True),
        # SQLAlchemy 2.1 maps float to DOUBLE, 2.0 to FLOAT; the migrations create DOUBLE
        float: Double,
    }


class InstanceState(enum.StrEnum):
    QUEUED = "queued"
    PROCESSED = "processed"
    FAILED = "failed"


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class AssociationOutcome(enum.StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    outcome: Mapped[str] = mapped_column(String(16), default=AssociationOutcome.OPEN)
    reason: Mapped[str | None] = mapped_column(Text)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)


class Instance(Base):
    """One received version of one SOP instance, as it lies in the spool."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version"),
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instances_uid_sha256"),
        Index("ix_instances_study_instance_uid", "study_instance_uid"),
        Index("ix_instances_patient_id", "patient_id"),
        Index("ix_instances_received_at", "received_at"),
        Index("ix_instances_series_instance_uid", "series_instance_uid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(Text)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(255))
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL")
    )
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.QUEUED)

    jobs: Mapped[list[Job]] = relationship(back_populates="instance")


class Job(Base):
    """A unit of pipeline work; claimed by one worker at a time under a lease."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_id", "state", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[dt.datetime | None]
    lease_expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)

    instance: Mapped[Instance] = relationship(back_populates="jobs")


class Result(Base):
    """What the pipeline made of one job: exactly one row per finished job."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    instance_id: Mapped[int] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16))
    failed_stage: Mapped[str | None] = mapped_column(String(32))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    shape: Mapped[list[Any] | None]
    frames_total: Mapped[int | None] = mapped_column(Integer)
    frames_analysed: Mapped[list[Any] | None]
    photometric: Mapped[str | None] = mapped_column(String(32))
    stats_decoded: Mapped[dict[str, Any] | None]
    stats_clahe: Mapped[dict[str, Any] | None]
    parameters: Mapped[dict[str, Any]]
    timings_ms: Mapped[dict[str, Any]]
    worker: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # What the models said (null where no model ran): the modality check...
    predicted_modality: Mapped[str | None] = mapped_column(String(16))
    modality_scores: Mapped[dict[str, Any] | None]
    modality_verdict: Mapped[str | None] = mapped_column(String(16), index=True)
    routed_to: Mapped[str | None] = mapped_column(String(16))
    # ...and the identity check against the enrolled gallery.
    top_matches: Mapped[list[Any] | None]
    identity_threshold: Mapped[float | None]
    # The model's calibrated mismatch margin where it decided (null: the settings' margin and
    # the threshold decided together).
    identity_margin: Mapped[float | None]
    identity_header_score: Mapped[float | None]  # the header patient's best score
    identity_verdict: Mapped[str | None] = mapped_column(String(16), index=True)
    matched_patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    model_versions: Mapped[dict[str, Any] | None]
    # Why the identity verdict is what it is where the verdict alone does not say (priors
    # that could not be had from the PACS, say).
    identity_reason: Mapped[str | None] = mapped_column(Text)
    # The header patient's PACS prior studies the image was judged against: [{study, date,
    # node}], newest first; null where it was judged against enrolled images only.
    priors: Mapped[list[Any] | None]
    # Unverifiable for want of priors: judged again when the PACS gives them.
    awaiting_priors: Mapped[bool] = mapped_column(default=False, index=True)
    judged_again_at: Mapped[dt.datetime | None]


class SeriesVerdictRow(Base):
    """One verdict per CT or MR series, decided after the series has been quiet for a while.

    Revised (``revision`` + 1) if images of the series arrive after it was decided."""

    __tablename__ = "series_verdicts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    header_modality: Mapped[str | None] = mapped_column(String(16))
    images: Mapped[int] = mapped_column(Integer)
    images_analysed: Mapped[int] = mapped_column(Integer)
    predicted_modality: Mapped[str | None] = mapped_column(String(16))
    modality_agreement: Mapped[float | None]
    modality_verdict: Mapped[str | None] = mapped_column(String(16), index=True)
    identity_verdict: Mapped[str | None] = mapped_column(String(16), index=True)
    matched_patient_id: Mapped[str | None] = mapped_column(String(64))
    header_score: Mapped[float | None]
    best_other_score: Mapped[float | None]
    threshold: Mapped[float | None]
    margin: Mapped[float | None]  # as results.identity_margin
    last_received_at: Mapped[dt.datetime]
    decided_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    decided_by: Mapped[str] = mapped_column(String(255))
    revision: Mapped[int] = mapped_column(Integer, default=1)


class AlertKind(enum.StrEnum):
    MODALITY_MISMATCH = "modality_mismatch"
    PATIENT_MISMATCH = "patient_mismatch"


class AlertScope(enum.StrEnum):
    IMAGE = "image"
    SERIES = "series"


class AlertState(enum.StrEnum):
    OPEN = "open"
    CONFIRMED = "confirmed"
    DISMISSED = "dismissed"


class Alert(Base):
    """A mismatch a person must look at: one per flagged image, or per judged series, and
    kind. ``open`` until a reviewer confirms or dismisses it, with a reason."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("result_id", "kind", name="uq_alerts_result_id_kind"),
        UniqueConstraint("series_verdict_id", "kind", name="uq_alerts_series_verdict_id_kind"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True, default=AlertState.OPEN)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    series_verdict_id: Mapped[int | None] = mapped_column(
        ForeignKey("series_verdicts.id", ondelete="CASCADE")
    )
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # What the pixels say instead: the patient they resemble, the modality they show.
    suspected_patient_id: Mapped[str | None] = mapped_column(String(64))
    header_modality: Mapped[str | None] = mapped_column(String(16))
    predicted_modality: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]]
    raised_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    raised_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    reviewed_by: Mapped[str | None] = mapped_column(String(255))
    reviewed_at: Mapped[dt.datetime | None]
    review_reason: Mapped[str | None] = mapped_column(Text)
    # A flagged image's embedding, so a reviewer who dismisses a patient mismatch may enroll
    # the image under its header patient without running the model again.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    embedding_model: Mapped[str | None] = mapped_column(String(128))
    embedding_modality: Mapped[str | None] = mapped_column(String(16))


class AlertEventKind(enum.StrEnum):
    RAISED = "alert.raised"
    REVIEWED = "alert.reviewed"


class AlertEvent(Base):
    """What happened to an alert that people outside are told of: written in the transaction
    of the change, then delivered from the outbox (``deliveries``)."""

    __tablename__ = "alert_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    GIVEN_UP = "given_up"


class Delivery(Base):
    """One event to one destination: retried with backoff until sent or given up, across
    restarts; claimed under a lease, as jobs are, so two dispatchers never send it at once."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint(
            "event_id", "channel", "destination", name="uq_deliveries_event_id_channel_destination"
        ),
        Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("alert_events.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(16))
    destination: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[dt.datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class GalleryOrigin(enum.StrEnum):
    ENROLLED = "enrolled"  # by a person: `medreid enroll`, a review, the auto-enroll policy
    PACS_PRIOR = "pacs_prior"  # the patient's earlier image, fetched from a PACS


class GalleryEntry(Base):
    """An enrolled embedding: this image shows this patient, for one model version.

    A PACS prior keeps where it came from (node, study, series, SOP Instance UIDs and the
    study date) instead of its pixels, so it can be fetched again under a new model."""

    __tablename__ = "gallery"
    __table_args__ = (
        Index("ix_gallery_model_version_id", "model_version", "id"),
        Index("ix_gallery_model_version_prior_sop_instance_uid", "model_version", "prior_sop_uid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(128))
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    source_instance_id: Mapped[int | None] = mapped_column(
        ForeignKey("instances.id", ondelete="SET NULL")
    )
    source_path: Mapped[str | None] = mapped_column(Text)
    enrolled_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    enrolled_by: Mapped[str] = mapped_column(String(255))
    origin: Mapped[str] = mapped_column(String(16), default=GalleryOrigin.ENROLLED)
    prior_node: Mapped[str | None] = mapped_column(String(255))
    prior_study_uid: Mapped[str | None] = mapped_column(String(64))
    prior_series_uid: Mapped[str | None] = mapped_column(String(64))
    prior_sop_uid: Mapped[str | None] = mapped_column(String(64))
    prior_study_date: Mapped[str | None] = mapped_column(String(8))  # DICOM DA, YYYYMMDD


class PriorFetchState(enum.StrEnum):
    FETCHING = "fetching"  # a worker is asking the PACS now (until lease_until)
    FETCHED = "fetched"  # the PACS answered; what it had (perhaps nothing) is in the gallery
    UNAVAILABLE = "unavailable"  # the PACS could not be asked: asked again at next_attempt_at
    GAVE_UP = "gave_up"  # unavailable max_attempts times running


class PriorFetch(Base):
    """What was last asked of the PACS for one patient's priors of one modality, under one
    model version: when, with what outcome, and when to ask again."""

    __tablename__ = "prior_fetches"
    __table_args__ = (
        UniqueConstraint("patient_id", "modality", "model_version"),
        Index("ix_prior_fetches_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    studies: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failures in a row
    fetched_at: Mapped[dt.datetime | None]
    next_attempt_at: Mapped[dt.datetime | None]
    lease_until: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ActiveModel(Base):
    """Which model version serves each slot ("compa", "reid:xray", ...)."""

    __tablename__ = "active_models"

    slot: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    activated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    activated_by: Mapped[str] = mapped_column(String(255))


class AuditEvent(Base):
    """An append-only audit record in the DICOM PS3.15 A.5 / IHE ATNA vocabulary."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_occurred_at", "occurred_at"),
        Index("ix_audit_events_event", "event"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    event_code: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[int] = mapped_column(SmallInteger)
    actor_ae: Mapped[str | None] = mapped_column(String(16))
    actor_host: Mapped[str | None] = mapped_column(String(255))
    actor_user: Mapped[str | None] = mapped_column(String(255))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]]


class UserRole(enum.StrEnum):
    """What a console user may do: look (viewer), also decide alerts (reviewer), and also
    manage users (admin)."""

    VIEWER = "viewer"
    REVIEWER = "reviewer"
    ADMIN = "admin"

    def may_review(self) -> bool:
        return self in (UserRole.REVIEWER, UserRole.ADMIN)


class ConsoleUser(Base):
    """A user of the web console; the password is kept as a salted scrypt hash."""

    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    password_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[dt.datetime | None]
    last_login_at: Mapped[dt.datetime | None]
    # failed logins before this time no longer count towards a lockout (`medreid users unlock`)
    unlocked_at: Mapped[dt.datetime | None]
    role: Mapped[str] = mapped_column(
        String(16), default=UserRole.VIEWER, server_default=UserRole.VIEWER.value
    )


class SessionKind(enum.StrEnum):
    BROWSER = "browser"  # a login's cookie, with a CSRF token for its forms
    API = "api"  # a bearer token made by `medreid users token`


class ConsoleSession(Base):
    """A console login or API token. Only the token's SHA-256 is stored, never the token."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_user_id", "user_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("console_users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    csrf_token: Mapped[str | None] = mapped_column(String(64))
    client_host: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    ended_at: Mapped[dt.datetime | None]
    ended_why: Mapped[str | None] = mapped_column(String(64))

    user: Mapped[ConsoleUser] = relationship()
