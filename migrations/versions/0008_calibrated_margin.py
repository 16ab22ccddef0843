"""results and series verdicts: the model's calibrated mismatch margin where it decided

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 12:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (see 0007): a batch copy of `results` would cascade to its alerts.
    op.add_column("results", sa.Column("identity_margin", sa.Double(), nullable=True))
    op.add_column("series_verdicts", sa.Column("margin", sa.Double(), nullable=True))


def downgrade() -> None:
    # SQLite (3.35 and later) drops a plain column in place
    op.drop_column("series_verdicts", "margin")
    op.drop_column("results", "identity_margin")
