"""Pose tracks: a driver's stored per-frame pose descriptors, and the jobs that make or use one.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as they were at this revision (see 0001).
UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pose_tracks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "ready",
                "failed",
                "expired",
                name="pose_track_status",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("frames", sa.Integer(), nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("dim", sa.Integer(), nullable=True),
        sa.Column("face_frames", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("audio", sa.Boolean(), nullable=False),
        sa.Column("keep_video", sa.Boolean(), nullable=False),
        sa.Column("encoder", sa.String(length=64), nullable=True),
        sa.Column("expires_at", UTC_DATETIME, nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_pose_tracks_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_pose_tracks"),
    )
    op.create_index("ix_pose_tracks_tenant_created", "pose_tracks", ["tenant_id", "created_at"])
    # Batch mode: SQLite cannot add a foreign key to an existing table, so it rebuilds `jobs`.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pose_track_id", sa.String(length=36), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_pose_track_id_pose_tracks",
            "pose_tracks",
            ["pose_track_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index("ix_jobs_pose_track_id", ["pose_track_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_pose_track_id")
        batch.drop_constraint("fk_jobs_pose_track_id_pose_tracks", type_="foreignkey")
        batch.drop_column("pose_track_id")
    op.drop_table("pose_tracks")  # its index goes with it
