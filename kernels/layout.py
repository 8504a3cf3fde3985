"""Weight layouts the CUDA kernels read, and the conversions from the canonical on-disk packing.

Canonical (checkpoint, DESIGN.md section 3): uint8 [N, K/2], column 2j in the low nibble and
2j+1 in the high nibble. Loading that in a GEMM forces stride-2 gathers or an in-register
interleave, so the CUDA path repacks once at load time into the *half-split* kernel layout:

    int32 [N, K/8]  (viewed as bytes: [N, K/2]); byte j of row n holds
        w[n, j]       in the low nibble  (j < K/2)
        w[n, K/2 + j] in the high nibble

A GEMM tile that loads packed bytes [BN, BKP] at byte offset kp then splits them, in registers,
into two int8 tiles: low nibbles <-> activations k in [kp, kp+BKP), high nibbles <-> k in
[K/2+kp, K/2+kp+BKP). Both activation tiles are contiguous, for any tile size, and the unpack is
two 32-bit bit operations per 8 weights (`(b << 4) & 0xF0` and `b & 0xF0` give 16x the signed
nibble in each byte; the kernel divides the int32 accumulator by 16 exactly).

The dtype int32 marks the layout: canonical is uint8 [N, K/2], unpacked is int8 [N, K], kernel
layout is int32 [N, K/8]; every op accepts all three (the reference unpacks).
"""
from __future__ import annotations

import torch

from vllm_rotquant.format import signed_nibbles, unpack_int4

__all__ = ["prepare_weight", "is_kernel_layout", "kernel_layout_to_int", "weight_in_features"]


def _to_int4(w: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] or int8 [N, K] -> int8 [N, K] in [-8, 7]."""
    if w.dtype == torch.uint8:
        return unpack_int4(w)
    if w.dtype == torch.int8:
        return w
    if w.dtype == torch.int32:
        return kernel_layout_to_int(w)
    raise TypeError(f"weight: expected uint8 (packed), int8 (unpacked) or int32 (kernel layout), got {w.dtype}")


def is_kernel_layout(w: torch.Tensor) -> bool:
    return w.dtype == torch.int32


def gemm_group_supported(k: int, group: int) -> bool:
    """Whether the Triton GEMM takes group-wise scales of `group` along K: a power of two in
    [32, 512] dividing K/2 (this layout pairs column k with column k + K/2 in one byte, so a group
    must not straddle the two halves)."""
    return 32 <= group <= 512 and group & (group - 1) == 0 and k % 2 == 0 and (k // 2) % group == 0


def weight_in_features(w: torch.Tensor) -> int:
    """K of a weight in any of the three layouts."""
    if w.dtype == torch.uint8:
        return w.shape[1] * 2
    if w.dtype == torch.int32:
        return w.shape[1] * 8
    return w.shape[1]


def prepare_weight(w: torch.Tensor) -> torch.Tensor:
    """Canonical packed uint8 [N, K/2] (or unpacked int8 [N, K]) -> kernel layout int32 [N, K/8].

    Done once at load time (vLLM: process_weights_after_loading), on the weight's device.
    K must be a multiple of 8. Idempotent on a tensor already in kernel layout.
    """
    if w.dtype == torch.int32:
        return w
    if w.dim() != 2:
        raise ValueError(f"prepare_weight: expected a 2-D weight, got shape {tuple(w.shape)}")
    q = _to_int4(w)
    n, k = q.shape
    if k % 8:
        raise ValueError(f"prepare_weight: in_features {k} must be a multiple of 8")
    kh = k // 2
    b = (q[:, :kh].to(torch.int32) & 0x0F) | ((q[:, kh:].to(torch.int32) & 0x0F) << 4)
    return b.to(torch.uint8).contiguous().view(torch.int32)


def kernel_layout_to_int(w: torch.Tensor) -> torch.Tensor:
    """Kernel layout int32 [N, K/8] -> int8 [N, K] (inverse of prepare_weight)."""
    if w.dtype != torch.int32:
        raise TypeError(f"kernel_layout_to_int expects int32, got {w.dtype}")
    lo, hi = signed_nibbles(w.contiguous().view(torch.uint8))
    return torch.cat((lo, hi), dim=1)
