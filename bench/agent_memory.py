"""Idle footprint of the real `edgeship agent run` service with no bundle: numbers, never pass/fail.

For each run: start the service as systemd would (the `edgeship` console script, a config file, a
fresh state dir, one pinned public key, the broker at mqtt://127.0.0.1:1883), wait until it has published its retained
state (it is up and reporting), let it settle through a few heartbeats, then read VmRSS / VmHWM /
RssAnon / RssFile from /proc/<pid>/status and which heavy native libraries it has mapped
(/proc/<pid>/maps: onnxruntime, numpy, cryptography, pydantic-core, tokenizers). A second reading
follows one API probe (GET /healthz, GET /v1/models), the load a supervisor puts on an idle agent.

Also, in fresh interpreters: `python -X importtime -c "import edgeship.cli, agent.cli, agent.service"`
(what `edgeship agent run` imports; top modules by cumulative import time) and the RSS each heavy package adds when imported on its own.

    python bench/agent_memory.py                    # 3 runs, table on stdout
    python bench/agent_memory.py --runs 5 --json bench/results/agent_memory.json --label after
    git archive <commit> agent edgeship | tar -x -C /tmp/old    # the same measurement of an older tree:
    python bench/agent_memory.py --tree /tmp/old --label before
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BROKER_PORT = 1883
# Shared objects whose presence in /proc/<pid>/maps says the package was imported.
NATIVE = {
    "onnxruntime": "onnxruntime_pybind11_state",
    "numpy": "_multiarray_umath",
    "cryptography": "_rust.abi3",
    "pydantic_core": "_pydantic_core",
    "tokenizers": "tokenizers.abi3",
}
ENTRY = "edgeship.cli, agent.cli, agent.service"  # what `edgeship agent run` imports before it starts
# Packages whose import cost, alone over a bare interpreter, the table lists.
PACKAGES = ["click", "edgeship", "paho.mqtt.client", "pydantic", "pydantic_settings", "cryptography.hazmat.primitives.asymmetric.ed25519",
            "numpy", "onnxruntime", "agent.protocol", "agent.config", "agent.bundle", "agent.service"]


def child_env(tree: Path) -> dict[str, str]:
    """The environment of every measured process: `tree` first on the path, no agent settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESHIP_AGENT_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    if tree != ROOT:
        env["PYTHONPATH"] = str(tree)
    return env


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out


