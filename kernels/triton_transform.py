"""Triton: the declared input transforms (format.InputTransform) before the per-token quantizer.

A Kronecker pair (FlatQuant) runs fused with the quantizer (`kron_quant`): one program per token
holds the token as its [n1, n2] matrix, computes left^T X right with two tensor-core dots and
quantizes it, so the transformed activations never touch memory. The block rotations (DuQuant),
whose permutation mixes all blocks, run as two stages, each a gather of columns followed by a
block-diagonal matmul, then the quantizer:  y1 = ((x * diag)[:, src1]) @ blockdiag(B1),  y = y1[:, src2] @ blockdiag(B2).
  block_rotation (DuQuant): src1 = identity, B1 = rot1, src2 = perm, B2 = rot2;
  kronecker (FlatQuant):    src1 = the [n1, n2] -> [n2, n1] transpose, B1 = left (one block
                            shared by the n2 blocks), src2 = the transpose back, B2 = right:
                            per token left^T X right.
`prepare` turns a layer's checkpoint tensors into that form once, at load. Each program computes
one block of BM token rows (a [BM, b] x [b, b] tensor-core dot in split-TF32 "tf32x3", about
float32 accuracy), so the grid is (row groups, blocks) and a decode step uses every SM. The result
differs from the reference (kernels/reference.py, float32 on the CPU) in summation order only;
the quantizer that follows (triton_quant.quant_act) is bit-exact on it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_rotquant.format import MAX_TRANSFORM_BLOCK, InputTransform
from vllm_rotquant.kernels.triton_quant import INTERPRET, _asym_params, _qmax, _quant_asym, _quantize


@triton.jit
def _stage(x_ptr, y_ptr, diag_ptr, src_ptr, b_ptr, M, stride_x, stride_y,
           B: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr, HAS_DIAG: tl.constexpr,
           SHARED: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    g = tl.program_id(1)
    rows = pm * BM + tl.arange(0, BM)
    cols = tl.arange(0, BP)
    rmask = rows < M
    cmask = cols < B
    j = g * B + cols
    src = tl.load(src_ptr + j, mask=cmask, other=0)
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + src[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_DIAG:
        x = x * tl.load(diag_ptr + src, mask=cmask, other=0.0)[None, :]
    if SHARED:
        boff = 0
    else:
        boff = g * B * B
    bt = tl.load(b_ptr + boff + cols[:, None] * B + cols[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    y = tl.dot(x, bt, input_precision=PREC)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + j[None, :], y, mask=m2)


def _launch(x, y, diag, src, b, m, k):
    block = b.shape[-1]
    bp = max(16, triton.next_power_of_2(block))
    bm = 16 if m <= 16 else (32 if m <= 256 else 64)
    grid = (triton.cdiv(m, bm), k // block)
    _stage[grid](x, y, diag if diag is not None else y, src, b, m, x.stride(0), y.stride(0), B=block, BP=bp, BM=bm,
                 HAS_DIAG=diag is not None, SHARED=b.shape[0] == 1, PREC="ieee" if INTERPRET else "tf32x3",
                 num_warps=4 if bp <= 64 else 8)


def block_transform(x: torch.Tensor, diag: torch.Tensor, src1: torch.Tensor, b1: torch.Tensor, src2: torch.Tensor,
                    b2: torch.Tensor) -> torch.Tensor:
    """The two-stage transform of x [M, K] (any float dtype) -> float32 [M, K]."""
    m, k = x.shape
    for name, b in (("b1", b1), ("b2", b2)):
        if b.dim() != 3 or b.shape[1] != b.shape[2] or k % b.shape[-1] or b.shape[0] not in (1, k // b.shape[-1]):
            raise ValueError(f"rotquant Triton transform: {name} {tuple(b.shape)} does not tile {k} features")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y1 = torch.empty(m, k, dtype=torch.float32, device=x.device)
    y = torch.empty_like(y1)
    if m:
        _launch(x, y1, diag, src1, b1, m, k)
        _launch(y1, y, None, src2, b2, m, k)
    return y


@triton.jit
def _kron_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, f_ptr, diag_ptr, l_ptr, r_ptr, M, stride_x, clip,
                       N1: tl.constexpr, N2: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                       QMAX: tl.constexpr, ASYM: tl.constexpr, OUT_F: tl.constexpr, INTERP: tl.constexpr,
                       PREC: tl.constexpr):
    """One token per program, all of it in registers: X = reshape(x * diag, [N1, N2]) ->
    Z = left^T X right (two tensor-core dots) -> the per-token quantizer, in one pass."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, P1)
    j = tl.arange(0, P2)
    mask = (i[:, None] < N1) & (j[None, :] < N2)
    off = i[:, None] * N2 + j[None, :]
    x = tl.load(x_ptr + t * stride_x + off, mask=mask, other=0.0).to(tl.float32)
    x = x * tl.load(diag_ptr + off, mask=mask, other=0.0)
    lt = tl.load(l_ptr + i[None, :] * N1 + i[:, None], mask=(i[:, None] < N1) & (i[None, :] < N1), other=0.0)
    y = tl.dot(lt, x, input_precision=PREC)  # left^T X
    r = tl.load(r_ptr + j[:, None] * N2 + j[None, :], mask=(j[:, None] < N2) & (j[None, :] < N2), other=0.0)
    z = tl.dot(y, r, input_precision=PREC)  # (left^T X) right; padding rows/columns are 0
    if OUT_F:
        tl.store(f_ptr + t * (N1 * N2) + off, z, mask=mask)
    if ASYM:
        scale, u = _asym_params(tl.max(tl.max(z, axis=1), axis=0), tl.min(tl.min(z, axis=1), axis=0), clip, QMAX,
                                INTERP)
        q = _quant_asym(z, scale, u, QMAX, INTERP)
        tl.store(z_ptr + t, (u - (QMAX + 1.0)).to(tl.int32))
    else:
        amax = tl.max(tl.max(tl.abs(z), axis=1), axis=0)
        q, scale = _quantize(z, amax, clip, QMAX, INTERP)
    tl.store(q_ptr + t * (N1 * N2) + off, q, mask=mask)
    tl.store(s_ptr + t, scale)


