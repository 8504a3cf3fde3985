"""Tensor parallelism on several GPUs (vLLM staged on a device with 2, 4 or 8 GPUs): one rotquant
checkpoint served at TP 2/4/8 gives TP 1's prompt logprobs within the all-reduce's reordering.

What differs between TP sizes by design: the row-parallel layers (o_proj, down_proj) sum their
bf16 partial outputs across ranks (vLLM's all-reduce) instead of in one GEMM, so the residual
stream differs by about one bf16 rounding per layer, and a quantized activation near a rounding
boundary then rounds the other way. What must not differ: the per-token activation scale (ranks
all-gather the per-token max/min, so every rank quantizes with TP 1's scale), the rank-local R4
block Hadamard, the sharded packed weights/scales/weight sums. A per-rank scale or a mis-sharded
weight changes every token, which the negative control (the same checkpoint read with another
clip) shows is far above the bound used here: median |dlogprob| < 0.02, perplexity within 1 %.

    pytest -m gpu tests/gpu/test_vllm_tp.py -q -s        # cases above the GPU count are skipped
"""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("vllm_engine_env")]

from vllm_rotquant.format import RotQuantSpec  # noqa: E402
from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint, write_random_rotquant  # noqa: E402


TOKENS = 256
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# (name, how to build, TP sizes to compare with TP 1)
TINY_SPEC = dict(down_proj_block=64, qk_block=32, tp_sizes=(1, 2, 4))
CASES = [
    ("tiny-sym", dict(kind="tiny", spec=dict()), (2, 4)),
    ("tiny-asym", dict(kind="tiny", spec=dict(act_symmetric=False)), (2, 4)),
    ("tiny-group32", dict(kind="tiny", spec=dict(group_size=32)), (2,)),
    ("llama2-7b-sym", dict(kind="llama2-7b", spec=dict()), (2, 4, 8)),
    ("llama3-8b-sym", dict(kind="llama3-8b", spec=dict()), (2, 4, 8)),
    ("llama3-8b-asym", dict(kind="llama3-8b", spec=dict(act_symmetric=False)), (2,)),
    ("llama3-8b-group128", dict(kind="llama3-8b", spec=dict(group_size=128)), (2,)),
]


def build(name: str, how: dict, root: Path) -> Path:
    if how["kind"] == "tiny":
        # intermediate 512 and 8 heads (4 KV heads): R4 block 64 and every head split stay whole at TP 4
        spec = RotQuantSpec(**{**TINY_SPEC, **how["spec"]})
        return build_tiny_checkpoint(root / name, spec=spec, seed=3, hidden_size=256, intermediate_size=512,
                                     num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    return write_random_rotquant(root / name, how["kind"], **how["spec"])


def logprobs(ckpt: Path, ids: list[int], tp: int) -> list[float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(ckpt), tensor_parallel_size=tp, dtype="bfloat16", gpu_memory_utilization=0.5,
              max_model_len=1024, seed=0, enable_prefix_caching=False, skip_tokenizer_init=True,
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4]})
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        return [d[ids[i]].logprob for i, d in enumerate(out.prompt_logprobs) if i > 0]
    finally:
        llm.llm_engine.engine_core.shutdown()  # the engine-core process gives its GPU memory back now
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _median(a, b) -> float:
    d = sorted(abs(x - y) for x, y in zip(a, b))
    return d[len(d) // 2]


@pytest.mark.parametrize("name, how, tps", CASES, ids=[c[0] for c in CASES])
def test_tp_serves_tp1_logprobs(name, how, tps, tmp_path_factory):
    if GPUS < 2:
        pytest.skip(f"needs 2+ GPUs, found {GPUS}")
    import vllm_rotquant

    vllm_rotquant.register()
    root = tmp_path_factory.mktemp("tp")
    ckpt = build(name, how, root)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (TOKENS,), generator=torch.Generator().manual_seed(11)).tolist()
    base = logprobs(ckpt, ids, 1)
    wrong = root / f"{name}-clip"
    wrong.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (wrong / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["act_clip_ratio"] = round(cfg["quantization_config"]["act_clip_ratio"] - 0.05, 2)
    (wrong / "config.json").write_text(json.dumps(cfg))
    control = _median(base, logprobs(wrong, ids, 1))
    ppl = lambda lp: float(torch.tensor(lp).neg().mean().exp())  # noqa: E731
    for tp in tps:
        if tp > GPUS:
            continue
        got = logprobs(ckpt, ids, tp)
        med = _median(got, base)
        d = sorted(abs(x - y) for x, y in zip(got, base))
        print(f"{name} TP {tp} vs TP 1: |dlogprob| median {med:.2e} mean {sum(d) / len(d):.2e} max {d[-1]:.2e}; "
              f"another clip at TP 1: median {control:.2e}; ppl {ppl(got):.4f} vs {ppl(base):.4f}")
        assert med < 0.02 and med < control / 4, (tp, med, control)
        assert abs(ppl(got) / ppl(base) - 1) < 0.01
    shutil.rmtree(root, ignore_errors=True)
