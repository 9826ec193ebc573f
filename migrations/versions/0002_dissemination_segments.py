"""The segments of the report's sections 5.6 and 5.7: city networks and the media.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Frozen here as they were when this migration was written (a migration never reads the
# live code, which may change later): the same names as core.vocabulary.STANDARD_SEGMENTS.
NEW_SEGMENTS = {
    "city-networks": "European networks against racism (ENAR, ECCAR)",
    "media": "Media and press offices",
}

_segments = sa.table(
    "segments",
    sa.column("slug", sa.String),
    sa.column("name", sa.String),
    sa.column("created_at", sa.DateTime),
)


def upgrade() -> None:
    conn = op.get_bind()
    existing = set(conn.execute(sa.select(_segments.c.slug)).scalars())
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows = [
        {"slug": slug, "name": name, "created_at": now}
        for slug, name in NEW_SEGMENTS.items()
        if slug not in existing  # a registry may have created them with --create-segments
    ]
    if rows:
        op.bulk_insert(_segments, rows)


def downgrade() -> None:
    # Segments with members stay: removing them would drop people from the registry.
    conn = op.get_bind()
    members = sa.table("recipient_segments", sa.column("segment_id", sa.Integer))
    for slug in NEW_SEGMENTS:
        seg_id = conn.execute(
            sa.select(sa.column("id")).select_from(_segments).where(_segments.c.slug == slug)
        ).scalar()
        if seg_id is None:
            continue
        used = conn.execute(
            sa.select(sa.func.count()).select_from(members).where(members.c.segment_id == seg_id)
        ).scalar()
        if not used:
            op.execute(_segments.delete().where(_segments.c.slug == slug))
