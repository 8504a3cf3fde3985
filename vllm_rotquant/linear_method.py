"""`RotQuantLinearMethod`: packed INT4 weights in vLLM's linear layers, W4A4 forward.

Weights are created with vLLM's parameter classes (`PackedvLLMParameter` for the uint8 [out, in/2]
packed weight, `ChannelQuantScaleParameter` / `GroupQuantScaleParameter` for the scales), so
vLLM's own loaders do the merging (qkv, gate_up) and the tensor-parallel sharding (column: rows of
the output, row: packed columns of the input). Every loader call is checked and recorded; after
loading, a tensor that never arrived or arrived with the wrong shape or dtype is a
`CheckpointError` naming it (vLLM itself only asserts, or leaves the memory uninitialised).

`apply` calls `rotquant_linear` from `vllm_rotquant.kernels.ops`, the composition the offline
simulation runs: [R4 block Hadamard on the down_proj input] -> per-token activation
quantization -> INT4 x INT4 GEMM with exact integer accumulation -> x act_scale[m] * w_scale[n].

Tensor parallelism and activation scales: a row-parallel layer (o_proj, down_proj) sees only
in/tp columns of each token on a rank. Quantizing them with a per-rank range would change the
numerics with the TP size, so at tp > 1 the per-token max and min are all-gathered over the TP
group (2M floats per layer) and every rank quantizes with the scale TP 1 would use. The R4 block must
then divide in/tp so that the online Hadamard stays rank-local.
"""
from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (LinearMethodBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, RowParallelLinear,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import (ChannelQuantScaleParameter, GroupQuantScaleParameter,
                                           PackedvLLMParameter)
from vllm.model_executor.utils import set_weight_attrs

from vllm_rotquant.format import PACKED_SUFFIX, SCALE_SUFFIX, CheckpointError, unpack_int4
from vllm_rotquant.kernels import ops as kops

# vLLM module names (after merging) whose weights are rotquant INT4
QUANTIZED_LAYER_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                         "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SCALE_DTYPE = torch.float32  # fp16/bf16/fp32 checkpoint scales all convert to it exactly


def prepare_runtime_weight(w_packed: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place where a loaded canonical weight (uint8 [N, K/2], scale [N, G]) becomes the
    layout the kernels run on: on CUDA the kernels' repack (`kernels.ops.prepare_weight`,
    int32 [N, K/8]); on CPU the torch reference runs fastest on int8 [N, K], unpacked once here."""
    if w_packed.device.type == "cpu":
        return unpack_int4(w_packed), w_scale
    return kops.prepare_weight(w_packed), w_scale.contiguous()


@register_weight_loader_v2_supported_method
class RotQuantLinearMethod(LinearMethodBase):
    """W4A4 linear method of a rotquant checkpoint (one instance per layer)."""

    def __init__(self, quant_config, prefix: str):
        self.quant_config = quant_config
        self.spec = quant_config.spec
        self.prefix = prefix
        self.hadamard_block = self.spec.down_proj_block if prefix.endswith("down_proj") else None
        self.global_act_scale = False  # set in create_weights for row-parallel layers at tp > 1

    # ------------------------------------------------------------------ weights
    def _checkpoint_names(self, layer) -> dict:
        """vLLM shard id -> checkpoint module name (e.g. 'k' -> '...self_attn.k_proj')."""
        stem, name = self.prefix.rsplit(".", 1) if "." in self.prefix else ("", self.prefix)
        parts = self.quant_config.packed_modules_mapping.get(name)
        join = (lambda n: f"{stem}.{n}") if stem else (lambda n: n)
        if isinstance(layer, QKVParallelLinear):
            parts = parts or ["q_proj", "k_proj", "v_proj"]
            return {sid: join(p) for sid, p in zip(("q", "k", "v"), parts)}
        if isinstance(layer, MergedColumnParallelLinear):
            parts = parts or [f"{name}[{i}]" for i in range(len(layer.output_sizes))]
            return {i: join(p) for i, p in enumerate(parts)}
        return {None: self.prefix}

    def _tracking_loader(self, layer, suffix: str, inner, dtypes: tuple[torch.dtype, ...]):
        names = layer._rotquant_ckpt_names

        def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            tensor = f"{names.get(shard, self.prefix)}.{suffix}"
            if loaded_weight.dtype not in dtypes:
                raise CheckpointError(f"rotquant: tensor '{tensor}' has dtype {loaded_weight.dtype}, "
                                      f"expected {' or '.join(map(str, dtypes))}")
            try:
                inner(param, loaded_weight, *args, **kwargs)
            except AssertionError:  # vLLM's loaders only assert on shapes
                raise CheckpointError(
                    f"rotquant: tensor '{tensor}' has shape {tuple(loaded_weight.shape)}, which does not fit "
                    f"layer '{self.prefix}' ({suffix} of shape {tuple(param.shape)} on this rank; "
                    f"check the checkpoint against config.json)") from None
            layer._rotquant_loaded.add((suffix, shard))

        return load

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        k = input_size_per_partition
        n = sum(output_partition_sizes)
        where = f"rotquant layer '{self.prefix}'"
        if k % 2:
            raise CheckpointError(f"{where}: input features per rank ({k}) must be even to pack INT4")
        group = self.spec.group_size
        if group and k % group:
            raise CheckpointError(f"{where}: group_size {group} does not divide the {k} input features per rank")
        if self.hadamard_block and k % self.hadamard_block:
            raise CheckpointError(
                f"{where}: online_hadamard.down_proj.block {self.hadamard_block} does not divide "
                f"intermediate_size/tp = {input_size}/{input_size // k}; this checkpoint supports "
                f"tp in {list(self.spec.tp_sizes)}")
        tp = getattr(layer, "tp_size", 1)
        self.global_act_scale = isinstance(layer, RowParallelLinear) and tp > 1 and self.spec.act_bits < 16

        layer._rotquant_ckpt_names = self._checkpoint_names(layer)
        layer._rotquant_loaded = set()
        loader = extra_weight_attrs.pop("weight_loader")
        packed = PackedvLLMParameter(
            data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=2,
            weight_loader=self._tracking_loader(layer, PACKED_SUFFIX, loader, (torch.uint8,)))
        scale_loader = self._tracking_loader(layer, SCALE_SUFFIX, loader,
                                             (torch.float16, torch.bfloat16, torch.float32))
        if group:
            scale = GroupQuantScaleParameter(data=torch.empty(n, k // group, dtype=SCALE_DTYPE),
                                             input_dim=1, output_dim=0, weight_loader=scale_loader)
        else:
            scale = ChannelQuantScaleParameter(data=torch.empty(n, 1, dtype=SCALE_DTYPE), output_dim=0,
                                               weight_loader=scale_loader)
        layer.register_parameter(PACKED_SUFFIX, packed)
        layer.register_parameter(SCALE_SUFFIX, scale)
        set_weight_attrs(packed, extra_weight_attrs)
        set_weight_attrs(scale, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        names = layer._rotquant_ckpt_names
        for suffix in (PACKED_SUFFIX, SCALE_SUFFIX):
            for shard, module in names.items():
                if (suffix, shard) not in layer._rotquant_loaded:
                    raise CheckpointError(f"rotquant: missing tensor '{module}.{suffix}' (layer '{self.prefix}')")
        scale = layer.weight_scale.data
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"rotquant: '{self.prefix}.{SCALE_SUFFIX}' holds non-finite values")
        w, s = prepare_runtime_weight(layer.weight_packed.data, scale)
        del layer.weight_packed, layer.weight_scale
        layer.weight_q = Parameter(w, requires_grad=False)
        layer.weight_scale = Parameter(s, requires_grad=False)
        # asymmetric activations: the GEMM subtracts zero[m] * (sum of this rank's weights per channel)
        layer.weight_sum = (Parameter(kops.weight_sums(w, s.shape[1]), requires_grad=False)
                            if not self.spec.act_symmetric and self.spec.act_bits < 16 else None)
        del layer._rotquant_loaded

    # ------------------------------------------------------------------ forward
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        if self.global_act_scale:
            return self._apply_tp_row(layer, x, bias)
        return kops.rotquant_linear(x, layer.weight_q, layer.weight_scale, bias, spec.act_bits,
                                    spec.act_clip_ratio, self.hadamard_block, spec.act_symmetric,
                                    layer.weight_sum)

    def _apply_tp_row(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Row-parallel at tp > 1: quantize the local columns with the per-token scale (and zero
        point) of the full row.

        The ops' quantizers derive the scale from the row's max and min, so the all-gathered global
        max and min ride along as two extra columns, which set the scale and are then dropped: the
        arithmetic stays the kernels' own (an op taking the scale directly would save the copy)."""
        from vllm.distributed import tensor_model_parallel_all_gather

        spec = self.spec
        k = x.shape[-1]
        lead = x.shape[:-1]
        xf = x.reshape(-1, k).float()  # what the ops' reference quantizes from (x.float())
        if self.hadamard_block:
            xf = torch.ops.rotquant.hadamard(xf, self.hadamard_block)  # float32 in, float32 out
        local = torch.cat([xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True)], dim=-1)
        both = tensor_model_parallel_all_gather(local, dim=-1)  # [M, 2*tp]: (max, min) per rank
        extremes = torch.cat([both[:, 0::2].amax(dim=-1, keepdim=True), both[:, 1::2].amin(dim=-1, keepdim=True)], dim=-1)
        qa, sa, za = kops.quantize_activations(torch.cat([xf, extremes], dim=-1), spec.act_bits, spec.act_clip_ratio,
                                               None, spec.act_symmetric)
        out = torch.ops.rotquant.w4a4_gemm(qa[:, :k].contiguous(), sa, layer.weight_q, layer.weight_scale, x.dtype,
                                           za, layer.weight_sum)
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, out.shape[-1])
