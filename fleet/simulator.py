"""A device simulator that speaks the real protocol over the real broker.

Each simulated device has its own MQTT connection (so its Last Will is its own), its own
session id and sequence numbers, a retained birth/state message, heartbeats with inference
numbers, and an update flow that answers deploy, rollback, cancel and report commands with
acks and events like an agent does (by default it really downloads the bundle over HTTP and
checks its manifest sha256). Many devices share one thread: one selector loop drives all
their paho clients (paho's external-loop API), so a few processes carry thousands of devices.

Behaviour (latency, failures, health regressions) is configurable per simulator, and tests
can take devices offline and back online at any time. This is the device side used by the
fleet tests and bench/fleet_scale.py; it is not the agent.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import json
import logging
import queue
import secrets
import selectors
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import (
    AckMessage,
    BundleRef,
    CancelCommand,
    Channel,
    DeployCommand,
    DeviceFacts,
    EventMessage,
    HealthMessage,
    InferenceStats,
    OfflineMessage,
    ProtocolError,
    ReportCommand,
    RollbackCommand,
    StateMessage,
    Topics,
    UpdateState,
    UpdateStatus,
    encode,
    parse_command,
)

log = logging.getLogger("edgeship.fleet.simulator")
STEPS = (UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGING, UpdateState.SMOKE_TESTING,
         UpdateState.SWITCHING, UpdateState.WATCHING, UpdateState.COMMITTED)


@dataclass(frozen=True)
class Behaviour:
    """How simulated devices behave; the same for every device of one simulator."""

    heartbeat_s: float = 1.0
    requests_per_beat: int = 20
    base_error_rate: float = 0.0
    base_p95_ms: float = 40.0
    ack_delay_s: float = 0.0
    step_delay_s: float = 0.02  # per update state
    download: bool = True  # GET the bundle's URL and check the manifest sha256
    fail_rate: float = 0.0  # share of devices (chosen by id hash) whose updates fail
    fail_ids: frozenset[str] = frozenset()
    fail_at: UpdateState = UpdateState.SMOKE_TESTING
    regress_refs: frozenset[str] = frozenset()  # NAME@VERSION that make a device worse once active
    regress_error_rate: float = 0.5
    regress_p95_factor: float = 4.0
    agent_version: str = "0.1.0"

    def fails(self, device_id: str) -> bool:
        if device_id in self.fail_ids:
            return True
        h = int(hashlib.sha256(device_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return h < self.fail_rate


@dataclass
class SimDevice:
    id: str
    labels: dict[str, str]
    arch: str = "x86_64"
    active: BundleRef | None = None
    previous: BundleRef | None = None
    session: str = field(default_factory=lambda: secrets.token_hex(6))
    seq: itertools.count = field(default_factory=itertools.count)
    client: mqtt.Client | None = None
    online: bool = False
    update: UpdateStatus | None = None
    job: str | None = None  # command id of the update in progress
    answered: dict[str, AckMessage] = field(default_factory=dict)  # command id -> our ack
    pending: set[str] = field(default_factory=set)  # received, not answered yet


class Simulator:
    """Many devices, one thread. Start with `start()`; every control method is thread-safe."""

    def __init__(self, broker_url: str, *, prefix: str, devices: list[SimDevice], behaviour: Behaviour = Behaviour(),
                 keepalive: int = 30):
        parts = urlsplit(broker_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.topics = Topics(prefix)
        self.devices = {d.id: d for d in devices}
        self.behaviour = behaviour
        self.keepalive = keepalive
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tie = itertools.count()
        self._control: queue.Queue = queue.Queue()
        self._dirty: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sim-download")
        self._http = httpx.Client(timeout=30)  # one client: connection reuse, one TLS context
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.received = 0
        self.commands: list[tuple[str, str, str]] = []  # (device, kind, command id) in arrival order

    # ---- control (any thread) -------------------------------------------------------------

    def start(self, *, online: bool = True) -> Simulator:
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self._thread.start()
        if online:
            self.go_online(list(self.devices))
        return self

    def stop(self) -> None:
        self._control.put(("stop", []))
        if self._thread is not None:
            self._thread.join(15)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def go_online(self, ids: list[str]) -> None:
        self._control.put(("online", list(ids)))

    def go_offline(self, ids: list[str], *, graceful: bool = False) -> None:
        """Ungraceful (default): the socket just closes, so the broker publishes the Last Will."""
        self._control.put(("offline_graceful" if graceful else "offline", list(ids)))

    def set_behaviour(self, behaviour: Behaviour) -> None:
        self._control.put(("behaviour", behaviour))

    def online_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.online)

    # ---- loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        next_misc = 0.0
        while True:
            try:
                while True:
                    op, arg = self._control.get_nowait()
                    if op == "stop":
                        for d in self.devices.values():
                            self._disconnect(d, graceful=False)
                        return
                    self._do_control(op, arg)
            except queue.Empty:
                pass
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                try:
                    fn()
                except Exception:
                    log.exception("simulated device step failed")
            self._flush()
            timeout = 0.05 if not self._timers else min(0.05, max(0.0, self._timers[0][0] - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                d = self.devices[key.data]
                if d.client is not None:
                    d.client.loop_read(100)
                    self._dirty.add(d.id)
            self._flush()
            if now >= next_misc:
                next_misc = now + 1.0
                for d in self.devices.values():
                    if d.client is not None:
                        d.client.loop_misc()

    def _flush(self) -> None:
        for did in list(self._dirty):
            d = self.devices[did]
            if d.client is None or not d.client.want_write():
                self._dirty.discard(did)
                continue
            d.client.loop_write()
            if not d.client.want_write():
                self._dirty.discard(did)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._tie), fn))

    def _do_control(self, op: str, arg: Any) -> None:
        if op == "online":
            for did in arg:
                self._connect(self.devices[did])
        elif op in ("offline", "offline_graceful"):
            for did in arg:
                self._disconnect(self.devices[did], graceful=op == "offline_graceful")
        elif op == "behaviour":
            self.behaviour = arg
        elif op == "call":
            arg()

    def _connect(self, d: SimDevice) -> None:
        if d.client is not None:
            return
        d.session = secrets.token_hex(6)
        d.seq = itertools.count()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{d.id}", clean_session=False, protocol=mqtt.MQTTv311)
        c.will_set(self.topics.device(d.id, Channel.STATE), encode(OfflineMessage(device_id=d.id, session=d.session)),
                   qos=1, retain=True)
        c.on_connect = lambda client, userdata, flags, rc, props, d=d: self._on_connect(d, rc)
        c.on_message = lambda client, userdata, msg, d=d: self._on_message(d, msg.payload)
        c.on_socket_close = lambda client, userdata, sock, d=d: self._on_socket_close(d, sock)
        try:
            c.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError as exc:
            log.warning("device %s cannot connect: %s", d.id, exc)
            self._later(1.0, lambda: self._connect(d) if d.client is None else None)
            return
        d.client = c
        self.sel.register(c.socket(), selectors.EVENT_READ, d.id)
        self._dirty.add(d.id)

    def _on_socket_close(self, d: SimDevice, sock) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _disconnect(self, d: SimDevice, *, graceful: bool) -> None:
        c, d.client = d.client, None
        d.online = False
        if c is None:
            return
        sock = c.socket()
        if graceful:
            c.publish(self.topics.device(d.id, Channel.STATE),
                      encode(OfflineMessage(device_id=d.id, session=d.session, reason="shutdown")), qos=1, retain=True)
            c.loop_write()
            c.disconnect()
            c.loop_write()
        if sock is not None:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()  # no DISCONNECT packet when ungraceful: the broker sends the will

    def _on_connect(self, d: SimDevice, rc) -> None:
        if rc.is_failure:
            return
        d.online = True
        d.client.subscribe(self.topics.device(d.id, Channel.CMD), qos=1)
        self._publish_state(d)
        self._later(self.behaviour.heartbeat_s * (0.2 + 0.8 * (hash(d.id) % 1000) / 1000), lambda: self._heartbeat(d, d.session))

    # ---- device behaviour ---------------------------------------------------------------------

    def _pub(self, d: SimDevice, channel: Channel, msg: Any, *, qos: int = 1, retain: bool = False) -> None:
        if d.client is None:
            return
        d.client.publish(self.topics.device(d.id, channel), encode(msg), qos=qos, retain=retain)
        self._dirty.add(d.id)
        self.sent += 1

    def _base(self, d: SimDevice) -> dict[str, Any]:
        return {"device_id": d.id, "session": d.session, "seq": next(d.seq)}

    def _publish_state(self, d: SimDevice) -> None:
        facts = DeviceFacts(arch=d.arch, os="linux", cpu_model="simulated", cores=4, cpu_features=["avx2"],
                            ram_bytes=4 << 30, execution_providers=["CPUExecutionProvider"], onnxruntime="1.32.0")
        self._pub(d, Channel.STATE, StateMessage(**self._base(d), agent_version=self.behaviour.agent_version, facts=facts,
                                                 labels=d.labels, active=d.active, previous=d.previous,
                                                 execution_provider="CPUExecutionProvider", update=d.update), retain=True)

    def _heartbeat(self, d: SimDevice, session: str) -> None:
        if d.client is None or d.session != session:
            return  # this loop belonged to an earlier connection
        b = self.behaviour
        worse = d.active is not None and d.active.ref in b.regress_refs
        n = b.requests_per_beat
        rate = b.regress_error_rate if worse else b.base_error_rate
        p95 = b.base_p95_ms * (b.regress_p95_factor if worse else 1.0)
        state = UpdateState.IDLE if d.job is None else (d.update.state if d.update else UpdateState.IDLE)
        self._pub(d, Channel.HEALTH, HealthMessage(**self._base(d), uptime_s=1.0, cpu_percent=10.0, active=d.active,
                                                   update_state=state,
                                                   inference=InferenceStats(requests=n, errors=round(n * rate),
                                                                            p50_ms=p95 / 2 if n else None,
                                                                            p95_ms=p95 if n else None)), qos=0)
        self._later(b.heartbeat_s, lambda: self._heartbeat(d, session))

    def _on_message(self, d: SimDevice, payload: bytes) -> None:
        self.received += 1
        try:
            cmd = parse_command(payload)
        except ProtocolError as exc:
            log.warning("device %s got a bad command: %s", d.id, exc)
            return
        self.commands.append((d.id, cmd.kind, cmd.id))
        if cmd.id in d.answered:
            prev = d.answered[cmd.id]
            self._pub(d, Channel.ACK, AckMessage(**self._base(d), command_id=cmd.id, accepted=prev.accepted,
                                                 code=prev.code, reason=prev.reason, duplicate=True))
            return
        if cmd.id in d.pending:
            return  # a re-send of a command we are about to answer
        d.pending.add(cmd.id)
        if isinstance(cmd, DeployCommand):
            self._later(self.behaviour.ack_delay_s, lambda: self._deploy(d, cmd))
        elif isinstance(cmd, RollbackCommand):
            self._later(self.behaviour.ack_delay_s, lambda: self._rollback(d, cmd))
        elif isinstance(cmd, CancelCommand):
            self._cancel(d, cmd)
        elif isinstance(cmd, ReportCommand):
            self._ack(d, cmd.id, True)
            self._publish_state(d)

    def _ack(self, d: SimDevice, cid: str, accepted: bool, code: str = "", reason: str = "") -> None:
        ack = AckMessage(**self._base(d), command_id=cid, accepted=accepted, code=code, reason=reason)
        d.answered[cid] = ack
        d.pending.discard(cid)
        self._pub(d, Channel.ACK, ack)

    def _event(self, d: SimDevice, cid: str, rollout_id: str | None, state: UpdateState, bundle: BundleRef | None,
               *, code: str = "", reason: str = "", **extra: Any) -> None:
        d.update = UpdateStatus(command_id=cid, rollout_id=rollout_id, state=state, bundle=bundle, code=code, reason=reason)
        self._pub(d, Channel.EVENTS, EventMessage(**self._base(d), command_id=cid, rollout_id=rollout_id, state=state,
                                                  bundle=bundle, code=code, reason=reason, **extra))

    def _deploy(self, d: SimDevice, cmd: DeployCommand) -> None:
        if d.job is not None:
            self._ack(d, cmd.id, False, "busy", f"update {d.job} in progress")
            return
        if d.active is not None and d.active.manifest_sha256 == cmd.bundle.manifest_sha256:
            self._ack(d, cmd.id, True)
            self._event(d, cmd.id, cmd.rollout_id, UpdateState.COMMITTED, cmd.bundle, reason="already active")
            self._publish_state(d)
            return
        self._ack(d, cmd.id, True)
        d.job = cmd.id
        self._event(d, cmd.id, cmd.rollout_id, UpdateState.DOWNLOADING, cmd.bundle, bytes_done=0, bytes_total=cmd.size)
        if self.behaviour.download:
            fut = self._pool.submit(_download, self._http, cmd.urls, cmd.bundle.manifest_sha256)
            fut.add_done_callback(lambda f: self._control.put(("call", lambda: self._downloaded(d, cmd, f))))
        else:
            self._later(self.behaviour.step_delay_s, lambda: self._step(d, cmd, 1))

    def _downloaded(self, d: SimDevice, cmd: DeployCommand, fut) -> None:
        if d.job != cmd.id:
            return
        error = fut.exception() or fut.result()
        if error:
            d.job = None
            self._event(d, cmd.id, cmd.rollout_id, UpdateState.FAILED, cmd.bundle, code="download_failed", reason=str(error))
            self._publish_state(d)
            return
        self._step(d, cmd, 1)

    def _step(self, d: SimDevice, cmd: DeployCommand, i: int) -> None:
        if d.job != cmd.id:
            return  # cancelled
        state = STEPS[i]
        if self.behaviour.fails(d.id) and state == self.behaviour.fail_at:
            d.job = None
            self._event(d, cmd.id, cmd.rollout_id, UpdateState.FAILED, cmd.bundle, code="smoke_test_failed",
                        reason="simulated failure: golden outputs differ")
            self._publish_state(d)
            return
        if state == UpdateState.SWITCHING:
            d.previous, d.active = d.active, cmd.bundle
        if state == UpdateState.COMMITTED:
            d.job = None
            self._event(d, cmd.id, cmd.rollout_id, state, cmd.bundle, metrics={"smoke_ms": 5.0})
            self._publish_state(d)
            return
        self._event(d, cmd.id, cmd.rollout_id, state, cmd.bundle)
        if state == UpdateState.SWITCHING:
            self._publish_state(d)
        self._later(self.behaviour.step_delay_s, lambda: self._step(d, cmd, i + 1))

    def _rollback(self, d: SimDevice, cmd: RollbackCommand) -> None:
        if d.previous is None:
            self._ack(d, cmd.id, False, "no_previous", "nothing to roll back to")
            return
        self._ack(d, cmd.id, True)
        d.job = None
        d.active, d.previous = d.previous, d.active
        self._event(d, cmd.id, cmd.rollout_id, UpdateState.ROLLED_BACK, d.active, reason="rollback by the controller")
        self._publish_state(d)

    def _cancel(self, d: SimDevice, cmd: CancelCommand) -> None:
        job = d.job
        if job is None or (d.update and d.update.state in (UpdateState.SWITCHING, UpdateState.WATCHING)):
            self._ack(d, cmd.id, False, "nothing_to_cancel", "no update in progress before switching")
            return
        d.job = None
        self._ack(d, cmd.id, True)
        self._event(d, job, cmd.rollout_id, UpdateState.FAILED, d.update.bundle if d.update else None,
                    code="cancelled", reason="cancelled by the controller")
        self._publish_state(d)


def _download(http: httpx.Client, urls: list[str], manifest_sha256: str) -> str | None:
    """Fetch the archive (first URL that works); None if its manifest.json has the expected sha256."""
    last = "no URL"
    give_up = time.monotonic() + 60  # keep trying for a minute, backing off: servers restart
    for attempt, url in enumerate(itertools.cycle(urls)):
        try:
            resp = http.get(url)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            last = f"{url}: {exc}"
            if time.monotonic() > give_up:
                break
            time.sleep(min(0.25 * 2**attempt, 1.0))
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:") as tar:
                member = tar.extractfile("manifest.json")
                raw = member.read() if member else b""
        except (tarfile.TarError, KeyError) as exc:
            return f"{url}: not a bundle archive: {exc}"
        got = hashlib.sha256(raw).hexdigest()
        return None if got == manifest_sha256 else f"manifest sha256 {got[:12]} != {manifest_sha256[:12]}"
    return f"download failed: {last}"


def make_devices(count: int, *, id_prefix: str = "sim", labels: dict[str, str] | None = None,
                 arch: str = "x86_64", start: int = 0) -> list[SimDevice]:
    return [SimDevice(id=f"{id_prefix}-{i:05d}", labels=dict(labels or {}), arch=arch) for i in range(start, start + count)]


def main(argv: list[str] | None = None) -> None:
    """`python -m fleet.simulator --broker mqtt://127.0.0.1:1883 --prefix edgeship --count 1000 --start 0`."""
    import argparse
    import signal

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--broker", required=True)
    p.add_argument("--prefix", default="edgeship")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--id-prefix", default="sim")
    p.add_argument("--label", action="append", default=[], help="k=v")
    p.add_argument("--behaviour", default="{}", help="JSON of Behaviour fields")
    p.add_argument("--stats-every", type=float, default=0)
    args = p.parse_args(argv)
    raw = json.loads(args.behaviour)
    for key in ("fail_ids", "regress_refs"):
        if key in raw:
            raw[key] = frozenset(raw[key])
    labels = dict(item.split("=", 1) for item in args.label)
    sim = Simulator(args.broker, prefix=args.prefix, behaviour=Behaviour(**raw),
                    devices=make_devices(args.count, id_prefix=args.id_prefix, labels=labels, start=args.start))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sim.start()
    while not stop.wait(args.stats_every or 3600):
        print(json.dumps({"online": sim.online_count(), "sent": sim.sent, "received": sim.received}), flush=True)
    sim.stop()


if __name__ == "__main__":
    main()
