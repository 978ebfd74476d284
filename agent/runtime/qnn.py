"""Qualcomm QNN execution provider (HTP backend) as an onnxruntime plugin.

onnxruntime-qnn ships the EP as a plugin library: it is registered once per process, then
sessions ask for its devices. On x86_64 Linux its HTP backend simulates the Hexagon NPU, which is
how the exporter verifies NPU bundles; on a Snapdragon device the same calls reach the real NPU.

    so = qnn_session_options(cpu_fallback=False)
    session = onnxruntime.InferenceSession(path, sess_options=so)

Imports nothing but onnxruntime and the standard library; onnxruntime_qnn is imported lazily so
that devices without it can still import this module and get a clear error when they ask for it.
"""

from __future__ import annotations

import threading

import onnxruntime as ort

EP_NAME = "QNNExecutionProvider"
_lock = threading.Lock()
_registered = False


class QnnUnavailable(RuntimeError):
    """onnxruntime-qnn is missing or its EP cannot be registered on this host."""


def register_qnn_ep() -> None:
    """Register the QNN EP plugin with onnxruntime (idempotent, thread-safe)."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            import onnxruntime_qnn
        except ImportError:
            raise QnnUnavailable(
                "the QNN execution provider needs the onnxruntime-qnn package: pip install onnxruntime-qnn"
            ) from None
        try:
            ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # onnxruntime raises its own Fail type; a second registration is fine
            if "already registered" not in str(exc):
                raise QnnUnavailable(
                    f"cannot register {EP_NAME} from {onnxruntime_qnn.get_library_path()}: {exc}"
                ) from None
        _registered = True


def qnn_devices() -> list:
    """The OrtEpDevice entries the QNN plugin offers (registers it first)."""
    register_qnn_ep()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise QnnUnavailable(f"{EP_NAME} is registered but offers no device on this host")
    return devices


def htp_backend_path() -> str:
    """Path of libQnnHtp.so (the HTP backend) inside onnxruntime-qnn."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise QnnUnavailable("the QNN HTP backend needs the onnxruntime-qnn package: pip install onnxruntime-qnn") from None
    return onnxruntime_qnn.get_qnn_htp_path()


def plugin_options(options: dict[str, str]) -> dict[str, str]:
    """Profile/manifest QNN options as the plugin wants them: `backend_type` becomes `backend_path`."""
    opts = {k: str(v) for k, v in options.items()}
    backend = opts.pop("backend_type", "htp")
    if backend != "htp":
        raise QnnUnavailable(f"QNN backend_type {backend!r} is not supported here; use 'htp'")
    opts.setdefault("backend_path", htp_backend_path())
    return opts


def qnn_session_options(
    *,
    cpu_fallback: bool = True,
    provider_options: dict[str, str] | None = None,
    sess_options: ort.SessionOptions | None = None,
) -> ort.SessionOptions:
    """SessionOptions that put the graph on QNN HTP; `cpu_fallback=False` makes any unsupported node an error.

    `provider_options` are QNN EP options (htp_performance_mode, ...); `backend_type` is turned
    into the backend library path, which is what the plugin wants.
    """
    so = sess_options or ort.SessionOptions()
    opts = plugin_options(provider_options or {})
    if not cpu_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(qnn_devices()[:1], opts)
    return so
