"""GGUF blocks -> MatMulNBits, checked against gguf.quants.dequantize on random blocks.

Any bytes with finite fp16 scales are a valid GGUF block, so random bytes cover every code, every
sub-block scale and every bit of the packing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from exporter.graph.decoder import linear_model
from exporter.gguf.levels import EXACT_POLICY, TWO_PASS, TWO_PASS_MIN_WEIGHTS, WEIGHT_CLASSES, AccuracyPolicy, weight_class
from exporter.gguf.repack import FORMATS, BlockWeight, decode

# byte ranges of the fp16 fields (d, and min/dmin where the type has one) inside one block
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
REQUIRED = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_rows(ggml_type: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, row_bytes]: random blocks whose fp16 fields are finite, modest numbers."""
    fmt = FORMATS[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n * k // fmt.elements, fmt.type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[ggml_type]:
        values = rng.uniform(-0.05, 0.05, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("ggml_type", list(FORMATS))
def test_decode_is_bit_exact(ggml_type):
    raw = random_rows(ggml_type, 8, 512)
    ref = dequantize(raw, GGMLQuantizationType[ggml_type])
    w = decode(ggml_type, raw, 512)
    assert w.codes.max() < (1 << w.bits)
    np.testing.assert_array_equal(w.dequantize(), ref)


@pytest.mark.parametrize("ggml_type", list(FORMATS))
def test_matmulnbits_equals_dequantized_matmul(ggml_type):
    n, k = 48, 512
    raw = random_rows(ggml_type, n, k, seed=1)
    ref_w = dequantize(raw, GGMLQuantizationType[ggml_type]).astype(np.float64)
    x = np.random.default_rng(2).standard_normal((5, k)).astype(np.float32)
    ref = x.astype(np.float64) @ ref_w.T

    model = linear_model(decode(ggml_type, raw, k), accuracy_level=0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]

    scale = np.abs(x).astype(np.float64) @ np.abs(ref_w).T  # the size of the sum, for a float tolerance
    assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-6), f"max abs diff {np.abs(y - ref).max()}"


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q6_K", "Q5_K", "Q4_1"])
def test_accuracy_level_4_is_close(ggml_type):
    """Level 4 quantizes activations to int8: fast, close, not exact (hence level 0 by default)."""
    n, k = 32, 512
    raw = random_rows(ggml_type, n, k, seed=5)
    ref_w = dequantize(raw, GGMLQuantizationType[ggml_type])
    x = np.random.default_rng(6).standard_normal((4, k)).astype(np.float32)
    model = linear_model(decode(ggml_type, raw, k), accuracy_level=4)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    scale = np.abs(x) @ np.abs(ref_w).T
    assert np.all(np.abs(y - x @ ref_w.T) <= 2e-2 * scale)


@pytest.mark.parametrize("ggml_type", REQUIRED)
def test_two_pass_int8_decodes_within_float_noise_and_prefills_at_level_0(ggml_type):
    """TWO_PASS: one row (decode) on level 4's int8 kernel as hi + lo, ~100x closer than level 4 alone, all-zero
    blocks exact; more rows (prefill) and 8-bit containers take level 0's float kernel, bit for bit."""
    every = dataclasses.replace(AccuracyPolicy.uniform(TWO_PASS), two_pass_min_weights=0)  # this small weight too
    n, k = 32, 512
    raw = random_rows(ggml_type, n, k, seed=7)
    ref_w = dequantize(raw, GGMLQuantizationType[ggml_type]).astype(np.float64)
    w = decode(ggml_type, raw, k)
    rng = np.random.default_rng(8)
    sessions = {level: ort.InferenceSession(linear_model(w, accuracy_level=every if level == TWO_PASS else level,
                                                         rank=3).SerializeToString(),
                                            providers=["CPUExecutionProvider"]) for level in (0, 4, TWO_PASS)}
    prompt = rng.standard_normal((1, 5, k)).astype(np.float32)
    np.testing.assert_array_equal(sessions[TWO_PASS].run(None, {"x": prompt})[0], sessions[0].run(None, {"x": prompt})[0])

    err = {level: [] for level in sessions}
    for trial in range(8):
        x = (rng.standard_normal((1, 1, k)) * np.logspace(-3, 2, k)).astype(np.float32)
        x[0, 0, 32 * trial:32 * trial + 32] = 0.0  # one all-zero block
        ref, scale = x.astype(np.float64) @ ref_w.T, np.abs(x).astype(np.float64) @ np.abs(ref_w).T
        for level, sess in sessions.items():
            err[level].append((np.abs(sess.run(None, {"x": x})[0] - ref) / scale).max())
    worst = {level: max(e) for level, e in err.items()}
    if w.bits == 8:  # Q8_0, Q5_K, Q6_K
        assert worst[TWO_PASS] == worst[0], worst
    else:
        assert worst[TWO_PASS] <= 5e-5 and worst[TWO_PASS] * 50 < worst[4], worst
    assert np.isfinite(worst[TWO_PASS])


def test_two_pass_only_for_big_4bit_linears():
    """Below the policy's two_pass_min_weights (TWO_PASS_MIN_WEIGHTS by default) and for 8-bit blocks the
    two-pass level is a plain level-0 node; the size is the policy's to set, and is checked."""
    small = decode("Q4_0", random_rows("Q4_0", 64, 256), 256)
    ops = {n.op_type: [a.i for a in n.attribute if a.name == "accuracy_level"] for n in linear_model(small, accuracy_level=TWO_PASS).graph.node}
    assert "If" not in ops and ops["MatMulNBits"] == [0]
    big = BlockWeight("Q4_0", 4, 32, np.zeros((2048, 2048), np.uint8), np.ones((2048, 64), np.float32), 8, None)
    assert "If" in {n.op_type for n in linear_model(big, accuracy_level=TWO_PASS).graph.node}
    assert big.shape[0] * big.shape[1] == TWO_PASS_MIN_WEIGHTS
    every = dataclasses.replace(AccuracyPolicy.uniform(TWO_PASS), two_pass_min_weights=0)
    assert "If" in {n.op_type for n in linear_model(small, accuracy_level=every).graph.node}
    q8 = decode("Q8_0", random_rows("Q8_0", 64, 256), 256)
    assert "If" not in {n.op_type for n in linear_model(q8, accuracy_level=every).graph.node}
    with pytest.raises(ValueError, match="two_pass_min_weights -1 must be 0"):
        dataclasses.replace(every, two_pass_min_weights=-1)


def test_split_nibbles_is_exact():
    w = decode("Q6_K", random_rows("Q6_K", 4, 256), 256)
    hi, lo = w.split_nibbles()
    assert hi.bits == lo.bits == 4 and hi.zero_points() is None and lo.zero_points() is None
    np.testing.assert_allclose(hi.dequantize() + lo.dequantize(), w.dequantize(), rtol=0, atol=1e-5 * np.abs(w.dequantize()).max())


@pytest.mark.parametrize("ggml_type", REQUIRED)
def test_graph_uses_integer_zero_points_only(ggml_type):
    """Float zero points are exact but 26-40x slower on CPU: offsets go through the blocksum path."""
    w = decode(ggml_type, random_rows(ggml_type, 16, 256), 256)
    model = linear_model(w, accuracy_level=4)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 1
    assert ("ReduceSum" in ops) == (w.offsets is not None)
    # level 0: 8-bit blocks become two 4-bit halves (MatMulNBits' fast float kernel is 4-bit only)
    ops = [node.op_type for node in linear_model(w, accuracy_level=0).graph.node]
    assert ops.count("MatMulNBits") == (2 if w.bits == 8 else 1)
    for init in model.graph.initializer:
        if "zero_points" in init.name:
            assert init.data_type == 2  # uint8


def test_q4_0_packs_neighbours_together():
    """ggml byte j = (element j, element j+16); MatMulNBits byte j = (element 2j, element 2j+1)."""
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    block[0, 2] = 0x21  # element 0 = 1, element 16 = 2
    w = decode("Q4_0", block, 32)
    assert w.codes[0, 0] == 1 and w.codes[0, 16] == 2
    packed = w.packed()
    assert packed.shape == (1, 1, 16)
    assert packed[0, 0, 0] == 0x01  # elements 0 and 1 (= 1, 0)
    assert packed[0, 0, 8] == 0x02  # elements 16 and 17 (= 2, 0)


def test_take_rows_keeps_blocks():
    w = decode("Q4_K", random_rows("Q4_K", 12, 256), 256)
    rows = np.array([3, 0, 7])
    np.testing.assert_array_equal(w.take_rows(rows).dequantize(), w.dequantize()[rows])


def test_unsupported_type_and_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="IQ2_XXS.*supported: Q4_0"):
        decode("IQ2_XXS", np.zeros((1, 66), dtype=np.uint8), 256)
    with pytest.raises(ValueError, match="not whole blocks"):
        decode("Q4_K", np.zeros((1, 144), dtype=np.uint8), 128)
    with pytest.raises(ValueError, match="bits=5"):
        BlockWeight("Q5_0", 5, 32, np.zeros((1, 32), np.uint8), np.zeros((1, 1), np.float32), 16, None)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_block_zero_points(bits):
    """Per-block uint8 zero points (the requantized int4-asym baseline uses them), odd block count."""
    rng = np.random.default_rng(4)
    n, k = 8, 96
    w = BlockWeight("int4-asym", bits, 32, rng.integers(0, 1 << bits, (n, k), dtype=np.uint8),
                    rng.uniform(-0.1, 0.1, (n, 3)).astype(np.float32), rng.integers(0, 1 << bits, (n, 3), dtype=np.uint8),
                    None)
    x = rng.standard_normal((3, k)).astype(np.float32)
    sess = ort.InferenceSession(linear_model(w).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.dequantize().T, rtol=1e-5, atol=1e-5)


