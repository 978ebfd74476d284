"""The controller's schema on the real databases: sizes past 4 GiB, and upgrading a database made by
the previous revision in place (data kept), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select, text

from fleet.db import make_engine, migrate, sessions
from fleet.models import Bundle, Rollout, RolloutDevice
from tests.support.fleet import make_database

DBS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
GIB = 1024**3
SHA = "c" * 64


@pytest.fixture(params=DBS)
def database(request, tmp_path):
    db = make_database(request.param, tmp_path)
    sql = make_engine(db.url, schema=db.schema)
    yield sql
    sql.dispose()
    db.drop()


def _rows(size: int, bytes_done: int | None) -> list:
    return [
        Bundle(manifest_sha256=SHA, name="llm7b", version="1.0.0", key_id="k", manifest={}, archive_sha256=SHA,
               size=size, stored=True, urls=[], url_only=False, created_at=0.0),
        Rollout(id="ro000000000001", schema_version=1, bundle_sha256=SHA, bundle_ref="llm7b@1.0.0", selector="",
                state="running", current_wave=0, waves=[1], spec={}, gate_override_wave=-1, reason="", gate=[],
                created_at=0.0, updated_at=0.0),
        RolloutDevice(rollout_id="ro000000000001", device_id="dev-1", wave=0, state="updating", update_state="downloading",
                      command_id="ro000000000001-deploy-x", sends=1, bytes_done=bytes_done, code="", reason="",
                      baseline_requests=0, baseline_errors=0, post_requests=0, post_errors=0, post_p95_sum=0.0,
                      post_p95_weight=0),
    ]


def _sizes(sql) -> tuple[int, int | None]:
    with sessions(sql)() as s:
        return s.get(Bundle, SHA).size, s.scalar(select(RolloutDevice.bytes_done))


def test_bundle_and_download_sizes_past_4_gib(database):
    migrate(database)
    big = 7 * GIB + 123  # a 7B model's int4 bundle is about 4 GiB; this is past every 32-bit limit
    with sessions(database).begin() as s:
        s.add_all(_rows(big, big - 1))
    assert _sizes(database) == (big, big - 1)


def test_upgrade_from_the_previous_revision_keeps_data_and_widens_sizes(database):
    migrate(database, revision="0001")
    with sessions(database).begin() as s:
        s.add_all(_rows(3 * 1024**2, 1024))
    migrate(database)
    with database.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) != "0001"
    assert _sizes(database) == (3 * 1024**2, 1024)  # nothing lost
    with sessions(database).begin() as s:
        s.get(Bundle, SHA).size = 5 * GIB
        s.scalars(select(RolloutDevice)).one().bytes_done = 5 * GIB
    assert _sizes(database) == (5 * GIB, 5 * GIB)
    if database.dialect.name == "postgresql":
        types = {t: {c["name"]: str(c["type"]) for c in inspect(database).get_columns(t)} for t in ("bundles", "rollout_devices")}
        assert types["bundles"]["size"] == "BIGINT" and types["rollout_devices"]["bytes_done"] == "BIGINT"
    migrate(database)  # idempotent
