"""CpuInt8: the fast CPU kernel. Exact: the integer products of the quantized activations (INT4
or INT8) and the INT4 weights are summed exactly in int32, and the epilogue is the reference's
(kernels/reference.py), so a served layer computes what the reference computes, bit for bit,
given the same quantized activations.

Pieces (chosen by measurement on a 2-core x86 CPU, bench/RESULTS.md):
- Per-token quantization: the reference's own torch code, traced (not an opaque op), so that
  Inductor fuses it into the op that produces the activations (the RMSNorm, the SiLU-and-mul);
  its C++ is bit-exact with eager torch (tests/test_cpu_kernel.py checks it compiled).
- Integer GEMM, `torch.ops.rotquant.cpu_int_gemm` -> float32 accumulators:
  * M <= NATIVE_MAX_M tokens (decode) and every group-wise layer: the native C kernel
    (kernels/cpu_native.c, AVX512-VNNI / AVX-VNNI / AVX2 `vpmaddubsw` / portable C), reading the
    INT4 weights themselves (0.5 byte a weight); a library GEMM's fixed cost dominates there;
  * larger M, per-channel scales: oneDNN's s8 x s8 -> s32 matmul through torch
    (`torch.ops.onednn.qlinear_pointwise`, AMX or VNNI as the CPU has them) with unit scales and
    a float32 output, i.e. float(acc), exact while |acc| < 2^24, which `_onednn_exact` checks
    (else the native kernel runs); its int8 copy of the weights costs 1 byte a weight.
  Either way the op returns float(sum_k (q - za) * w) per channel (the zero point's correction
  za * sum_k w is exact in int32), or, with groups, fl32(sum_g sw[n, g] * acc_g) summed in
  float64 (the reference sums the same exact products in float64 in another order: both are
  the exact value within ~K * 2^-53 relative, so they round to the same float32 except within
  that distance of a rounding boundary, where they differ by one float32 ulp).
- Epilogue: traced, as the reference writes it: (acc * sa) * sw (groups: acc * sa), rounded
  once to the output dtype; Inductor fuses it into the next op.
- R4 (down_proj): `torch.ops.rotquant.cpu_hadamard`, the native fast Walsh-Hadamard (Sylvester
  butterflies and the dense +-1 core), float32 out; it differs from the reference's dense float32
  matmul in summation order only, as the CUDA kernel does.
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from vllm_rotquant.format import unpack_int4
from vllm_rotquant.kernels import cpu_native
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.hadamard import hadamard_factors, hadamard_matrix
from vllm_rotquant.kernels.linear_kernel import LinearSpec, RotQuantKernel

NATIVE_MAX_M = 6  # tokens up to which the native GEMM beats oneDNN's fixed cost (bench/RESULTS.md)
_FP32_EXACT = 2 ** 24

# ------------------------------------------------------------------------------ oneDNN weights
# oneDNN's prepacked weights are opaque (MKLDNN) tensors that Dynamo cannot trace: they stay in
# this registry, and the layer keeps an int64 handle (a buffer, so a cached compiled graph reads
# this process's value).
_onednn_lock = threading.Lock()
_onednn_weights: dict[int, torch.Tensor] = {}
_onednn_unit: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@functools.lru_cache(maxsize=None)
def onednn_unavailable_reason() -> str | None:
    """None if torch's oneDNN int8 matmul works here (checked exactly on a small product)."""
    try:
        w = torch.tensor([[3, -8, 7, 1], [-1, 2, -3, 4]], dtype=torch.int8)
        q = torch.tensor([[127, -128, 5, -7]], dtype=torch.int8)
        got = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None),
                                                 torch.ones(2), torch.zeros(2, dtype=torch.int64), None, 1.0, 0,
                                                 torch.float32, "none", [], "")
    except (AttributeError, RuntimeError) as e:
        return f"torch's oneDNN int8 matmul is unavailable ({e})"
    want = (q.double() @ w.double().T).float()
    if not torch.equal(got, want):
        return f"torch's oneDNN int8 matmul is not exact here ({got.tolist()} != {want.tolist()})"
    return None


def _register_onednn(w_int: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.onednn.qlinear_prepack(w_int.contiguous(), None)
    n = w_int.shape[0]
    with _onednn_lock:
        handle = len(_onednn_weights)
        _onednn_weights[handle] = packed
        if n not in _onednn_unit:
            _onednn_unit[n] = (torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int64))
    return torch.tensor([handle], dtype=torch.int64)


def _onednn_exact(k: int, bits: int, asymmetric: bool) -> bool:
    """|sum_k q w| (and with a zero point |sum (q - za) w|) stays below 2^24, where float32 holds
    every integer: oneDNN's float32 output is then the exact sum."""
    bound = k * 2 ** (bits - 1) * 8 * (2 if asymmetric else 1)
    return bound < _FP32_EXACT


# ------------------------------------------------------------------------------ custom ops
_lib = torch.library.Library("rotquant", "FRAGMENT")
_lib.define("cpu_int_gemm(Tensor q, Tensor? za, Tensor w_nib, Tensor w_onednn, Tensor w_scale, Tensor? w_sum, "
            "int n) -> Tensor")
