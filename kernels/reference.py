"""The numerics of rotquant, defined once: every kernel, the offline calibrator, the simulation
and the tests use these functions (packing lives in vllm_rotquant/format.py, the checkpoint format).

- Activations: per-token symmetric quantization, computed in float32:
  scale = clip * max|x| / qmax (qmax = 2^(bits-1) - 1; an all-zero row gets scale 1),
  q = clamp(round_half_even(x / scale), -qmax-1, qmax).
- Asymmetric activations (`act_symmetric: false`, the DartQuant/QuaRot scripts' choice): with
  hi = clip*max(max x, 0), lo = clip*min(min x, 0) and L = 2^bits - 1 levels,
  scale = (hi - lo) / L (1 for an all-zero row), u = round_half_even(-lo / scale),
  q = clamp(round_half_even(x / scale) + u, 0, L) - 2^(bits-1) and zero = u - 2^(bits-1): both
  signed, so q holds the same int8 range as the symmetric case and x ~ scale * (q - zero).
- Online Hadamard: block-diagonal, x.view(..., K/block, block) @ H_block in float32.
- Declared input transforms (format.InputTransform; DuQuant's block rotations with a
  permutation, FlatQuant's Kronecker pair), with their per-channel factor, in float32.
- GEMM: acc = sum_k qa[m,k] * w[n,k] exactly (integer), out = acc * sa[m] * sw[n] in float32,
  rounded once to the output dtype. With groups: out = sa[m] * sum_g acc_g[m,n] * sw[n,g].
  Asymmetric activations: acc (and each acc_g) first loses zero[m] * sum_k w[n,k] over its K
  range (an exact integer correction), the epilogue is then unchanged.

Integer products of INT4/INT8 values summed over K stay below 2^24 for the sizes we serve, so a
float32 matmul computes the integer accumulation exactly (float64 is used past that bound).
"""
from __future__ import annotations

import torch

from vllm_rotquant.kernels.hadamard import hadamard_matrix

_FP32_EXACT = 2 ** 24


def qmax(bits: int) -> int:
    """Largest signed level of a `bits`-bit symmetric quantizer (7 for INT4): range [-qmax-1, qmax]."""
    return 2 ** (bits - 1) - 1


