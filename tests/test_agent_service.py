"""`edgeship agent run` as a real subprocess: sd_notify, retained state, heartbeats, LWT, SIGTERM,
SIGHUP, and a deploy whose events are buffered while the broker is down."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from agent.bundle import TrustedKeys, pack
from agent.protocol import Channel, UpdateState
from agent.update.store import BundleStore
from tests.support.broker import free_port
from tests.support.bundles import make_bundle
from tests.support.update_harness import deadline_in
from tests.test_agent_link import Watcher, restartable_broker

ROOT = Path(__file__).resolve().parents[1]


class NotifySocket:
    """What systemd listens on: a unix datagram socket; `@name` is the abstract namespace."""

    def __init__(self, *, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edgeship-test-{uuid.uuid4().hex[:12]}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="esn", dir="/tmp")  # AF_UNIX paths max 108 bytes
            path = os.path.join(self._dir, "notify")
            self.sock.bind(path)
            self.env = path
        self.received: list[str] = []

    def wait_for(self, line: str, timeout: float = 60.0) -> float:
        """Block until a datagram holding `line` arrives; returns the monotonic arrival time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.received.extend(data.splitlines())
            if line in data.splitlines():
                return time.monotonic()
        raise AssertionError(f"no {line!r} from the agent within {timeout}s; got {self.received}")

    def close(self) -> None:
        self.sock.close()
        if hasattr(self, "_dir"):
            shutil.rmtree(self._dir, ignore_errors=True)


class Agent:
    """One `edgeship agent run` subprocess with its own state dir, config file and API port."""

    def __init__(self, tmp: Path, broker_port: int, prefix: str, *, public_key: Path | None = None,
                 config: str = "", env: dict | None = None, device_id: str | None = None):
        self.tmp = tmp
        self.device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        self.state_dir = tmp / "state"
        self.api_port = free_port()
        self.config = tmp / "agent.toml"
        keys = f'trusted_keys = ["{public_key}"]\n' if public_key else ""
        self.config.write_text(
            f'device_id = "{self.device_id}"\nstate_dir = "{self.state_dir}"\n{keys}{config}'
            f'[broker]\nurl = "mqtt://127.0.0.1:{broker_port}"\ntopic_prefix = "{prefix}"\n'
            f'reconnect_min_s = 0.5\nreconnect_max_s = 2.0\n'
            f'[api]\nbind = "127.0.0.1:{self.api_port}"\ndrain_timeout_s = 5.0\n'
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESHIP_AGENT_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "agent.log"

    def install(self, bundle_dir: Path, public_key: Path) -> str:
        store = BundleStore(self.state_dir, trusted=TrustedKeys.from_paths([public_key]))
        vb = store.add_directory(bundle_dir)
        store.switch(vb.manifest_sha256, None)
        return vb.manifest_sha256

    def start(self) -> Agent:
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(self.config)],
                                     stdout=self._out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        return self

    def http(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=30)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_out"):
            self._out.close()


@pytest.fixture
def agents():
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


@pytest.fixture
def bundle_dir(tmp_path, keypair) -> Path:
    make_bundle(tmp_path / "bundle-1", keypair[0], name="tiny", version="1.0.0")
    return tmp_path / "bundle-1"


def cmd(device_id: str, kind: str, cid: str, **kw) -> bytes:
    return json.dumps({"v": 1, "type": "command", "kind": kind, "id": cid, "device_id": device_id, **kw}).encode()


def state_of(w: Watcher, timeout: float = 30.0, **want) -> dict:
    """The next message on the state topic matching `want` (e.g. type="offline")."""
    deadline = time.monotonic() + timeout
    while True:
        _, body, retain = w.next(Channel.STATE, timeout=max(0.1, deadline - time.monotonic()))
        if all(body.get(k) == v for k, v in want.items()):
            return body | {"_retain": retain}


# ---- systemd notifications --------------------------------------------------------------------


