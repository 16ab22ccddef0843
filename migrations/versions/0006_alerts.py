"""alerts: one row per flagged image or series and kind, open until a reviewer decides;
the mismatches already stored become open alerts; console users get a role (viewer,
reviewer, admin), existing ones viewer; alert events and their deliveries (the outbox)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 03:53:35.241457
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("result_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "series_verdict_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("suspected_patient_id", sa.String(length=64), nullable=True),
        sa.Column("header_modality", sa.String(length=16), nullable=True),
        sa.Column("predicted_modality", sa.String(length=16), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("raised_by", sa.String(length=255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewed_by", sa.String(length=255), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("review_reason", sa.Text(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_model", sa.String(length=128), nullable=True),
        sa.Column("embedding_modality", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["result_id"],
            ["results.id"],
            name=op.f("fk_alerts_result_id_results"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_verdict_id"],
            ["series_verdicts.id"],
            name=op.f("fk_alerts_series_verdict_id_series_verdicts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("result_id", "kind", name="uq_alerts_result_id_kind"),
        sa.UniqueConstraint("series_verdict_id", "kind", name="uq_alerts_series_verdict_id_kind"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_alerts_study_instance_uid"), ["study_instance_uid"], unique=False
        )
    op.create_table(
        "alert_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name=op.f("fk_alert_events_alert_id_alerts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
    )
    with op.batch_alter_table("alert_events") as batch:
        batch.create_index(batch.f("ix_alert_events_alert_id"), ["alert_id"], unique=False)
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("destination", sa.String(length=512), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["alert_events.id"],
            name=op.f("fk_deliveries_event_id_alert_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
        sa.UniqueConstraint(
            "event_id", "channel", "destination", name="uq_deliveries_event_id_channel_destination"
        ),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.create_index(
            "ix_deliveries_state_next_attempt_at", ["state", "next_attempt_at"], unique=False
        )
    with op.batch_alter_table("console_users") as batch:
        batch.add_column(
            sa.Column("role", sa.String(length=16), server_default="viewer", nullable=False)
        )
    _backfill()


def _backfill() -> None:
    """Every stored mismatch, of an image or a series, becomes an open alert."""
    alerts = sa.table(
        "alerts",
        *(
            sa.column(name)
            for name in (
                "kind",
                "scope",
                "state",
                "result_id",
                "series_verdict_id",
                "patient_id",
                "study_instance_uid",
                "series_instance_uid",
                "sop_instance_uid",
                "suspected_patient_id",
                "header_modality",
                "predicted_modality",
                "raised_at",
                "raised_by",
                "updated_at",
            )
        ),
        sa.column("detail", sa.JSON),
    )
    results = sa.table(
        "results",
        *(
            sa.column(name)
            for name in (
                "id",
                "instance_id",
                "modality_verdict",
                "identity_verdict",
                "matched_patient_id",
                "predicted_modality",
                "created_at",
                "worker",
            )
        ),
    )
    instances = sa.table(
        "instances",
        *(
            sa.column(name)
            for name in (
                "id",
                "patient_id",
                "study_instance_uid",
                "series_instance_uid",
                "sop_instance_uid",
                "modality",
            )
        ),
    )
    series = sa.table(
        "series_verdicts",
        *(
            sa.column(name)
            for name in (
                "id",
                "patient_id",
                "study_instance_uid",
                "series_instance_uid",
                "matched_patient_id",
                "header_modality",
                "predicted_modality",
                "modality_verdict",
                "identity_verdict",
                "decided_at",
                "decided_by",
            )
        ),
    )
    detail = sa.literal({"migrated": True}, sa.JSON)
    no_id = sa.cast(sa.null(), sa.BigInteger)
    no_text = sa.cast(sa.null(), sa.String)
    columns = [c.name for c in alerts.columns]
    for kind, verdict, suspect in (
        ("modality_mismatch", "modality_verdict", False),
        ("patient_mismatch", "identity_verdict", True),
    ):
        images = (
            sa.select(
                sa.literal(kind),
                sa.literal("image"),
                sa.literal("open"),
                results.c.id,
                no_id,
                instances.c.patient_id,
                instances.c.study_instance_uid,
                instances.c.series_instance_uid,
                instances.c.sop_instance_uid,
                results.c.matched_patient_id if suspect else no_text,
                instances.c.modality,
                results.c.predicted_modality,
                results.c.created_at,
                results.c.worker,
                results.c.created_at,
                detail,
            )
            .select_from(results.join(instances, instances.c.id == results.c.instance_id))
            .where(results.c[verdict] == "mismatch")
        )
        op.execute(alerts.insert().from_select(columns, images))
        judged = sa.select(
            sa.literal(kind),
            sa.literal("series"),
            sa.literal("open"),
            no_id,
            series.c.id,
            series.c.patient_id,
            series.c.study_instance_uid,
            series.c.series_instance_uid,
            no_text,
            series.c.matched_patient_id if suspect else no_text,
            series.c.header_modality,
            series.c.predicted_modality,
            series.c.decided_at,
            series.c.decided_by,
            series.c.decided_at,
            detail,
        ).where(series.c[verdict] == "mismatch")
        op.execute(alerts.insert().from_select(columns, judged))


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("alert_events")
    with op.batch_alter_table("console_users") as batch:
        batch.drop_column("role")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_alerts_state"))
        batch_op.drop_index(batch_op.f("ix_alerts_patient_id"))

    op.drop_table("alerts")