def test_accuracy_policy_classes_and_override():
    assert weight_class("model.layers.3.self_attn.qkv_proj") == "attn_qkv"
    assert weight_class("model.layers.3.self_attn.o_proj") == "attn_out"
    assert weight_class("model.layers.3.mlp.gate_up_proj") == weight_class("model.layers.0.mlp.up_proj") == "mlp_in"
    assert weight_class("model.layers.3.mlp.down_proj") == "mlp_out"
    assert weight_class("lm_head.hi") == weight_class("lm_head") == "lm_head"
    # the default: the decoder's linears exact, the lm_head fast with its top logits recomputed
    assert {EXACT_POLICY.level(f"model.layers.0.{m}") for m in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                  "mlp.gate_up_proj", "mlp.down_proj")} == {0}
    assert EXACT_POLICY.level("lm_head") == 4 and EXACT_POLICY.refines("lm_head")
    assert not EXACT_POLICY.refines("model.layers.0.mlp.down_proj")
    assert set(EXACT_POLICY.details()["reasons"]) == set(WEIGHT_CLASSES)
    assert EXACT_POLICY.uniform_level is None
    # an int accuracy_level: every weight at that level, nothing recomputed
    four = AccuracyPolicy.uniform(4)
    assert four.uniform_level == 4 and four.level("model.layers.1.mlp.down_proj") == 4 and not four.refines("lm_head")
    with pytest.raises(ValueError, match="is not a MatMulNBits level"):
        AccuracyPolicy.uniform(5)
    with pytest.raises(ValueError, match="must name exactly"):
        AccuracyPolicy({"lm_head": 4})


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1", "Q6_K"])
def test_lm_head_top_logits_are_recomputed_exactly(ggml_type):
    """The default policy's lm_head: all logits at level 4, then each row's top 16 recomputed in float from the
    same blocks (GatherBlockQuantized on the MatMulNBits' own initializer for Q8_0, Q4_0 and Q6_K, whose zero
    point 32 goes in as zero_points; codes + scales + mins for Q4_1): exact where it matters, one copy of the head."""
    n, k = 512, 256
    raw = random_rows(ggml_type, n, k, seed=8)
    ref_w = dequantize(raw, GGMLQuantizationType[ggml_type]).astype(np.float64)
    x = np.random.default_rng(9).standard_normal((6, k)).astype(np.float32)
    ref = x.astype(np.float64) @ ref_w.T
    model = linear_model(decode(ggml_type, raw, k), accuracy_level=EXACT_POLICY, stem="lm_head")
    ops = [node.op_type for node in model.graph.node]
    assert {"TopK", "ScatterElements"} <= set(ops)
    assert [a.i for node in model.graph.node if node.op_type == "MatMulNBits"
            for a in node.attribute if a.name == "accuracy_level"] == [4]
    matmul = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    gathers = [node for node in model.graph.node if node.op_type == "GatherBlockQuantized"]
    if ggml_type != "Q4_1":  # the rows are read from the head's own blocks: no second copy of them
        assert len(gathers) == 1 and gathers[0].input[0] == matmul.input[1]
        assert not any(t.name.startswith("embed.codes") for t in model.graph.initializer)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    scale = np.abs(x).astype(np.float64) @ np.abs(ref_w).T
    top = np.argsort(ref, axis=-1)[:, -8:]  # well inside the 16 recomputed: the true 16th may rank 17th approximately
    top_err = np.take_along_axis(np.abs(y - ref) - 1e-5 * scale, top, axis=-1)
    assert np.all(top_err <= 1e-6), "the largest logits must be the float ones"
    np.testing.assert_array_equal(y.argmax(-1), ref.argmax(-1))
    assert np.all(np.abs(y - ref) <= 2e-2 * scale)  # the rest: level-4 error
    assert np.abs(y - ref).max() > 1e-4  # ... which is there (the fast path ran)
