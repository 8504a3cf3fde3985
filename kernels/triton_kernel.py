"""Triton: the CUDA kernel, a thin wrapper over kernels/triton_quant.py (per-token quantization
fused with the online Hadamard), kernels/triton_transform.py (the declared input transforms, then
the same quantizer) and kernels/triton_gemm.py (the W4A4 GEMM), through their custom ops
(kernels/triton_ops.py). It declares what those kernels serve; a CUDA layer outside that is
refused at load (no per-call fallback)."""
from __future__ import annotations

import torch

from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import triton_ops, triton_quant, triton_transform
from vllm_rotquant.kernels.layout import gemm_group_supported, prepare_weight
from vllm_rotquant.kernels.linear_kernel import LinearSpec, RotQuantKernel


class TritonKernel(RotQuantKernel):
    name = "Triton"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> str | None:
        if spec.device_type != "cuda":
            return "runs on CUDA only"
        if spec.act_bits not in (4, 8, 16):
            return f"act_bits {spec.act_bits}: the Triton kernels quantize activations to 4 or 8 bits (16: none)"
        if spec.act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"activation dtype {spec.act_dtype}"
        k = spec.in_features
        if k % 8:
            return f"input features per rank ({k}) must be a multiple of 8 (kernel weight layout)"
        if spec.group_size and not gemm_group_supported(k, spec.group_size):
            return (f"group_size {spec.group_size} with {k} input features per rank: the GEMM takes powers of two "
                    f"in [32, 512] that divide K/2 = {k // 2}")
        if not spec.act_symmetric and k >= 65536:
            return f"K={k}: too large for the int32 accumulator with zero points (< 65536)"
        if spec.hadamard_block:
            reason = triton_quant.no_plan_reason(spec.hadamard_block, k)
            if reason:
                return reason
        if spec.transform:
            return triton_transform.no_transform_reason(spec.transform)
        return None

    def prepare(self, w_packed: torch.Tensor, w_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.spec.act_bits >= 16:  # W4A16 (an analysis mode): the de-quantized weight, cuBLAS
            return self.prepare_dequantized(w_packed, w_scale)
        w = prepare_weight(w_packed)
        out = {"w_q": w, "w_scale": w_scale.float().contiguous()}
        if not self.spec.act_symmetric:
            out["w_sum"] = ops.weight_sums(w, w_scale.shape[1])
        return out

    def prepare_transform(self, tensors):
        return triton_transform.prepare(self.spec.transform, tensors)

    def transform(self, x2, weights):
        return triton_ops.block_transform(x2, *(weights[f"t_{n}"] for n in ("diag", "src1", "b1", "src2", "b2")))

    def rotate(self, x2: torch.Tensor) -> torch.Tensor:
        block = self.spec.hadamard_block
        return triton_ops.hadamard(x2.float(), block) if block else x2

    def quantize(self, y, vmax=None, vmin=None):
        s = self.spec
        if vmax is None:
            return triton_ops.quantize_activations(y, s.act_bits, s.clip, None, s.act_symmetric)
        # a given range rides along as two extra columns, which set the kernels' own scale (and zero
        # point) and are then dropped: the arithmetic stays the quantizers' own
        k = y.shape[-1]
        q, sa, za = triton_ops.quantize_activations(torch.cat([y.float(), vmax, vmin], dim=-1), s.act_bits, s.clip,
                                                    None, s.act_symmetric)
        return q[:, :k].contiguous(), sa, za

    def quantize_input(self, x2, all_gather=None, weights=None):
        s = self.spec
        if all_gather is None and s.transform and s.transform.type == "kronecker":  # fused transform + quant
            args = (x2, weights["t_diag"], weights["t_left"], weights["t_right"], s.clip, s.act_bits)
            if s.act_symmetric:
                return (*triton_ops.kron_quant(*args), None)
            return triton_ops.kron_quant_asym(*args)
        if all_gather is None and not s.transform:  # the fused Hadamard + quantization kernel
            return triton_ops.quantize_activations(x2, s.act_bits, s.clip, s.hadamard_block, s.act_symmetric)
        return super().quantize_input(x2, all_gather, weights)

    def rotate_as_input(self, x2):
        return triton_ops.hadamard(x2, self.spec.hadamard_block)

    def gemm(self, q, scale, zero, weights, out_dtype):
        return triton_ops.w4a4_gemm(q, scale, weights["w_q"], weights["w_scale"], out_dtype, zero, weights.get("w_sum"))


KERNEL = TritonKernel