def quant_act_ref(x: torch.Tensor, clip: float, bits: int,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q int8 [..., K], scale float32 [..., 1]). `amax` (float32 [..., 1]):
    the per-token max|x| to use instead of this row's own (the row-parallel layers at tp > 1
    quantize their columns with the range of the whole row)."""
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax * clip / qmax(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(xf / scale), -qmax(bits) - 1, qmax(bits)).to(torch.int8)
    return q, scale


def levels(bits: int) -> int:
    """Number of steps of a `bits`-bit asymmetric quantizer (15 for INT4)."""
    return 2 ** bits - 1


def quant_act_asym_ref(x: torch.Tensor, clip: float, bits: int, vmax: torch.Tensor | None = None,
                       vmin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q int8 [..., K], scale float32 [..., 1], zero int32 [..., 1]).
    `vmax`, `vmin` (float32 [..., 1]): the per-token range to use instead of this row's own."""
    xf = x.float()
    if vmax is None:
        vmax, vmin = xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True)
    hi = vmax.clamp_min(0) * clip
    lo = vmin.clamp_max(0) * clip
    scale = (hi - lo) / levels(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.clamp(torch.round(-lo / scale), 0, levels(bits))
    half = 2 ** (bits - 1)
    q = (torch.clamp(torch.round(xf / scale) + u, 0, levels(bits)) - half).to(torch.int8)
    return q, scale, (u - half).to(torch.int32)


def dequant_act_ref(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scale * (q - zero) of quantized activations (zero None: symmetric)."""
    if zero is None:
        return q.float() * scale
    return (q.float() - zero.float()) * scale


def fake_quant_act(x: torch.Tensor, clip: float, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Per-token quantize then dequantize x (what a served linear's input becomes), in x's dtype."""
    if symmetric:
        return dequant_act_ref(*quant_act_ref(x, clip, bits)).to(x.dtype)
    return dequant_act_ref(*quant_act_asym_ref(x, clip, bits)).to(x.dtype)


def quantize_weight_ref(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [N, K] = clamp(round_half_even(w / scale)) with scales [N, G] (G groups along K), in float64."""
    n, k = w.shape
    g = k // scales.shape[1]
    q = torch.round(w.double().reshape(n, -1, g) / scales.double()[..., None])
    return torch.clamp(q, -qmax(bits) - 1, qmax(bits)).reshape(n, k).to(torch.int8)


def weight_sums_ref(w_int: torch.Tensor, groups: int) -> torch.Tensor:
    """Per output channel (and group) sums of the integer weights: int32 [N, groups]."""
    n, k = w_int.shape
    return w_int.to(torch.int32).reshape(n, groups, k // groups).sum(-1, dtype=torch.int32)


def hadamard_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard along the last dim, float32 result."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"hadamard: last dimension {k} is not a multiple of block {block}")
    h = hadamard_matrix(block, torch.float32, x.device)
    return (x.float().reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def hadamard_quant_ref(x: torch.Tensor, block: int, clip: float, bits: int):
    """Fused online Hadamard + per-token quantization (reference: the two steps in sequence)."""
    return quant_act_ref(hadamard_ref(x, block), clip, bits)


def hadamard_quant_asym_ref(x: torch.Tensor, block: int, clip: float, bits: int):
    """Fused online Hadamard + per-token asymmetric quantization (reference)."""
    return quant_act_asym_ref(hadamard_ref(x, block), clip, bits)


def block_rotation_ref(x: torch.Tensor, diag: torch.Tensor, rot1: torch.Tensor, perm: torch.Tensor,
                       rot2: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DuQuant's served input transform (format.InputTransform), in `dtype` (float32 served;
    the offline absorption uses float64): y = ((x * diag) @ blockdiag(rot1))[:, perm] @ blockdiag(rot2)."""
    k = x.shape[-1]
    g, b, _ = rot1.shape
    if g * b != k or rot2.shape != rot1.shape or diag.shape != (k,) or perm.shape != (k,):
        raise ValueError(f"block_rotation: input of {k} features, diag {tuple(diag.shape)}, rot1 {tuple(rot1.shape)}, "
                         f"perm {tuple(perm.shape)}, rot2 {tuple(rot2.shape)}")
    lead = x.shape[:-1]
    t = (x.to(dtype).reshape(-1, k) * diag.to(dtype)).reshape(-1, g, b)
    t = torch.einsum("mgi,gij->mgj", t, rot1.to(dtype)).reshape(-1, k)[:, perm.long()]
    return torch.einsum("mgi,gij->mgj", t.reshape(-1, g, b), rot2.to(dtype)).reshape(*lead, k)


def kronecker_ref(x: torch.Tensor, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FlatQuant's served input transform, in `dtype`: y = (x * diag) @ (left (x) right), per
    token left^T X right with X = reshape(x * diag, [n1, n2])."""
    k = x.shape[-1]
    n1, n2 = left.shape[0], right.shape[0]
    if n1 * n2 != k or diag.shape != (k,):
        raise ValueError(f"kronecker: input of {k} features, diag {tuple(diag.shape)}, factors {n1} x {n2}")
    lead = x.shape[:-1]
    t = (x.to(dtype).reshape(-1, k) * diag.to(dtype)).reshape(-1, n1, n2)
    return (left.to(dtype).T @ t @ right.to(dtype)).reshape(*lead, k)


def input_transform_ref(x: torch.Tensor, kind: str, tensors: dict[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The declared input transform `kind` ("block_rotation" or "kronecker") with its tensors."""
    if kind == "block_rotation":
        return block_rotation_ref(x, tensors["diag"], tensors["rot1"], tensors["perm"], tensors["rot2"], dtype)
    if kind == "kronecker":
        return kronecker_ref(x, tensors["diag"], tensors["left"], tensors["right"], dtype)
    raise ValueError(f"unknown input transform {kind!r}")


def row_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (max, min) of x [..., K] in float32, keepdim: what the quantizers scale by."""
    xf = x.float()
    return xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True)


def quant_act_in_range_ref(x: torch.Tensor, vmax: torch.Tensor, vmin: torch.Tensor, clip: float, bits: int,
                           symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token quantization of x [..., K] with a given per-token range (max, min), e.g. the
    whole row's when x holds one rank's columns: (q, scale, zero or None)."""
    if symmetric:
        q, s = quant_act_ref(x, clip, bits, torch.maximum(vmax.abs(), vmin.abs()))
        return q, s, None
    return quant_act_asym_ref(x, clip, bits, vmax, vmin)


def _exact_matmul_dtype(k: int, a_bound: int, b_bound: int) -> torch.dtype:
    return torch.float32 if k * a_bound * b_bound < _FP32_EXACT else torch.float64


def int_matmul_ref(qa: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact integer qa [M, K] @ w[N, K].T as float (an integer-valued tensor)."""
    bound_a = int(qa.abs().max()) if qa.numel() else 0
    bound_w = int(w.abs().max()) if w.numel() else 0
    dt = _exact_matmul_dtype(qa.shape[-1], bound_a, bound_w)
    return qa.to(dt) @ w.to(dt).T


def w4a4_gemm_ref(qa: torch.Tensor, sa: torch.Tensor, w_int: torch.Tensor, sw: torch.Tensor,
                  out_dtype: torch.dtype, za: torch.Tensor | None = None,
                  wsum: torch.Tensor | None = None) -> torch.Tensor:
    """qa int8 [M, K], sa f32 [M, 1], w_int int8 [N, K] (unpacked), sw [N, G] -> [M, N] out_dtype.
    `za` int32 [M, 1]: the activations' zero points (asymmetric quantization), else None;
    `wsum`: `weight_sums_ref(w_int, G)` when the caller keeps it (summed here otherwise)."""
    m, k = qa.shape
    n, groups = sw.shape
    if za is not None and wsum is None:
        wsum = weight_sums_ref(w_int, groups)
    if groups == 1:
        acc = int_matmul_ref(qa, w_int)
        if za is not None:  # exact integers in float64; rounded to float32 once, as the kernel's int32
            acc = acc.double() - za.double() * wsum.double().T
        out = acc.float() * sa.float() * sw.float().T
    else:
        # sum_g sw[n,g] * (exact integer sum of group g) in float64, in one matmul over the
        # group-scaled weights: every product q * w * sw is exact there and the sums are good to
        # ~1e-16, so this is the exact value rounded once to float32 (a [G, M, N] tensor of group
        # sums, the literal form, made a SmolLM2 group-32 forward 6x slower on the CPU)
        g = k // groups
        ws = (w_int.double().reshape(n, groups, g) * sw.double()[:, :, None]).reshape(n, k)
        acc = qa.double() @ ws.T
        if za is not None:  # - za[m] * sum_g sw[n,g] * wsum[n,g]
            acc = acc - za.double() * (sw.double() * wsum.double()).sum(1)[None, :]
        out = acc.float() * sa.float()
    return out.to(out_dtype)


def dequant_weight_ref(w_int: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """int8 [N, K] x scale [N, G] -> weight [N, K] in `dtype`: the exact product (float64), rounded
    once (W4A16 serving, GPTQ's error feedback, the tests)."""
    n, k = w_int.shape
    groups = sw.shape[1]
    w = w_int.double().reshape(n, groups, k // groups) * sw.double()[:, :, None]
    return w.reshape(n, k).to(dtype)
