"""The Triton (CUDA) kernels as torch custom ops, `torch.ops.rotquant.triton_*`, with fake
implementations for torch.compile. Semantics: kernels/reference.py (see triton_quant.py and
triton_gemm.py for what is bit-exact and what differs in float summation order).

These ops serve what the kernels serve and raise ValueError with the reason otherwise (4- or
8-bit activations, the kernel weight layout of kernels/layout.py, group sizes
`layout.gemm_group_supported` accepts, Hadamard blocks `triton_quant.hadamard_plan` can do):
there is no per-call fallback. TritonKernel (kernels/triton_kernel.py) checks the same rules once
per layer at load. The functions below take the reference ops' arguments (kernels/ops.py), so
tests and benchmarks can call either.
"""
from __future__ import annotations

import torch

from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import triton_gemm, triton_quant, triton_transform

__all__ = ["quant_act", "quant_act_asym", "hadamard_quant", "hadamard_quant_asym", "hadamard", "block_transform", "kron_quant", "kron_quant_asym", "w4a4_gemm",
           "weight_sums", "quantize_activations", "rotquant_linear"]

weight_sums = ops.weight_sums


def _fake_q(x, *args):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _fake_qz(x, *args):
    lead = (*x.shape[:-1], 1)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.int32))


@torch.library.custom_op("rotquant::triton_quant_act", mutates_args=(), device_types="cuda")
def quant_act(x: torch.Tensor, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization (bit-exact with the reference)."""
    return triton_quant.quant_act(x, clip, bits)


quant_act.register_fake(_fake_q)


@torch.library.custom_op("rotquant::triton_quant_act_asym", mutates_args=(), device_types="cuda")
def quant_act_asym(x: torch.Tensor, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric quantization (bit-exact with the reference)."""
    return triton_quant.quant_act(x, clip, bits, asymmetric=True)


quant_act_asym.register_fake(_fake_qz)


@torch.library.custom_op("rotquant::triton_hadamard_quant", mutates_args=(), device_types="cuda")
def hadamard_quant(x: torch.Tensor, block: int, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused block Hadamard + per-token quantization."""
    return triton_quant.hadamard_quant(x, block, clip, bits)


hadamard_quant.register_fake(_fake_q)


@torch.library.custom_op("rotquant::triton_hadamard_quant_asym", mutates_args=(), device_types="cuda")
def hadamard_quant_asym(x: torch.Tensor, block: int, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused block Hadamard + per-token asymmetric quantization."""
    return triton_quant.hadamard_quant(x, block, clip, bits, asymmetric=True)


hadamard_quant_asym.register_fake(_fake_qz)


@torch.library.custom_op("rotquant::triton_hadamard", mutates_args=(), device_types="cuda")
def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard along the last dim, in x's dtype (R3; R4 at tp > 1)."""
    return triton_quant.hadamard(x, block)


@hadamard.register_fake
def _(x, block):
    return torch.empty_like(x)


@torch.library.custom_op("rotquant::triton_w4a4_gemm", mutates_args=(), device_types="cuda")
def w4a4_gemm(qa: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
              out_dtype: torch.dtype, za: torch.Tensor | None = None,
              wsum: torch.Tensor | None = None) -> torch.Tensor:
    """int8 activations x INT4 weights in the kernel layout (int32 [N, K/8], made once by
    kernels.layout.prepare_weight); asymmetric activations pass za and the weight sums."""
    if w.dtype != torch.int32:
        raise ValueError(f"rotquant Triton GEMM: the weight must be in the kernel layout (int32 [N, K/8], "
                         f"made once at load by kernels.layout.prepare_weight), got {w.dtype} {tuple(w.shape)}")
    return triton_gemm.w4a4_gemm(qa, sa, w, sw, out_dtype, za=za, wsum=wsum)


@w4a4_gemm.register_fake
def _(qa, sa, w, sw, out_dtype, za=None, wsum=None):
    return qa.new_empty((qa.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("rotquant::triton_block_transform", mutates_args=(), device_types="cuda")
def block_transform(x: torch.Tensor, diag: torch.Tensor, src1: torch.Tensor, b1: torch.Tensor, src2: torch.Tensor,
                    b2: torch.Tensor) -> torch.Tensor:
    """A declared input transform in the kernel's two-stage form (triton_transform.prepare), float32 out."""
    return triton_transform.block_transform(x, diag, src1, b1, src2, b2)


@block_transform.register_fake
def _(x, diag, src1, b1, src2, b2):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("rotquant::triton_kron_quant", mutates_args=(), device_types="cuda")
def kron_quant(x: torch.Tensor, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor, clip: float,
               bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlatQuant's Kronecker transform fused with per-token symmetric quantization."""
    return triton_transform.kron_quant(x, diag, left, right, clip, bits)


kron_quant.register_fake(_fake_q)


@torch.library.custom_op("rotquant::triton_kron_quant_asym", mutates_args=(), device_types="cuda")
def kron_quant_asym(x: torch.Tensor, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor, clip: float,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlatQuant's Kronecker transform fused with per-token asymmetric quantization."""
    return triton_transform.kron_quant(x, diag, left, right, clip, bits, asymmetric=True)


kron_quant_asym.register_fake(_fake_qz)


def quantize_activations(x: torch.Tensor, act_bits: int, clip: float, hadamard_block: int | None,
                         act_symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[fused block Hadamard] + per-token quantization of x [M, K] -> (q, scale, zero or None)."""
    if act_symmetric:
        qa, sa = hadamard_quant(x, hadamard_block, clip, act_bits) if hadamard_block else quant_act(x, clip, act_bits)
        return qa, sa, None
    if hadamard_block:
        return hadamard_quant_asym(x, hadamard_block, clip, act_bits)
    return quant_act_asym(x, clip, act_bits)


def rotquant_linear(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                    act_bits: int, clip: float, hadamard_block: int | None, act_symmetric: bool = True,
                    wsum: torch.Tensor | None = None) -> torch.Tensor:
    """ops.rotquant_linear with the Triton kernels: w in the kernel layout, `wsum` given for
    asymmetric activations."""
    k = w.shape[1] * 8
    if x.shape[-1] != k:
        raise ValueError(f"rotquant linear: input has {x.shape[-1]} features, weight expects {k}")
    if not act_symmetric and wsum is None:
        raise ValueError("rotquant Triton linear: asymmetric activations need the weight sums (ops.weight_sums)")
    lead = x.shape[:-1]
    qa, sa, za = quantize_activations(x.reshape(-1, k), act_bits, clip, hadamard_block, act_symmetric)
    out = w4a4_gemm(qa, sa, w, sw, x.dtype, za, wsum)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, w.shape[0])
