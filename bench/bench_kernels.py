"""Benchmark of the rotquant CUDA kernels (issue 5). One device call:

    python bench/bench_kernels.py [--out DIR] [--sweep] [--quick] [--asym [--asym-group G] [--no-table]]

Prints, for the linear shapes of Llama-2-7B, Llama-3-8B and SmolLM2 and M in {1,16,128,512,2048,8192},
the time of bf16 F.linear (cuBLAS), torch._int_mm on int8 (cuBLASLt, M > 16 only), our full W4A4
linear (per-token quant, with the online block Hadamard on down_proj inputs, + GEMM) and our GEMM
alone; then the fused Hadamard+quant kernels' bandwidth against a device-to-device copy.

Timing: every method is captured in a CUDA graph that calls it on S distinct input sets (weights
and activations; S large enough that a pass streams >= 160 MB, so L2 (50 MB) cannot hold a set)
R times over; each replay is timed with CUDA events; the reported time per call is the median
over replays divided by S*R. Launch overheads are thus those of graph replay (as vLLM decodes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vllm_rotquant.kernels import ops, triton_gemm, triton_quant
from vllm_rotquant.kernels import triton_ops as tops
from vllm_rotquant.kernels.layout import prepare_weight

# layer -> (K, N, online Hadamard block on the input or None). down_proj gets the R4 block: 2048
# (Llama-3-8B) and 1536 = 12*128 (SmolLM2) are largest_block(K); for Llama-2-7B's 11008 that is
# 1376 = 344*4 (a Paley core too large for the fused kernel: such a layer is refused at load), so
# the table shows the 256 block a checkpoint can choose instead.
MODELS = {
    "Llama-2-7B": {"qkv": (4096, 12288, None), "o": (4096, 4096, None), "gate_up": (4096, 22016, None),
                   "down": (11008, 4096, 256)},
    "Llama-3-8B": {"qkv": (4096, 6144, None), "o": (4096, 4096, None), "gate_up": (4096, 28672, None),
                   "down": (14336, 4096, 2048)},
    "SmolLM2-135M": {"qkv": (576, 960, None), "gate_up": (576, 3072, None), "down": (1536, 576, 1536)},
}
MS = [1, 16, 128, 512, 2048, 8192]
SET_BYTES = 160 << 20
TARGET_MS = 4.0


def _capture(calls, rounds):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(rounds):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    return g


def _time_replays(g, reps):
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def timed_graph(make_call, set_bytes: int, reps: int = 9) -> float:
    """Median ms per call. make_call(i) -> zero-arg closure on input set i."""
    sets = max(2, min(64, math.ceil(SET_BYTES / max(set_bytes, 1))))
    calls = [make_call(i) for i in range(sets)]
    for c in calls:  # compile / handle creation / layout caches outside the graph
        c()
    torch.cuda.synchronize()
    g = _capture(calls, 1)
    est_ms = _time_replays(g, 3) / sets
    rounds = max(1, min(64, math.ceil(TARGET_MS / max(est_ms * sets, 1e-3))))
    if rounds > 1:
        del g
        g = _capture(calls, rounds)
    t = _time_replays(g, reps)
    del g, calls
    return t / (sets * rounds)


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    t = timed_graph(lambda i: (lambda: b.copy_(a)), 1 << 40, reps=15)
    return 2 * n / t / 1e6  # GB/s (read + write)


def _bench_cublas(k, n, m, gen, res):
    dev = "cuda"
    ws_bf = {}

    def mk_bf16(i):
        if i not in ws_bf:
            ws_bf[i] = (torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen),
                        torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02)
        x, w = ws_bf[i]
        return lambda: F.linear(x, w)
    res["bf16"] = timed_graph(mk_bf16, 2 * (m * k + n * k + m * n))
    ws_bf.clear()
    # int8 cuBLASLt
    if m > 16:
        ws_i8 = {}

        def mk_i8(i):
            if i not in ws_i8:
                ws_i8[i] = (torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8, generator=gen),
                            torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=gen))
            a, b = ws_i8[i]
            return lambda: torch._int_mm(a, b.t())
        res["int_mm"] = timed_graph(mk_i8, m * k + n * k + 4 * m * n)
        ws_i8.clear()


def bench_linear(k: int, n: int, m: int, block: int | None, gen: torch.Generator, sweep_cfg=None):
    dev = "cuda"
    res = {}
    if sweep_cfg is None:
        _bench_cublas(k, n, m, gen, res)
    # ours: weights in kernel layout
    ws_q = {}

    def q_set(i):
        if i not in ws_q:
            w = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=gen)
            sw = (torch.rand(n, 1, device=dev, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
            qa, sa = tops.quant_act(x, 0.9, 4)
            ws_q[i] = (prepare_weight(w), sw, x, qa, sa)
        return ws_q[i]

    def mk_full(i):
        w, sw, x, _, _ = q_set(i)
        return lambda: tops.rotquant_linear(x, w, sw, None, 4, 0.9, block)

    def mk_gemm(i):
        w, sw, _, qa, sa = q_set(i)
        if sweep_cfg is not None:
            return lambda: triton_gemm.w4a4_gemm(qa, sa, w, sw, torch.bfloat16, config=sweep_cfg)
        return lambda: tops.w4a4_gemm(qa, sa, w, sw, torch.bfloat16)

    qbytes = n * k // 2 + 2 * m * k + m * k + 2 * m * n
    if sweep_cfg is None:
        res["full"] = timed_graph(mk_full, qbytes)
    res["gemm"] = timed_graph(mk_gemm, qbytes)
    ws_q.clear()
    return res


def fmt_us(ms):
    return "-" if ms is None else f"{ms * 1e3:8.1f}"


def run_linear_table(out_rows, ms, quick=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hdr = ("| model | layer | K→N | M | bf16 µs | int_mm µs | W4A4 full µs | GEMM µs | GEMM TOPS "
           "| bf16/full | bf16/GEMM | int_mm/GEMM |")
    print(hdr)
    print("|" + "---|" * 12)
    for model, layers in MODELS.items():
        for layer, (k, n, block) in layers.items():
            layer = layer.strip()
            for m in ms:
                t0 = time.time()
                r = bench_linear(k, n, m, block, gen)
                tops = 2 * m * n * k / (r["gemm"] * 1e-3) / 1e12
                row = dict(model=model, layer=layer, k=k, n=n, m=m, block=block, **r, gemm_tops=tops)
                out_rows.append(row)
                im = r.get("int_mm")
                imr = "-" if im is None else f"{im / r['gemm']:5.2f}"
                print(f"| {model} | {layer}{'(H' + str(block) + ')' if block else ''} | {k}→{n} | {m} | "
                      f"{fmt_us(r['bf16'])} | {fmt_us(im)} | {fmt_us(r['full'])} | {fmt_us(r['gemm'])} | "
                      f"{tops:7.1f} | {r['bf16'] / r['full']:5.2f} | {r['bf16'] / r['gemm']:5.2f} | "
                      f"{imr} |",
                      flush=True)
                print(f"  ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)


def run_asym_table(out_rows, ms, group: int | None = None):
    """The cost of asymmetric activations (zero point from the per-token min and max, and the GEMM's
    za[m] * weight-sum correction) against the symmetric linear on the same data.
    `group`: weight scales per group of K instead of per channel."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    print()
    print(f"weight scales: {'per channel' if group is None else f'per group of {group}'}")
    print("| model | layer | K→N | M | W4A4 sym µs | W4A4 asym µs | asym/sym |")
    print("|---|---|---|---|---|---|---|")
    for model in ("Llama-2-7B", "Llama-3-8B"):
        for layer, (k, n, block) in MODELS[model].items():
            if layer != layer.strip():
                continue
            for m in ms:
                sets = {}

                def data(i):
                    if i not in sets:
                        w = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8, generator=gen)
                        groups = 1 if group is None else k // group
                        sw = (torch.rand(n, groups, device="cuda", generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
                        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.3
                        wk = prepare_weight(w)
                        sets[i] = (wk, sw, x, ops.weight_sums(wk, groups))
                    return sets[i]

                def mk(sym):
                    def make(i):
                        wk, sw, x, wsum = data(i)
                        return lambda: tops.rotquant_linear(x, wk, sw, None, 4, 0.9, block, sym, None if sym else wsum)
                    return make

                qbytes = n * k // 2 + 2 * m * k + m * k + 2 * m * n
                t_sym, t_asym = timed_graph(mk(True), qbytes), timed_graph(mk(False), qbytes)
                sets.clear()
                out_rows.append(dict(model=model, layer=layer, k=k, n=n, m=m, block=block, group=group,
                                     sym=t_sym, asym=t_asym))
                print(f"| {model} | {layer}{'(H' + str(block) + ')' if block else ''} | {k}→{n} | {m} | "
                      f"{fmt_us(t_sym)} | {fmt_us(t_asym)} | {t_asym / t_sym:5.2f} |", flush=True)


def run_quant_table(out_rows, copy_gbs):
    gen = torch.Generator(device="cuda").manual_seed(1)
    cases = [("quant_act", 4096, None), ("quant_act", 14336, None),
             ("hadamard_quant", 11008, 256),
             ("hadamard_quant", 14336, 2048), ("hadamard_quant", 1536, 1536),
             ("hadamard_quant", 4096, 128), ("hadamard (R3, bf16 out)", 4096, 128)]
    print()
    print(f"| kernel | K | block | M | µs | GB/s | % of copy ({copy_gbs:.0f} GB/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, k, block in cases:
        for m in (2048, 8192):
            sets = {}

            def mk(i):
                if i not in sets:
                    sets[i] = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                x = sets[i]
                if name == "quant_act":
                    return lambda: tops.quant_act(x, 0.9, 4)
                if name.startswith("hadamard_quant"):
                    return lambda: tops.hadamard_quant(x, block, 0.9, 4)
                return lambda: tops.hadamard(x, block)
            out_bytes = m * k * (2 if name.startswith("hadamard (") else 1) + (0 if name.startswith("hadamard (") else 4 * m)
            nbytes = 2 * m * k + out_bytes
            t = timed_graph(mk, nbytes)
            gbs = nbytes / t / 1e6
            out_rows.append(dict(kernel=name, k=k, block=block, m=m, ms=t, gbs=gbs, copy_gbs=copy_gbs))
            print(f"| {name} | {k} | {block or '-'} | {m} | {t * 1e3:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |",
                  flush=True)


def run_sweep(out_rows):
    """GEMM tile configurations for M >= 512 (the first sweep's winners and their neighbours);
    decode (M <= 16) is --sweep-decode's (run_decode_sweep)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    c = triton_gemm._cfg
    mid = [c(64, 128, 128, 4, 4), c(32, 64, 128, 4, 4), c(64, 64, 128, 4, 4), c(128, 128, 64, 8, 4),
           c(64, 128, 64, 4, 5)]
    pre = [c(128, 128, 64, 8, 4), c(128, 128, 64, 4, 4), c(128, 128, 64, 8, 5), c(128, 128, 64, 4, 5),
           c(128, 128, 64, 8, 4, group_m=16), c(128, 128, 64, 8, 4, group_m=4), c(64, 128, 128, 4, 4)]
    plan = [(512, [(4096, 12288), (11008, 4096), (4096, 4096)], mid + pre[:2]),
            (2048, [(4096, 12288), (14336, 4096)], pre),
            (8192, [(4096, 28672)], pre[:5])]
    print("\nsweep: M K N config -> µs")
    for m, shapes, cfgs in plan:
        for k, n in shapes:
            best = None
            for cfg in cfgs:
                try:
                    t = bench_linear(k, n, m, None, gen, sweep_cfg=cfg)["gemm"]
                except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
                    print(f"  {m} {k} {n} {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                out_rows.append(dict(m=m, k=k, n=n, cfg=cfg, us=t * 1e3))
                if best is None or t < best[0]:
                    best = (t, cfg)
                print(f"  {m} {k} {n} {cfg} {t * 1e3:.1f}", flush=True)
            if best:
                print(f"BEST M={m} K={k} N={n}: {best[1]} {best[0] * 1e3:.1f} µs "
                      f"({2 * m * n * k / best[0] / 1e9:.0f} TOPS)", flush=True)


DECODE_SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096),  # Llama-2-7B (K, N)
                 (4096, 6144), (4096, 28672), (14336, 4096)]  # Llama-3-8B


def decode_candidates():
    """BM = 16 tiles for M <= 16: (BN, BKP) pairs x split-K x (warps, stages)."""
    c = triton_gemm._cfg
    out = [c(16, bn, bkp, w, st, split) for bn, bkp in [(16, 256), (32, 256), (32, 512), (64, 128), (64, 256), (128, 128)]
           for split in (1, 2, 4, 8) for w, st in ((4, 4), (4, 6))]
    out += [c(16, bn, bkp, 8, 4, split) for bn, bkp in [(64, 256), (128, 128)] for split in (1, 2, 4, 8)]
    return out


def run_decode_sweep(out_rows, ms=(1, 16), keep=8, shapes=DECODE_SHAPES):
    """Decode GEMM tiles per (M, K, N): every candidate at the first M, the `keep` fastest of
    them (and the heuristic) at the others; weights streamed from HBM (input sets > L2). Returns
    the table entries (kernels/tuned_tiles.py) of the tiles that beat the heuristic by > 3 %."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    cands = decode_candidates()
    entries = []
    dev = torch.device("cuda")
    print("\ndecode sweep: M K N config -> µs (GB/s of the weight stream)")
    for k, n in shapes:
        sets = max(2, min(64, math.ceil(SET_BYTES / (n * k // 2))))
        ws = []
        for _ in range(sets):
            w = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=gen)
            ws.append((prepare_weight(w), (torch.rand(n, 1, device=dev, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)))
        ranked = None
        for m in ms:
            xs = [tops.quant_act(torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen), 0.9, 4)
                  for _ in range(sets)]
            base = triton_gemm.heuristic_config(m, n, k, 0, dev)
            todo = cands if ranked is None else [c for _, c in ranked[:keep]]
            todo = [base] + [c for c in todo if c != base]
            res = []
            for cfg in todo:
                def mk(i, cfg=cfg):
                    (w, sw), (qa, sa) = ws[i % sets], xs[i % sets]
                    return lambda: triton_gemm.w4a4_gemm(qa, sa, w, sw, torch.bfloat16, config=cfg)
                try:
                    t = timed_graph(mk, SET_BYTES // sets + 1) * 1e3
                except Exception as e:  # noqa: BLE001 (a tile that does not compile is skipped)
                    print(f"  {m} {k} {n} {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                res.append((t, cfg))
                out_rows.append(dict(m=m, k=k, n=n, cfg=cfg, us=t, default=cfg == base))
            res.sort(key=lambda r: r[0])
            if ranked is None:
                ranked = res
            t_base = next(t for t, c in res if c == base)
            t_best, best = res[0]
            gbs = lambda t: n * k / 2 / t / 1e3  # noqa: E731
            print(f"BEST M={m} K={k} N={n}: {best} {t_best:.2f} µs ({gbs(t_best):.0f} GB/s); heuristic "
                  f"{t_base:.2f} µs ({gbs(t_base):.0f} GB/s)", flush=True)
            if t_best < 0.97 * t_base:
                entries.append(dict(m=m, n=n, k=k, cfg=best, us=round(t_best, 2), default_us=round(t_base, 2)))
    return entries


def run_hq_decode(out_rows, ms=(1, 16)):
    """Hadamard + quant plans for down_proj's input at decode sizes (one program per row group:
    at M = 1 the whole row is one program's work)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    print("\nhadamard_quant at decode M: K block order A R warps -> µs")
    grid = [(11008, 256, [(None, None, None), ("core", 16, 4), ("fast", 16, 4), ("core", 16, 8), ("fast", 1, 4)]),
            (14336, 2048, [(None, None, None), ("core", 64, 8), ("fast", 16, 4), ("core", 128, 8)])]
    for m in ms:
        for k, block, variants in grid:
            for order, a, warps in variants:
                def mk(i):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                    return lambda: triton_quant.hadamard_quant(x, block, 0.9, 4, order=order, a_force=a, num_warps=warps)
                try:
                    t = timed_graph(mk, 1 << 22) * 1e3
                except Exception as e:  # noqa: BLE001
                    print(f"  {m} {k} {block} {order} A{a} w{warps} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                out_rows.append(dict(m=m, k=k, block=block, order=order, a=a, warps=warps, us=t))
                print(f"  M={m} K={k} block={block} {order} A{a} w{warps}: {t:.2f} µs", flush=True)


def run_hq_sweep(out_rows, copy_gbs):
    """Fused Hadamard+quant: stage order / factorisation, rows per program, warps, CTAs per SM."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    print("\nhadamard_quant sweep (M=8192): K block order A R warps ctas/SM -> GB/s")
    v = lambda order, a, rows=None, warps=None, cps=2: (order, a, rows, warps, cps)  # noqa: E731
    grid = [(4096, 128, [v("fast", 1, 2, 8), v("fast", 1, 1, 4, 4), v("core", 16), v("core", 32)]),
            (11008, 256, [v("fast", 1, 1, 8), v("core", 16), v("core", 32), v("fast", 16), v("core", 64)]),
            (14336, 2048, [v("fast", 16, 1, 8), v("core", 64), v("core", 128), v("core", 256), v("fast", 16, 1, 8, 1)]),
            (1536, 1536, [v("fast", 12, 4, 4), v("core", 48), v("core", 96), v("core", 192), v("fast", 12, 2, 4, 4)]),
            (4736, 1184, [v(None, None)])]
    m = 8192
    for k, block, variants in grid:
        best = None
        for order, a, rows, warps, cps in variants:
            sets = {}

            def mk(i):
                if i not in sets:
                    sets[i] = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                x = sets[i]
                return lambda: triton_quant.hadamard_quant(x, block, 0.9, 4, num_warps=warps, ctas_per_sm=cps,
                                                           rows=rows, order=order, a_force=a)
            tag = f"{order} A{a} R{rows} w{warps} c{cps}"
            try:
                t = timed_graph(mk, 3 * m * k)
            except Exception as e:  # noqa: BLE001
                print(f"  {k} {block} {tag} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            gbs = (3 * m * k + 4 * m) / t / 1e6
            out_rows.append(dict(k=k, block=block, order=order, a=a, rows=rows, warps=warps, cps=cps, gbs=gbs))
            if best is None or gbs > best[0]:
                best = (gbs, tag)
            print(f"  {k} {block} {tag}: {gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}%)", flush=True)
        print(f"BEST HQ K={k} block={block}: {best[1]} {best[0]:.0f} GB/s ({100 * best[0] / copy_gbs:.0f}%)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also sweep GEMM / Hadamard configs")
    ap.add_argument("--sweep-hq", action="store_true", help="sweep the Hadamard+quant plans only")
    ap.add_argument("--sweep-decode", action="store_true",
                    help="sweep decode (M <= 16) GEMM tiles on the 7B/8B shapes and Hadamard+quant plans at M = 1, 16")
    ap.add_argument("--write-tuned", default=None, metavar="FILE",
                    help="with --sweep-decode: write the winning tiles as a table (kernels/tuned_tiles.py)")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--asym", action="store_true", help="also time asymmetric against symmetric activations")
    ap.add_argument("--asym-group", type=int, default=None,
                    help="with --asym: weight scales per group of this many K (default: per channel)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    import triton
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda)
    print(f"device: {info}")
    rows = {"info": info, "linear": [], "quant": [], "sweep": [], "hq_sweep": [], "asym": [], "decode_sweep": [],
            "hq_decode": []}
    copy_bandwidth()  # warm-up: clocks up
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows["copy_gbs"] = copy_gbs
    if args.sweep_decode:
        entries = run_decode_sweep(rows["decode_sweep"])
        rows["tuned"] = entries
        if args.write_tuned:
            table = dict(device=props.name, triton=triton.__version__, torch=torch.__version__,
                         command="python bench/bench_kernels.py --sweep-decode --no-table --write-tuned FILE",
                         gemm=entries)
            with open(args.write_tuned, "w") as f:
                json.dump(table, f, indent=1)
            print(f"wrote {len(entries)} tuned tiles to {args.write_tuned}")
        run_hq_decode(rows["hq_decode"])
    if args.sweep or args.sweep_hq:
        run_hq_sweep(rows["hq_sweep"], copy_gbs)
    if args.sweep:
        run_sweep(rows["sweep"])
    if not args.no_table:
        run_quant_table(rows["quant"], copy_gbs)
        print()
        run_linear_table(rows["linear"], [int(v) for v in args.ms.split(",")])
    if args.asym:
        run_asym_table(rows["asym"], [int(v) for v in args.ms.split(",")], args.asym_group)
    copy_end = copy_bandwidth()
    print(f"device-to-device copy at the end: {copy_end:.0f} GB/s")
    rows["copy_gbs_end"] = copy_end
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
