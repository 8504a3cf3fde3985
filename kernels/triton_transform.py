"""Triton: the declared input transforms (format.InputTransform) before the per-token quantizer.

Both types run as two stages of one kernel, each a gather of columns followed by a block-diagonal
matmul:  y1 = ((x * diag)[:, src1]) @ blockdiag(B1),  y = y1[:, src2] @ blockdiag(B2).
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
from vllm_rotquant.kernels.triton_quant import INTERPRET


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
    return {"t_diag": diag, "t_src1": grid.T.contiguous().reshape(k),  # [n2, n1] order: x[a * n2 + c] at c * n1 + a
            "t_b1": tensors["left"].float().reshape(1, n1, n1).contiguous(),
            "t_src2": _back(n1, n2, dev),
            "t_b2": tensors["right"].float().reshape(1, n2, n2).contiguous()}


def _back(n1: int, n2: int, dev) -> torch.Tensor:
    """src2 of the Kronecker form: position i * n2 + c reads the stage-1 output at c * n1 + i."""
    i = torch.arange(n1, dtype=torch.int32, device=dev)[:, None]
    c = torch.arange(n2, dtype=torch.int32, device=dev)[None, :]
    return (c * n1 + i).reshape(n1 * n2)
