"""Small real bundles for tests: a tiny ONNX graph, golden files, sealed and signed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.bundle import Golden, Manifest, ModelSpec, Target, Task, load_private_key, seal_bundle


def tiny_onnx(path: Path, *, dim: int = 8, seed: int = 0, scale: float = 1.0) -> None:
    """y = tanh(x @ W) * scale: an ONNX model that onnxruntime really runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((dim, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("Mul", ["t", "s"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(scale, np.float32), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)


def make_bundle(
    directory: Path,
    private_key_path: Path,
    *,
    name: str = "tiny",
    version: str = "1.0.0",
    seed: int = 0,
    golden_scale: float = 1.0,
    profile: str = "cpu-x86-avx2",
    arch: list[str] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Write and seal a runnable bundle. `golden_scale != 1` makes golden outputs wrong on purpose."""
    import onnxruntime as ort

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_onnx(directory / "model.onnx", seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((2, 8)).astype(np.float32)
    y = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (directory / "golden").mkdir(exist_ok=True)
    np.savez(directory / "golden" / "inputs.npz", x=x)
    np.savez(directory / "golden" / "outputs.npz", y=y * golden_scale)
    for rel, data in (extra_files or {}).items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    return seal_bundle(
        directory,
        private_key=load_private_key(private_key_path),
        name=name,
        version=version,
        task=Task.EMBEDDING,
        target=Target(profile=profile, arch=arch or ["x86_64", "aarch64"]),
        model=ModelSpec(entry="model.onnx", inputs=["x"], outputs=["y"], config={"kind": "raw"}),
        golden=Golden(inputs="golden/inputs.npz", outputs="golden/outputs.npz", atol=1e-4, rtol=1e-4),
    )
