"""What a report at a million deliveries reads instead of the whole log.

- ``campaign_segments``: how many deliveries each (campaign, segment) has, kept by the
  delivery log's plan in the transaction that inserts them (rows are never deleted nor
  moved to another segment; a campaign's go with it). Status changes do not touch it.
- ``ix_deliveries_unsent``: a partial index of the rows not ``sent`` (in a finished
  campaign a small part of the log). Sent = the segment's count - the others.
- ``ix_deliveries_problems``: a partial, covering index of the problem rows, for the
  "most common problem replies" table.
- ``ix_deliveries_segment`` loses ``status`` (which the two above now serve), so a
  status change updates one segment index, as before, not two.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNSENT = "status <> 'sent'"
PROBLEMS = "status IN ('failed', 'deferred', 'bounced', 'unknown')"


def upgrade() -> None:
    op.create_table(
        "campaign_segments",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("segment", sa.String(length=64), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("campaign_id", "segment"),
    )
    op.execute(
        "INSERT INTO campaign_segments (campaign_id, segment, deliveries) "
        "SELECT campaign_id, segment, count(*) FROM deliveries GROUP BY campaign_id, segment"
    )
    op.drop_index("ix_deliveries_segment", table_name="deliveries")
    op.create_index("ix_deliveries_segment", "deliveries", ["campaign_id", "segment", "id"])
    where = {"sqlite_where": sa.text(UNSENT), "postgresql_where": sa.text(UNSENT)}
    op.create_index(
        "ix_deliveries_unsent", "deliveries", ["campaign_id", "segment", "status"], **where
    )
    where = {"sqlite_where": sa.text(PROBLEMS), "postgresql_where": sa.text(PROBLEMS)}
    op.create_index(
        "ix_deliveries_problems",
        "deliveries",
        ["campaign_id", "status", "smtp_code", "smtp_reply", "segment"],
        **where,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_problems", table_name="deliveries")
    op.drop_index("ix_deliveries_unsent", table_name="deliveries")
    op.drop_index("ix_deliveries_segment", table_name="deliveries")
    op.create_index("ix_deliveries_segment", "deliveries", ["campaign_id", "segment", "status"])
    op.drop_table("campaign_segments")