def kron_quant(x: torch.Tensor, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor, clip: float, bits: int,
               asymmetric: bool = False, float_out: torch.Tensor | None = None):
    """FlatQuant's transform fused with the per-token quantizer: x [M, K] (K = n1 * n2) ->
    (q int8 [M, K], scale float32 [M, 1][, zero int32 [M, 1]]), bit-exact with
    reference.quant_act[_asym]_ref on the kernel's own float32 transform output (`float_out`)."""
    m, k = x.shape
    n1, n2 = left.shape[0], right.shape[0]
    if n1 * n2 != k:
        raise ValueError(f"rotquant Triton Kronecker: factors {n1} x {n2} do not make {k} features")
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    z = torch.empty(m, 1, dtype=torch.int32, device=x.device) if asymmetric else None
    if m:
        p1, p2 = max(16, triton.next_power_of_2(n1)), max(16, triton.next_power_of_2(n2))
        _kron_quant_kernel[(m,)](x, q, s, z if asymmetric else s, float_out if float_out is not None else s, diag,
                                 left, right, m, x.stride(0), float(clip), N1=n1, N2=n2, P1=p1, P2=p2,
                                 QMAX=_qmax(bits), ASYM=asymmetric, OUT_F=float_out is not None, INTERP=INTERPRET,
                                 PREC="ieee" if INTERPRET else "tf32x3", num_warps=4 if p1 * p2 <= 4096 else 8)
    return (q, s, z) if asymmetric else (q, s)


def no_transform_reason(t: InputTransform) -> str | None:
    """Why the kernel cannot serve the declared transform `t`, or None."""
    sizes = (t.block,) if t.type == "block_rotation" else t.factors
    if max(sizes) > MAX_TRANSFORM_BLOCK:
        return f"input transform {t.describe()}: blocks up to {MAX_TRANSFORM_BLOCK}"
    return None


def prepare(t: InputTransform, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's checkpoint transform tensors (this rank's part) -> the kernel's runtime tensors."""
    diag = tensors["diag"].float().contiguous()
    k = diag.shape[0]
    dev = diag.device
    if t.type == "block_rotation":
        return {"t_diag": diag, "t_src1": torch.arange(k, dtype=torch.int32, device=dev),
                "t_b1": tensors["rot1"].float().contiguous(), "t_src2": tensors["perm"].to(torch.int32).contiguous(),
                "t_b2": tensors["rot2"].float().contiguous()}
    n1, n2 = t.factors
    grid = torch.arange(k, dtype=torch.int32, device=dev).reshape(n1, n2)
    left, right = tensors["left"].float().contiguous(), tensors["right"].float().contiguous()
    # the fused kernel reads left/right; the two-stage form (W4A16's float transform) the same memory
    return {"t_diag": diag, "t_left": left, "t_right": right,
            "t_src1": grid.T.contiguous().reshape(k),  # [n2, n1] order: x[a * n2 + c] at c * n1 + a
            "t_b1": left.reshape(1, n1, n1), "t_src2": _back(n1, n2, dev), "t_b2": right.reshape(1, n2, n2)}


def _back(n1: int, n2: int, dev) -> torch.Tensor:
    """src2 of the Kronecker form: position i * n2 + c reads the stage-1 output at c * n1 + i."""
    i = torch.arange(n1, dtype=torch.int32, device=dev)[:, None]
    c = torch.arange(n2, dtype=torch.int32, device=dev)[None, :]
    return (c * n1 + i).reshape(n1 * n2)
