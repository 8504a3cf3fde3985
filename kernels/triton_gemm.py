"""Triton W4A4 GEMM for Hopper: int8 activations x INT4 weights (kernel layout), int32 accumulation.

Hopper has no INT4 MMA. The weights arrive in the half-split kernel layout (kernels/layout.py):
a [BN, BKP] tile of packed bytes becomes, in registers, two int8 tiles holding 16x the signed
nibbles (`(b << 4) & 0xF0`, `b & 0xF0`: two 32-bit bit operations per 8 weights, through inline
PTX on 4 packed bytes), which are the *register* A operand of int8 `tl.dot` (wgmma with A from
registers); the activations are the shared-memory B operand:

    acc^T[BN, BM] += lo[BN, BKP] @ X[:, kp:kp+BKP]^T + hi[BN, BKP] @ X[:, K/2+kp : K/2+kp+BKP]^T

Asymmetric activations (zero points za[m]) subtract za[m] * sum_k w[n,k] from the exact integer
sum, with the sums made at load time: per channel, the accumulator starts at -16*za[m]*wsum[n]
(a correction in the epilogue needs a second [BN, BM] int32 tile and made the whole GEMM 1.6x
slower at M = 8192 on the H100); per group, za[m] * sum_g sw[n,g]*wsum[n,g] is subtracted
once after the loop, the sum made there from [BN, GB]-group blocks (correcting each group's
integer sum costs two [BN, BM] integer ops per K step: 1.5x slower than symmetric at M = 512,
5x with 8 warps).

The int32 accumulator is 16x the exact integer product (|acc| <= 16*K*8*128 < 2^31 for K < 131072;
with a zero point, |acc| <= 16*K*8*256: K < 65536)
and is shifted back exactly. Epilogue as the reference: fl(fl(acc*sa[m])*sw[n]) -> out dtype, so
per-channel outputs are bit-identical to kernels/reference.py; with group-wise scales each
group's exact integer sum is scaled and summed in fp32 (order differs from the reference: within
one rounding of the output dtype).

Decode (M <= 16) is memory-bound: small BN tiles (many programs stream the 4-bit weights once)
and optional split-K, whose int32 partials meet in a zero-initialised workspace through atomics;
the last program of a tile (a per-tile arrival counter in the same workspace) applies the
epilogue. No host synchronisation anywhere: CUDA-graph capturable.
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from vllm_rotquant.kernels import tuned_tiles
from vllm_rotquant.kernels.layout import gemm_group_supported

logger = logging.getLogger(__name__)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _unpack(w, USE_ASM: tl.constexpr):
    """int8 bytes (low nibble, high nibble) -> (16*low, 16*high) as int8, signed."""
    if USE_ASM:
        lo = tl.inline_asm_elementwise(
            "{\n.reg .b32 t;\nshl.b32 t, $1, 4;\nand.b32 $0, t, 0xF0F0F0F0;\n}",
            "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [w], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = w << 4
        hi = w & -16
    return lo, hi


@triton.jit
def _w4a4_kernel(x_ptr, sa_ptr, w_ptr, sw_ptr, out_ptr, ws_ptr, za_ptr, wsum_ptr,
                 M, N, KH, stride_xm, stride_om, stride_swn, stride_wsn,
                 BM: tl.constexpr, BN: tl.constexpr, BKP: tl.constexpr, GROUP: tl.constexpr,
                 SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                 MASK_M: tl.constexpr, ZP: tl.constexpr, GB: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """acc^T[BN, BM] over packed bytes [k_lo, k_hi) of this split; KH = K/2. Rows past M are
    wrapped (in-bounds loads, discarded at the store) or, with MASK_M (M < BM), zero-filled.
    ZP (asymmetric activations): per channel, the exact integer sum loses za[m] * wsum[n] before
    it is scaled; per group, the scaled sum loses za[m] * sum_g sw[n, g] * wsum[n, g] after the
    loop (summed there in [BN, GB] blocks: no extra loads inside the K loop)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    k_chunk = tl.cdiv(tl.cdiv(KH, BKP), SPLIT_K) * BKP
    k_lo = pid_k * k_chunk
    k_hi = min(k_lo + k_chunk, KH)

    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn_c = rn % N  # wrapped rows: in-bounds loads, discarded at the store
    if MASK_M:
        rm_c = rm
    else:
        rm_c = rm % M
    rk = tl.arange(0, BKP)
    wb = w_ptr.to(tl.pointer_type(tl.int8))
    w_ptrs = wb + rn_c[:, None].to(tl.int64) * KH + (k_lo + rk)[None, :]
    x_ptrs = x_ptr + rm_c[None, :].to(tl.int64) * stride_xm + (k_lo + rk)[:, None]
    if ZP:
        za = tl.load(za_ptr + rm_c, mask=rm < M, other=0)
    if GROUP == 0:
        if ZP:  # the accumulator starts at -16 * za[m] * wsum[n] (split 0 only): no epilogue temp
            za0 = za * (pid_k == 0).to(tl.int32)
            acc = -((tl.load(wsum_ptr + rn_c * stride_wsn)[:, None] * za0[None, :]) << 4)
        else:
            acc = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        accf = tl.zeros((BN, BM), dtype=tl.float32)
    # per step two int8 dots: low nibbles <-> k in [kp, kp+BKP), high <-> [K/2+kp, K/2+kp+BKP)
    for kk in range(k_lo, k_hi, BKP):
        if EVEN_K:
            w = tl.load(w_ptrs)
            if MASK_M:
                xl = tl.load(x_ptrs, mask=rm[None, :] < M, other=0)
                xh = tl.load(x_ptrs + KH, mask=rm[None, :] < M, other=0)
            else:
                xl = tl.load(x_ptrs)
                xh = tl.load(x_ptrs + KH)
        else:
            kmask = (kk + rk) < k_hi
            xmask = kmask[:, None] & (rm[None, :] < M)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
            xl = tl.load(x_ptrs, mask=xmask, other=0)
            xh = tl.load(x_ptrs + KH, mask=xmask, other=0)
        lo, hi = _unpack(w, USE_ASM)
        if GROUP == 0:
            acc = tl.dot(lo, xl, acc, out_dtype=tl.int32)
            acc = tl.dot(hi, xh, acc, out_dtype=tl.int32)
        else:
            zero = tl.zeros((BN, BM), dtype=tl.int32)
            a_lo = tl.dot(lo, xl, zero, out_dtype=tl.int32) >> 4
            a_hi = tl.dot(hi, xh, zero, out_dtype=tl.int32) >> 4
            s_lo = tl.load(sw_ptr + rn_c * stride_swn + kk // GROUP).to(tl.float32)
            s_hi = tl.load(sw_ptr + rn_c * stride_swn + (KH + kk) // GROUP).to(tl.float32)
            accf += a_lo.to(tl.float32) * s_lo[:, None]
            accf += a_hi.to(tl.float32) * s_hi[:, None]
        w_ptrs += BKP
        x_ptrs += BKP

    omask = (rn[:, None] < N) & (rm[None, :] < M)
    o_ptrs = out_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    sa = tl.load(sa_ptr + rm_c, mask=rm < M, other=0.0)
    if GROUP == 0:
        acc = acc >> 4
        if SPLIT_K > 1:
            ws = ws_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
            tl.atomic_add(ws, acc, mask=omask, sem="relaxed")
            tl.debug_barrier()
            cnt_ptr = ws_ptr + M * N + pid  # split-K only for small M: no overflow
            arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                tl.debug_barrier()
                acc = tl.load(ws, mask=omask, other=0, cache_modifier=".cg")
                sw = tl.load(sw_ptr + rn_c * stride_swn).to(tl.float32)
                out = acc.to(tl.float32) * sa[None, :] * sw[:, None]
                tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            sw = tl.load(sw_ptr + rn_c * stride_swn).to(tl.float32)
            out = acc.to(tl.float32) * sa[None, :] * sw[:, None]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        if ZP:  # sum_g sw[n, g] * wsum[n, g] in [BN, GB] blocks, once per tile
            corr = tl.zeros((BN,), dtype=tl.float32)
            n_groups = 2 * KH // GROUP
            rg = tl.arange(0, GB)
            for g0 in range(0, n_groups, GB):
                gm = (g0 + rg)[None, :] < n_groups
                swg = tl.load(sw_ptr + rn_c[:, None] * stride_swn + (g0 + rg)[None, :], mask=gm, other=0.0)
                wsg = tl.load(wsum_ptr + rn_c[:, None] * stride_wsn + (g0 + rg)[None, :], mask=gm, other=0)
                corr += tl.sum(swg.to(tl.float32) * wsg.to(tl.float32), axis=1)
            accf -= corr[:, None] * za[None, :].to(tl.float32)
        out = accf * sa[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------- configs
def _cfg(bm, bn, bkp, warps, stages, split=1, group_m=8):
    return dict(BM=bm, BN=bn, BKP=bkp, num_warps=warps, num_stages=stages, SPLIT_K=split,
                GROUP_M=group_m)


_NUM_SMS: dict = {}


def num_sms(device: torch.device, interpreted: int = 132) -> int:
    """Streaming multiprocessors of `device` (cached); `interpreted` stands in under the Triton
    interpreter or off CUDA, where grids are sized for the host instead."""
    if INTERPRET or device.type != "cuda":
        return interpreted
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


_DEVICE_NAMES: dict = {}


def _tuned_table(device: torch.device) -> dict:
    """The measured tile table for `device`'s GPU model (kernels/tuned_tiles.py); off CUDA only
    an explicit $ROTQUANT_GEMM_TILES applies (interpreter tests)."""
    if INTERPRET or device.type != "cuda":
        return tuned_tiles.table_for("") if os.environ.get(tuned_tiles.ENV) else {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_NAMES:
        _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return tuned_tiles.table_for(_DEVICE_NAMES[idx])


def pick_config(m: int, n: int, k: int, group: int, device: torch.device) -> dict:
    """Tile configuration per (M bucket, N, K): the device's measured table where it has the
    shape (decode sweeps, kernels/tuned_tiles.py), else the heuristic below, chosen from the
    H100/H200 sweeps recorded in bench/RESULTS.md. Deterministic (no run-time autotuning, so
    CUDA-graph capture and torch.compile never see a benchmark run)."""
    if not group:
        cfg = tuned_tiles.lookup(_tuned_table(device), m, n, k)
        if cfg is not None:
            return cfg
    return heuristic_config(m, n, k, group, device)


def heuristic_config(m: int, n: int, k: int, group: int, device: torch.device) -> dict:
    """The tile rules for shapes without a measured entry (and the sweep's baseline)."""
    sms = num_sms(device)
    kh = k // 2
    if m <= 16:  # memory-bound: stream the 4-bit weights with many small-N programs
        if n >= 8192:
            bn, bkp, split = 64, 128, 1
        elif k > 4096:  # down_proj: 4-way split-K of 64-wide tiles (H200 sweep, issue 16: 7-12 %
            bn, bkp, split = 64, 128, 4  # faster than 32 x 512 unsplit at 11008 / 14336 -> 4096)
        else:
            bn, bkp, split = 32, 256, 1
        bkp = min(bkp, max(64, triton.next_power_of_2(kh)))
        steps = triton.cdiv(kh, bkp)
        split = min(split, steps)
        while triton.cdiv(n, bn) * split < sms // 2 and split * 2 <= steps and split < 8:
            split *= 2  # tiny N (e.g. 576): spread K over more programs
        cfg = _cfg(16, bn, bkp, 4, 4, split)
    elif m <= 256:
        if triton.cdiv(m, 64) * triton.cdiv(n, 128) >= sms:
            cfg = _cfg(64, 128, 128, 4, 4)
        else:
            cfg = _cfg(32, 64, 128, 4, 4)
    else:  # int8 tensor cores, unpacked INT4 weights as the register operand of wgmma
        if triton.cdiv(m, 128) * triton.cdiv(n, 128) >= sms:
            cfg = _cfg(128, 128, 64, 8, 4)
        else:
            cfg = _cfg(64, 128, 128, 4, 4)
    if group:
        cfg["SPLIT_K"] = 1
        cfg["BKP"] = group
    return cfg


def w4a4_gemm(qa: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
              out_dtype: torch.dtype, config: dict | None = None, za: torch.Tensor | None = None,
              wsum: torch.Tensor | None = None) -> torch.Tensor:
    """qa int8 [M, K], sa float32 [M, 1], w kernel layout int32 [N, K/8], sw [N, G] ->
    [M, N] out_dtype. Asymmetric activations: `za` int32 [M, 1] zero points and `wsum` int32
    [N, G] weight sums (ops.weight_sums). `config` overrides the tile choice (sweeps)."""
    m, k = qa.shape
    n = w.shape[0]
    if w.dtype != torch.int32 or w.shape[1] * 8 != k:
        raise ValueError(f"w4a4_gemm: weight must be the kernel layout int32 [N, {k // 8}], got "
                         f"{w.dtype} {tuple(w.shape)}")
    groups = sw.shape[1]
    group = 0 if groups == 1 else k // groups
    if group:
        if k % groups or not gemm_group_supported(k, group):
            raise ValueError(f"w4a4_gemm: unsupported group size {group} for K={k}")
    if qa.stride(-1) != 1:
        qa = qa.contiguous()
    sa = sa.reshape(m).contiguous()
    if (za is None) != (wsum is None):
        raise ValueError("w4a4_gemm: asymmetric activations need both za and wsum")
    if za is not None:
        if za.dtype != torch.int32 or wsum.dtype != torch.int32 or wsum.shape != (n, groups):
            raise ValueError(f"w4a4_gemm: za must be int32 [M, 1] and wsum int32 [{n}, {groups}], got "
                             f"{za.dtype} {tuple(za.shape)} and {wsum.dtype} {tuple(wsum.shape)}")
        if k >= 65536:
            raise ValueError(f"w4a4_gemm: K={k} is too large for the int32 accumulator with zero points (< 65536)")
        za = za.reshape(m).contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return out
    cfg = dict(config) if config is not None else pick_config(m, n, k, group, qa.device)
    if group:
        cfg["BKP"], cfg["SPLIT_K"] = group, 1
    split = cfg.pop("SPLIT_K")
    kh = k // 2
    grid_mn = triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"])
    k_chunk = triton.cdiv(triton.cdiv(kh, cfg["BKP"]), split) * cfg["BKP"]
    even_k = kh % cfg["BKP"] == 0  # then every split's range is whole tiles too
    if split > 1:
        split = triton.cdiv(kh, k_chunk)  # no empty splits
        ws = torch.zeros(m * n + grid_mn, dtype=torch.int32, device=qa.device)
    else:
        ws = out  # unused
    zp = za is not None
    if zp and not group and cfg["num_warps"] == 8 and not INTERPRET:
        # the zero-point loads take the 8-warp tiles from 120 to 141 registers a thread, one CTA
        # per SM instead of two (1.6x slower at M = 8192); capped at 128 they stay two (the
        # grouped kernel keeps only a [BN] vector more than without zero points: no cap)
        cfg.setdefault("maxnreg", 128)
    _w4a4_kernel[(grid_mn, split)](
        qa, sa, w, sw, out, ws, za if zp else sa, wsum if zp else sw,
        m, n, k // 2, qa.stride(0), out.stride(0), sw.stride(0), wsum.stride(0) if zp else 0,
        GROUP=group, SPLIT_K=split, EVEN_K=even_k, MASK_M=m < cfg["BM"], ZP=zp,
        GB=min(triton.next_power_of_2(groups), max(8, 16 * 32 * cfg["num_warps"] // cfg["BN"])),  # 16 regs a tile
        USE_ASM=not INTERPRET,
        **cfg)
    return out
