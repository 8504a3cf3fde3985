"""`RotQuantLinearMethod`: packed INT4 weights in vLLM's linear layers, W4A4 forward.

Weights are created with vLLM's parameter classes (`PackedvLLMParameter` for the uint8 [out, in/2]
packed weight, `ChannelQuantScaleParameter` / `GroupQuantScaleParameter` for the scales), so
vLLM's own loaders do the merging (qkv, gate_up) and the tensor-parallel sharding (column: rows of
the output, row: packed columns of the input). Every loader call is checked and recorded; after
loading, a tensor that never arrived or arrived with the wrong shape or dtype is a
`CheckpointError` naming it (vLLM itself only asserts, or leaves the memory uninitialised).

The kernel is chosen once per layer in `process_weights_after_loading`, as vLLM chooses its
mixed-precision kernels (kernels/linear_kernel.py: Triton on CUDA; on the CPU the CpuInt8 kernel,
else the reference); the kernel makes its own runtime tensors from the checkpoint's (registered on
the layer as `rq_<name>`) and `apply` only calls it: [R4 block Hadamard on the down_proj input] ->
per-token activation quantization -> INT4 x INT4 GEMM with exact integer accumulation ->
x act_scale[m] * w_scale[n]. A CUDA layer no fast kernel serves stops the server at startup with
every kernel's reason (ROTQUANT_KERNEL=reference runs the float64 reference instead).

Tensor parallelism and activation scales: a row-parallel layer (o_proj, down_proj) sees only
in/tp columns of each token on a rank. Quantizing them with a per-rank range would change the
numerics with the TP size, so at tp > 1 the per-token max and min are all-gathered over the TP
group (2M floats per layer) and every rank quantizes with the scale TP 1 would use. The R4 block must
then divide in/tp so that the online Hadamard stays rank-local.
"""
from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (LinearMethodBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, RowParallelLinear,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import (ChannelQuantScaleParameter, GroupQuantScaleParameter,
                                           PackedvLLMParameter)
from vllm.model_executor.utils import set_weight_attrs

from vllm_rotquant.format import (PACKED_SUFFIX, ROW_PARALLEL_KINDS, SCALE_SUFFIX, TRANSFORM_PREFIX, CheckpointError,
                                  check_transform_values)
from vllm_rotquant.kernels.linear_kernel import ENV_VAR, LinearSpec, choose_kernel, requested_kernel

log = init_logger("vllm.rotquant")

# vLLM module names (after merging) whose weights are rotquant INT4
QUANTIZED_LAYER_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                         "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SCALE_DTYPE = torch.float32  # fp16/bf16/fp32 checkpoint scales all convert to it exactly


@register_weight_loader_v2_supported_method
class RotQuantLinearMethod(LinearMethodBase):
    """W4A4 linear method of a rotquant checkpoint (one instance per layer)."""

    def __init__(self, quant_config, prefix: str):
        self.quant_config = quant_config
        self.spec = quant_config.spec
        self.prefix = prefix
        self.hadamard_block = self.spec.down_proj_block if prefix.endswith("down_proj") else None
        self.transform = self.spec.transform_for(prefix)  # a declared input transform (DuQuant, FlatQuant)
        self.global_act_scale = False  # set in create_weights for row-parallel layers at tp > 1
        self.kernel = None  # chosen in process_weights_after_loading
        self._weight_names: tuple[str, ...] = ()

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
        self.act_bits, self.act_clip = self.spec.act_for(self.prefix)  # act_overrides by input kind
        self.global_act_scale = isinstance(layer, RowParallelLinear) and tp > 1 and self.act_bits < 16
        self._shape = (k, n, params_dtype)

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
        if self.transform:
            self._create_transform(layer, input_size, k, tp)

    def _create_transform(self, layer, input_size: int, k: int, tp: int) -> None:
        """The declared input transform's tensors as parameters of this layer, with loaders that
        take the checkpoint's full tensors (stored once, under the input's first projection) and
        keep this rank's part: all of it for a column-parallel input; on a row-parallel one its
        K/tp channels (perm made rank-local, refused if it is not)."""
        t = self.transform
        row = t.kind in ROW_PARALLEL_KINDS
        where = f"rotquant layer '{self.prefix}'"
        t.check_width(k, f"{t.kind} input per rank" if row else f"{t.kind} input", tp if row else None,
                      where)
        rank = getattr(layer, "tp_rank", 0) if row else 0
        owner = next(iter(layer._rotquant_ckpt_names.values()))
        for leaf, (shape, dtypes) in t.tensors(input_size if row else k).items():
            local = (shape[0] // tp, *shape[1:]) if row and leaf in ("diag", "perm", "rot1", "rot2") else shape
            name = f"{TRANSFORM_PREFIX}{leaf}"
            param = Parameter(torch.empty(local, dtype=dtypes[0]), requires_grad=False)

            def load(param, loaded, *args, leaf=leaf, shape=shape, local=local, name=name, dtypes=dtypes, **kwargs):
                tensor = f"{owner}.{name}"
                if loaded.dtype not in dtypes or tuple(loaded.shape) != shape:
                    raise CheckpointError(f"rotquant: tensor '{tensor}' is {loaded.dtype} {tuple(loaded.shape)}, "
                                          f"expected {dtypes[0]} {shape}")
                if local != shape:  # this rank's channels; perm re-based to them (checked after loading)
                    loaded = loaded.narrow(0, rank * local[0], local[0])
                    if leaf == "perm":
                        loaded = loaded - rank * local[0]
                param.data.copy_(loaded)
                layer._rotquant_loaded.add((name, None))

            param.weight_loader = load
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        names = layer._rotquant_ckpt_names
        for suffix in (PACKED_SUFFIX, SCALE_SUFFIX):
            for shard, module in names.items():
                if (suffix, shard) not in layer._rotquant_loaded:
                    raise CheckpointError(f"rotquant: missing tensor '{module}.{suffix}' (layer '{self.prefix}')")
        transform = {}
        if self.transform:
            for leaf in self.transform.leaves:
                name = f"{TRANSFORM_PREFIX}{leaf}"
                if (name, None) not in layer._rotquant_loaded:
                    owner = next(iter(names.values()))
                    raise CheckpointError(f"rotquant: missing tensor '{owner}.{name}' (layer '{self.prefix}')")
                transform[leaf] = getattr(layer, name).data
                if transform[leaf].is_floating_point() and not torch.isfinite(transform[leaf]).all():
                    raise CheckpointError(f"rotquant: '{self.prefix}.{name}' holds non-finite values")
                delattr(layer, name)
            k_local = transform["diag"].shape[0]
            part = f" (this rank's {k_local} columns: a row-parallel input's permutation must stay within them)" \
                if self.transform.kind in ROW_PARALLEL_KINDS and getattr(layer, "tp_size", 1) > 1 else ""
            check_transform_values(self.transform, transform, k_local, (1,), f"rotquant layer '{self.prefix}'{part}")
        scale = layer.weight_scale.data
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"rotquant: '{self.prefix}.{SCALE_SUFFIX}' holds non-finite values")
        packed = layer.weight_packed.data
        k, n, act_dtype = self._shape
        spec = LinearSpec(in_features=k, out_features=n, group_size=self.spec.group_size, act_bits=self.act_bits,
                          act_symmetric=self.spec.act_symmetric, clip=self.act_clip,
                          hadamard_block=self.hadamard_block, global_act_range=self.global_act_scale,
                          device_type=packed.device.type, act_dtype=act_dtype, transform=self.transform)
        kernel_cls, passed_over = choose_kernel(spec)  # NoKernelError (a CheckpointError) names every reason
        self.kernel = kernel_cls(spec)
        weights = self.kernel.prepare(packed, scale)
        if transform:
            weights.update(self.kernel.prepare_transform(transform))
        del layer.weight_packed, layer.weight_scale, layer._rotquant_loaded
        for name, t in weights.items():
            layer.register_parameter(f"rq_{name}", Parameter(t, requires_grad=False))
        self._weight_names = tuple(weights)
        kind = self.prefix.rsplit(".", 1)[-1]
        if passed_over:
            log.warning_once("rotquant: kernel %s for the %s layers (%s), since %s", kernel_cls.name, kind,
                             spec.describe(), "; ".join(passed_over))
        elif requested_kernel() != "auto":
            log.warning_once("rotquant: kernel %s for the %s layers (%s), as %s asks", kernel_cls.name, kind,
                             spec.describe(), ENV_VAR)
        else:
            log.info_once("rotquant: kernel %s for the %s layers (%s)", kernel_cls.name, kind, spec.describe())

    # ------------------------------------------------------------------ forward
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        weights = {name: getattr(layer, f"rq_{name}") for name in self._weight_names}
        return self.kernel.apply(x, weights, bias, tensor_model_parallel_all_gather if self.global_act_scale else None)
