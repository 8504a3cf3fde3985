"""Kernel selection for rotquant's quantized linears, the way vLLM picks its mixed-precision
kernels (vllm/model_executor/kernels/linear/mixed_precision: `MPLinearKernel.can_implement`,
`choose_mp_linear_kernel`): every kernel says which layers it can serve and, if not, why; a layer
gets the first kernel of its device's list that can serve it, once, when its weights are loaded;
that kernel makes its own runtime form of the weights (`prepare`) and runs the forward.

Order per device (fastest first):
    cuda: Triton (kernels/triton_kernel.py). Nothing else: a layer it cannot serve is refused at
          startup with its reason, unless the reference is asked for.
    cpu:  CpuInt8 (kernels/cpu_kernel.py), then Reference (kernels/reference_kernel.py).
`ROTQUANT_KERNEL`: unset or "auto": that order; "reference": the float64 reference for every
layer on every device (slow; it defines the numerics); a kernel name ("CpuInt8", "Triton"):
that kernel, or an error saying why it cannot serve a layer.

Nothing here imports vLLM: the offline simulation (offline/simulate.py) and the tests use the
same kernels.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import os
from typing import Callable, ClassVar

import torch

from vllm_rotquant.format import CheckpointError, InputTransform
from vllm_rotquant.kernels import reference as ref

__all__ = ["LinearSpec", "RotQuantKernel", "NoKernelError", "choose_kernel", "kernel_class", "KERNEL_ORDER",
           "ENV_VAR", "requested_kernel", "hadamard_op"]

ENV_VAR = "ROTQUANT_KERNEL"
# device type -> kernel names, fastest first ("Reference" is the fallback only where listed)
KERNEL_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("Triton",), "cpu": ("CpuInt8", "Reference")}
_MODULES = {"Triton": "vllm_rotquant.kernels.triton_kernel", "CpuInt8": "vllm_rotquant.kernels.cpu_kernel",
            "Reference": "vllm_rotquant.kernels.reference_kernel"}


class NoKernelError(CheckpointError):
    """No kernel can serve a quantized layer on this device (raised at load, with every reason)."""


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """One quantized linear on one tensor-parallel rank: what a kernel needs to know to say
    whether it can serve it."""

    in_features: int  # K on this rank
    out_features: int  # N on this rank
    group_size: int | None  # weight scales per group of K columns (None: per output channel)
    act_bits: int  # 4, 8, or 16 (activations not quantized: W4A16)
    act_symmetric: bool
    clip: float  # activation clip ratio
    hadamard_block: int | None  # R4: online block Hadamard on the input (down_proj only)
    global_act_range: bool  # row-parallel at tp > 1: the per-token range is all-gathered over TP
    device_type: str  # "cpu", "cuda"
    act_dtype: torch.dtype
    transform: InputTransform | None = None  # a declared online input transform (instead of R4)

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size if self.group_size else 1

    def describe(self) -> str:
        parts = [f"{self.in_features} -> {self.out_features}", f"W4A{self.act_bits}",
                 "symmetric" if self.act_symmetric else "asymmetric",
                 f"group {self.group_size}" if self.group_size else "per-channel",
                 str(self.act_dtype).replace("torch.", "")]
        if self.hadamard_block:
            parts.append(f"R4 block {self.hadamard_block}")
        if self.transform:
            parts.append(f"input {self.transform.describe()}")
        if self.global_act_range:
            parts.append("TP-global activation range")
        return ", ".join(parts)


class RotQuantKernel(abc.ABC):
    """A way to run a rotquant linear on one device. Subclasses declare what they can serve
    (`can_implement`), make the runtime weights once (`prepare`), and implement the forward in
    pieces that Dynamo traces with fullgraph=True (torch ops and `torch.ops.rotquant.*` custom
    ops only): `rotate` (the online Hadamard), `quantize` (per-token, optionally with a given
    range), `gemm` (integer GEMM + epilogue); `apply` composes them."""

    name: ClassVar[str]

    def __init__(self, spec: LinearSpec):
        reason = self.can_implement(spec)
        if reason is not None:
            raise NoKernelError(f"rotquant kernel {self.name} cannot serve {spec.describe()}: {reason}")
        self.spec = spec

    @classmethod
    @abc.abstractmethod
    def can_implement(cls, spec: LinearSpec) -> str | None:
        """None if this kernel serves `spec`, else the reason it does not."""

    @abc.abstractmethod
    def prepare(self, w_packed: torch.Tensor, w_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical checkpoint weights (uint8 [N, K/2], scale [N, G]) -> this kernel's runtime
        tensors (its weight layout, float32 scales, weight sums for asymmetric activations...),
        on the weights' device. Called once per layer at load."""

    def rotate(self, x2: torch.Tensor) -> torch.Tensor:
        """The online block Hadamard of x2 [M, K] (float32 out); x2 itself without one."""
        if self.spec.hadamard_block:
            raise NotImplementedError(f"{self.name}.rotate")
        return x2

    def prepare_transform(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The declared input transform's checkpoint tensors (leaf name -> tensor, this rank's
        part) -> runtime tensors, named "t_<leaf>" among the layer's weights. Called once at load."""
        return {f"t_{leaf}": t.contiguous() for leaf, t in tensors.items()}

    def transform(self, x2: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The declared input transform of x2 [M, K] (float32 out); the reference ops by default."""
        from vllm_rotquant.kernels import ops

        leaves = {k[2:]: v for k, v in weights.items() if k.startswith("t_")}
        return ops.input_transform(x2, self.spec.transform.type, leaves)

    def online_input(self, x2: torch.Tensor, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """What the quantizer reads: the declared transform, the R4 Hadamard, or x2 itself."""
        return self.transform(x2, weights) if self.spec.transform else self.rotate(x2)

    @abc.abstractmethod
    def quantize(self, y: torch.Tensor, vmax: torch.Tensor | None = None, vmin: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token quantization of y [M, K] -> (q int8, scale float32 [M, 1], zero int32 [M, 1]
        or None when symmetric); with (vmax, vmin) given (float32 [M, 1]) the tokens' range is
        taken from them instead of from y (kernels/reference.py: quant_act_in_range_ref)."""

    @abc.abstractmethod
    def gemm(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
             weights: dict[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """Quantized activations x INT4 weights: exact integer accumulation, the reference's
        epilogue -> [M, N] out_dtype."""

    def quantize_input(self, x2: torch.Tensor, all_gather: Callable | None = None,
                       weights: dict[str, torch.Tensor] | None = None):
        """[online Hadamard or declared transform] + per-token quantization of x2 [M, K].
        `all_gather(t, dim)` (the TP group's) makes the range that of the whole row: each rank's
        per-token (max, min) are gathered (2M floats) and every rank quantizes with the scale
        tp = 1 would use."""
        y = self.online_input(x2, weights)
        if all_gather is None:
            return self.quantize(y)
        vmax, vmin = ref.row_range(y)
        both = all_gather(torch.cat([vmax, vmin], dim=-1), -1)  # [M, 2 * tp]: (max, min) per rank
        return self.quantize(y, both[:, 0::2].amax(dim=-1, keepdim=True), both[:, 1::2].amin(dim=-1, keepdim=True))

    def prepare_dequantized(self, w_packed: torch.Tensor, w_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """W4A16 (act_bits 16, no activation quantizer): the weight de-quantized once, at load."""
        from vllm_rotquant.format import unpack_int4

        return {"w_dequant": ref.dequant_weight_ref(unpack_int4(w_packed), w_scale.float(), self.spec.act_dtype)}

    def rotate_as_input(self, x2: torch.Tensor) -> torch.Tensor:
        """The online block Hadamard of x2 in x2's dtype (W4A16's input); kernels serving W4A16
        with R4 implement it."""
        raise NotImplementedError(f"{self.name}.rotate_as_input")

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
              all_gather: Callable | None = None) -> torch.Tensor:
        """The whole linear: x [..., K] -> [..., N] in x's dtype. W4A16: the rotated input times
        the de-quantized weight (`prepare_dequantized`), as ops.rotquant_linear."""
        k, n = self.spec.in_features, self.spec.out_features
        if x.shape[-1] != k:
            raise ValueError(f"rotquant linear: input has {x.shape[-1]} features, weight expects {k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if self.spec.act_bits >= 16:
            if self.spec.transform:
                x2 = self.transform(x2, weights).to(x.dtype)
            elif self.spec.hadamard_block:
                x2 = self.rotate_as_input(x2)
            out = x2 @ weights["w_dequant"].T
        else:
            q, s, z = self.quantize_input(x2, all_gather, weights)
            out = self.gemm(q, s, z, weights, x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, n)


def requested_kernel() -> str:
    """The `ROTQUANT_KERNEL` choice: "auto", "reference" or a kernel name."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value or value.lower() == "auto":
        return "auto"
    if value.lower() == "reference":
        return "Reference"
    if value not in _MODULES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected 'auto', 'reference' or one of {sorted(_MODULES)}")
    return value


@functools.lru_cache(maxsize=None)
def kernel_class(name: str) -> type[RotQuantKernel] | str:
    """The kernel class called `name`, or the reason it cannot be imported here (e.g. no Triton)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as e:
        return f"cannot be imported ({e})"
    return getattr(module, "KERNEL")


@functools.lru_cache(maxsize=None)
def _choose(spec: LinearSpec, choice: str, fallback_to_reference: bool) -> tuple[type[RotQuantKernel], tuple[str, ...]]:
    if choice == "auto":
        names = KERNEL_ORDER.get(spec.device_type, ())
        if fallback_to_reference and "Reference" not in names:
            names = (*names, "Reference")
    else:
        names = (choice,)
    reasons = []
    for name in names:
        cls = kernel_class(name)
        reason = cls if isinstance(cls, str) else cls.can_implement(spec)
        if reason is None:
            return cls, tuple(reasons)
        reasons.append(f"{name}: {reason}")
    if not names:
        reasons.append(f"no kernels for device type '{spec.device_type}'")
    hint = ("" if choice == "Reference" else
            f"; set {ENV_VAR}=reference to run the (slow) float64 reference kernel instead")
    raise NoKernelError(f"rotquant: no kernel can serve a layer ({spec.describe()}) on {spec.device_type}: "
                        + "; ".join(reasons) + hint)


def choose_kernel(spec: LinearSpec, *, fallback_to_reference: bool = False
                  ) -> tuple[type[RotQuantKernel], tuple[str, ...]]:
    """The kernel class for `spec` and the reasons the kernels before it were passed over.
    `fallback_to_reference`: end the device's list with the reference (the offline simulation;
    serving on CUDA never does). Raises NoKernelError with every kernel's reason."""
    return _choose(spec, requested_kernel(), fallback_to_reference)


def hadamard_op(device_type: str, block: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The per-head Hadamard of R3 (query and key after RoPE) for a device: (x -> H x in x's
    dtype, the kernel that runs it). The same choice as for the linears: Triton on CUDA (raises
    NoKernelError if it cannot), the native CPU kernel on the CPU, else (or with
    ROTQUANT_KERNEL=reference) the reference op."""
    choice = requested_kernel()
    if choice != "Reference":
        if device_type == "cuda":
            cls = kernel_class("Triton")
            reason = cls if isinstance(cls, str) else _triton_hadamard_reason(block)
            if reason is None:
                return (lambda x: torch.ops.rotquant.triton_hadamard(x, block)), "Triton"
            raise NoKernelError(f"rotquant: no kernel for the R3 Hadamard (block {block}) on cuda: Triton: {reason}; "
                                f"set {ENV_VAR}=reference to run the reference instead")
        if device_type == "cpu":
            cls = kernel_class("CpuInt8")
            from vllm_rotquant.kernels import cpu_native

            if not isinstance(cls, str) and cpu_native.unavailable_reason() is None:
                return (lambda x: torch.ops.rotquant.cpu_hadamard_as_input(x, block)), "CpuInt8"
    return (lambda x: torch.ops.rotquant.hadamard(x, block)), "Reference"


def _triton_hadamard_reason(block: int) -> str | None:
    from vllm_rotquant.kernels import triton_quant

    return triton_quant.no_plan_reason(block, block)
