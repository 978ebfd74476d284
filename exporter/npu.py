"""The NPU path (npu-qnn-htp): static QDQ quantization for the Hexagon HTP and verification on the
real QNN HTP backend (onnxruntime-qnn simulates it on x86_64 Linux).

    quantize_qdq(fp32.onnx) -> QDQ model (uint16 activations, uint8 weights by default)
    verify_on_qnn(model)    -> which nodes HTP rejected and why, or its outputs with CPU fallback off
    write_ep_context(model) -> the compiled HTP context, so a device can skip compilation

HTP runs integer QDQ graphs: every activation needs a fixed scale, so the model is calibrated
on representative text first (calibration.py).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize
from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

from agent.runtime.qnn import QnnUnavailable, qnn_session_options
from exporter.calibration import FeedReader
from exporter.errors import ConversionError
from exporter.profiles import QuantRecipe

_QTYPES = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16, "int8": QuantType.QInt8, "int16": QuantType.QInt16}
# The QNN EP logs, at verbose level, a block per node unit it refuses:
#   Validation FAILED for 1 nodes in OrtNodeUnit (DequantizeLinear) :
#       Operator type: DequantizeLinear Node name: out_DequantizeLinear Node index: 272
#       REASON : QNN EP is configured to not take DQ nodes that generate a graph output.
_NODE_RE = re.compile(r"Operator type: (\S+) Node name: (.*?) Node index:")
_REASON_RE = re.compile(r"REASON\s*:\s*(.*)")
# Graph I/O (de)quantization stays on HTP unless the profile says otherwise: with the ORT default
# ("1") the final DequantizeLinear is handed to the CPU EP, which "CPU fallback off" forbids.
DEFAULT_PROVIDER_OPTIONS = {"offload_graph_io_quantization": "0"}


@dataclass(frozen=True)
class QnnReport:
    """What the QNN HTP backend made of a model."""

    ok: bool  # compiled with every node on HTP and ran every feed
    rejected: list[dict[str, str]] = field(default_factory=list)  # [{name, op_type}] nodes left to the CPU EP
    reasons: list[str] = field(default_factory=list)  # QNN EP log lines / session error explaining the rejection
    error: str | None = None  # session creation or run error with CPU fallback disabled
    outputs: list[np.ndarray] = field(default_factory=list)  # first output per feed, from HTP
    compile_seconds: float = 0.0
    run_seconds: float = 0.0

    def summary(self) -> str:
        if self.ok:
            return f"all nodes on QNN HTP (compile {self.compile_seconds:.1f}s, {len(self.outputs)} runs {self.run_seconds:.1f}s)"
        if self.rejected:
            ops = Counter(n["op_type"] for n in self.rejected)
            return f"QNN HTP rejected {len(self.rejected)} node(s): " + ", ".join(f"{op} x{c}" for op, c in ops.items())
        return f"QNN HTP failed: {self.error}"

    def failures(self) -> list[str]:
        """The quality gate's lines for a graph HTP did not take (none when it did)."""
        if self.ok:
            return []
        lines = [self.summary(), *[f"  {r}" for r in self.reasons[:5]]]
        if self.error and not self.rejected:
            lines.append(f"  {self.error.splitlines()[0][:300]}")
        return lines


