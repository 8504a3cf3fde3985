"""Online cost of the declared input transforms on the GPU (issue 21): per call, the transform +
per-token quantization a transformed linear runs before its GEMM (DuQuant: the two-stage kernel +
the quantizer; FlatQuant: the fused Kronecker + quantization kernel it serves with, and the
two-stage form for comparison), against the plain quantizer and the fused R4 Hadamard + quantizer,
at decode and prefill token counts, on Llama-2-7B / Llama-3-8B input widths. CUDA events, median of --iters calls after a warm-up; prints a markdown table.

    python bench/bench_transforms.py --out bench/results/transforms_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from vllm_rotquant.format import InputTransform
from vllm_rotquant.kernels import triton_ops as tops
from vllm_rotquant.kernels import triton_transform
from vllm_rotquant.testing.ckpt_factory import random_transform

# (input, K, DuQuant block, FlatQuant factors, R4 block of the plain checkpoint or None)
INPUTS = [("qkv/o/gate_up 4096", 4096, 128, (64, 64), None), ("down 7B 11008", 11008, 86, (86, 128), 32),
          ("down 8B 14336", 14336, 128, (112, 128), 1792)]


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 8192])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for name, k, block, factors, r4 in INPUTS:
        ts = {"duquant": InputTransform("qkv", "block_rotation", block=block),
              "flatquant": InputTransform("qkv", "kronecker", factors=factors)}
        prepared = {}
        for key, t in ts.items():
            p = triton_transform.prepare(t, random_transform(t, k, 1, torch.Generator().manual_seed(k)))
            prepared[key] = [p[f"t_{n}"].cuda() for n in ("diag", "src1", "b1", "src2", "b2")]
            if key == "flatquant":
                fused = [p[f"t_{n}"].cuda() for n in ("diag", "left", "right")]
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"input": name, "tokens": m, "quant_us": _time(lambda: tops.quant_act(x, 0.9, 4), args.iters)}
            if r4:
                row["r4_hadamard_quant_us"] = _time(lambda: tops.hadamard_quant(x, r4, 0.9, 4), args.iters)
            for key, p in prepared.items():
                row[f"{key}_us"] = _time(lambda p=p: tops.quant_act(tops.block_transform(x, *p), 0.9, 4), args.iters)
            d, left, right = fused
            row["flatquant_fused_us"] = _time(lambda: tops.kron_quant(x, d, left, right, 0.9, 4), args.iters)
            rows.append(row)
            print(row, flush=True)
    cols = ["quant_us", "r4_hadamard_quant_us", "duquant_us", "flatquant_us", "flatquant_fused_us"]
    print("\n| input | tokens | quant only µs | R4 Hadamard + quant µs | DuQuant two-stage + quant µs | "
          "FlatQuant two-stage + quant µs | FlatQuant fused µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['input']} | {r['tokens']} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
