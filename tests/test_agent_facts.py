"""Device facts and health readings: real /proc and /sys on this machine, and written files for the
shapes other machines have (thermal zones, Arm cpuinfo)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from agent.facts import (
    CpuMeter,
    cpu_flags,
    device_facts,
    disk_free,
    meminfo,
    os_name,
    plugin_execution_providers,
    process_rss,
    temperature_c,
)


def test_this_machine():
    facts = device_facts()
    assert facts.arch and facts.cores >= 1 and facts.ram_bytes > 0 and facts.onnxruntime
    assert "CPUExecutionProvider" in facts.execution_providers
    assert "Linux" in os_name() and "Linux" in facts.os
    assert process_rss() > 10 * 2**20
    assert disk_free(Path("/")) > 0 and disk_free(Path("/nonexistent/dir")) is None
    mem = meminfo()
    assert 0 < mem["MemAvailable"] <= mem["MemTotal"] == facts.ram_bytes


def test_thermal_zones(tmp_path):
    assert temperature_c(tmp_path) is None  # containers and VMs expose none
    for n, milli in enumerate(["41500", "-273000", "garbage", "56250"]):
        (tmp_path / f"thermal_zone{n}").mkdir()
        (tmp_path / f"thermal_zone{n}" / "temp").write_text(milli + "\n")
    assert temperature_c(tmp_path) == 56.25  # the hottest sane zone


def test_cpu_flags_x86_and_arm(tmp_path):
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_flags(tmp_path / "x86") == {"fpu", "sse4_2", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "arm") == {"fp", "asimd", "asimddp", "i8mm"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_cpu_meter_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    meter = CpuMeter(stat)
    stat.write_text("cpu  175 0 125 900 0 0 0 0 0 0\n")  # +100 busy, +100 idle
    assert meter.percent() == 50.0
    assert meter.percent() is None  # no time passed: no reading rather than a made-up one
    first = CpuMeter().percent()
    assert first is None or 0.0 <= first <= 100.0


def test_qnn_simulator_on_x86_is_not_reported_as_an_npu():
    assert plugin_execution_providers("x86_64") == []  # not even probed there
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        assert plugin_execution_providers("aarch64") == []  # nothing to probe
    else:
        # The probe really registers the plugin; its HTP simulator offers a CPU-type device only.
        import onnxruntime as ort

        assert plugin_execution_providers("aarch64") == []
        qnn = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
        assert qnn and all(d.device.type == ort.OrtHardwareDeviceType.CPU for d in qnn)
