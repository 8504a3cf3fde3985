"""CpuInt8: the fast CPU kernel. Exact: the integer products of the quantized activations (INT4
or INT8) and the INT4 weights are summed exactly in int32, and the epilogue is the reference's
(kernels/reference.py), so a served layer computes what the reference computes, bit for bit,
given the same quantized activations.

Pieces (chosen by measurement on a 2-core x86 CPU, bench/RESULTS.md):
- Per-token quantization: the reference's own torch code, traced (not an opaque op), so that
  Inductor fuses it into the op that produces the activations (the RMSNorm, the SiLU-and-mul);
  its C++ is bit-exact with eager torch (tests/test_cpu_kernel.py checks it compiled).
- R4 (down_proj): `torch.ops.rotquant.cpu_hadamard_quant[_asym]`, the native fast Walsh-Hadamard
  (Sylvester butterflies and the dense +-1 core) with the reference's quantization of each row
  in the same pass. The transform differs from the reference's dense float32 matmul in summation
  order only, as the CUDA kernel's does; the quantization is bit-exact given its output. At
  tp > 1 (a gathered range) the transform (`cpu_hadamard`) and the traced quantization run apart.
- GEMM, `torch.ops.rotquant.cpu_gemm`, with the reference's epilogue inside:
  * up to NATIVE_MAX_M tokens (decode) and for group-wise scales: the native VNNI kernel
    (kernels/cpu_native.c: AVX512-VNNI / AVX-VNNI / AVX2 `vpmaddubsw` / portable C), which reads
    the INT4 weights themselves (0.5 byte a weight);
  * more tokens, per-channel scales: the native AMX kernel (`tdpbsud` on tiles it unpacks from the
    same INT4 weights) where the CPU has AMX; without AMX, oneDNN's s8 matmul through torch
    (`torch.ops.onednn.qlinear_pointwise`, an int8 copy of the weights: 1 byte a weight more) with
    unit scales and a float32 output, i.e. float(acc), exact while |acc| < 2^24 (`_onednn_exact`,
    else the VNNI kernel runs), and the epilogue in torch.
- R3 (query/key, chosen by kernels.linear_kernel.hadamard_op): `cpu_hadamard_as_input`, the
  native transform stored in the input dtype (rounded once, as the reference op rounds it).
  Per channel the epilogue is fl(fl(float(acc) * sa) * sw) rounded once to the output dtype, the
  reference's bit for bit (acc already less za * sum_k w for asymmetric activations, exact in
  int32). With groups it is fl32(sum_g sw[n, g] * acc_g) * sa with the group sum in float64: the
  reference sums the same exact products in float64 in another order, so both are the exact value
  within ~K * 2^-53 relative and round to the same float32 except within that distance of a
  rounding boundary, where they differ by one float32 ulp (tests/test_cpu_kernel.py checks the
  bound).
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

NATIVE_MAX_M = 8  # tokens up to which the VNNI GEMM beats the AMX one (bench/RESULTS.md)
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
_lib.define("cpu_gemm(Tensor q, Tensor sa, Tensor? za, Tensor w_nib, Tensor w_onednn, Tensor w_scale, Tensor? w_sum, "
            "int n, ScalarType out_dtype) -> Tensor")
_lib.define("cpu_hadamard(Tensor x, int block) -> Tensor")
_lib.define("cpu_hadamard_as_input(Tensor x, int block) -> Tensor")
_lib.define("cpu_hadamard_quant(Tensor x, int block, float clip, int bits) -> (Tensor, Tensor)")
_lib.define("cpu_hadamard_quant_asym(Tensor x, int block, float clip, int bits) -> (Tensor, Tensor, Tensor)")


def _cpu_gemm(q, sa, za, w_nib, w_onednn, w_scale, w_sum, n, out_dtype):
    m = q.shape[0]
    if m > NATIVE_MAX_M and w_scale.shape[1] == 1:
        if cpu_native.has_amx():
            return cpu_native.gemm_amx(q, sa, za, w_nib, n, w_scale, w_sum, out_dtype)
        handle = int(w_onednn[0])
        if handle >= 0:
            ones, zeros = _onednn_unit[n]
            acc = torch.ops.onednn.qlinear_pointwise(q.contiguous(), 1.0, 0, _onednn_weights[handle], ones, zeros,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            if za is not None:  # exact: every term is an integer below 2^24 (_onednn_exact)
                acc = acc - (za * w_sum.T).float()
            return (acc * sa * w_scale.T).to(out_dtype)
    return cpu_native.gemm(q, sa, za, w_nib, n, w_scale, w_sum, out_dtype)


_lib.impl("cpu_gemm", _cpu_gemm, "CPU")


@torch.library.register_fake("rotquant::cpu_gemm")
def _(q, sa, za, w_nib, w_onednn, w_scale, w_sum, n, out_dtype):
    return q.new_empty((q.shape[0], n), dtype=out_dtype)


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


def _rows(x, block):
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"hadamard: last dimension {k} is not a multiple of block {block}")
    return x.reshape(-1, k), _hadamard_factors(block)


def _cpu_hadamard(x, block):
    x2, (core, norm) = _rows(x, block)
    return cpu_native.hadamard(x2, block, core, norm).reshape(x.shape)


def _cpu_hadamard_as_input(x, block):
    x2, (core, norm) = _rows(x, block)
    return cpu_native.hadamard(x2, block, core, norm, x.dtype).reshape(x.shape)


_NO_CORE = torch.ones(1, 1)


def _quant_rows(x, block):
    """_rows for the quantizing ops, where block 0 means no Hadamard (the per-token quantization
    alone, in the same native pass)."""
    return (x.reshape(-1, x.shape[-1]), (_NO_CORE, 1.0)) if block == 0 else _rows(x, block)


def _cpu_hadamard_quant(x, block, clip, bits):
    x2, (core, norm) = _quant_rows(x, block)
    q, s, _ = cpu_native.hadamard_quant(x2, block, core, norm, clip, bits, True)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def _cpu_hadamard_quant_asym(x, block, clip, bits):
    x2, (core, norm) = _quant_rows(x, block)
    q, s, z = cpu_native.hadamard_quant(x2, block, core, norm, clip, bits, False)
    lead = (*x.shape[:-1], 1)
    return q.reshape(x.shape), s.reshape(lead), z.reshape(lead)


_lib.impl("cpu_hadamard", _cpu_hadamard, "CPU")
_lib.impl("cpu_hadamard_as_input", _cpu_hadamard_as_input, "CPU")
_lib.impl("cpu_hadamard_quant", _cpu_hadamard_quant, "CPU")
_lib.impl("cpu_hadamard_quant_asym", _cpu_hadamard_quant_asym, "CPU")


@torch.library.register_fake("rotquant::cpu_hadamard")
def _(x, block):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("rotquant::cpu_hadamard_as_input")
def _(x, block):
    return torch.empty_like(x)


@torch.library.register_fake("rotquant::cpu_hadamard_quant")
def _(x, block, clip, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.register_fake("rotquant::cpu_hadamard_quant_asym")
def _(x, block, clip, bits):
    lead = (*x.shape[:-1], 1)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.int32))


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
        """Whether the many-token per-channel GEMM runs on oneDNN (CPUs without AMX), which needs
        its own int8 copy of the weights."""
        s = self.spec
        return (s.groups == 1 and not cpu_native.has_amx() and onednn_unavailable_reason() is None
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

    def quantize_input(self, x2, all_gather=None, weights=None):
        s = self.spec
        if all_gather is None:  # one native pass: [Hadamard +] quantization (block 0: none)
            block = s.hadamard_block or 0
            if s.transform:  # the declared transform (reference op, float32), then the native quantizer
                x2 = self.transform(x2, weights)
            if s.act_symmetric:
                q, scale = torch.ops.rotquant.cpu_hadamard_quant(x2, block, s.clip, s.act_bits)
                return q, scale, None
            return torch.ops.rotquant.cpu_hadamard_quant_asym(x2, block, s.clip, s.act_bits)
        return super().quantize_input(x2, all_gather, weights)

    def gemm(self, q, scale, zero, weights, out_dtype):
        return torch.ops.rotquant.cpu_gemm(q, scale, zero, weights["w_nib"], weights["w_onednn"], weights["w_scale"],
                                           weights.get("w_sum"), self.spec.out_features, out_dtype)


KERNEL = CpuInt8Kernel
