"""PACS priors: gallery entries remember the prior they came from; one row per patient,
modality and model of what was last asked of the PACS; results say which priors they were
judged against, and whether they wait for priors

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 06:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Plain ADD COLUMN, never a batch copy: on SQLite a copy drops the old table, and
    # dropping `results` would cascade to the alerts that refer to it.
    op.add_column(
        "gallery",
        sa.Column("origin", sa.String(length=16), nullable=False, server_default="enrolled"),
    )
    op.add_column("gallery", sa.Column("prior_node", sa.String(length=255), nullable=True))
    op.add_column("gallery", sa.Column("prior_study_uid", sa.String(length=64), nullable=True))
    op.add_column("gallery", sa.Column("prior_series_uid", sa.String(length=64), nullable=True))
    op.add_column("gallery", sa.Column("prior_sop_uid", sa.String(length=64), nullable=True))
    op.add_column("gallery", sa.Column("prior_study_date", sa.String(length=8), nullable=True))
    op.create_index(
        "ix_gallery_model_version_prior_sop_instance_uid",
        "gallery",
        ["model_version", "prior_sop_uid"],
    )
    op.add_column("results", sa.Column("identity_reason", sa.Text(), nullable=True))
    op.add_column("results", sa.Column("priors", sa.JSON(), nullable=True))
    op.add_column(
        "results",
        sa.Column("awaiting_priors", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column(
        "results", sa.Column("judged_again_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(op.f("ix_results_awaiting_priors"), "results", ["awaiting_priors"])
    op.create_table(
        "prior_fetches",
        sa.Column("id", BigId, nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("studies", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prior_fetches")),
        sa.UniqueConstraint(
            "patient_id", "modality", "model_version", name=op.f("uq_prior_fetches_patient_id")
        ),
    )
    op.create_index(
        "ix_prior_fetches_state_next_attempt_at", "prior_fetches", ["state", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_prior_fetches_state_next_attempt_at", table_name="prior_fetches")
    op.drop_table("prior_fetches")
    op.drop_index(op.f("ix_results_awaiting_priors"), table_name="results")
    op.drop_index("ix_gallery_model_version_prior_sop_instance_uid", table_name="gallery")
    # SQLite (3.35 and later) drops a plain column in place
    for column in ("judged_again_at", "awaiting_priors", "priors", "identity_reason"):
        op.drop_column("results", column)
    for column in (
        "prior_study_date",
        "prior_sop_uid",
        "prior_series_uid",
        "prior_study_uid",
        "prior_node",
        "origin",
    ):
        op.drop_column("gallery", column)
