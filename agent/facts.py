"""Device facts (once per process, in the retained state) and health readings (every heartbeat).

Everything comes from /proc, /sys and os.statvfs: no psutil on the device. A reading the OS does
not expose is None, never a guess.

`python -m agent.facts` prints the execution providers as JSON: the agent asks a child process
while it serves nothing, so onnxruntime and numpy (~30 MB) enter its memory with the first model.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from agent.protocol import DeviceFacts
from agent.runtime.cpu import cpu_facts

THERMAL_ROOT = Path("/sys/class/thermal")
log = logging.getLogger("edgeship.agent.facts")


def os_name() -> str:
    """'Debian GNU/Linux 12 (bookworm), Linux 6.1.0' (PRETTY_NAME from os-release, kernel release)."""
    pretty = ""
    for path in (Path("/etc/os-release"), Path("/usr/lib/os-release")):
        try:
            for line in path.read_text().splitlines():
                if line.startswith("PRETTY_NAME="):
                    pretty = line.partition("=")[2].strip().strip('"')
                    break
        except OSError:
            continue
        if pretty:
            break
    kernel = f"{platform.system()} {platform.release()}"
    return f"{pretty}, {kernel}" if pretty else kernel


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes, e.g. {'MemTotal': ..., 'MemAvailable': ...}; {} when unreadable."""
    out = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


# Plugin EPs worth a probe, by the machines where they can mean an accelerator. onnxruntime-qnn on
# x86_64 is the Hexagon simulator the exporter verifies with, not an NPU: registering it there
# would cost ~1 s and ~28 MB at every start to report nothing real.
PLUGIN_EPS = {"QNNExecutionProvider": ("onnxruntime_qnn", frozenset({"aarch64", "arm64"}))}


def plugin_execution_providers(machine: str | None = None) -> list[str]:
    """Plugin EPs (onnxruntime >= 1.22) that offer a non-CPU device here; registering them is the probe."""
    import importlib.util

    machine = machine or platform.machine()
    found = []
    for name, (package, machines) in PLUGIN_EPS.items():
        if machine not in machines or importlib.util.find_spec(package) is None:
            continue
        try:
            import onnxruntime as ort

            from agent.runtime.qnn import register_qnn_ep

            register_qnn_ep()
            if any(d.ep_name == name and d.device.type != ort.OrtHardwareDeviceType.CPU for d in ort.get_ep_devices()):
                found.append(name)
        except Exception as exc:  # a broken driver stack must not stop the agent from starting
            log.warning("%s is installed but unusable here: %s", name, exc)
    return found


def execution_providers(*, isolate: bool = False) -> tuple[list[str], str]:
    """(available EPs, accelerators first; onnxruntime version); ([], '') without onnxruntime.

    `isolate`: ask a child process unless onnxruntime is already imported here, so an agent that
    serves nothing does not carry onnxruntime and numpy.
    """
    if isolate and "onnxruntime" not in sys.modules:
        answer = execution_providers_in_child()
        if answer is not None:
            return answer
    try:
        import onnxruntime as ort
    except ImportError:
        return [], ""
    # a plugin EP registered earlier in this process (a QNN bundle was loaded) shows up in onnxruntime's
    # list too; plugins are reported by plugin_execution_providers alone, with its per-machine rule
    builtin = [ep for ep in ort.get_available_providers() if ep not in PLUGIN_EPS]
    return [*plugin_execution_providers(), *builtin], ort.__version__


def execution_providers_in_child(timeout_s: float = 120.0) -> tuple[list[str], str] | None:
    """`python -m agent.facts` in a child process; None (and a warning) when it gives no answer."""
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.facts"], capture_output=True, text=True,
                              errors="replace", timeout=timeout_s, check=True)
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        return [str(ep) for ep in answer["execution_providers"]], str(answer["onnxruntime"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError, TypeError) as exc:
        # The answer matters more than the memory: the caller then probes in this process.
        err = getattr(exc, "stderr", None) or ""
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        detail = err.strip().splitlines()[-1:] or [f"{type(exc).__name__}: {exc}"]
        log.warning("cannot probe the execution providers in a child process (%s); probing in the agent", detail[0][:300])
        return None


def device_facts(*, isolate_onnxruntime: bool = False) -> DeviceFacts:
    """What the retained state says about the hardware; read once at start (it does not change)."""
    cpu = cpu_facts()
    eps, ort_version = execution_providers(isolate=isolate_onnxruntime)
    return DeviceFacts(
        arch=cpu["arch"],
        os=os_name(),
        cpu_model=cpu["model"][:128],
        cores=cpu["cores_usable"],
        cpu_features=cpu["flags"],
        ram_bytes=meminfo().get("MemTotal", 0),
        execution_providers=eps,
        onnxruntime=ort_version,
    )


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Every CPU feature flag the kernel lists (x86 'flags', Arm 'Features'); empty if unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def temperature_c(root: Path = THERMAL_ROOT) -> float | None:
    """The hottest thermal zone in °C, None where /sys exposes none (VMs, containers)."""
    best = None
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        if -50_000 < milli < 200_000:  # drivers report garbage like -273000 or 0x7fffffff
            best = milli / 1000 if best is None else max(best, milli / 1000)
    return best


def disk_free(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def process_rss() -> int | None:
    """This process's resident set size in bytes."""
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


class CpuMeter:
    """Whole-device CPU busy % between successive `percent()` calls (from /proc/stat)."""

    def __init__(self, path: Path = Path("/proc/stat")):
        self._path = path
        self._last = self._read()

    def _read(self) -> tuple[int, int] | None:
        try:
            first = self._path.read_text().splitlines()[0].split()
            values = [int(v) for v in first[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    def percent(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        total, idle = now[0] - last[0], now[1] - last[1]
        return round(100.0 * (total - idle) / total, 1)


class Uptime:
    """Seconds since the agent started (monotonic)."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def seconds(self) -> float:
        return round(time.monotonic() - self._start, 1)


if __name__ == "__main__":
    eps, version = execution_providers()
    print(json.dumps({"execution_providers": eps, "onnxruntime": version}))
