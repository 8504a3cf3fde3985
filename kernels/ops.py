"""The reference ops (`torch.ops.rotquant.*`): kernels/reference.py registered as torch custom
ops for every device, with fake (meta) implementations so that Dynamo traces them
(fullgraph) and Inductor keeps them opaque. They define the numerics; the fast kernels
(kernels/cpu_kernel.py, kernels/triton_kernel.py) register their own ops under their own names,
and a layer runs the kernel chosen for it at load (kernels/linear_kernel.py).

The GEMM takes weights in any layout: canonical packed uint8 [N, K/2], unpacked int8 [N, K], or
the Triton kernel's int32 [N, K/8] (kernels/layout.py); the reference unpacks.
"""
from __future__ import annotations

import torch

from vllm_rotquant.format import unpack_int4
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.layout import kernel_layout_to_int, prepare_weight, weight_in_features

__all__ = ["quant_act", "quant_act_asym", "quant_act_in_range", "quant_act_asym_in_range", "hadamard_quant",
           "hadamard_quant_asym", "hadamard", "block_rotation", "kronecker", "input_transform", "w4a4_gemm", "weight_sums", "rotquant_linear", "prepare_weight"]


def _weight_int(w: torch.Tensor) -> torch.Tensor:
    if w.dtype == torch.uint8:
        return unpack_int4(w)
    if w.dtype == torch.int32:  # kernel layout (prepare_weight)
        return kernel_layout_to_int(w)
    return w


def _weight_k(w: torch.Tensor) -> int:
    return weight_in_features(w)


@torch.library.custom_op("rotquant::quant_act", mutates_args=())
def quant_act(x: torch.Tensor, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of x [M, K] -> (int8 [M, K], float32 scale [M, 1])."""
    return ref.quant_act_ref(x, clip, bits)


@quant_act.register_fake
def _(x, clip, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("rotquant::quant_act_asym", mutates_args=())
def quant_act_asym(x: torch.Tensor, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric quantization of x [M, K] -> (int8 [M, K], float32 scale [M, 1],
    int32 zero [M, 1]); x ~ scale * (q - zero), see kernels/reference.py."""
    return ref.quant_act_asym_ref(x, clip, bits)


def _asym_fake(x, *args):
    lead = (*x.shape[:-1], 1)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.int32))


quant_act_asym.register_fake(_asym_fake)


