"""devices.revoked_at: when the operator revoked the device (`edgeship fleet device revoke`); NULL if not.

Revision ID: 0003_device_revoked
Revises: 0002_sizes
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_device_revoked"
down_revision = "0002_sizes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("revoked_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:  # SQLite cannot drop a column in place
        batch.drop_column("revoked_at")
