"""exporter/quantize.py details that the model-level tests do not isolate."""

from __future__ import annotations

import copy

import numpy as np
import pytest


@pytest.mark.parametrize("shape", [(1, 3), (5,)])
def test_hqq_float_zero_points_become_offsets_with_the_same_result(shape):
    """HQQ's float zero points (a slow MatMulNBits path on CPU) are rewritten as zero point 0 plus
    blocksum(x) @ offsets: same output, no float zero points left, inputs of any rank."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from exporter.quantize import float_zero_points_to_offsets

    k, n = 96, 40  # 3 blocks of 32: an odd block count exercises the packed zero points' padding
    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(size=(k, n)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="a"), helper.make_node("MatMul", ["x", "w2"], ["y2"], name="b")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*shape, k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [*shape, n]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    quantizer.process()
    hqq = quantizer.model.model
    x = rng.normal(size=(*shape, k)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    fast = copy.deepcopy(hqq)
    assert float_zero_points_to_offsets(fast) == 2
    onnx.checker.check_model(fast)
    for before, after in zip(run(hqq), run(fast)):
        np.testing.assert_allclose(after, before, atol=1e-4, rtol=1e-4)
    inits = {i.name: i for i in fast.graph.initializer}
    nbits = [nd for nd in fast.graph.node if nd.op_type == "MatMulNBits"]
    assert all(inits[nd.input[3]].data_type == TensorProto.UINT8 for nd in nbits)
    assert sum(nd.op_type == "ReduceSum" for nd in fast.graph.node) == 1  # x's blocks summed once for both
    assert float_zero_points_to_offsets(fast) == 0  # idempotent


def test_int8_dynamic_weights_take_7_bits_where_uint8_x_int8_pairs_saturate(tmp_path):
    """x86 CPUs without VNNI add pairs of uint8 x int8 products in a saturating int16 (VPMADDUBSW): with a large
    activation range and full-range int8 weights the sums overflow (SmolLM2 requantized to int8: ppl x97 on an
    AMD EPYC). Profiles whose CPUs may lack VNNI quantize int8-dynamic weights to 7 bits, whatever --quant
    picks; VNNI and Arm profiles keep 8. The 7-bit model stays within quantization error on any CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporter.profiles import load_profile
    from exporter.quantize import quantize

    avx2, vnni, arm = (load_profile(p) for p in ("cpu-x86-avx2", "cpu-x86-avx512-vnni", "cpu-arm64"))
    assert avx2.int8_saturates and not vnni.int8_saturates and not arm.int8_saturates
    for task in ("text-generation", "embedding", "text-classification"):  # int4 by default, int8 after --quant int8
        assert avx2.task(task).quantization.reduce_range and not vnni.task(task).quantization.reduce_range

    k, n = 1536, 576  # a SmolLM2 down_proj, fed one massive negative activation as its real inputs carry
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="down_proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    recipe = avx2.task("embedding").quantization.model_copy(update={"mixed_precision": False})
    result = quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", recipe)
    assert result.recipe == "int8-dynamic-per-channel-7bit" and result.details["reduce_range"] is True
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, 7] = -380.0
    y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y - x @ w).max() < 0.1 * np.abs(x @ w).max()  # full 8 bits on a non-VNNI CPU: ~2.5
