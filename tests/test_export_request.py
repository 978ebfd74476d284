"""ExportRequest: every option checked once, one line per bad field naming it and what to write instead."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.errors import ExportError
from exporter.profiles import TargetProfile
from exporter.request import ExportRequest, InvalidRequest

GOOD = {"model": "org/name", "out": "bundles/x", "key": "keys/edgeship.key"}


@pytest.mark.parametrize(
    "field, value, line",
    [
        ("profile", "cpu-riscv", "--profile: unknown target profile 'cpu-riscv'; built-in: cpu-arm64"),
        ("task", "summarization", "--task 'summarization': choose one of: text-generation, embedding"),
        ("quant", "int3", "--quant 'int3': choose one of: int4, int8, fp16, none"),
        ("block_size", 48, "--block-size 48 must be a power of two >= 16 (e.g. 32, 64, 128)"),
        ("block_size", 8, "--block-size 8 must be a power of two >= 16"),
        ("accuracy_level", 5, "--accuracy-level 5 must be 0-4 (0 exact, 4 int8 activations), or 4x2"),
        ("accuracy_level", "fast", "--accuracy-level fast must be 0-4"),
        ("exclude", "lm_head", "--exclude 'lm_head': give node-name patterns, one per --exclude"),
        ("algorithm", "gptq", "--int4-algorithm 'gptq': choose rtn (round to nearest) or hqq"),
        ("thresholds", {"min_vibes": 0.5}, "--threshold: unknown threshold 'min_vibes'; known: min_top1_agreement"),
        ("thresholds", {"min_top1_agreement": "high"}, "--threshold {'min_top1_agreement': 'high'}: write NAME=NUMBER"),
        ("graph", "fast", "--graph 'fast': choose auto, native or optimum"),
        ("name", "My Model", "--name 'My Model': use 1-64 lower-case letters, digits"),
        ("version", "1.0", "--version '1.0': write a semantic version, e.g. 1.0.0"),
        ("out", "", "--out '': give the bundle directory to write"),
        ("model", "  ", "MODEL '  ': give a hub id (org/name), a local directory or a .gguf file"),
    ],
)
def test_a_bad_field_is_one_line_naming_it_and_the_fix(field, value, line):
    with pytest.raises(InvalidRequest) as info:
        ExportRequest(**{**GOOD, field: value})
    assert isinstance(info.value, ExportError) and isinstance(info.value, ValueError)
    assert info.value.problems == (str(info.value),)  # exactly one line
    assert str(info.value).startswith(line), str(info.value)


def test_every_bad_field_is_reported_at_once_in_field_order():
    with pytest.raises(InvalidRequest) as info:
        ExportRequest(**GOOD, quant="int3", block_size=48, graph="fast", version="x")
    assert [p.split()[0] for p in info.value.problems] == ["--quant", "--block-size", "--graph", "--version"]
    assert str(info.value).splitlines() == list(info.value.problems)


def test_a_good_request_is_normalized_and_frozen(tmp_path):
    req = ExportRequest(model="org/name", out=tmp_path / "sub" / ".." / "b", key="~/k.key", accuracy_level="3",
                        exclude=["lm_head", "down_proj"], thresholds={"min_top1_agreement": 0.9},
                        profile="npu-qnn-htp")
    assert req.out == (tmp_path / "b").resolve() and req.key == Path("~/k.key").expanduser()
    assert req.accuracy_level == 3 and req.exclude == ("lm_head", "down_proj")
    assert isinstance(req.profile, TargetProfile) and req.profile.name == "npu-qnn-htp"
    assert dict(req.thresholds) == {"min_top1_agreement": 0.9}
    with pytest.raises(TypeError):
        req.thresholds["min_top1_agreement"] = 0.1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.quant = "int4"  # type: ignore[misc]
    assert ExportRequest(**GOOD, accuracy_level="4x2").accuracy_level == "4x2"  # GGUF's two-pass level stays


def test_the_recipe_is_the_profiles_with_the_requests_overrides_on_top():
    req = ExportRequest(**GOOD, quant="int4", block_size=64, symmetric=True, accuracy_level="4x2")
    base = req.profile.task("text-generation").quantization.model_copy(update={"method": "int8-dynamic"})
    recipe = req.recipe(base)
    assert (recipe.method, recipe.block_size, recipe.symmetric) == ("int4", 64, True)
    assert recipe.accuracy_level == base.accuracy_level  # 4x2 is the GGUF import's policy, not a recipe level
    assert ExportRequest(**GOOD).recipe(base, gguf_requantize=True).algorithm == "hqq"


def test_a_quant_the_profile_names_brings_its_own_gate_and_the_request_still_overrides_it(tmp_path):
    """npu-qnn-htp exports LMs in fp16 by default, gated by what fp16 reaches; --quant int8 there is the w8a16
    QDQ recipe, gated by that recipe's looser bar, not fp16's (nor refused as CPU dynamic int8)."""
    from exporter.profiles import ProfileError, load_profile

    lm = load_profile("npu-qnn-htp").task("text-generation")
    assert lm.quantization.method == "fp16"
    qdq, fp16 = lm.thresholds_for("qdq-static").as_dict(), lm.thresholds_for("fp16").as_dict()
    assert fp16 == lm.thresholds.as_dict() and fp16 != qdq
    assert fp16["min_top1_agreement"] > qdq["min_top1_agreement"] and fp16["max_ppl_delta"] < qdq["max_ppl_delta"]
    assert fp16["min_greedy_match"] >= 0.7 and "min_greedy_match" not in qdq
    assert lm.thresholds_for("int4") == lm.thresholds  # a method the profile says nothing about: the task's gate
    req = ExportRequest(**GOOD, profile="npu-qnn-htp", quant="int8", thresholds={"max_ppl_delta": 0.02})
    recipe = req.recipe(lm.quantization, device_class="npu")
    assert recipe.method == "qdq-static" and recipe.weight_type == "int8" and recipe.activation_type == "uint16"
    assert recipe.float_regions == ["residual", "norm"] and recipe.exclude == []
    assert req.thresholds_over(lm.thresholds_for(recipe.method)).as_dict() == {**qdq, "max_ppl_delta": 0.02}
    assert req.recipe(lm.quantization).method == "int8-dynamic"  # on a CPU profile int8 stays dynamic int8
    bad = tmp_path / "bad.toml"
    bad.write_text('[tasks.text-generation.quant_thresholds.int3]\nmin_top1_agreement = 0.9\n')
    with pytest.raises(ProfileError, match=r"^profile .*bad.toml: tasks.text-generation.quant_thresholds.int3"):
        load_profile(bad)
    bad.write_text('[tasks.text-generation.quant_thresholds.fp16]\nmin_vibes = 0.9\n')
    with pytest.raises(ProfileError, match="quant_thresholds.fp16.min_vibes: Extra inputs are not permitted"):
        load_profile(bad)


def test_cli_prints_one_error_line_per_bad_option_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    p = subprocess.run([sys.executable, "-m", "edgeship.cli", "export", "org/name", "--out", str(tmp_path / "b"),
                        "--block-size", "48", "--threshold", "min_vibes=1", "--version", "one"],
                       capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, p.stderr
    assert "--block-size 48" in errors[0] and "'min_vibes'" in errors[1] and "--version 'one'" in errors[2]
    assert "Traceback" not in p.stderr and not (tmp_path / "b").exists()
