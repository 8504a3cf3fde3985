"""vLLM on CPU: startup time and tokens/s, bf16 SmolLM2 vs its W4A4 rotquant checkpoint.

For each model: a cold start (fresh vLLM compile cache, default CPU compilation = Dynamo trace
once + Inductor) and a warm start (the AOT-compiled graph reused), time from process start to
/health = 200; then, on the warm server, through /v1/completions:
- prefill: 8 prompts of 512 tokens, one at a time, max_tokens 1 -> prompt tokens / s;
- decode, batch 1: 128 generated tokens (ignore_eos) -> tokens / s;
- decode, batch 16: 16 concurrent requests of 64 generated tokens -> generated tokens / s.

    python bench/bench_vllm_cpu.py [--out bench/results/vllm_cpu.json]

The rotquant numbers run the torch reference ops (fp32 matmuls of exact small integers), not
optimized CPU kernels: they measure the plugin's overhead on CPU, not what INT4 could do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_server import VllmServer  # noqa: E402


def complete(srv: VllmServer, prompt, max_tokens: int) -> dict:
    r = requests.post(f"{srv.base_url}/v1/completions", timeout=1800, json={
        "model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()


def measure(srv: VllmServer, prompts: list[list[int]]) -> dict:
    complete(srv, prompts[0][:16], 4)  # first request: Dynamo trace of the decode shapes etc.
    t0 = time.perf_counter()
    n = 0
    for p in prompts:
        n += complete(srv, p, 1)["usage"]["prompt_tokens"]
    prefill = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = complete(srv, prompts[0][:32], 128)["usage"]["completion_tokens"]
    decode1 = got / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: complete(srv, prompts[i % len(prompts)][:32], 64), range(16)))
    decode16 = sum(o["usage"]["completion_tokens"] for o in outs) / (time.perf_counter() - t0)
    return {"prefill_tok_s": prefill, "decode_b1_tok_s": decode1, "decode_b16_tok_s": decode16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", help="bf16 HF folder (default: tests' SmolLM2)")
    ap.add_argument("--rotquant", help="rotquant checkpoint (default: tests' SmolLM2 hadamard+GPTQ W4A4)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_cpu.json"))
    args = ap.parse_args()
    from real_model import smollm2_dir, smollm2_rotquant_dir
    from transformers import AutoTokenizer

    from vllm_rotquant.offline import data

    models = {"bf16": Path(args.bf16) if args.bf16 else smollm2_dir(),
              "rotquant W4A4": Path(args.rotquant) if args.rotquant else smollm2_rotquant_dir()}
    ids = data.tokenize(AutoTokenizer.from_pretrained(models["bf16"]), data.load_text("austen"))
    prompts = data.eval_windows(ids, 512, 8).tolist()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_start": os.getloadavg()}, "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_cpu_"))
    for name, model in models.items():
        cache = tmp / f"cache_{name.split()[0]}"
        entry = {"model": str(model)}
        for kind in ("cold", "warm"):
            srv = VllmServer(model, env={"VLLM_CACHE_ROOT": str(cache), "VLLM_CPU_CI_ENV": "0"},
                             log_path=tmp / f"{name.split()[0]}_{kind}.log")
            with srv:
                entry[f"startup_{kind}_s"] = srv.startup_s
                if kind == "warm":
                    entry.update(measure(srv, prompts))
            print(name, kind, json.dumps(entry), flush=True)
        result["models"][name] = entry
    result["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
