"""CUDA implementations of the rotquant custom ops (Triton), registered on import.

`vllm_rotquant.kernels` imports this module when CUDA is available. The CPU keeps the torch
references of kernels/ops.py; semantics are identical (see kernels/reference.py).

Weight layout: the CUDA GEMM reads the kernel layout int32 [N, K/8] made once at load time by
`vllm_rotquant.kernels.ops.prepare_weight` (kernels/layout.py). A canonical uint8 [N, K/2] or
unpacked int8 [N, K] weight still works but is repacked on every call (logged once).
"""
from __future__ import annotations

import logging

import torch

from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels import triton_gemm, triton_quant
from vllm_rotquant.kernels.layout import gemm_group_supported, prepare_weight

logger = logging.getLogger(__name__)
_warned: set = set()


def _warn_once(key, msg, *args):
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


@ops.quant_act.register_kernel("cuda")
def _quant_act_cuda(x: torch.Tensor, clip: float, bits: int):
    if bits not in (4, 8):
        return ref.quant_act_ref(x, clip, bits)
    return triton_quant.quant_act(x, clip, bits)


@ops.hadamard_quant.register_kernel("cuda")
def _hadamard_quant_cuda(x: torch.Tensor, block: int, clip: float, bits: int):
    if bits not in (4, 8):
        return ref.hadamard_quant_ref(x, block, clip, bits)
    return triton_quant.hadamard_quant(x, block, clip, bits)


@ops.quant_act_asym.register_kernel("cuda")
def _quant_act_asym_cuda(x: torch.Tensor, clip: float, bits: int):
    if bits not in (4, 8):
        return ref.quant_act_asym_ref(x, clip, bits)
    return triton_quant.quant_act(x, clip, bits, asymmetric=True)


@ops.hadamard_quant_asym.register_kernel("cuda")
def _hadamard_quant_asym_cuda(x: torch.Tensor, block: int, clip: float, bits: int):
    if bits not in (4, 8):
        return ref.hadamard_quant_asym_ref(x, block, clip, bits)
    return triton_quant.hadamard_quant(x, block, clip, bits, asymmetric=True)


@ops.hadamard.register_kernel("cuda")
def _hadamard_cuda(x: torch.Tensor, block: int):
    return triton_quant.hadamard(x, block)


@ops.w4a4_gemm.register_kernel("cuda")
def _w4a4_gemm_cuda(qa: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
                    out_dtype: torch.dtype, za: torch.Tensor | None = None,
                    wsum: torch.Tensor | None = None):
    if w.dtype != torch.int32:
        _warn_once(("repack", w.dtype),
                   "rotquant: w4a4_gemm got a %s weight on CUDA; repacking on every call. Call "
                   "vllm_rotquant.kernels.ops.prepare_weight once at load time.", w.dtype)
        w = prepare_weight(w)
    if za is not None and wsum is None:
        _warn_once("wsum", "rotquant: asymmetric w4a4_gemm without weight sums; summing the weights on "
                   "every call. Pass ops.weight_sums(w, groups), made once at load time.")
        wsum = ops.weight_sums(w, sw.shape[1])
    k = qa.shape[1]
    groups = sw.shape[1]
    if groups > 1:
        g = k // groups
        if k % groups or not gemm_group_supported(k, g):
            _warn_once(("group", g, k), "rotquant: group size %d with K=%d has no Triton path; "
                       "using the torch reference", g, k)
            return ref.w4a4_gemm_ref(qa, sa, ops._weight_int(w), sw, out_dtype, za, wsum)
    return triton_gemm.w4a4_gemm(qa, sa, w, sw, out_dtype, za=za, wsum=wsum)