def test_ready_only_when_serving_then_watchdog_then_stopping(tmp_path, broker, topic_prefix, keypair, bundle_dir, agents):
    notify = NotifySocket()
    a = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1],
              env={"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "1000000"})
    sha = a.install(bundle_dir, keypair[1])
    agents.append(a.start())
    try:
        notify.wait_for("READY=1")
        status, body = a.http("GET", "/readyz")  # READY=1 came after the model loaded and the API listened
        assert status == 200 and body["model"] == "tiny@1.0.0", body
        assert any(line.startswith("STATUS=serving tiny@1.0.0") for line in notify.received)
        first = notify.wait_for("WATCHDOG=1", timeout=15)
        second = notify.wait_for("WATCHDOG=1", timeout=15)
        assert 0.2 < second - first < 5  # every WATCHDOG_USEC / 2 (0.5 s); loose for a busy CI machine
        a.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=10)
        assert a.wait() == 0
        assert sha in (a.state_dir / "pointer.json").read_text()
    finally:
        notify.close()


def test_device_without_bundle_comes_up_reports_and_answers(tmp_path, broker, topic_prefix, agents):
    notify = NotifySocket(abstract=True)
    w = Watcher(broker.port, topic_prefix)
    a = Agent(tmp_path, broker.port, topic_prefix, env={"NOTIFY_SOCKET": notify.env})
    agents.append(a.start())
    try:
        notify.wait_for("READY=1")
        status, body = a.http("GET", "/readyz")
        assert status == 503 and body["reason"] == "no model loaded"
        state = state_of(w, type="state")
        assert state["device_id"] == a.device_id and "active" not in state and state["facts"]["cores"] >= 1
        w.send(f"{topic_prefix}/v1/devices/{a.device_id}/cmd", cmd(a.device_id, "report", "rep-1"))
        _, ack, _ = w.next(Channel.ACK)
        assert ack["command_id"] == "rep-1" and ack["accepted"] is True
        _, health, _ = w.next(Channel.HEALTH)  # a report also sends a fresh heartbeat
        assert health["update_state"] == "idle"
        a.signal(signal.SIGTERM)
        assert a.wait() == 0
    finally:
        notify.close()
        w.close()


