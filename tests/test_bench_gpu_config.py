"""The GPU benchmark's peer configs are what their rows claim: vLLM's own GPTQ config reader
quantizes every linear of the GPTQ variant (bench/bench_vllm_gpu.py writes a config-only folder
for vLLM's dummy loader; vLLM >= 0.24 otherwise reads the quantized layers from the safetensors'
dtypes, finds none, and serves bf16 under the GPTQ name -- the first H200 run did; vLLM 0.32 reads
an empty list as "all", so the config must name the layers itself)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("vllm")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_vllm_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_vllm_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", ["llama2-7b", "llama3-8b"])
def test_gptq_variant_quantizes_every_linear(shape, tmp_path):
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

    cfg = _bench().gptq_config(shape)["quantization_config"]
    named = {m for group in cfg.get("modules_in_block_to_quantize", []) for m in group}
    assert named == {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    quant = get_quantization_config("auto_gptq").from_config(cfg)
    quant.maybe_update_config(str(tmp_path))  # a folder without safetensors, as the dummy loader's
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert is_layer_gptq_quantized(f"model.layers.7.{name}", quant.modules_in_block_to_quantize, fused), name


def test_profile_breakdowns_group_and_scale_the_kernels():
    bench = _bench()
    pre = bench.prefill_breakdown({"_w4a4_kernel": 3000.0, "_quant_act_kernel": 1000.0, "flash_fwd": 2000.0,
                                   "some_kernel": 500.0, "triton_red_fused_cutlass_scaled_mm_rms_norm": 100.0}, tokens=2000, wall_s=0.01)
    assert pre["groups_us"] == {"rotquant GEMM": 1500.0, "attention (+ KV-cache write)": 1000.0, "rotquant quant": 500.0,
                                "other": 250.0, "norm / rope / act (Inductor; FP8's with its quantizer)": 50.0}
    assert pre["gpu_busy_us_per_1k_tokens"] == 3300.0 and pre["wall_us_per_1k_tokens"] == 5000.0
    dec = bench.decode_breakdown({"_w4a4_kernel": 100.0}, {"_w4a4_kernel": 420.0, "flash_fwd": 64.0}, steps=32,
                                 batch=1, wall_s=0.0032)
    assert dec["groups_us"] == {"rotquant GEMM": 10.0, "attention (+ KV-cache write)": 2.0} and dec["wall_us_per_step"] == 100.0
    text = bench.profile_table([{"shape": "s", "variant": "w4a4", "profile": {"b1": dec, "prefill": pre}}])
    assert "decode batch 1" in text and "prefill of 2000 tokens" in text and "| rotquant GEMM | 1500.0 | 45 % |" in text
