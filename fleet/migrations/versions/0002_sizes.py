"""Sizes are 64-bit: bundles.size and rollout_devices.bytes_done become BIGINT.

A 7B model's int4 bundle is about 4 GiB, past PostgreSQL's 32-bit INTEGER. SQLite's INTEGER is
64-bit already, so there is nothing to change there (and rebuilding `bundles` in batch mode would
trip the foreign key from `rollouts`).

Revision ID: 0002_sizes
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_sizes"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (("bundles", "size", False), ("rollout_devices", "bytes_done", True))


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=nullable)


def downgrade() -> None:
    """Fails on PostgreSQL while any size is past 2 GiB, rather than cut it."""
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=nullable)