@pytest.mark.parametrize("problem", ["api-port-taken", "state-dir-is-a-file", "token-file-missing"])
def test_startup_failure_is_one_line_and_exit_1(tmp_path, broker, topic_prefix, problem):
    a = Agent(tmp_path, broker.port, topic_prefix)
    blocker = socket.socket()
    if problem == "api-port-taken":
        blocker.bind(("127.0.0.1", a.api_port))
        blocker.listen()
        expected = f"error: cannot listen on api.bind '127.0.0.1:{a.api_port}'"
    elif problem == "token-file-missing":
        a.config.write_text(a.config.read_text().replace("[api]\n", f'[api]\ntoken_file = "{tmp_path / "nope"}"\n'))
        expected = f"error: cannot read api.token_file {tmp_path / 'nope'}"
    else:
        (tmp_path / "file").write_text("")
        a.config.write_text(a.config.read_text().replace(str(a.state_dir), str(tmp_path / "file" / "state")))
        expected = f"error: state_dir {tmp_path / 'file' / 'state'} is not writable"
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(a.config)],
                              capture_output=True, text=True, env=a.env, cwd=ROOT, timeout=60)
    finally:
        blocker.close()
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_on_a_unix_socket(tmp_path, broker, topic_prefix):
    sock_dir = tempfile.mkdtemp(prefix="esa", dir="/tmp")
    path = os.path.join(sock_dir, "api.sock")
    notify = NotifySocket()
    a = Agent(tmp_path, broker.port, topic_prefix, env={"NOTIFY_SOCKET": notify.env})
    a.config.write_text(a.config.read_text().replace(f'bind = "127.0.0.1:{a.api_port}"', f'bind = "unix:{path}"'))
    a.start()
    try:
        notify.wait_for("READY=1")

        class UnixConnection(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)

        conn = UnixConnection("localhost", timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        a.signal(signal.SIGTERM)
        assert a.wait() == 0
        assert not os.path.exists(path)  # removed on the way out
    finally:
        a.stop()
        notify.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


# ---- what the device reports --------------------------------------------------------------------


def test_birth_heartbeats_and_clean_sigterm(tmp_path, broker, topic_prefix, keypair, bundle_dir, agents):
    w = Watcher(broker.port, topic_prefix)
    a = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1],
              config='heartbeat_interval_s = 1\nlabels = { site = "lab", line = "2" }\n')
    sha = a.install(bundle_dir, keypair[1])
    agents.append(a.start())
    try:
        birth = state_of(w, type="state")
        assert birth["labels"] == {"site": "lab", "line": "2"}
        late = Watcher(broker.port, topic_prefix)  # retained: a controller that starts later sees it at once
        assert state_of(late, timeout=20)["_retain"]
        late.close()
        assert birth["active"] == {"name": "tiny", "version": "1.0.0", "manifest_sha256": sha}
        assert birth["execution_provider"] == "CPUExecutionProvider"
        facts = birth["facts"]
        assert facts["arch"] and facts["ram_bytes"] > 0 and facts["onnxruntime"] and "CPUExecutionProvider" in facts["execution_providers"]

        status, body = a.http("POST", "/v1/embeddings", {"model": "tiny", "input": [[0.1] * 8, [0.2] * 8]})
        assert status == 200, body
        seen, beats = 0, []
        deadline = time.monotonic() + 40
        while seen == 0 and time.monotonic() < deadline:
            try:
                topic, beat, retain = w.messages.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if topic.endswith("/health"):
                assert not retain and len(json.dumps(json.loads(beat), separators=(",", ":"))) < 1024
                beats.append(json.loads(beat))
                seen = beats[-1]["inference"]["requests"]
        assert seen == 1, f"heartbeats: {beats}\nagent log:\n{a.output()}"  # in exactly one heartbeat
        last = beats[-1]
        for key in ("uptime_s", "rss_bytes", "mem_available_bytes", "disk_free_bytes"):
            assert last[key] > 0, key
        assert last["active"]["manifest_sha256"] == sha and last["update_state"] == "idle"
        assert last["inference"]["p50_ms"] is not None and last["session"] == birth["session"]
        assert [b["seq"] for b in beats] == sorted(b["seq"] for b in beats) and beats[0]["seq"] > birth["seq"]

        a.signal(signal.SIGTERM)
        assert a.wait(timeout=20) == 0
        bye = state_of(w, type="offline")
        assert bye["reason"] == "shutdown" and bye["session"] == birth["session"]
        late = Watcher(broker.port, topic_prefix)
        assert state_of(late, timeout=20) == bye | {"_retain": True}
        late.close()
    finally:
        w.close()


def test_sigterm_lets_an_inflight_stream_finish_and_refuses_new_work(tmp_path, broker, topic_prefix, keypair, agents):
    from tests.support.lm_bundle import make_lm_bundle, seal_lm_bundle
    from tests.support.models import cache_dir

    cached = cache_dir() / "onnx-tiny-llama-lm"  # make_lm_bundle's export cache
    if (cached / "model.onnx").exists():  # skips tiny_model()'s torch import (~10 s on 2 busy cores)
        seal_lm_bundle(cached, tmp_path / "lm", keypair[0], name="tiny-llama")
    else:
        make_lm_bundle(tmp_path / "lm", keypair[0])
    notify = NotifySocket()
    a = Agent(tmp_path, broker.port, topic_prefix, public_key=keypair[1], env={"NOTIFY_SOCKET": notify.env})
    a.install(tmp_path / "lm", keypair[1])
    agents.append(a.start())
    try:
        notify.wait_for("READY=1")
        conn = http.client.HTTPConnection("127.0.0.1", a.api_port, timeout=30)
        conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": "tiny-llama", "stream": True, "max_tokens": 48,
                                      "messages": [{"role": "user", "content": "hello"}]}))
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()  # the body is chunked: read it through the response
        assert first.startswith(b"data: ")
        a.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=10)
        rest = resp.read()  # the request in flight finishes
        assert rest.rstrip().endswith(b"data: [DONE]")
        conn.close()
        assert a.wait(timeout=20) == 0
        with pytest.raises(OSError):  # and nothing listens any more
            a.http("GET", "/healthz")
    finally:
        notify.close()


