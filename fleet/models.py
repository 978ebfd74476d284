"""ORM tables (SQLAlchemy 2). Times are UNIX seconds (float) so SQLite and PostgreSQL agree.

The schema is created and upgraded only by the alembic migrations in fleet/migrations.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    session: Mapped[str] = mapped_column(String(64), default="")
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    offline_reason: Mapped[str] = mapped_column(String(32), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # reported by the device
    op_labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # set by operators
    active: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    previous: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    execution_provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    update: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Set by `edgeship fleet device revoke`: its messages are ignored, rollouts never select it.
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_devices_online", "online"),)


class Bundle(Base):
    __tablename__ = "bundles"

    manifest_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(32))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    archive_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)  # bytes: 7B int4 bundles pass 4 GiB
    stored: Mapped[bool] = mapped_column(Boolean, default=True)
    urls: Mapped[list[str]] = mapped_column(JSON, default=list)  # registered external URLs
    url_only: Mapped[bool] = mapped_column(Boolean, default=False)  # advertise only the external URLs
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("name", "version", name="uq_bundles_name_version"),)


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer)
    bundle_sha256: Mapped[str] = mapped_column(ForeignKey("bundles.manifest_sha256"))
    bundle_ref: Mapped[str] = mapped_column(String(130))
    selector: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[list[int]] = mapped_column(JSON)  # cumulative device counts per wave
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # RolloutSpec as JSON
    wave_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    observe_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    gate_override_wave: Mapped[int] = mapped_column(Integer, default=-1)
    reason: Mapped[str] = mapped_column(Text, default="")
    gate: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # one verdict per judged wave
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_rollouts_state", "state"),)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    update_state: Mapped[str] = mapped_column(String(16), default="")
    command_id: Mapped[str] = mapped_column(String(64))
    sends: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    committed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes_done: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    code: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    baseline_requests: Mapped[int] = mapped_column(Integer, default=0)
    baseline_errors: Mapped[int] = mapped_column(Integer, default=0)
    baseline_p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    post_requests: Mapped[int] = mapped_column(Integer, default=0)
    post_errors: Mapped[int] = mapped_column(Integer, default=0)
    post_p95_sum: Mapped[float] = mapped_column(Float, default=0.0)  # sum of p95 * requests
    post_p95_weight: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_rollout_devices_device", "device_id"),
        Index("ix_rollout_devices_rollout_state", "rollout_id", "state"),
    )
