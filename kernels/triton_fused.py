"""Triton: per-token activation quantization fused into the W4A4 GEMM, for decode (M <= 16).

At decode a linear is two launches, the quantizer and the GEMM (issue 16: ~1.7 us each on the
H200 for qkv / o / gate_up, 166 us a 7B decode step). Here every GEMM program first reads the
few token rows it multiplies (M x K, 8 KB a token at K = 4096, from L2 after the first program)
to get their range, then quantizes each activation tile in registers right before its int8
`tl.dot`: one launch, and no int8 activation round trip through memory. The redundant range
pass is what limits this to small M (at M = 16 each program re-reads 128 KB).

Numerics are kernels/reference.py's, bit for bit: the range is an exact max (min) in float32,
the scale, zero point and rounding are the quantizers' own helpers (kernels/triton_quant.py),
the integer accumulation and the epilogue the GEMM's (kernels/triton_gemm.py). Per-channel
weight scales only, no online Hadamard and no tensor-parallel range: layers with those keep the
two-kernel path (`fused_plan_reason`).

Not in the serving path yet: the first version (range pass over 16-row tiles) measured 2.3x
slower than the two kernels on the H200 (qkv 29.2 against 12.5 us at M = 1;
bench/results/bench_decode_h200_fused_v1.json); this one reads only the real rows and is still
1.7-8x slower (bench_decode_h200_v2.json): every program repeats the quantization. Kept, tested,
as the measured baseline for a fusion that quantizes once per launch; TritonKernel takes a fused
path only when `bench/bench_decode.py` shows it faster.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.triton_gemm import INTERPRET, _unpack, pick_config
from vllm_rotquant.kernels.triton_quant import _asym_params, _quant, _quant_asym, _scale

FUSED_MAX_M = 16  # the decode bucket of triton_gemm.pick_config


@triton.jit
def _row_range(x_ptr, M, K, stride_xm, KC: tl.constexpr, BMR: tl.constexpr, BM: tl.constexpr,
               ASYM: tl.constexpr):
    """Per-token (max|x|) or (max, min) over the whole row, float32 [BM]; rows past M give 0.
    Tiles of the BMR = next_pow2(M) real rows only, as wide as registers allow (one dependent
    L2 round trip per tile: at M = 1 and K = 4096 a single tile)."""
    rr = tl.arange(0, BMR)
    rc = tl.arange(0, KC)
    vmax = tl.zeros((BMR,), dtype=tl.float32)
    vmin = tl.zeros((BMR,), dtype=tl.float32)
    for k0 in range(0, K, KC):
        mask = (rr[:, None] < M) & ((k0 + rc)[None, :] < K)
        x = tl.load(x_ptr + rr[:, None].to(tl.int64) * stride_xm + (k0 + rc)[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if ASYM:  # padding is 0, inside the range anyway (as in the quantizer)
            vmax = tl.maximum(vmax, tl.max(x, axis=1))
            vmin = tl.minimum(vmin, tl.min(x, axis=1))
        else:
            vmax = tl.maximum(vmax, tl.max(tl.abs(x), axis=1))
    if BMR < BM:  # widen to the MMA's BM columns (the padding rows: 0)
        sel = (tl.arange(0, BM)[:, None] == rr[None, :]).to(tl.float32)  # [BM, BMR]
        vmax = tl.sum(sel * vmax[None, :], axis=1)
        vmin = tl.sum(sel * vmin[None, :], axis=1)
    return vmax, vmin


@triton.jit
def _fused_kernel(x_ptr, w_ptr, sw_ptr, out_ptr, ws_ptr, wsum_ptr,
                  M, N, KH, stride_xm, stride_om, stride_swn, stride_wsn, clip,
                  QMAX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKP: tl.constexpr,
                  KC: tl.constexpr, BMR: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, ASYM: tl.constexpr,
                  USE_ASM: tl.constexpr, INTERP: tl.constexpr):
    """acc^T[BN, BM] over packed bytes [k_lo, k_hi) of this split, from float activations x
    [M, 2*KH] quantized per token on the fly (one M tile: M <= BM)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_chunk = tl.cdiv(tl.cdiv(KH, BKP), SPLIT_K) * BKP
    k_lo = pid_k * k_chunk
    k_hi = min(k_lo + k_chunk, KH)

    rn = pid_n * BN + tl.arange(0, BN)
    rn_c = rn % N  # wrapped rows: in-bounds loads, discarded at the store
    rm = tl.arange(0, BM)
    rm_c = rm % M
    vmax, vmin = _row_range(x_ptr, M, 2 * KH, stride_xm, KC, BMR, BM, ASYM)
    if ASYM:
        scale, u = _asym_params(vmax, vmin, clip, QMAX, INTERP)
        za = (u - (QMAX + 1.0)).to(tl.int32)
        za0 = za * (pid_k == 0).to(tl.int32)  # the correction once, in split 0
        acc = -((tl.load(wsum_ptr + rn_c * stride_wsn)[:, None] * za0[None, :]) << 4)
    else:
        scale = _scale(vmax, clip, QMAX)
        acc = tl.zeros((BN, BM), dtype=tl.int32)

    rk = tl.arange(0, BKP)
    wb = w_ptr.to(tl.pointer_type(tl.int8))
    w_ptrs = wb + rn_c[:, None].to(tl.int64) * KH + (k_lo + rk)[None, :]
    x_ptrs = x_ptr + rm_c[None, :].to(tl.int64) * stride_xm + (k_lo + rk)[:, None]
    mrow = rm[None, :] < M
    for kk in range(k_lo, k_hi, BKP):
        if EVEN_K:
            w = tl.load(w_ptrs)
            xmask = mrow
        else:
            kmask = (kk + rk) < k_hi
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
            xmask = kmask[:, None] & mrow
        xl = tl.load(x_ptrs, mask=xmask, other=0.0).to(tl.float32)
        xh = tl.load(x_ptrs + KH, mask=xmask, other=0.0).to(tl.float32)
        if ASYM:  # masked entries become the zero point; their weights (or rows) are 0 (discarded)
            ql = _quant_asym(xl, scale[None, :], u[None, :], QMAX, INTERP)
            qh = _quant_asym(xh, scale[None, :], u[None, :], QMAX, INTERP)
        else:
            ql = _quant(xl, scale[None, :], QMAX, INTERP)
            qh = _quant(xh, scale[None, :], QMAX, INTERP)
        lo, hi = _unpack(w, USE_ASM)
        acc = tl.dot(lo, ql, acc, out_dtype=tl.int32)
        acc = tl.dot(hi, qh, acc, out_dtype=tl.int32)
        w_ptrs += BKP
        x_ptrs += BKP

    acc = acc >> 4
    omask = (rn[:, None] < N) & mrow
    o_ptrs = out_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    if SPLIT_K > 1:
        ws = ws_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
        tl.atomic_add(ws, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(ws_ptr + M * N + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            acc = tl.load(ws, mask=omask, other=0, cache_modifier=".cg")
            sw = tl.load(sw_ptr + rn_c * stride_swn).to(tl.float32)
            out = acc.to(tl.float32) * scale[None, :] * sw[:, None]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        sw = tl.load(sw_ptr + rn_c * stride_swn).to(tl.float32)
        out = acc.to(tl.float32) * scale[None, :] * sw[:, None]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)


def fused_plan_reason(m: int, k: int, groups: int, bits: int) -> str | None:
    """None if the fused kernel serves this call, else why not (the two-kernel path does)."""
    if m > FUSED_MAX_M:
        return f"M={m} > {FUSED_MAX_M} (the range pass is repeated by every program)"
    if groups != 1:
        return "group-wise weight scales"
    if bits not in (4, 8):
        return f"act_bits {bits}"
    if k % 8:
        return f"K={k} is not a multiple of 8"
    return None


def quant_gemm(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype, bits: int,
               clip: float, asymmetric: bool = False, wsum: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """x float [M, K] (M <= 16), w kernel layout int32 [N, K/8], sw [N, 1] -> [M, N] out_dtype:
    reference.quant_act_ref (or quant_act_asym_ref) then w4a4_gemm_ref, in one launch.
    Asymmetric activations need the weight sums `wsum` int32 [N, 1] (ops.weight_sums)."""
    m, k = x.shape
    n = w.shape[0]
    if w.dtype != torch.int32 or w.shape[1] * 8 != k:
        raise ValueError(f"quant_gemm: weight must be the kernel layout int32 [N, {k // 8}], got "
                         f"{w.dtype} {tuple(w.shape)}")
    reason = fused_plan_reason(m, k, sw.shape[1], bits)
    if reason:
        raise ValueError(f"quant_gemm: {reason}")
    if asymmetric and (wsum is None or wsum.dtype != torch.int32 or wsum.shape != (n, 1)):
        raise ValueError(f"quant_gemm: asymmetric activations need wsum int32 [{n}, 1]")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = dict(config) if config is not None else pick_config(m, n, k, 0, x.device)
    split = cfg.pop("SPLIT_K")
    cfg.pop("GROUP_M", None)
    bm = cfg.pop("BM")
    kh = k // 2
    k_chunk = triton.cdiv(triton.cdiv(kh, cfg["BKP"]), split) * cfg["BKP"]
    grid_n = triton.cdiv(n, cfg["BN"])
    if split > 1:
        split = triton.cdiv(kh, k_chunk)  # no empty splits
        ws = torch.zeros(m * n + grid_n, dtype=torch.int32, device=x.device)
    else:
        ws = out  # unused
    _fused_kernel[(grid_n, split)](
        x, w, sw, out, ws, wsum if asymmetric else sw,
        m, n, kh, x.stride(0), out.stride(0), sw.stride(0), wsum.stride(0) if asymmetric else 0, float(clip),
        QMAX=ref.qmax(bits), BM=max(bm, triton.next_power_of_2(m)), BMR=triton.next_power_of_2(m),
        KC=min(4096 // triton.next_power_of_2(m), triton.next_power_of_2(k)),
        SPLIT_K=split, EVEN_K=kh % cfg["BKP"] == 0, ASYM=asymmetric, USE_ASM=not INTERPRET, INTERP=INTERPRET,
        **cfg)
    return out
