"""Initial schema: devices, bundles, rollouts, rollout_devices.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("offline_reason", sa.String(32), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("facts", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("op_labels", sa.JSON, nullable=False),
        sa.Column("active", sa.JSON, nullable=True),
        sa.Column("previous", sa.JSON, nullable=True),
        sa.Column("execution_provider", sa.String(64), nullable=True),
        sa.Column("update", sa.JSON, nullable=True),
        sa.Column("health", sa.JSON, nullable=True),
    )
    op.create_index("ix_devices_online", "devices", ["online"])
    op.create_table(
        "bundles",
        sa.Column("manifest_sha256", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("archive_sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("stored", sa.Boolean, nullable=False),
        sa.Column("urls", sa.JSON, nullable=False),
        sa.Column("url_only", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_bundles_name_version"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("bundle_sha256", sa.String(64), sa.ForeignKey("bundles.manifest_sha256"), nullable=False),
        sa.Column("bundle_ref", sa.String(130), nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_wave", sa.Integer, nullable=False),
        sa.Column("waves", sa.JSON, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("wave_started_at", sa.Float, nullable=True),
        sa.Column("observe_until", sa.Float, nullable=True),
        sa.Column("gate_override_wave", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("gate", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(32), sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("update_state", sa.String(16), nullable=False),
        sa.Column("command_id", sa.String(64), nullable=False),
        sa.Column("sends", sa.Integer, nullable=False),
        sa.Column("sent_at", sa.Float, nullable=True),
        sa.Column("acked_at", sa.Float, nullable=True),
        sa.Column("committed_at", sa.Float, nullable=True),
        sa.Column("done_at", sa.Float, nullable=True),
        sa.Column("bytes_done", sa.Integer, nullable=True),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("baseline_requests", sa.Integer, nullable=False),
        sa.Column("baseline_errors", sa.Integer, nullable=False),
        sa.Column("baseline_p95_ms", sa.Float, nullable=True),
        sa.Column("post_requests", sa.Integer, nullable=False),
        sa.Column("post_errors", sa.Integer, nullable=False),
        sa.Column("post_p95_sum", sa.Float, nullable=False),
        sa.Column("post_p95_weight", sa.Integer, nullable=False),
    )
    op.create_index("ix_rollout_devices_device", "rollout_devices", ["device_id"])
    op.create_index("ix_rollout_devices_rollout_state", "rollout_devices", ["rollout_id", "state"])


def downgrade() -> None:
    op.drop_table("rollout_devices")
    op.drop_table("rollouts")
    op.drop_table("bundles")
    op.drop_table("devices")