def test_last_will_is_retained_when_killed(tmp_path, broker, topic_prefix, agents):
    w = Watcher(broker.port, topic_prefix)
    a = Agent(tmp_path, broker.port, topic_prefix)
    agents.append(a.start())
    try:
        birth = state_of(w, type="state")
        a.proc.kill()  # SIGKILL: no goodbye, the broker speaks for us
        a.wait()
        will = state_of(w, type="offline", timeout=60)
        assert will["reason"] == "lwt" and will["session"] == birth["session"]
        late = Watcher(broker.port, topic_prefix)
        assert state_of(late, timeout=20)["type"] == "offline"  # retained for whoever looks later
        late.close()
    finally:
        w.close()


# ---- SIGHUP -----------------------------------------------------------------------------------


def test_sighup_reloads_labels_heartbeat_and_log_level(tmp_path, broker, topic_prefix, agents):
    w = Watcher(broker.port, topic_prefix)
    a = Agent(tmp_path, broker.port, topic_prefix, config='labels = { site = "a" }\nheartbeat_interval_s = 600\n')
    agents.append(a.start())
    try:
        assert state_of(w, type="state")["labels"] == {"site": "a"}
        a.config.write_text(a.config.read_text().replace('site = "a"', 'site = "b", line = "7"')
                            .replace("heartbeat_interval_s = 600", "heartbeat_interval_s = 1\nlog_level = \"DEBUG\""))
        a.signal(signal.SIGHUP)
        # the agent may still publish a state of its start (e.g. once its facts child answers) before the reload's:
        # wait for the reloaded labels, which never come if SIGHUP did not reload them
        assert state_of(w, type="state", labels={"site": "b", "line": "7"})["labels"] == {"site": "b", "line": "7"}
        t0 = time.monotonic()
        w.next(Channel.HEALTH, timeout=30)
        w.next(Channel.HEALTH, timeout=30)
        assert time.monotonic() - t0 < 60  # heartbeats now every second, not every 10 minutes

        a.config.write_text(a.config.read_text().replace("heartbeat_interval_s = 1", "heartbeat_interval_s = -5"))
        a.signal(signal.SIGHUP)
        time.sleep(1.5)
        assert a.proc.poll() is None  # a bad reload is refused; the agent keeps running on the old config
        a.signal(signal.SIGTERM)
        assert a.wait() == 0
        out = a.output()
        assert "reload refused, keeping the running config: config error: heartbeat_interval_s" in out
        assert "DEBUG" in out  # the new log level took effect
    finally:
        w.close()


# ---- broker outage during an update -----------------------------------------------------------------