def mapped_natives(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [name for name, marker in NATIVE.items() if marker in maps]


def agent_command() -> list[str]:
    """The console script systemd's ExecStart runs; `python -m edgeship.cli` from a bare source tree."""
    script = Path(sys.executable).with_name("edgeship")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgeship.cli"]


class StateWatcher:
    """Subscribes to one device's retained state topic; `wait()` returns once the agent published it."""

    def __init__(self, prefix: str, device_id: str):
        self.got: queue.Queue = queue.Queue()
        subscribed: queue.Queue = queue.Queue()
        topic = f"{prefix}/v1/devices/{device_id}/state"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.on_message = lambda c, u, m: self.got.put(json.loads(m.payload)) if m.payload else None
        self.client.connect("127.0.0.1", BROKER_PORT)
        self.client.loop_start()
        subscribed.get(timeout=10)

    def wait(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.got.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg.get("type") == "state":
                return msg

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def api_probe(port: int) -> None:
    for path in ("/healthz", "/v1/models"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            conn.getresponse().read()
        finally:
            conn.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(settle_s: float, tree: Path) -> dict:
    """Start the service, wait for its retained state, settle, read its memory, probe the API, read again."""
    from agent.bundle.signing import generate_keypair

    tmp = Path(tempfile.mkdtemp(prefix="edgeship-mem-"))
    device_id, prefix, port = f"bench-{uuid.uuid4().hex[:8]}", f"benchmem{uuid.uuid4().hex[:6]}", free_port()
    config = tmp / "agent.toml"
    pub = generate_keypair(tmp / "keys").public_path  # a production device pins at least one key
    config.write_text(f'device_id = "{device_id}"\nstate_dir = "{tmp / "state"}"\nheartbeat_interval_s = 1.0\n'
                      f'trusted_keys = ["{pub}"]\n'
                      f'[broker]\nurl = "mqtt://127.0.0.1:{BROKER_PORT}"\ntopic_prefix = "{prefix}"\n'
                      f'[api]\nbind = "127.0.0.1:{port}"\n')
    watcher = StateWatcher(prefix, device_id)
    t0 = time.monotonic()
    proc = subprocess.Popen([*agent_command(), "agent", "run", "--config", str(config)], env=child_env(tree), cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            state = watcher.wait(timeout=120)
        except queue.Empty:
            proc.kill()
            raise SystemExit(f"the agent published no state within 120 s: {proc.communicate()[1][-2000:]}") from None
        up_s = time.monotonic() - t0
        assert state.get("active") is None, f"the state dir is fresh, yet the agent serves {state.get('active')}"
        time.sleep(settle_s)
        idle = status_kb(proc.pid) | {"natives": mapped_natives(proc.pid)}
        api_probe(port)
        time.sleep(1.0)
        probed = status_kb(proc.pid) | {"natives": mapped_natives(proc.pid)}
    finally:
        watcher.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"up_s": round(up_s, 2), "idle": idle, "after_api_probe": probed}


def import_times(top: int, tree: Path) -> tuple[list[dict], list[dict]]:
    """`python -X importtime -c 'import <ENTRY>'`: the `top` modules by cumulative time, and the
    `top` top-level packages by the sum of their modules' own (self) time."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {ENTRY}"], cwd=tree, env=child_env(tree),
                         capture_output=True, text=True, check=True).stderr
    rows = {}
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line[len("import time:"):].split("|"))
        rows[name.strip()] = max(rows.get(name.strip(), (0, 0)), (int(cum_us), int(self_us)))
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    modules = [{"module": name, "cumulative_ms": round(cum / 1000, 1), "self_ms": round(own / 1000, 1)}
               for name, (cum, own) in ranked[:top]]
    packages: dict[str, list[int]] = {}
    for name, (_, own) in rows.items():
        entry = packages.setdefault(name.split(".")[0], [0, 0])
        entry[0] += own
        entry[1] += 1
    by_self = sorted(packages.items(), key=lambda kv: -kv[1][0])
    return modules, [{"package": name, "self_ms": round(own / 1000, 1), "modules": n} for name, (own, n) in by_self[:top]]


def import_rss(module: str, tree: Path) -> dict:
    """VmRSS of a fresh interpreter before and after importing `module` alone, in kB."""
    code = ("import sys\n"
            "def rss():\n"
            "    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
            "before = rss()\n"
            f"import {module}\n"
            "print(before, rss(), 'onnxruntime' in sys.modules, 'numpy' in sys.modules, 'cryptography' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=child_env(tree), capture_output=True, text=True, check=True).stdout.split()
    return {"module": module, "bare_kb": int(out[0]), "after_kb": int(out[1]), "added_kb": int(out[1]) - int(out[0]),
            "pulls_onnxruntime": out[2] == "True", "pulls_numpy": out[3] == "True", "pulls_cryptography": out[4] == "True"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=4.0, help="seconds of idle (heartbeats every 1 s) before reading")
    ap.add_argument("--top", type=int, default=15, help="modules in the import-time table")
    ap.add_argument("--label", default="", help="what this run measures (e.g. before/after a change)")
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree to measure (default: this one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tree = args.tree.resolve()

    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.settle, tree))
        r = runs[-1]
        log(f"run {i + 1}: up in {r['up_s']} s, VmRSS {r['idle']['VmRSS'] / 1024:.1f} MiB, natives {r['idle']['natives']}")
    imports, import_packages = import_times(args.top, tree)
    packages = [import_rss(m, tree) for m in PACKAGES]

    def med(phase: str, key: str) -> float:
        return round(statistics.median(r[phase][key] for r in runs) / 1024, 1)

    print(f"\n`edgeship agent run`, no bundle, {args.runs} runs (median), MiB {args.label}")
    print(f"{'phase':<18} {'VmRSS':>7} {'VmHWM':>7} {'RssAnon':>8} {'RssFile':>8}  native libraries mapped")
    for phase in ("idle", "after_api_probe"):
        natives = ", ".join(runs[-1][phase]["natives"]) or "-"
        print(f"{phase:<18} {med(phase, 'VmRSS'):>7} {med(phase, 'VmHWM'):>7} {med(phase, 'RssAnon'):>8} "
              f"{med(phase, 'RssFile'):>8}  {natives}")
    print(f"start to retained state: {statistics.median(r['up_s'] for r in runs):.2f} s (median)")
    print(f"\n`python -X importtime -c 'import {ENTRY}'`, top {args.top} by cumulative time")
    print(f"{'module':<48} {'cum ms':>8} {'self ms':>8}")
    for row in imports:
        print(f"{row['module']:<48} {row['cumulative_ms']:>8} {row['self_ms']:>8}")
    print(f"\nthe same, summed per top-level package (own time of its modules), top {args.top}")
    print(f"{'package':<32} {'self ms':>8} {'modules':>8}")
    for row in import_packages:
        print(f"{row['package']:<32} {row['self_ms']:>8} {row['modules']:>8}")
    print("\nRSS a package adds on its own to a bare interpreter (MiB)")
    print(f"{'module':<52} {'added':>6}  pulls in")
    for p in packages:
        pulls = [n for n in ("onnxruntime", "numpy", "cryptography") if p[f"pulls_{n}"]]
        print(f"{p['module']:<52} {p['added_kb'] / 1024:>6.1f}  {', '.join(pulls) or '-'}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "label": args.label, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "tree": str(tree), "command": " ".join([*agent_command(), "agent", "run", "--config", "..."]),
            "median_mib": {ph: {k: med(ph, k) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
                           for ph in ("idle", "after_api_probe")},
            "runs": runs, "import_time_top": imports, "import_time_packages": import_packages, "package_rss": packages,
        }, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
