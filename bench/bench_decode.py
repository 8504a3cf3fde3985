"""Decode-size (M <= 16) linears on the GPU (issue 16): the two-kernel path (per-token quantizer,
then the INT4 GEMM) against the fused quantize-in-GEMM kernel (kernels/triton_fused.py), and a
tile sweep of the fused kernel (and of the GEMM alone for down_proj, whose R4 Hadamard keeps the
quantizer separate). Timing as bench/bench_kernels.py: CUDA graphs over input sets larger than
L2, CUDA events, median. Prints tables; writes <out>/bench_decode.json.

    python bench/bench_decode.py --out $OUT [--no-sweep] [--ms 1,16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402 (the timing harness)

from vllm_rotquant.kernels import triton_fused, triton_gemm  # noqa: E402
from vllm_rotquant.kernels import triton_ops as tops  # noqa: E402
from vllm_rotquant.kernels.layout import prepare_weight  # noqa: E402

# (model, layer, K, N, R4 block): the decode GEMMs of a 7B / 8B step
LAYERS = [("Llama-2-7B", "qkv", 4096, 12288, None), ("Llama-2-7B", "o", 4096, 4096, None),
          ("Llama-2-7B", "gate_up", 4096, 22016, None), ("Llama-2-7B", "down", 11008, 4096, 256),
          ("Llama-3-8B", "qkv", 4096, 6144, None), ("Llama-3-8B", "gate_up", 4096, 28672, None),
          ("Llama-3-8B", "down", 14336, 4096, 2048)]
c = triton_gemm._cfg
SWEEP = [c(16, bn, bkp, w, st, split) for bn, bkp in ((16, 512), (32, 256), (32, 512), (64, 128), (64, 256),
                                                     (128, 128), (64, 512))
         for w in (4,) for st in (4,) for split in (1, 2, 4)]


def _sets(m, k, n, gen, bits=4):
    cache = {}

    def get(i):
        if i not in cache:
            w = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8, generator=gen)
            sw = (torch.rand(n, 1, device="cuda", generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            qa, sa = tops.quant_act(x, 0.9, bits)
            cache[i] = (prepare_weight(w), sw.float(), x, qa, sa)
        return cache[i]
    return get, cache


def time_layer(m, k, n, block, gen, cfg=None, what=("two", "fused", "gemm")):
    get, cache = _sets(m, k, n, gen)
    nbytes = n * k // 2 + 3 * m * k + 2 * m * n
    res = {}
    if "two" in what:  # what served before: quantizer (with R4 where the layer has it) + GEMM
        res["two"] = bk.timed_graph(lambda i: (lambda w, sw, x, qa, sa: lambda: tops.w4a4_gemm(
            *tops.quantize_activations(x, 4, 0.9, block, True)[:2], w, sw, torch.bfloat16))(*get(i)), nbytes)
    if "fused" in what and block is None:
        res["fused"] = bk.timed_graph(lambda i: (lambda w, sw, x, qa, sa: lambda: triton_fused.quant_gemm(
            x, w, sw, torch.bfloat16, 4, 0.9, config=cfg))(*get(i)), nbytes)
    if "gemm" in what:
        res["gemm"] = bk.timed_graph(lambda i: (lambda w, sw, x, qa, sa: lambda: triton_gemm.w4a4_gemm(
            qa, sa, w, sw, torch.bfloat16, config=cfg))(*get(i)), nbytes)
    cache.clear()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bk.copy_bandwidth()
    copy = bk.copy_bandwidth()
    out = {"device": props.name, "copy_gbs": copy, "rows": [], "sweep": []}
    print(f"device {props.name}, copy {copy:.0f} GB/s (read+write)")
    print("\n| model | layer | K->N | M | two kernels us | fused us | GEMM alone us | weights TB/s (fused or GEMM) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model, layer, k, n, block in LAYERS:
        for m in ms:
            r = time_layer(m, k, n, block, gen)
            best = r.get("fused", r["gemm"])
            tbs = n * k / 2 / (best * 1e-3) / 1e12
            out["rows"].append(dict(model=model, layer=layer, k=k, n=n, m=m, block=block, **{a: v * 1e3 for a, v in r.items()}))
            f = f"{r['fused'] * 1e3:.1f}" if "fused" in r else "-"
            print(f"| {model} | {layer} | {k}->{n} | {m} | {r['two'] * 1e3:.1f} | {f} | {r['gemm'] * 1e3:.1f} | {tbs:.2f} |",
                  flush=True)
    if not args.no_sweep:
        print("\nsweep (fused kernel; GEMM alone for down_proj): model layer M cfg -> us")
        for model, layer, k, n, block in LAYERS:
            if model == "Llama-3-8B" and layer != "gate_up" and layer != "down":
                continue
            for m in ms:
                what = ("gemm",) if block else ("fused",)
                best = None
                for cfg in SWEEP:
                    try:
                        t = time_layer(m, k, n, block, gen, cfg=cfg, what=what)[what[0]]
                    except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
                        print(f"  {layer} {m} {cfg} failed: {type(e).__name__}: {str(e)[:80]}")
                        continue
                    out["sweep"].append(dict(model=model, layer=layer, k=k, n=n, m=m, cfg=cfg, us=t * 1e3))
                    if best is None or t < best[0]:
                        best = (t, cfg)
                print(f"BEST {model} {layer} M={m}: {best[1]} {best[0] * 1e3:.1f} us "
                      f"({n * k / 2 / (best[0] * 1e-3) / 1e12:.2f} TB/s)", flush=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