_lib.define("cpu_hadamard(Tensor x, int block) -> Tensor")


def _cpu_int_gemm(q, za, w_nib, w_onednn, w_scale, w_sum, n):
    m = q.shape[0]
    handle = int(w_onednn[0])
    if handle >= 0 and m > NATIVE_MAX_M:
        ones, zeros = _onednn_unit[n]
        acc = torch.ops.onednn.qlinear_pointwise(q.contiguous(), 1.0, 0, _onednn_weights[handle], ones, zeros, None,
                                                 1.0, 0, torch.float32, "none", [], "")
        if za is not None:  # exact: every term is an integer below 2^24 (_onednn_exact)
            acc = acc - (za * w_sum.T).float()
        return acc
    return cpu_native.int_gemm(q, za, w_nib, n, w_scale, w_sum)


_lib.impl("cpu_int_gemm", _cpu_int_gemm, "CPU")


@torch.library.register_fake("rotquant::cpu_int_gemm")
def _(q, za, w_nib, w_onednn, w_scale, w_sum, n):
    return q.new_empty((q.shape[0], n), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _hadamard_factors(block: int) -> tuple[torch.Tensor, float]:
    """(+-1 core [A, A] float32, fl32(1/sqrt(block))) with hadamard_matrix(block) = kron(core, S)/sqrt."""
    factors = hadamard_factors(block)
    if factors is None:
        raise ValueError(f"hadamard: no Hadamard matrix of order {block}")
    core, pow2 = factors
    c = torch.sign(hadamard_matrix(block)[::pow2, ::pow2]).float().contiguous()
    assert c.shape == (core, core)
    return c, float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def _cpu_hadamard(x, block):
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"hadamard: last dimension {k} is not a multiple of block {block}")
    core, norm = _hadamard_factors(block)
    return cpu_native.hadamard(x.reshape(-1, k), block, core, norm).reshape(x.shape)


_lib.impl("cpu_hadamard", _cpu_hadamard, "CPU")


@torch.library.register_fake("rotquant::cpu_hadamard")
def _(x, block):
    return x.new_empty(x.shape, dtype=torch.float32)


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block Hadamard of x [..., K] (float32 out) with the native kernel (R3 on query/key too)."""
    return torch.ops.rotquant.cpu_hadamard(x, block)


# ------------------------------------------------------------------------------ the kernel
class CpuInt8Kernel(RotQuantKernel):
    name = "CpuInt8"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> str | None:
        if spec.device_type != "cpu":
            return "runs on the CPU only"
        if spec.act_bits not in (4, 8):
            return f"act_bits {spec.act_bits}: it multiplies 4- or 8-bit activations (W4A16 runs on the reference)"
        if spec.act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"activation dtype {spec.act_dtype} is not float32, bfloat16 or float16"
        if spec.in_features % 2:
            return f"odd input features ({spec.in_features})"
        if spec.group_size and spec.group_size % 8:
            return f"group_size {spec.group_size}: the native GEMM needs a multiple of 8"
        if spec.hadamard_block and hadamard_factors(spec.hadamard_block) is None:
            return f"no Hadamard matrix of order {spec.hadamard_block}"
        return cpu_native.unavailable_reason()

    def _uses_onednn(self) -> bool:
        s = self.spec
        return (s.groups == 1 and onednn_unavailable_reason() is None
                and _onednn_exact(s.in_features, s.act_bits, not s.act_symmetric))

    def prepare(self, w_packed: torch.Tensor, w_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        w_int = unpack_int4(w_packed)
        out = {"w_nib": cpu_native.pack_weights(w_int), "w_scale": w_scale.float().contiguous(),
               "w_onednn": _register_onednn(w_int) if self._uses_onednn() else torch.tensor([-1], dtype=torch.int64)}
        if not self.spec.act_symmetric:
            out["w_sum"] = ref.weight_sums_ref(w_int, self.spec.groups).contiguous()
        return out

    def rotate(self, x2: torch.Tensor) -> torch.Tensor:
        block = self.spec.hadamard_block
        return torch.ops.rotquant.cpu_hadamard(x2, block) if block else x2

    def quantize(self, y, vmax=None, vmin=None):
        s = self.spec
        if s.act_symmetric:
            amax = None if vmax is None else torch.maximum(vmax.abs(), vmin.abs())
            q, scale = ref.quant_act_ref(y, s.clip, s.act_bits, amax)
            return q, scale, None
        return ref.quant_act_asym_ref(y, s.clip, s.act_bits, vmax, vmin)

    def gemm(self, q, scale, zero, weights, out_dtype):
        sw = weights["w_scale"]
        acc = torch.ops.rotquant.cpu_int_gemm(q, zero, weights["w_nib"], weights["w_onednn"], sw,
                                              weights.get("w_sum"), self.spec.out_features)
        if self.spec.groups == 1:
            return (acc * scale * sw.T).to(out_dtype)
        return (acc * scale).to(out_dtype)


KERNEL = CpuInt8Kernel