@torch.library.custom_op("rotquant::quant_act_in_range", mutates_args=())
def quant_act_in_range(x: torch.Tensor, amax: torch.Tensor, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_act` with a given per-token max|x| (float32 [M, 1]): the range of the whole row
    when x holds one tensor-parallel rank's columns."""
    return ref.quant_act_ref(x, clip, bits, amax)


@quant_act_in_range.register_fake
def _(x, amax, clip, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("rotquant::quant_act_asym_in_range", mutates_args=())
def quant_act_asym_in_range(x: torch.Tensor, vmax: torch.Tensor, vmin: torch.Tensor, clip: float,
                            bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quant_act_asym` with a given per-token (max, min) (float32 [M, 1] each)."""
    return ref.quant_act_asym_ref(x, clip, bits, vmax, vmin)


quant_act_asym_in_range.register_fake(_asym_fake)


@torch.library.custom_op("rotquant::hadamard_quant", mutates_args=())
def hadamard_quant(x: torch.Tensor, block: int, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block Hadamard along K, then per-token quantization (fused on CUDA)."""
    return ref.hadamard_quant_ref(x, block, clip, bits)


@hadamard_quant.register_fake
def _(x, block, clip, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("rotquant::hadamard_quant_asym", mutates_args=())
def hadamard_quant_asym(x: torch.Tensor, block: int, clip: float, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block Hadamard along K, then per-token asymmetric quantization (fused on CUDA)."""
    return ref.hadamard_quant_asym_ref(x, block, clip, bits)


hadamard_quant_asym.register_fake(_asym_fake)


@torch.library.custom_op("rotquant::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard along the last dim, in x's dtype (R3 on query/key)."""
    return ref.hadamard_ref(x, block).to(x.dtype)


@hadamard.register_fake
def _(x, block):
    return torch.empty_like(x)


@torch.library.custom_op("rotquant::block_rotation", mutates_args=())
def block_rotation(x: torch.Tensor, diag: torch.Tensor, rot1: torch.Tensor, perm: torch.Tensor,
                   rot2: torch.Tensor) -> torch.Tensor:
    """DuQuant's declared input transform (kernels/reference.py), float32 out."""
    return ref.block_rotation_ref(x, diag, rot1, perm, rot2)


@block_rotation.register_fake
def _(x, diag, rot1, perm, rot2):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("rotquant::kronecker", mutates_args=())
def kronecker(x: torch.Tensor, diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """FlatQuant's declared input transform (kernels/reference.py), float32 out."""
    return ref.kronecker_ref(x, diag, left, right)


@kronecker.register_fake
def _(x, diag, left, right):
    return x.new_empty(x.shape, dtype=torch.float32)


def input_transform(x: torch.Tensor, kind: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The declared transform `kind` with its tensors `t` (leaf names of format.InputTransform)."""
    if kind == "block_rotation":
        return block_rotation(x, t["diag"], t["rot1"], t["perm"], t["rot2"])
    return kronecker(x, t["diag"], t["left"], t["right"])


@torch.library.custom_op("rotquant::w4a4_gemm", mutates_args=())
def w4a4_gemm(qa: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
              out_dtype: torch.dtype, za: torch.Tensor | None = None,
              wsum: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized activations x INT4 weights, exact integer accumulation, scaled epilogue.
    Asymmetric activations pass their zero points `za` (int32 [M, 1]) and the weights'
    per-channel (per-group) integer sums `wsum` from `weight_sums`, made once at load time."""
    return ref.w4a4_gemm_ref(qa, sa, _weight_int(w), sw, out_dtype, za, wsum)


@w4a4_gemm.register_fake
def _(qa, sa, w, sw, out_dtype, za=None, wsum=None):
    return qa.new_empty((qa.shape[0], w.shape[0]), dtype=out_dtype)


def weight_sums(w: torch.Tensor, groups: int) -> torch.Tensor:
    """int32 [N, groups] sums of the integer weights (any layout), the asymmetric GEMM's correction."""
    return ref.weight_sums_ref(_weight_int(w), groups).contiguous()


def quantize_activations(x: torch.Tensor, act_bits: int, clip: float, hadamard_block: int | None,
                         act_symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[online block Hadamard] + per-token quantization of x [M, K] -> (q, scale, zero or None)."""
    if act_symmetric:
        qa, sa = hadamard_quant(x, hadamard_block, clip, act_bits) if hadamard_block else quant_act(x, clip, act_bits)
        return qa, sa, None
    if hadamard_block:
        return hadamard_quant_asym(x, hadamard_block, clip, act_bits)
    return quant_act_asym(x, clip, act_bits)


def rotquant_linear(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                    act_bits: int, clip: float, hadamard_block: int | None, act_symmetric: bool = True,
                    wsum: torch.Tensor | None = None,
                    transform: tuple[str, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """The whole quantized linear, as vLLM's apply and the offline simulation both run it:
    [online block Hadamard, or the declared input `transform` (type, tensors)] -> per-token
    activation quantization -> INT4 GEMM (+ bias). Asymmetric activations need the weight sums (`weight_sums(w, sw.shape[1])`); computed here
    when not given."""
    k = _weight_k(w)
    if x.shape[-1] != k:
        raise ValueError(f"rotquant linear: input has {x.shape[-1]} features, weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if transform is not None:
        x2 = input_transform(x2, *transform)
        if act_bits >= 16:
            x2 = x2.to(x.dtype)
    if act_bits >= 16:
        if hadamard_block:
            x2 = hadamard(x2, hadamard_block)
        out = x2 @ ref.dequant_weight_ref(_weight_int(w), sw, x2.dtype).T
    else:
        qa, sa, za = quantize_activations(x2, act_bits, clip, hadamard_block, act_symmetric)
        if za is not None and wsum is None:
            wsum = weight_sums(w, sw.shape[1])
        out = w4a4_gemm(qa, sa, w, sw, x.dtype, za, wsum)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, w.shape[0])
