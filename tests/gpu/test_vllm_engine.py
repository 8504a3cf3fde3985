"""vLLM itself on the GPU (device machine, vLLM staged there): tiny rotquant checkpoints served by
`vllm.LLM` in vLLM's default mode (torch.compile + CUDA graphs) give the prompt logprobs of the
offline simulation on the same GPU; a bad checkpoint fails at start-up with the plugin's message.

Each case starts its own engine with a small share of the GPU, so the cases run in parallel
(`pytest -m gpu tests/gpu/test_vllm_engine.py -n 6`).

Tolerance: the engine computes in bf16 with vLLM's fused kernels (FlashAttention, fused RMSNorm,
Inductor), the simulation with transformers' SDPA and eager torch, so a few quantized activations
round the other way and move single logprobs. A wrong scale, rotation, zero point or shard moves
every token: each case also scores the simulation of a slightly different checkpoint (activation
clip 0.05 lower) and requires the served logprobs to sit far closer to the right one.
"""
from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("vllm_engine_env")]

from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint  # noqa: E402
from vllm_rotquant.format import RotQuantSpec  # noqa: E402


TOKENS = 160
CASES = {
    "a4-sym": dict(),
    "a4-asym": dict(act_symmetric=False),
    "a4-group32": dict(group_size=32),
    "a8-sym": dict(act_bits=8),
    "a8-asym-group32": dict(act_bits=8, act_symmetric=False, group_size=32),
    "a16-group32": dict(act_bits=16, group_size=32),
}


def _spec(**kw) -> RotQuantSpec:
    return RotQuantSpec(down_proj_block=128, qk_block=32, tp_sizes=(1, 2), act_clip_ratio=0.9, **kw)


@torch.no_grad()
def simulated_logprobs(ckpt, ids: list[int]) -> list[float]:
    """`rotquant eval`'s model of the checkpoint on the GPU (the Triton kernels through the ops)."""
    from vllm_rotquant.offline.simulate import load_simulated

    model = load_simulated(ckpt, torch.bfloat16).to("cuda")
    x = torch.tensor([ids], device="cuda")
    lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float()[0, :-1], dim=-1)
    out = lp.gather(1, x[0, 1:, None])[:, 0].tolist()
    del model
    torch.cuda.empty_cache()
    return out


def served_logprobs(ckpt, ids: list[int], **llm_kw):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(ckpt), dtype="bfloat16", gpu_memory_utilization=0.08, max_model_len=512, seed=0,
              enable_prefix_caching=False, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]}, **llm_kw)
    try:
        cfg = llm.llm_engine.vllm_config
        assert not cfg.model_config.enforce_eager, "CUDA graphs are off"
        assert cfg.quant_config is not None and cfg.quant_config.get_name() == "rotquant"
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        # prompt_logprobs[i]: {token id: Logprob} holding prompt token i itself (None for i = 0)
        got = [d[ids[i]].logprob for i, d in enumerate(out.prompt_logprobs) if i > 0]
        # a decode step through the CUDA graphs must produce a token too
        gen = llm.generate([TokensPrompt(prompt_token_ids=ids[:20])],
                           SamplingParams(max_tokens=8, min_tokens=8, ignore_eos=True, temperature=0.0),
                           use_tqdm=False)[0]
        assert len(gen.outputs[0].token_ids) == 8
        return got
    finally:
        llm.llm_engine.engine_core.shutdown()  # the engine-core process gives its GPU memory back now
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _stats(a: list[float], b: list[float]) -> tuple[float, float]:
    d = sorted(abs(x - y) for x, y in zip(a, b))
    return d[len(d) // 2], sum(d) / len(d)


@pytest.mark.parametrize("case", list(CASES))
def test_served_logprobs_follow_the_simulation(case, tmp_path):
    import vllm_rotquant

    vllm_rotquant.register()
    spec = _spec(**CASES[case])
    ckpt = build_tiny_checkpoint(tmp_path / case, spec=spec, seed=1)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 384, (TOKENS,), generator=g).tolist()
    served = served_logprobs(ckpt, ids)
    right = simulated_logprobs(ckpt, ids)
    wrong_dir = tmp_path / f"{case}-wrong"
    shutil.copytree(ckpt, wrong_dir)
    cfg = json.loads((wrong_dir / "config.json").read_text())
    if spec.act_bits < 16:
        cfg["quantization_config"]["act_clip_ratio"] = 0.85
    else:  # no activation quantizer: read the weights with the scales of another row instead
        cfg["quantization_config"]["online_hadamard"]["down_proj"]["block"] = 64
    (wrong_dir / "config.json").write_text(json.dumps(cfg))
    wrong = simulated_logprobs(wrong_dir, ids)
    med, mean = _stats(served, right)
    med_w, _ = _stats(served, wrong)
    ppl = lambda lp: float(torch.tensor(lp).neg().mean().exp())  # noqa: E731
    print(f"{case}: served vs simulation median {med:.2e} mean {mean:.2e}; vs the wrong checkpoint median "
          f"{med_w:.2e}; ppl {ppl(served):.3f} vs {ppl(right):.3f}")
    assert len(served) == len(right) == TOKENS - 1
    assert med < 0.02 and mean < 0.05, (med, mean)
    assert med_w > 4 * max(med, 1e-4), (med, med_w)
    assert abs(ppl(served) / ppl(right) - 1) < 0.01


def test_bad_checkpoint_fails_at_startup_with_the_plugin_message(tmp_path):
    import vllm_rotquant

    vllm_rotquant.register()
    missing = "model.layers.1.mlp.up_proj.weight_scale"
    ckpt = build_tiny_checkpoint(tmp_path / "bad", mutate=lambda t, c: t.pop(missing))
    with pytest.raises(Exception, match=f"missing tensor '{missing}'"):
        served_logprobs(ckpt, list(range(3, 40)))
