"""Three indexes of ``deliveries`` only where their column is set.

Every state change of a delivery row (plan, claim, ``sending``, outcome) writes a new row
version, and none is a HOT update (each changes an indexed column), so each version adds
an entry to every index of the table. Three of them only serve queries that never look
for NULL:

- ``ix_deliveries_message_id``: bounce matching by the Message-ID a bounce returns
  (``message_id IN (...)``); NULL until the row is marked ``sending``;
- ``ix_deliveries_sent``: the report's first/last accepted message and timeline
  (``sent_at IS NOT NULL``, ranges of ``sent_at``); NULL until the row is ``sent``;
- ``ix_deliveries_lease``: expired leases (``lease_expires_at < now``); NULL except
  while a worker holds the row.

Made partial (``WHERE <column> IS NOT NULL``, which a comparison on the column implies
for both planners, bound parameters included), a row's four versions in a send add 28
index entries instead of 35.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: name -> (columns, the column that must be set).
INDEXES = {
    "ix_deliveries_lease": (["status", "lease_expires_at"], "lease_expires_at"),
    "ix_deliveries_sent": (["campaign_id", "sent_at"], "sent_at"),
    "ix_deliveries_message_id": (["message_id"], "message_id"),
}


def upgrade() -> None:
    for name, (columns, column) in INDEXES.items():
        where = sa.text(f"{column} IS NOT NULL")
        op.drop_index(name, table_name="deliveries")
        op.create_index(name, "deliveries", columns, sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    for name, (columns, _column) in INDEXES.items():
        op.drop_index(name, table_name="deliveries")
        op.create_index(name, "deliveries", columns)
