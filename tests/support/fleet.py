"""Fleet controller test support: the real controller as a subprocess, and its databases.

`ControllerProcess` runs `python -m edgeship.cli fleet serve` with EDGESHIP_FLEET_* settings,
waits for its HTTP port, and can be stopped with SIGTERM or killed with SIGKILL. Databases are a
SQLite file or a fresh PostgreSQL schema (dropped afterwards) on 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.broker import free_port

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TOKEN = "test-token-" + uuid.uuid4().hex[:8]


@dataclass
class Database:
    url: str
    schema: str | None = None

    def drop(self) -> None:
        if self.schema:
            from sqlalchemy import create_engine, text

            engine = create_engine(self.url)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            engine.dispose()


def make_database(kind: str, tmp_path: Path) -> Database:
    if kind == "sqlite":
        return Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    return Database(PG_URL, schema=f"fleet_{uuid.uuid4().hex[:12]}")


@dataclass
class ControllerProcess:
    broker_url: str
    prefix: str
    db: Database
    data_dir: Path
    trusted_keys: list[Path]
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_FLEET_")}
        env.update({
            "EDGESHIP_FLEET_MQTT_URL": self.broker_url,
            "EDGESHIP_FLEET_TOPIC_PREFIX": self.prefix,
            "EDGESHIP_FLEET_MQTT_CLIENT_ID": f"fleet-{self.prefix}",
            "EDGESHIP_FLEET_DATABASE_URL": self.db.url,
            "EDGESHIP_FLEET_DATA_DIR": str(self.data_dir),
            "EDGESHIP_FLEET_HTTP_PORT": str(self.port),
            "EDGESHIP_FLEET_API_TOKEN": TOKEN,
            "EDGESHIP_FLEET_TRUSTED_KEYS": "[" + ",".join(f'"{p}"' for p in self.trusted_keys) + "]",
            "EDGESHIP_FLEET_TICK_INTERVAL_S": "0.1",
            "EDGESHIP_FLEET_RESEND_INTERVAL_S": "2",
            "EDGESHIP_FLEET_LOG_LEVEL": "INFO",
        })
        if self.db.schema:
            env["EDGESHIP_FLEET_DATABASE_SCHEMA"] = self.db.schema
        env.update(self.settings)
        return env

    def start(self, timeout: float = 60.0) -> ControllerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "controller.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "fleet", "serve"], env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"controller not up after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs at all."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll until `predicate()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