def test_deploy_events_buffered_while_the_broker_is_down(tmp_path, topic_prefix, keypair, bundle_dir, agents):
    from tests.support.http import Fault, FileServer

    own = restartable_broker()  # this test stops its broker; sessions survive the restart
    controller_id = f"ctl-{uuid.uuid4().hex[:8]}"
    files = FileServer().start()
    try:
        make_bundle(tmp_path / "bundle-2", keypair[0], name="tiny", version="1.1.0", seed=5)
        archive = pack(tmp_path / "bundle-2", tmp_path / "b2.tar")
        sha2 = hashlib.sha256((tmp_path / "bundle-2" / "manifest.json").read_bytes()).hexdigest()
        url = files.add("b2.tar", archive)
        files.fault = Fault("slow", limit_bps=max(2000, archive.stat().st_size // 3))  # ~3 s download

        w = Watcher(own.port, topic_prefix, client_id=controller_id)
        a = Agent(tmp_path, own.port, topic_prefix, public_key=keypair[1])
        sha1 = a.install(bundle_dir, keypair[1])
        agents.append(a.start())
        state_of(w, type="state")
        w.send(f"{topic_prefix}/v1/devices/{a.device_id}/cmd",
               cmd(a.device_id, "deploy", "dep-1", rollout_id="r-1", urls=[url], size=archive.stat().st_size,
                   bundle={"name": "tiny", "version": "1.1.0", "manifest_sha256": sha2},
                   deadline=deadline_in().isoformat(), watch={"window_s": 0, "min_requests": 0}))
        _, ack, _ = w.next(Channel.ACK)
        assert ack["accepted"], ack
        w.close()  # its persistent session keeps collecting
        own.stop()  # the broker goes away mid-download

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the agent keeps serving and finishes the update offline
            status, body = a.http("GET", "/readyz")
            if status == 200 and body["model"] == "tiny@1.1.0" and '"committed"' in (a.state_dir / "update.json").read_text():
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"update did not finish offline:\n{a.output()}")

        own.start()
        w = Watcher(own.port, topic_prefix, client_id=controller_id)  # gets all that was queued for it
        events, state = [], None
        while state is None:  # up to the fresh state published after the reconnect
            topic, body, _ = w.next(timeout=30)
            if topic.endswith("/events"):
                events.append(body)
            elif topic.endswith("/state") and body["type"] == "state" and (body.get("update") or {}).get("state") == "committed":
                state = body
        order = [s.value for s in UpdateState]
        got = [e["state"] for e in events]
        assert got[-1] == "committed" and "switching" in got, got
        assert [order.index(s) for s in got] == sorted(order.index(s) for s in got), got  # in order
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert all(e["command_id"] == "dep-1" for e in events)
        # the fresh retained state comes after the buffered events and shows the new slots
        assert state["seq"] > events[-1]["seq"]
        assert state["active"]["manifest_sha256"] == sha2 and state["previous"]["manifest_sha256"] == sha1
        assert state["update"]["state"] == "committed"
        w.close()
        a.signal(signal.SIGTERM)
        assert a.wait() == 0
    finally:
        files.stop()
        own.stop()


def test_a_wedged_runtime_stops_the_watchdog_pings(tmp_path, keypair, bundle_dir, caplog):
    """WATCHDOG=1 needs inference that answers: a runtime stuck inside a run stops the pings."""
    import threading

    from agent.bundle import open_bundle
    from agent.config import load_settings
    from agent.runtime import load_model
    from agent.service import AgentService
    from agent.systemd import Notifier

    notify = NotifySocket()
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "dev-wedge"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[api]\nbind = "127.0.0.1:{free_port()}"\nqueue_size = 4\ndrain_timeout_s = 0\n'
                      '[liveness]\nprobe_interval_s = 0.2\nmax_silence_s = 1.5\n')
    service = AgentService(load_settings(config),
                           notifier=Notifier({"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "400000"}))
    model = load_model(open_bundle(bundle_dir, TrustedKeys.from_paths([keypair[1]])))
    service.host.swap(model)
    service._start_api()
    service._start_probe()
    # The wedge: onnxruntime's run never returns (an execution provider hung in a driver call).
    wedged, release, real_run = threading.Event(), threading.Event(), model.session.run

    def run(*args, **kwargs):
        if wedged.is_set():
            release.wait()
        return real_run(*args, **kwargs)

    model.session.run = run
    loop = threading.Thread(target=service._loop, daemon=True)
    loop.start()

    def pings(seconds: float) -> list[float]:
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            notify.sock.settimeout(left)
            try:
                data = notify.sock.recv(4096).decode()
            except TimeoutError:
                break
            got += [time.monotonic()] * data.splitlines().count("WATCHDOG=1")
        return got

    def request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", service.settings.api.port, timeout=60)
        conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "tiny", "input": [[0.5] * 8]}),
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()

    try:
        start = time.monotonic()
        idle = pings(3.0)  # idle: the probe's inference answers, so pings go on past max_silence_s
        assert len(idle) >= 8 and max(idle) - start > 2.5, idle
        request()
        wedged.set()
        stuck = threading.Thread(target=request, daemon=True)  # a request stuck inside the run, holding its slot
        stuck.start()
        start = time.monotonic()
        got = pings(4.0)
        # no ping later than max_silence_s (1.5) after the last answer (+1 s for a busy machine), then 1.5 s of none
        assert got and max(got) - start < 2.5, got
        assert "inference has not answered for over 1.5 s (wedged runtime?)" in caplog.text
        release.set()  # the runtime comes back: the stuck request answers and the pings resume
        stuck.join(30)
        assert len(pings(1.5)) >= 2
    finally:
        release.set()
        service.inbox.put(signal.SIGTERM)
        loop.join(10)
        service._shutdown()
        notify.close()
