"""A small real agent process for the update tests: BundleStore + ModelHost + UpdateManager + paho MQTT.

    python -m tests.support.update_driver --state-dir D --port P --prefix T --device-id dev1 \
        --trusted-key k.pub [--install BUNDLE_DIR] [--rps 50]

It installs BUNDLE_DIR as the first active bundle when the store is empty, serves it from a
ModelHost (with `--rps`, a steady stream of requests through host.acquire()), recovers any
interrupted update, then answers commands from the broker until SIGTERM. Crash injection comes
from EDGESHIP_CRASH_AT (agent/update/crashpoint.py); without it nothing is injected. With
EDGESHIP_TEST_FSYNC_LOG set it logs every fsync and rename under the state dir
(tests/support/powercut.py), after an os.sync() that makes the installed state the baseline.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from agent.bundle import TrustedKeys
from agent.protocol import Channel, StateMessage, Topics, encode
from agent.runtime import ModelHost
from agent.update.manager import UpdateConfig, UpdateManager
from agent.update.store import BundleStore
from tests.support import powercut

CHANNEL_OF = {"state": Channel.STATE, "ack": Channel.ACK, "event": Channel.EVENTS, "health": Channel.HEALTH}


def request_stream(host: ModelHost, rps: float, stop: threading.Event) -> None:
    """What local apps would do: embed 8-float vectors, recording latency and errors."""
    x = [np.linspace(-1, 1, 8, dtype=np.float32).tolist()]
    while not stop.is_set():
        start = time.perf_counter()
        ok = True
        try:
            with host.acquire() as model:
                model.embed(x)
        except Exception:  # a failing request is exactly what the watcher counts
            ok = False
        host.stats.record((time.perf_counter() - start) * 1000, ok=ok)
        stop.wait(1.0 / rps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--device-id", default="dev1")
    ap.add_argument("--trusted-key", type=Path, action="append", required=True)
    ap.add_argument("--install", type=Path)
    ap.add_argument("--rps", type=float, default=0.0)
    ap.add_argument("--agent-version", default="0.1.0")
    ap.add_argument("--max-watch-s", type=float, default=30.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="driver %(levelname)s %(message)s")

    trusted = TrustedKeys.from_paths(args.trusted_key)
    spy = powercut.FsyncLog(Path(os.environ[powercut.ENV]), args.state_dir).install() \
        if os.environ.get(powercut.ENV) else None  # what reaches the disk, for the power-cut tests
    store = BundleStore(args.state_dir, trusted=trusted)
    if store.active_sha() is None and args.install:
        vb = store.add_directory(args.install)
        store.switch(vb.manifest_sha256, None)
    if spy is not None:
        spy.baseline()  # the device as installed is on disk before any update starts
    host = ModelHost(None)  # manager.recover() loads the active bundle (or falls back), as the service does

    topics = Topics(args.prefix)
    seq = itertools.count().__next__
    session = f"drv{int(time.time() * 1000) % 10**9}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{args.device_id}-{session}")
    inbox: queue.Queue[bytes] = queue.Queue()
    connected = threading.Event()

    def on_connect(c, userdata, flags, rc, props=None):
        c.subscribe(topics.device(args.device_id, Channel.CMD), qos=1)
        connected.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, msg: inbox.put(msg.payload)  # handed to the main thread
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    if not connected.wait(10):
        print("driver: broker not reachable", file=sys.stderr)
        return 2

    def publish(msg) -> None:
        topic = topics.device(args.device_id, CHANNEL_OF[msg.type])
        client.publish(topic, encode(msg), qos=1, retain=msg.type == "state").wait_for_publish(5)

    manager: UpdateManager | None = None

    def publish_state() -> None:
        snap = manager.snapshot()
        serving = host.current
        served_sha = Path(serving.path).name if serving is not None else None
        active_ref = snap["active"] if snap["active"] and snap["active"].manifest_sha256 == served_sha else None
        publish(StateMessage(device_id=args.device_id, session=session, seq=seq(), agent_version=args.agent_version,
                             active=active_ref, previous=snap["previous"], update=snap["update"],
                             execution_provider=getattr(serving, "execution_provider", None),
                             labels={"serving": served_sha or ""}))

    config = UpdateConfig(state_dir=args.state_dir, device_id=args.device_id, agent_version=args.agent_version,
                          session=session, max_watch_s=args.max_watch_s, watch_poll_s=0.1, drain_timeout_s=5,
                          baseline_window_s=60, min_watch_sample=5)
    manager = UpdateManager(config=config, store=store, host=host, publish=publish, trusted=trusted,
                            on_state_change=publish_state, next_seq=seq)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    if args.rps > 0:
        threading.Thread(target=request_stream, args=(host, args.rps, stop), daemon=True).start()
    manager.recover()
    publish_state()
    while not stop.is_set():
        try:
            payload = inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        publish(manager.handle_payload(payload))
    manager.close()
    client.loop_stop()
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
