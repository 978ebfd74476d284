"""Test harness for agent/update: a controller-side MQTT client and an in-process device.

Both talk through the real broker: the controller publishes commands on .../cmd and collects
every ack, event and state message the device publishes.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from agent.bundle import TrustedKeys, pack
from agent.protocol import Channel, StateMessage, Topics, encode, parse_device_message
from tests.support.bundles import make_bundle

def deadline_in(seconds: float = 3600.0) -> datetime:
    """A deploy deadline `seconds` from now (every deploy must carry one)."""
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


CHANNEL_OF = {"state": Channel.STATE, "ack": Channel.ACK, "event": Channel.EVENTS, "health": Channel.HEALTH}


class Controller:
    """Publishes commands, records what devices say."""

    def __init__(self, port: int, prefix: str):
        self.topics = Topics(prefix)
        self.messages: list[Any] = []
        self.raw: list[tuple[str, bytes]] = []
        self.sent: dict[str, bytes] = {}  # command id -> the payload last sent with it
        self._cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ctl-{prefix}")

        def on_connect(c, u, f, rc, p=None):
            c.subscribe(f"{self.topics.root}/#", qos=1)

        def on_subscribe(*a):
            ready.set()

        def on_message(c, u, msg):
            parsed = self.topics.parse(msg.topic)
            if parsed is None or parsed[1] == Channel.CMD:
                return
            m = parse_device_message(msg.payload, channel=parsed[1], device_id=parsed[0])
            with self._cond:
                self.raw.append((msg.topic, msg.payload))
                self.messages.append(m)
                self._cond.notify_all()

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10), "controller could not subscribe"

    def send_raw(self, device_id: str, payload: bytes) -> None:
        self.client.publish(self.topics.device(device_id, Channel.CMD), payload, qos=1).wait_for_publish(5)

    def send(self, command) -> None:
        self.sent[command.id] = encode(command)
        self.send_raw(command.device_id, self.sent[command.id])

    def wait(self, pred: Callable[[Any], bool], timeout: float = 60.0, what: str = "message") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.type, getattr(m, "state", ""), getattr(m, "code", "")) for m in self.messages[-15:]]
                    raise AssertionError(f"no {what} within {timeout}s; last messages: {seen}")
                self._cond.wait(left)

    def ack(self, command_id: str, timeout: float = 30.0):
        return self.wait(lambda m: m.type == "ack" and m.command_id == command_id, timeout, f"ack {command_id}")

    def final_event(self, command_id: str, timeout: float = 90.0):
        rest = {"committed", "failed", "rolled_back"}
        return self.wait(lambda m: m.type == "event" and m.command_id == command_id and m.state.value in rest,
                         timeout, f"final event of {command_id}")

    def events(self, command_id: str) -> list:
        with self._cond:
            return [m for m in self.messages if m.type == "event" and m.command_id == command_id]

    def states(self) -> list[StateMessage]:
        with self._cond:
            return [m for m in self.messages if m.type == "state"]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Bundles:
    """Signed test bundles packed as .tar, served over HTTP."""

    root: Path
    private_key: Path
    made: dict[str, tuple[Path, Path, str]] = field(default_factory=dict)  # label -> (dir, tar, sha)

    def make(self, label: str, **kw) -> tuple[Path, Path, str]:
        d = self.root / label
        make_bundle(d, self.private_key, **kw)
        tar = pack(d, self.root / f"{label}.tar")
        sha = hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
        self.made[label] = (d, tar, sha)
        return d, tar, sha


class InProcessDevice:
    """BundleStore + ModelHost + UpdateManager in this process, linked to the broker with paho."""

    def __init__(self, state_dir: Path, port: int, prefix: str, trusted: TrustedKeys, *, install: Path | None = None,
                 device_id: str = "dev1", **config_kw):
        from agent.runtime import ModelHost
        from agent.update.manager import UpdateConfig, UpdateManager
        from agent.update.store import BundleStore

        self.device_id = device_id
        self._closing = False
        self.store = BundleStore(state_dir, trusted=trusted)
        if self.store.active_sha() is None and install is not None:
            vb = self.store.add_directory(install)
            self.store.switch(vb.manifest_sha256, None)
        self.host = ModelHost(None)  # manager.recover() loads the active bundle (or falls back), as the service does
        self.topics = Topics(prefix)
        self.seq = itertools.count().__next__
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{prefix}")
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(self.topics.device(device_id, Channel.CMD), qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = lambda c, u, msg: self.inbox.put(msg.payload)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)
        cfg = dict(state_dir=state_dir, device_id=device_id, agent_version="0.1.0", watch_poll_s=0.05,
                   drain_timeout_s=5, max_watch_s=20)
        cfg.update(config_kw)
        self.manager = UpdateManager(config=UpdateConfig(**cfg), store=self.store, host=self.host,
                                     publish=self.publish, trusted=trusted, next_seq=self.seq,
                                     on_state_change=self.publish_state)
        self.manager.recover()
        self._owner = threading.Thread(target=self._serve, daemon=True)
        self._owner.start()

    def publish(self, msg) -> None:
        try:
            self.client.publish(self.topics.device(self.device_id, CHANNEL_OF[msg.type]), encode(msg), qos=1,
                                retain=msg.type == "state").wait_for_publish(5)
        except RuntimeError:
            if not self._closing:  # while closing the real link would buffer; this harness stops talking
                raise

    def publish_state(self) -> None:
        snap = self.manager.snapshot()
        self.publish(StateMessage(device_id=self.device_id, session=self.manager.config.session, seq=self.seq(),
                                  agent_version="0.1.0", **snap))

    def _serve(self) -> None:  # the owner thread: commands are handled here, never on paho's thread
        while (payload := self.inbox.get()) is not None:
            self.publish(self.manager.handle_payload(payload))

    def serving_sha(self) -> str | None:
        cur = self.host.current
        return Path(cur.path).name if cur is not None else None

    def close(self) -> None:
        self._closing = True
        self.inbox.put(None)
        self.manager.close()
        self.client.disconnect()
        self.client.loop_stop()
        cur = self.host.current
        if cur is not None:
            cur.close()


def regressing_bundle(directory: Path, private_key: Path, *, version: str = "1.1.0") -> tuple[Path, str]:
    """(archive, manifest sha) of a bundle that passes its smoke test but rejects the 8-float inputs
    clients send (it takes 16): after the switch every request fails, so the watcher must roll back."""
    import numpy as np
    import onnxruntime as ort

    from agent.bundle import Golden, ModelSpec, Target, Task, load_private_key, seal_bundle
    from tests.support.bundles import tiny_onnx

    d = Path(directory)
    (d / "golden").mkdir(parents=True)
    tiny_onnx(d / "model.onnx", dim=16, seed=5)
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    y = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(d / "golden" / "inputs.npz", x=x)
    np.savez(d / "golden" / "outputs.npz", y=y)
    seal_bundle(d, private_key=load_private_key(private_key), name="tiny", version=version, task=Task.EMBEDDING,
                target=Target(profile="cpu-x86-avx2"),
                model=ModelSpec(entry="model.onnx", inputs=["x"], outputs=["y"], config={"kind": "raw"}),
                golden=Golden(inputs="golden/inputs.npz", outputs="golden/outputs.npz", atol=1e-4, rtol=1e-4))
    return pack(d, d.with_suffix(".tar")), hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()


def slow_bundle(directory: Path, private_key: Path, *, version: str = "1.1.0", width: int = 3072) -> tuple[Path, str]:
    """(archive, manifest sha) of a correct bundle with the same 8-float I/O as `make_bundle`'s but
    far more work per request (a width x width outer product through tanh): a p95 latency regression.
    3072 is ~5 ms a request on a 2-core Xeon, ~10x what 1024 was: at 1024 (0.6 ms) the old model's
    baseline p95, taken while the smoke test loads on the other core, came within 3x of it and a CI
    run saw "no regression"."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from agent.bundle import Golden, ModelSpec, Target, Task, load_private_key, seal_bundle

    d = Path(directory)
    (d / "golden").mkdir(parents=True)
    rng = np.random.default_rng(7)
    inits = {"W0": (rng.standard_normal((8, width)) / np.sqrt(8)).astype(np.float32),
             "R": rng.standard_normal((1, width)).astype(np.float32),
             "W1": (rng.standard_normal((width, 8)) / np.sqrt(width)).astype(np.float32),
             "axis": np.array([2], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"]), helper.make_node("Tanh", ["m0"], ["t0"]),
             helper.make_node("Unsqueeze", ["t0", "axis"], ["u"]),  # [b, width, 1]
             helper.make_node("MatMul", ["u", "R"], ["o"]),  # [b, width, width]: the expensive part
             helper.make_node("Tanh", ["o"], ["to"]),
             helper.make_node("ReduceMean", ["to"], ["r"], axes=[2], keepdims=0),
             helper.make_node("MatMul", ["r", "W1"], ["m1"]), helper.make_node("Tanh", ["m1"], ["y"])]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), d / "model.onnx")
    x = rng.standard_normal((2, 8)).astype(np.float32)
    y = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(d / "golden" / "inputs.npz", x=x)
    np.savez(d / "golden" / "outputs.npz", y=y)
    seal_bundle(d, private_key=load_private_key(private_key), name="tiny", version=version, task=Task.EMBEDDING,
                target=Target(profile="cpu-x86-avx2"),
                model=ModelSpec(entry="model.onnx", inputs=["x"], outputs=["y"], config={"kind": "raw"}),
                golden=Golden(inputs="golden/inputs.npz", outputs="golden/outputs.npz", atol=1e-3, rtol=1e-3))
    return pack(d, d.with_suffix(".tar")), hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
