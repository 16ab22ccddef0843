"""series verdicts and the header patient's score

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 08:54:56.648653
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "series_verdicts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("header_modality", sa.String(length=16), nullable=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("images_analysed", sa.Integer(), nullable=False),
        sa.Column("predicted_modality", sa.String(length=16), nullable=True),
        sa.Column("modality_agreement", sa.Double(), nullable=True),
        sa.Column("modality_verdict", sa.String(length=16), nullable=True),
        sa.Column("identity_verdict", sa.String(length=16), nullable=True),
        sa.Column("matched_patient_id", sa.String(length=64), nullable=True),
        sa.Column("header_score", sa.Double(), nullable=True),
        sa.Column("best_other_score", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(length=255), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series_verdicts")),
        sa.UniqueConstraint(
            "series_instance_uid", name=op.f("uq_series_verdicts_series_instance_uid")
        ),
    )
    with op.batch_alter_table("series_verdicts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_series_verdicts_identity_verdict"), ["identity_verdict"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_series_verdicts_modality_verdict"), ["modality_verdict"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_series_verdicts_patient_id"), ["patient_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_series_verdicts_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            "ix_instances_series_instance_uid", ["series_instance_uid"], unique=False
        )

    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("identity_header_score", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("identity_header_score")

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_series_instance_uid")

    with op.batch_alter_table("series_verdicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_verdicts_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_series_verdicts_patient_id"))
        batch_op.drop_index(batch_op.f("ix_series_verdicts_modality_verdict"))
        batch_op.drop_index(batch_op.f("ix_series_verdicts_identity_verdict"))

    op.drop_table("series_verdicts")