def quantize_qdq(src: Path, dst: Path, *, recipe: QuantRecipe, feeds: Sequence[dict[str, np.ndarray]],
                 init_overrides: dict[str, list[dict]] | None = None, float_nodes: Sequence[str] = ()) -> dict:
    """Static QDQ quantization for HTP, calibrated on `feeds`; returns details for the manifest.

    `init_overrides` are onnxruntime's per-tensor quantization overrides (e.g. per-channel weights);
    `float_nodes` are node names kept float besides the recipe's `exclude` patterns (exact names).
    """
    if recipe.activation_type not in _QTYPES or recipe.weight_type not in _QTYPES:
        raise ConversionError(
            f"qdq-static needs activation/weight types in {sorted(_QTYPES)}, got {recipe.activation_type}/{recipe.weight_type}"
        )
    if not feeds:
        raise ConversionError("qdq-static needs calibration text; give --calibration FILE or keep the built-in set")
    with tempfile.TemporaryDirectory(prefix="edgeship-qdq-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Fuses the exported LayerNorm subgraphs and reruns shape inference, which QNN's op builders need.
        model_in = pre if qnn_preprocess_model(str(src), str(pre), fuse_layernorm=True) else src
        fp32 = onnx.load(str(model_in), load_external_data=False)
        keep = set(float_nodes)
        excluded = [n.name for n in fp32.graph.node if n.name in keep or _matches(n, recipe.exclude)]
        config = get_qnn_qdq_config(
            str(model_in),
            FeedReader(feeds),
            activation_type=_QTYPES[recipe.activation_type],
            weight_type=_QTYPES[recipe.weight_type],
            per_channel=recipe.per_channel,
            activation_symmetric=recipe.symmetric,
            nodes_to_exclude=excluded or None,
            init_overrides=init_overrides,
        )
        try:
            quantize(str(model_in), str(dst), config)
        except Exception as exc:  # the quantizer raises bare exceptions of many kinds
            raise ConversionError(f"QDQ quantization of {src.name} failed: {exc}") from exc
    q = onnx.load(str(dst), load_external_data=False)
    ops = Counter(n.op_type for n in q.graph.node)
    return {
        "activation_type": recipe.activation_type,
        "weight_type": recipe.weight_type,
        "per_channel": recipe.per_channel,
        "calibration_samples": len(feeds),
        "calibration_method": "minmax",
        "opset": max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "excluded_nodes": [n for n in excluded if n not in keep],
    }


def _matches(node: onnx.NodeProto, patterns: Sequence[str]) -> bool:
    return any(p in node.name or any(p in i for i in node.input) for p in patterns)


def verify_on_qnn(
    model_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    provider_options: dict[str, str] | None = None,
) -> QnnReport:
    """Compile `model_path` for QNN HTP and run `feeds` with CPU fallback disabled.

    First a session with fallback allowed records which nodes HTP did not take (and the QNN EP's
    log says why); only a fully accepted graph is then run with fallback off.
    """
    provider_options = {**DEFAULT_PROVIDER_OPTIONS, **(provider_options or {})}
    so = ort.SessionOptions()
    so.log_severity_level = 0  # the QNN EP explains rejected nodes at verbose level only
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    try:
        so = qnn_session_options(cpu_fallback=True, provider_options=provider_options, sess_options=so)
    except QnnUnavailable as exc:
        return QnnReport(ok=False, error=str(exc))
    t0 = time.perf_counter()
    with _captured_stderr() as log:
        try:
            probe = ort.InferenceSession(str(model_path), sess_options=so)
            error = None
        except Exception as exc:  # onnxruntime's EPFail / Fail carry the QNN error text
            probe, error = None, f"{type(exc).__name__}: {exc}"
    reasons = _rejections(log.text)
    if probe is None:
        return QnnReport(ok=False, error=error, reasons=reasons, compile_seconds=time.perf_counter() - t0)
    rejected = [
        {"name": n.name, "op_type": n.op_type}
        for sg in probe.get_provider_graph_assignment_info()
        if sg.ep_name != "QNNExecutionProvider"
        for n in sg.get_nodes()
    ]
    del probe
    if rejected:
        return QnnReport(ok=False, rejected=rejected, reasons=reasons or ["the QNN EP gave no reason in its log"],
                         error="nodes left to the CPU EP", compile_seconds=time.perf_counter() - t0)
    strict = ort.SessionOptions()
    strict.log_severity_level = 3
    t0 = time.perf_counter()
    try:
        strict = qnn_session_options(cpu_fallback=False, provider_options=provider_options, sess_options=strict)
        sess = ort.InferenceSession(str(model_path), sess_options=strict)
    except Exception as exc:
        return QnnReport(ok=False, error=f"with CPU fallback disabled: {exc}", reasons=reasons)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        outputs = [sess.run(None, f)[0] for f in feeds]
    except Exception as exc:
        return QnnReport(ok=False, error=f"run on QNN HTP failed: {exc}", reasons=reasons, compile_seconds=compile_s)
    return QnnReport(ok=True, outputs=outputs, compile_seconds=compile_s, run_seconds=time.perf_counter() - t0)


def write_ep_context(model_path: Path, ctx_path: Path, *, provider_options: dict[str, str] | None = None) -> Path:
    """Compile `model_path` for HTP and save the EP context model (binary embedded) at `ctx_path`."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(ctx_path))
    so.add_session_config_entry("ep.context_embed_mode", "1")
    provider_options = {**DEFAULT_PROVIDER_OPTIONS, **(provider_options or {})}
    so = qnn_session_options(cpu_fallback=False, provider_options=provider_options, sess_options=so)
    ort.InferenceSession(str(model_path), sess_options=so)
    if not ctx_path.exists():
        raise ConversionError(f"QNN EP did not write its context model to {ctx_path}")
    return ctx_path


class _Captured:
    text = ""


@contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """Everything written to file descriptor 2 (onnxruntime's C++ logger) inside the block."""
    cap = _Captured()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield cap
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            cap.text = sink.read().decode("utf-8", "replace")


def _rejections(log: str, limit: int = 20) -> list[str]:
    """'OpType node-name: reason' for each node the QNN EP refused, from its verbose log."""
    out: list[str] = []
    pending: list[str] = []
    in_block = False
    for raw in log.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw).strip()
        if "Validation FAILED" in line:
            in_block, pending = True, []
        elif in_block and (m := _NODE_RE.search(line)):
            pending.append(f"{m[1]} {m[2]}")
        elif in_block and (m := _REASON_RE.search(line)):
            for node in pending:
                text = f"{node}: {m[1].strip()}"
                if text not in out:
                    out.append(text)
            in_block = False
        elif in_block and not line:
            in_block = False
    if not out:  # a compile failure rather than a refused node: keep the error-level log lines
        out = [re.sub(r"\x1b\[[0-9;]*m", "", re.sub(r"^.*?\] ", "", ln)).strip()
               for ln in log.splitlines() if "[E:" in ln][:5]
    return out[:limit]
