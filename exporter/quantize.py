"""Weight quantization of an exported float32 ONNX graph, one function per recipe.

    none          float32, unchanged
    fp16          float16 weights and math, float32 inputs/outputs (the KV cache stays float32)
    int8-dynamic  MatMul weights int8 (per-channel by default), activations quantized at run time
    int4          MatMulNBits: 4-bit weight blocks of `block_size`, `accuracy_level` picks the kernel

Every recipe writes `<out>` plus one external-data file `<out>.data` (the agent loads both), and
leaves the MatMuls named by `exclude` patterns (default: the lm_head) in float.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from agent.bundle import Quantization
from exporter.errors import ConversionError, IncompatibleTarget
from exporter.profiles import QuantRecipe

# CLI --quant names -> recipe methods
QUANT_CHOICES = {"int4": "int4", "int8": "int8-dynamic", "fp16": "fp16", "none": "none"}
# where a device class runs a --quant name through another recipe: on the NPU, int8 is the static QDQ
# graph (int8 weights, uint16 activations), since the HTP has no dynamic quantization
QUANT_ON_CLASS = {"npu": {"int8": "qdq-static"}}


def quant_method(quant: str, device_class: str) -> str:
    """The recipe method a --quant name means on a device class."""
    return QUANT_ON_CLASS.get(device_class, {}).get(quant, QUANT_CHOICES[quant])


# What each device class can run. int8-dynamic uses CPU integer kernels; MatMulNBits has CPU and
# CUDA kernels; the HTP NPU runs static QDQ graphs, and language models' static float graph in fp16.
ALLOWED_METHODS = {
    "cpu": {"none", "fp16", "int8-dynamic", "int4", "qdq-static"},
    "gpu": {"none", "fp16", "int4"},
    "npu": {"qdq-static", "fp16"},
}


def check_target(recipe: QuantRecipe, *, device_class: str, profile: str, task: str) -> None:
    allowed = ALLOWED_METHODS.get(device_class, set())
    if recipe.method not in allowed:
        raise IncompatibleTarget(
            f"precision {recipe.method!r} does not run on target {profile!r} ({device_class}); "
            f"it takes: {', '.join(sorted(allowed))}"
        )
    if device_class == "npu" and recipe.method == "fp16" and task != "text-generation":
        raise IncompatibleTarget(
            f"fp16 on target {profile!r} is built for language models (their static float graph, run in fp16 on the "
            f"HTP); {task} takes qdq-static there: drop --quant fp16"
        )
    if task == "text-generation" and recipe.method == "qdq-static" and device_class != "npu":
        # the static-shape LM graph (exporter/npu_lm.py) is built for NPU profiles only
        raise IncompatibleTarget(
            f"static QDQ for text-generation needs an NPU profile (e.g. npu-qnn-htp), not {profile!r}; "
            "use int4, int8 or fp16 for language models on CPU and GPU"
        )


def recipe_name(recipe: QuantRecipe) -> str:
    if recipe.method == "int4":
        head = "-int8head" if recipe.int8_head else ""
        if head and recipe.lm_head_top_k:
            head = f"-int4scan-int8top{recipe.lm_head_top_k}head"
        if recipe.algorithm == "hqq":
            return f"int4-matmulnbits-hqq-b{recipe.block_size}-acc{recipe.accuracy_level}{head}"
        sym = "sym" if recipe.symmetric else "asym"
        return f"int4-matmulnbits-b{recipe.block_size}-acc{recipe.accuracy_level}-{sym}{head}"
    if recipe.method == "int8-dynamic":
        return f"int8-dynamic-{'per-channel' if recipe.per_channel else 'per-tensor'}{'-7bit' if recipe.reduce_range else ''}"
    return {"none": "fp32", "fp16": "fp16"}.get(recipe.method, recipe.method)


def _matmul_names(model: Any) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "MatMul"]


def excluded_nodes(model: Any, patterns: list[str]) -> list[str]:
    """MatMul nodes whose name matches a pattern (glob, or plain substring like 'lm_head')."""
    out = []
    for name in _matmul_names(model):
        for pat in patterns:
            if (fnmatch.fnmatchcase(name, pat) if any(c in pat for c in "*?[") else pat in name):
                out.append(name)
                break
    return out


def save_model(model: Any, path: Path) -> None:
    """Write `model` as path + path.data (every tensor over 1 KiB in the data file)."""
    import onnx

    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def model_size(path: Path) -> int:
    """Bytes of an ONNX file plus its external-data file."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize(src: Path, out: Path, recipe: QuantRecipe) -> Quantization:
    """Write the `recipe` form of float32 graph `src` to `out`; returns what the manifest says about it."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    details: dict[str, Any] = {"method": recipe.method}
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # onnxruntime.quantization logs every skipped node at INFO
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    quiet_level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        if recipe.method == "none":
            save_model(onnx.load(str(src)), out)
            precision = "fp32"
        elif recipe.method == "fp16":
            _fp16(src, out)
            precision = "fp16"
        elif recipe.method == "int8-dynamic":
            details.update(_int8_dynamic(src, out, recipe))
            precision = "int8"
        elif recipe.method == "int4":
            details.update(_int4(src, out, recipe))
            precision = "int4"
        else:
            raise IncompatibleTarget(f"quantization method {recipe.method!r} is not available for this export")
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        if isinstance(exc, IncompatibleTarget):
            raise
        raise ConversionError(f"{recipe.method} quantization failed: {exc}") from exc
    finally:
        root.setLevel(level)
        quiet.setLevel(quiet_level)
    details["op_counts"] = op_counts(out)
    details["size_bytes"] = model_size(out)
    return Quantization(recipe=recipe_name(recipe), precision=precision, details=details)


def _fp16(src: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # float32 I/O keeps the bundle's I/O contract (float32 KV cache) for every precision.
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    save_model(model, out)


def _int8_dynamic(src: Path, out: Path, recipe: QuantRecipe) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    header = onnx.load(str(src), load_external_data=False)
    exclude = excluded_nodes(header, recipe.exclude)
    tmp = out.with_name(out.stem + ".int8-tmp.onnx")
    quantize_dynamic(
        str(src),
        str(tmp),
        op_types_to_quantize=["MatMul"],
        per_channel=recipe.per_channel,
        weight_type=QuantType.QInt8 if recipe.weight_type == "int8" else QuantType.QUInt8,
        reduce_range=recipe.reduce_range,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
        # DefaultTensorType: shape inference cannot type the outputs of com.microsoft ops (GroupQueryAttention)
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    save_model(onnx.load(str(tmp)), out)
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    data = tmp.parent / (tmp.stem + ".onnx.data")
    if data.exists():
        data.unlink()
    return {"per_channel": recipe.per_channel, "weight_type": recipe.weight_type, "reduce_range": recipe.reduce_range,
            "excluded_nodes": exclude}


def _int4(src: Path, out: Path, recipe: QuantRecipe) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    model = onnx.load(str(src))
    exclude = excluded_nodes(model, recipe.exclude)
    algo = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=4) if recipe.algorithm == "hqq" else None
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=recipe.block_size,
        is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level,
        nodes_to_exclude=exclude,
        algo_config=algo,
    )
    quantizer.process()
    del model
    result = quantizer.model.model
    if algo is not None:  # the HQQ path does not set the kernel choice
        for node in result.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", recipe.accuracy_level))
        float_zero_points_to_offsets(result)
    eight = [n for n in excluded_nodes(result, recipe.int8_blocks) if n in exclude]
    if eight:  # asymmetric 8-bit blocks, round-to-nearest: error ~1/255 of each block's range
        quantizer = MatMulNBitsQuantizer(result, bits=8, block_size=recipe.block_size, is_symmetric=False,
                                         accuracy_level=recipe.accuracy_level, nodes_to_include=eight)
        quantizer.process()
        result = quantizer.model.model
        # a MatMul whose weight is computed (optimum's tied lm_head reads a Transpose) stays float
        done = {n.name for n in result.graph.node if n.op_type == "MatMulNBits"}
        eight = [n for n in eight if f"{n}_Q8" in done]
    save_model(result, out)
    return {
        "int8_block_nodes": eight,
        "algorithm": recipe.algorithm,
        "block_size": recipe.block_size,
        "accuracy_level": recipe.accuracy_level,
        "symmetric": recipe.symmetric if recipe.algorithm == "rtn" else False,
        "excluded_nodes": [n for n in exclude if n not in eight],
    }


def float_zero_points_to_offsets(model: Any) -> int:
    """Rewrite MatMulNBits nodes with float zero points (HQQ's) into the exact, fast form; returns how many.

    onnxruntime's CPU MatMulNBits takes a slow path for float zero points (measured 1472 vs 29 us for a
    576x1536 layer at batch 1, level 4: HQQ bundles decoded ~30x slower). With r = round(z) as a uint8 zero
    point, w = s*(q - z) = s*(q - r) + o with o = s*(r - z) per block, so x @ w^T = MatMulNBits(x, q, s, r)
    + blocksum(x) @ o^T, where blocksum sums x over each block: the same numbers, on the fast kernel. The
    integer zero point keeps the codes centred, so level 4's int8 activations lose no more than before.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes, sums, count = [], {}, 0
    for node in model.graph.node:
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type != TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
        nb = -(-k // block)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, nb)
        z = numpy_helper.to_array(zp).reshape(n, nb).astype(np.float32)
        r = np.clip(np.rint(z), 0, (1 << bits) - 1).astype(np.uint8)
        offsets = (scales * (r.astype(np.float32) - z)).astype(np.float32)
        name, x = node.name or node.output[0], node.input[0]
        per_byte = 8 // bits
        padded = np.zeros((n, -(-nb // per_byte) * per_byte), np.uint8)
        padded[:, :nb] = r
        zero = np.zeros((n, padded.shape[1] // per_byte), np.uint8)  # packed: element j in bits j*bits..
        for j in range(per_byte):
            zero |= (padded[:, j::per_byte] << (j * bits)).astype(np.uint8)
        model.graph.initializer.remove(zp)
        model.graph.initializer.extend([numpy_helper.from_array(zero, f"{name}.zero_points_u8"),
                                        numpy_helper.from_array(offsets.T.copy(), f"{name}.offsets")])
        fast = helper.make_node("MatMulNBits", [x, node.input[1], node.input[2], f"{name}.zero_points_u8"],
                                [f"{name}.y"], name=name, domain=node.domain, **attrs)
        if (x, block, nb) not in sums:  # inputs shared by several layers (q/k/v) are summed once
            shape, lead, blocks, summed = (f"{name}.{s}" for s in ("x_shape", "lead", "x_blocks", "blocksum"))
            model.graph.initializer.extend([
                numpy_helper.from_array(np.array([0], np.int64), f"{name}.start"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{name}.end"),
                numpy_helper.from_array(np.array([nb, block], np.int64), f"{name}.blocks"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last")])
            new_nodes += [
                helper.make_node("Shape", [x], [shape], name=f"{name}/Shape"),
                helper.make_node("Slice", [shape, f"{name}.start", f"{name}.end"], [lead], name=f"{name}/Slice"),
                helper.make_node("Concat", [lead, f"{name}.blocks"], [f"{name}.block_shape"], axis=0, name=f"{name}/Concat"),
                helper.make_node("Reshape", [x, f"{name}.block_shape"], [blocks], name=f"{name}/Reshape"),
                helper.make_node("ReduceSum", [blocks, f"{name}.last"], [summed], keepdims=0, name=f"{name}/BlockSum"),
            ]
            sums[x, block, nb] = summed
        new_nodes += [fast,
                      helper.make_node("MatMul", [sums[x, block, nb], f"{name}.offsets"], [f"{name}.o"], name=f"{name}/Offsets"),
                      helper.make_node("Add", [f"{name}.y", f"{name}.o"], list(node.output), name=f"{name}/AddOffsets")]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize
