"""The reference kernel: the float64/exact torch reference (kernels/reference.py) through the
reference custom ops (kernels/ops.py), on any device. It defines the numerics; it serves a CPU
layer the fast CPU kernel cannot, and any layer when ROTQUANT_KERNEL=reference. Slow: every
call converts the int8 weights for an exact floating-point matmul."""
from __future__ import annotations

import torch

from vllm_rotquant.format import unpack_int4
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels.hadamard import hadamard_supported
from vllm_rotquant.kernels.linear_kernel import LinearSpec, RotQuantKernel


class ReferenceKernel(RotQuantKernel):
    name = "Reference"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> str | None:
        if spec.act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"activation dtype {spec.act_dtype} is not a float type"
        if spec.hadamard_block and not hadamard_supported(spec.hadamard_block):
            return f"no Hadamard matrix of order {spec.hadamard_block}"
        return None

    def prepare(self, w_packed: torch.Tensor, w_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.spec.act_bits >= 16:
            return self.prepare_dequantized(w_packed, w_scale)
        w_int = unpack_int4(w_packed)
        sw = w_scale.float().contiguous()
        out = {"w_int": w_int, "w_scale": sw}
        if not self.spec.act_symmetric:
            out["w_sum"] = ops.weight_sums(w_int, sw.shape[1])
        return out

    def rotate(self, x2: torch.Tensor) -> torch.Tensor:
        block = self.spec.hadamard_block
        return ops.hadamard(x2.float(), block) if block else x2

    def quantize(self, y, vmax=None, vmin=None):
        spec = self.spec
        if vmax is None:
            return ops.quantize_activations(y, spec.act_bits, spec.clip, None, spec.act_symmetric)
        if spec.act_symmetric:
            q, s = ops.quant_act_in_range(y, torch.maximum(vmax.abs(), vmin.abs()), spec.clip, spec.act_bits)
            return q, s, None
        return ops.quant_act_asym_in_range(y, vmax, vmin, spec.clip, spec.act_bits)

    def quantize_input(self, x2, all_gather=None, weights=None):
        spec = self.spec
        if all_gather is None and not spec.transform:  # the fused reference ops (Hadamard + quantization in one op)
            return ops.quantize_activations(x2, spec.act_bits, spec.clip, spec.hadamard_block, spec.act_symmetric)
        return super().quantize_input(x2, all_gather, weights)

    def gemm(self, q, scale, zero, weights, out_dtype):
        return ops.w4a4_gemm(q, scale, weights["w_int"], weights["w_scale"], out_dtype, zero, weights.get("w_sum"))

    def rotate_as_input(self, x2):
        return ops.hadamard(x2, self.spec.hadamard_block)


KERNEL = ReferenceKernel
