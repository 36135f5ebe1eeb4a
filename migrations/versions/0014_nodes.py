"""Several nodes on one queue: the nodes each process reports, and the shared storage's identity.

A deployment may run any number of ``vaenode serve`` receivers and ``vaenode worker`` scorers
on one PostgreSQL database and one shared storage folder (docs/cluster.md). ``nodes`` holds one
row per process, written by that process alone (its heartbeat), so the dashboard and
``vaenode queue nodes`` show who is up, who runs the cluster-wide jobs and what each worker
scores. ``cluster`` holds one row: the identity of the shared storage folder, which each node
compares with the marker file in its ``[storage].dir`` before it stores or reads anything (a
node whose network file system is not mounted would otherwise write to its local disk).

Revision ID: 0014_nodes
Revises: 0013_station_references
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_nodes"
down_revision: str | Sequence[str] | None = "0013_station_references"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_s", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("cluster_jobs", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("clock_offset_s", sa.Float(), nullable=True),
    )
    op.create_table(
        "cluster",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("storage_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_cluster_one_row"),
    )


def downgrade() -> None:
    op.drop_table("cluster")
    op.drop_table("nodes")
