"""The HTTP client the CLI uses (httpx). Every failure is a ClientError with one clear line.

    ClientError(RuntimeError)      .exit_code: what the CLI exits with
    ├── Unreachable                no controller at the URL (exit 3)
    └── ApiError                   the controller said no (401 -> 4, 404 -> 5, 409 -> 6, else 1)
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8470"
EXIT_FOR_STATUS = {401: 4, 403: 4, 404: 5, 409: 6}


class ClientError(RuntimeError):
    exit_code = 1


class Unreachable(ClientError):
    exit_code = 3


class ApiError(ClientError):
    def __init__(self, status: int, message: str, code: str = ""):
        super().__init__(message)
        self.status, self.code = status, code
        self.exit_code = EXIT_FOR_STATUS.get(status, 1)


class FleetClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0):
        self.url = (url or os.environ.get("EDGESHIP_FLEET_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("EDGESHIP_FLEET_TOKEN", "")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the controller at {self.url} ({type(exc).__name__}: {exc}); "
                              "is `edgeship fleet serve` running? set --url or EDGESHIP_FLEET_URL") from None
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _error_line(resp), _error_code(resp))
        return resp.json()

    # devices
    def devices(self, selector: str = "") -> list[dict]:
        return self.request("GET", "/v1/devices", params={"selector": selector} if selector else None)

    def device(self, device_id: str) -> dict:
        return self.request("GET", f"/v1/devices/{device_id}")

    def label(self, device_id: str, labels: list[str]) -> dict:
        return self.request("POST", f"/v1/devices/{device_id}/labels", json={"labels": labels})

    def revoke(self, device_id: str, *, enrolled: bool = False) -> dict:
        return self.request("POST", f"/v1/devices/{device_id}/revoke", json={"enrolled": enrolled})

    def status(self) -> dict:
        return self.request("GET", "/v1/status")

    # bundles
    def push(self, path: Path) -> dict:
        """Upload a bundle .tar, or a bundle directory packed on the fly."""
        path = Path(path)
        if not path.exists():
            raise ClientError(f"bundle {path} does not exist; pass a bundle directory or .tar")
        if path.is_dir():
            from agent.bundle import pack

            with tempfile.TemporaryDirectory() as tmp:
                return self._upload(pack(path, Path(tmp) / "bundle.tar"))
        if not tarfile.is_tarfile(path):
            raise ClientError(f"{path} is neither a bundle directory nor a .tar archive")
        return self._upload(path)

    def _upload(self, archive: Path) -> dict:
        with open(archive, "rb") as f:
            return self.request("POST", "/v1/bundles", content=f, headers={"Content-Type": "application/x-tar"})

    def bundles(self) -> list[dict]:
        return self.request("GET", "/v1/bundles")

    def bundle(self, ref: str) -> dict:
        return self.request("GET", f"/v1/bundles/{ref}")

    def remove_bundle(self, ref: str) -> dict:
        return self.request("DELETE", f"/v1/bundles/{ref}")

    def register_url(self, ref: str, url: str, *, only: bool = False) -> dict:
        return self.request("POST", f"/v1/bundles/{ref}/urls", json={"url": url, "only": only})

    # rollouts
    def create_rollout(self, **body: Any) -> dict:
        return self.request("POST", "/v1/rollouts", json={k: v for k, v in body.items() if v is not None})

    def rollouts(self) -> list[dict]:
        return self.request("GET", "/v1/rollouts")

    def rollout(self, rollout_id: str, *, devices: bool = True) -> dict:
        return self.request("GET", f"/v1/rollouts/{rollout_id}", params={"devices": str(devices).lower()})

    def operate(self, rollout_id: str, verb: str) -> dict:
        return self.request("POST", f"/v1/rollouts/{rollout_id}/{verb}")


def _error_code(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("code", ""))
    except ValueError:
        return ""


def _error_line(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"controller answered HTTP {resp.status_code}: {resp.text[:200]}"
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail:  # FastAPI validation errors
        d = detail[0]
        return f"invalid request: {'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
    return f"controller answered HTTP {resp.status_code}: {detail or body}"
