"""A real MQTT broker per test session: our own `mosquitto` on a free loopback port.

The config is generated, so a test can ask for TLS, password files and ACLs. Only where no
`mosquitto` binary exists does it fall back to the embedded amqtt broker (and says so).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


@dataclass
class Broker:
    """A running broker; `restart()` keeps the port (for reconnect tests)."""

    port: int
    kind: str  # "mosquitto" or "amqtt"
    workdir: Path
    extra_config: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            base = (
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "max_packet_size 1048576\n"
                f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            ) if not self.extra_config else self.extra_config
            conf.write_text(base)
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeship.embedded_broker", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()


def start_broker(*, extra_config: str = "", port: int | None = None) -> Broker:
    """Start mosquitto (or amqtt if mosquitto is absent) on a free port in a fresh temp dir."""
    kind = "mosquitto" if mosquitto_binary() else "amqtt"
    workdir = Path(tempfile.mkdtemp(prefix="edgeship-broker-"))
    return Broker(port=port or free_port(), kind=kind, workdir=workdir, extra_config=extra_config).start()
