"""The management REST API (FastAPI; OpenAPI at /openapi.json, docs at /docs) and bundle downloads.

Every /v1 route needs `Authorization: Bearer <token>`. `/bundles/<sha256>.tar` is open (devices
fetch it without the operator token; the bundle is signed and content-addressed) and supports
HTTP Range, so agents resume interrupted downloads. Reads use their own session; every write
runs on the engine thread (`Engine.call`), so writes never race each other.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeship import __version__
from fleet.bundles import BundleStore
from fleet.errors import Conflict, FleetError, InvalidRequest, NotFound, Unauthorized
from fleet.models import Bundle, Device, Rollout, RolloutDevice
from fleet.registry import Selector, device_dict, device_view, parse_labels
from fleet.rollout.engine import Engine
from fleet.rollout.plan import DEVICE_DEADLINE, HEALTH_WINDOW, RolloutSpec, parse_duration, parse_rate, parse_waves
from fleet.rollout.state import ACTIVE, RolloutEvent
from fleet.upload import UploadLimit, receive

_bearer = HTTPBearer(auto_error=False, description="the controller's API token (api_token)")


class LabelsBody(BaseModel):
    labels: list[str] = Field(description="k=v to set, k= to remove")


class RevokeBody(BaseModel):
    enrolled: bool = False  # the fleet CA issued it a certificate: record the revocation even if never seen


class UrlBody(BaseModel):
    url: str = Field(pattern=r"^https?://", max_length=2048)
    only: bool = False  # advertise only external URLs, not the controller's own copy


class RolloutBody(BaseModel):
    bundle: str = Field(description="NAME@VERSION")
    selector: str = ""
    waves: str = "1,10%,50%,100%"
    max_failure_rate: str = "5%"
    health_window: str = "10m"
    device_deadline: str = "30m"
    auto_rollback: bool = False
    max_concurrent_downloads: int | None = Field(default=None, ge=1, le=1_000_000)
    offline_policy: Literal["fail", "skip"] = "fail"
    max_error_rate_increase: str = "5%"
    max_p95_ratio: float = Field(default=1.5, gt=0, le=1000)
    min_requests: int = Field(default=1, ge=0, le=1_000_000)
    replaces: list[str] = Field(default=[], description="bundle names this bundle may replace on a device")

    def spec(self) -> RolloutSpec:
        try:
            return RolloutSpec(
                waves=parse_waves(self.waves), max_failure_rate=parse_rate(self.max_failure_rate, what="--max-failure-rate"),
                health_window_s=parse_duration(self.health_window, what="--health-window", allowed=HEALTH_WINDOW),
                device_deadline_s=parse_duration(self.device_deadline, what="--device-deadline", allowed=DEVICE_DEADLINE),
                auto_rollback=self.auto_rollback, max_concurrent_downloads=self.max_concurrent_downloads,
                offline_policy=self.offline_policy,
                max_error_rate_increase=parse_rate(self.max_error_rate_increase, what="--max-error-rate-increase"),
                max_p95_ratio=self.max_p95_ratio, min_requests=self.min_requests, replaces=self.replaces)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise InvalidRequest(f"rollout option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def bundle_dict(b: Bundle, *, in_use: list[str] | None = None) -> dict[str, Any]:
    m = b.manifest
    return {"ref": f"{b.name}@{b.version}", "name": b.name, "version": b.version, "manifest_sha256": b.manifest_sha256,
            "archive_sha256": b.archive_sha256, "size": b.size, "key_id": b.key_id, "task": m.get("task"),
            "target": m.get("target"), "stored": b.stored, "urls": b.urls, "url_only": b.url_only,
            "created_at": b.created_at, "files": len(m.get("files", [])), "active_rollouts": in_use or []}


def rollout_dict(r: Rollout, counts: dict[str, int], *, devices: list[dict] | None = None) -> dict[str, Any]:
    spec = r.spec
    out = {"id": r.id, "bundle": r.bundle_ref, "bundle_sha256": r.bundle_sha256, "selector": r.selector, "state": r.state,
           "wave": r.current_wave + 1, "waves": len(r.waves), "wave_sizes": r.waves, "counts": counts,
           "total": sum(counts.values()), "reason": r.reason, "gate": r.gate, "spec": spec,
           "observe_until": r.observe_until, "wave_started_at": r.wave_started_at,
           "created_at": r.created_at, "updated_at": r.updated_at, "finished_at": r.finished_at}
    if devices is not None:
        out["devices"] = devices
    return out


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def create_app(*, engine: Engine, store: BundleStore, token: str, sessions, upload_dir: Path,
               upload_limit: UploadLimit) -> FastAPI:
    app = FastAPI(title="edgeship fleet controller", version=__version__,
                  description="Device registry, bundle registry and staged rollouts. All /v1 routes need a bearer token.")

    def auth(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise Unauthorized("missing or wrong API token; pass --token or set EDGESHIP_FLEET_TOKEN")

    def db() -> Session:
        with sessions() as s:
            yield s

    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse({"error": str(exc), "code": exc.code}, status_code=exc.status, headers=headers)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__}

    @app.get("/v1/status", tags=["ops"], dependencies=[Depends(auth)])
    def status(s: Session = Depends(db)) -> dict[str, Any]:
        total = s.scalar(select(func.count()).select_from(Device)) or 0
        online = s.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True))) or 0
        return {"devices": total, "online": online, "engine": engine.stats.as_dict(), "inbox": engine.inbox.qsize()}

    # ---- devices ---------------------------------------------------------------------------

    @app.get("/v1/devices", tags=["devices"], dependencies=[Depends(auth)])
    def list_devices(selector: str = "", s: Session = Depends(db)) -> list[dict[str, Any]]:
        sel = Selector.parse(selector)
        return [device_dict(d) for d in s.scalars(select(Device).order_by(Device.id)) if sel.matches(device_view(d))]

    @app.get("/v1/devices/{device_id}", tags=["devices"], dependencies=[Depends(auth)])
    def show_device(device_id: str, s: Session = Depends(db)) -> dict[str, Any]:
        d = s.get(Device, device_id)
        if d is None:
            raise NotFound(f"device {device_id!r} not found; list them with: edgeship fleet devices")
        out = device_dict(d)
        out["rollouts"] = [{"rollout": rd.rollout_id, "state": rd.state, "update_state": rd.update_state, "reason": rd.reason}
                           for rd in s.scalars(select(RolloutDevice).where(RolloutDevice.device_id == device_id))]
        return out

    @app.post("/v1/devices/{device_id}/labels", tags=["devices"], dependencies=[Depends(auth)])
    def label_device(device_id: str, body: LabelsBody) -> dict[str, Any]:
        changes = parse_labels(body.labels)

        def do(s: Session) -> dict[str, Any]:
            d = s.get(Device, device_id)
            if d is None:
                raise NotFound(f"device {device_id!r} not found; list them with: edgeship fleet devices")
            labels = dict(d.op_labels or {})
            for k, v in changes.items():
                if v is None:
                    labels.pop(k, None)
                else:
                    labels[k] = v
            d.op_labels = labels
            return device_dict(d)

        return engine.call(do)

    @app.post("/v1/devices/{device_id}/revoke", tags=["devices"], dependencies=[Depends(auth)])
    def revoke_device(device_id: str, body: RevokeBody | None = None) -> dict[str, Any]:
        enrolled = body is not None and body.enrolled
        return engine.call(lambda s: device_dict(engine.revoke_device(s, device_id, enrolled=enrolled)))

    # ---- bundles ---------------------------------------------------------------------------

    def _bundle(s: Session, ref: str) -> Bundle:
        name, sep, version = ref.partition("@")
        b = s.scalar(select(Bundle).where(Bundle.name == name, Bundle.version == version)) if sep else s.get(Bundle, ref)
        if b is None:
            raise NotFound(f"bundle {ref!r} not found; list them with: edgeship fleet bundle list")
        return b

    def _in_use(s: Session, sha: str) -> list[str]:
        return list(s.scalars(select(Rollout.id).where(Rollout.bundle_sha256 == sha, Rollout.state.in_([x.value for x in ACTIVE]))))

    @app.post("/v1/bundles", tags=["bundles"], dependencies=[Depends(auth)], status_code=201,
              openapi_extra={"requestBody": {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
    async def push_bundle(request: Request) -> dict[str, Any]:
        await asyncio.to_thread(upload_dir.mkdir, parents=True, exist_ok=True)
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=upload_dir, prefix=".upload-", suffix=".tar")
        os.close(fd)
        try:
            await receive(request.stream(), Path(name), limit=upload_limit, declared=_content_length(request))
            return await asyncio.to_thread(_register, Path(name))
        finally:
            Path(name).unlink(missing_ok=True)

    def _register(archive: Path) -> dict[str, Any]:
        stored = store.ingest(archive)

        def do(s: Session) -> dict[str, Any]:
            same = s.scalar(select(Bundle).where(Bundle.name == stored.name, Bundle.version == stored.version))
            if same is not None and same.manifest_sha256 != stored.manifest_sha256:
                raise Conflict(f"bundle {stored.name}@{stored.version} exists with a different manifest "
                               f"({same.manifest_sha256[:12]}); bump the version to publish a new build")
            if same is None:
                same = Bundle(manifest_sha256=stored.manifest_sha256, name=stored.name, version=stored.version,
                              key_id=stored.key_id, manifest=stored.manifest, archive_sha256=stored.archive_sha256,
                              size=stored.size, stored=True, urls=[], url_only=False, created_at=time.time())
                s.add(same)
            else:
                same.stored, same.archive_sha256, same.size = True, stored.archive_sha256, stored.size
            s.flush()
            return bundle_dict(same)

        return engine.call(do)

    @app.get("/v1/bundles", tags=["bundles"], dependencies=[Depends(auth)])
    def list_bundles(s: Session = Depends(db)) -> list[dict[str, Any]]:
        return [bundle_dict(b, in_use=_in_use(s, b.manifest_sha256)) for b in s.scalars(select(Bundle).order_by(Bundle.name, Bundle.created_at))]

    @app.get("/v1/bundles/{ref}", tags=["bundles"], dependencies=[Depends(auth)])
    def show_bundle(ref: str, s: Session = Depends(db)) -> dict[str, Any]:
        b = _bundle(s, ref)
        out = bundle_dict(b, in_use=_in_use(s, b.manifest_sha256))
        out["manifest"] = b.manifest
        return out

    @app.delete("/v1/bundles/{ref}", tags=["bundles"], dependencies=[Depends(auth)])
    def remove_bundle(ref: str) -> dict[str, Any]:
        def do(s: Session) -> dict[str, Any]:
            b = _bundle(s, ref)
            users = _in_use(s, b.manifest_sha256)
            if users:
                raise Conflict(f"bundle {ref} is used by active rollout(s) {', '.join(users)}; abort or finish them first")
            referenced = s.scalar(select(func.count()).select_from(Rollout).where(Rollout.bundle_sha256 == b.manifest_sha256))
            store.remove(b.manifest_sha256)
            if referenced:
                b.stored, b.urls = False, []  # rollout history keeps the record; the archive is gone
            else:
                s.delete(b)
            return {"removed": f"{b.name}@{b.version}", "manifest_sha256": b.manifest_sha256}

        return engine.call(do)

    @app.post("/v1/bundles/{ref}/urls", tags=["bundles"], dependencies=[Depends(auth)])
    def register_url(ref: str, body: UrlBody) -> dict[str, Any]:
        def do(s: Session) -> dict[str, Any]:
            b = _bundle(s, ref)
            if body.url not in b.urls:
                if len(b.urls) >= 7:
                    raise InvalidRequest(f"bundle {ref} already has {len(b.urls)} external URLs (max 7)")
                b.urls = [*b.urls, body.url]
            b.url_only = body.only
            return bundle_dict(b)

        return engine.call(do)

    @app.get("/bundles/{name}", tags=["download"], response_class=FileResponse,
             responses={200: {"content": {"application/x-tar": {}}}, 206: {"description": "partial content (Range)"}})
    def download(name: str) -> FileResponse:
        sha = name.removesuffix(".tar")
        path = store.path(sha)
        if not name.endswith(".tar") or not path.is_file():
            raise NotFound(f"no stored bundle archive {name!r}")
        return FileResponse(path, media_type="application/x-tar", filename=f"{sha}.tar")

    # ---- rollouts --------------------------------------------------------------------------

    def _counts(s: Session, ids: list[str]) -> dict[str, Counter]:
        out: dict[str, Counter] = {i: Counter() for i in ids}
        q = (select(RolloutDevice.rollout_id, RolloutDevice.state, func.count()).where(RolloutDevice.rollout_id.in_(ids))
             .group_by(RolloutDevice.rollout_id, RolloutDevice.state))
        for rid, state, n in s.execute(q):
            out[rid][state] = n
        return out

    @app.post("/v1/rollouts", tags=["rollouts"], dependencies=[Depends(auth)], status_code=201)
    def create_rollout(body: RolloutBody) -> dict[str, Any]:
        spec = body.spec()
        rid = engine.call(lambda s: engine.create_rollout(s, bundle_ref=body.bundle, selector=body.selector, spec=spec))
        with sessions() as s:
            r = s.get(Rollout, rid)
            return rollout_dict(r, dict(_counts(s, [rid])[rid]))

    @app.get("/v1/rollouts", tags=["rollouts"], dependencies=[Depends(auth)])
    def list_rollouts(s: Session = Depends(db)) -> list[dict[str, Any]]:
        rows = list(s.scalars(select(Rollout).order_by(Rollout.created_at.desc())))
        counts = _counts(s, [r.id for r in rows])
        return [rollout_dict(r, dict(counts[r.id])) for r in rows]

    @app.get("/v1/rollouts/{rollout_id}", tags=["rollouts"], dependencies=[Depends(auth)])
    def show_rollout(rollout_id: str, devices: bool = True, s: Session = Depends(db)) -> dict[str, Any]:
        r = s.get(Rollout, rollout_id)
        if r is None:
            raise NotFound(f"rollout {rollout_id!r} not found; list them with: edgeship fleet rollout list")
        rows = list(s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
                              .order_by(RolloutDevice.wave, RolloutDevice.device_id)))
        detail = [{"device": rd.device_id, "wave": rd.wave + 1, "state": rd.state, "update_state": rd.update_state,
                   "code": rd.code, "reason": rd.reason, "sends": rd.sends, "bytes_done": rd.bytes_done,
                   "sent_at": rd.sent_at, "acked_at": rd.acked_at, "committed_at": rd.committed_at, "done_at": rd.done_at}
                  for rd in rows] if devices else None
        return rollout_dict(r, dict(Counter(rd.state for rd in rows)), devices=detail)

    def _operate(rollout_id: str, event: RolloutEvent) -> dict[str, Any]:
        engine.call(lambda s: engine.operate(s, rollout_id, event))
        with sessions() as s:
            return rollout_dict(s.get(Rollout, rollout_id), dict(_counts(s, [rollout_id])[rollout_id]))

    def _route(event: RolloutEvent):
        def endpoint(rollout_id: str) -> dict[str, Any]:
            return _operate(rollout_id, event)
        return endpoint

    for event in (RolloutEvent.PAUSE, RolloutEvent.RESUME, RolloutEvent.ABORT, RolloutEvent.ROLLBACK):
        app.add_api_route(f"/v1/rollouts/{{rollout_id}}/{event.value}", _route(event), methods=["POST"], tags=["rollouts"],
                          dependencies=[Depends(auth)], name=f"{event.value}_rollout", summary=f"{event.value.capitalize()} a rollout")
    return app
