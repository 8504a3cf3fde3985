"""Run a rotquant checkpoint in torch with exactly the arithmetic of the served model: every
quantized linear goes through `rotquant_linear` (the same custom ops vLLM's linear method
calls), R4 on the down_proj input, and R3 (per-head Hadamard on query and key after RoPE)
through a registered transformers attention function."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vllm_rotquant.format import (PACKED_SUFFIX, QUANTIZED_PROJECTIONS, SCALE_SUFFIX, TRANSFORM_OWNERS, TRANSFORM_PREFIX,
                                  CheckpointError, InputTransform, act_override, RotQuantSpec, load_checkpoint,
                                  unpack_int4)
from vllm_rotquant.format import is_rotquant_checkpoint  # noqa: F401  (the CLI imports it from here)
from vllm_rotquant.kernels import ops

log = logging.getLogger(__name__)

R3_ATTENTION = "rotquant_r3_sdpa"


class SimQuantLinear(nn.Module):
    """A quantized linear as the served model computes it (packed INT4 weights + scales, as the
    checkpoint holds them: a 7B model's codes unpacked to int8 would take 6 GiB more host memory
    while the clip search moves it to the GPU).

    On the CPU it runs the reference composition (`ops.rotquant_linear`), which defines the
    numerics. On another device it runs the kernel vLLM would choose there
    (kernels/linear_kernel.py: Triton on CUDA, same numerics up to the Hadamard's float summation
    order), prepared once per device; where that kernel cannot serve the layer, the reference
    runs there instead (logged once). `clip` may be changed between forwards (act_clip.search)."""

    def __init__(self, w_packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 act_bits: int, clip: float, hadamard_block: int | None, act_symmetric: bool = True,
                 transform: InputTransform | None = None, transform_tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.transform = transform  # a declared input transform, its tensors as buffers "t_<leaf>"
        for leaf, t in (transform_tensors or {}).items():
            self.register_buffer(f"t_{leaf}", t)
        self.register_buffer("w_packed", w_packed)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("w_sum", None if act_symmetric else ops.weight_sums(unpack_int4(w_packed), scale.shape[1]))
        self.act_bits, self.clip, self.hadamard_block = act_bits, clip, hadamard_block
        self.act_symmetric, self.clip_searched = act_symmetric, True
        self.out_features, self.in_features = w_packed.shape[0], 2 * w_packed.shape[1]
        self._prepared: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}
        self._unpacked: torch.Tensor | None = None  # the CPU reference's int8 codes, made on first use

    @property
    def w_int(self) -> torch.Tensor:
        """The int8 codes [out, in] (unpacked once and kept while the module stays where it is)."""
        if self._unpacked is None or self._unpacked.device != self.w_packed.device:
            self._unpacked = unpack_int4(self.w_packed)
        return self._unpacked

    def _transform_tensors(self) -> dict[str, torch.Tensor]:
        return {leaf: getattr(self, f"t_{leaf}") for leaf in self.transform.leaves} if self.transform else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            tr = (self.transform.type, self._transform_tensors()) if self.transform else None
            return ops.rotquant_linear(x, self.w_int, self.scale, self.bias, self.act_bits, self.clip,
                                       self.hadamard_block, self.act_symmetric, self.w_sum, tr)
        from vllm_rotquant.kernels.linear_kernel import LinearSpec, choose_kernel

        spec = LinearSpec(self.in_features, self.out_features,
                          None if self.scale.shape[1] == 1 else self.in_features // self.scale.shape[1],
                          self.act_bits, self.act_symmetric, self.clip, self.hadamard_block, False, x.device.type,
                          x.dtype, self.transform)
        cls, passed_over = choose_kernel(spec, fallback_to_reference=True)
        if passed_over and (cls.name, spec.describe()) not in _LOGGED:
            _LOGGED.add((cls.name, spec.describe()))
            log.warning("simulation on %s: kernel %s for a layer (%s), since %s", x.device.type, cls.name,
                        spec.describe(), "; ".join(passed_over))
        kernel = cls(spec)
        key = (cls.name, x.device)
        if key not in self._prepared:
            self._prepared[key] = kernel.prepare(self.w_packed.to(x.device), self.scale.to(x.device))
            if self.transform:
                self._prepared[key].update(kernel.prepare_transform(
                    {k: v.to(x.device) for k, v in self._transform_tensors().items()}))
        return kernel.apply(x, self._prepared[key], self.bias)


_LOGGED: set = set()


def _register_r3_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def r3_sdpa(module, query, key, value, attention_mask, **kwargs):
        block = module.config.rotquant_qk_block
        query = ops.hadamard(query, block)
        key = ops.hadamard(key, block)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(R3_ATTENTION, r3_sdpa)


def load_simulated(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16):
    """An HF model that simulates the rotquant checkpoint at `model_dir`, validated first by
    `format.load_checkpoint` (the checks the vLLM plugin runs at server start)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    ckpt, tensors = load_checkpoint(model_dir)
    spec = ckpt.spec

    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = _install_quant_linears(model, spec, tensors, dtype)
    rest = {k: v.to(dtype) for k, v in tensors.items() if k.rsplit(".", 1)[0] not in quantized}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [m for m in missing if "rotary_emb" not in m and m.rsplit(".", 1)[0] not in quantized]
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected tensor '{unexpected[0]}'")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # rebuild buffers off meta
    if spec.qk_block:
        _register_r3_attention()
        model.config.rotquant_qk_block = spec.qk_block
        model.set_attn_implementation(R3_ATTENTION)
    else:
        model.set_attn_implementation("sdpa")
    model.eval()
    model.rotquant_spec = spec
    return model


def _install_quant_linears(model, spec: RotQuantSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> set[str]:
    names = set()
    for i, layer in enumerate(model.model.layers):
        for parent in ("self_attn", "mlp"):
            owner = getattr(layer, parent)
            for name in QUANTIZED_PROJECTIONS:
                if not hasattr(owner, name):
                    continue
                prefix = f"model.layers.{i}.{parent}.{name}"
                bias = tensors.get(f"{prefix}.bias")
                bits, clip = spec.act_for(name)
                transform = spec.transform_for(name)
                leaves = None
                if transform:  # stored once under the input's first projection, shared by its readers
                    stem = f"model.layers.{i}.{TRANSFORM_OWNERS[transform.kind]}.{TRANSFORM_PREFIX}"
                    leaves = {leaf: tensors[stem + leaf] for leaf in transform.leaves}
                lin = SimQuantLinear(
                    tensors[f"{prefix}.{PACKED_SUFFIX}"], tensors[f"{prefix}.{SCALE_SUFFIX}"],
                    None if bias is None else bias.to(dtype), bits, clip,
                    spec.down_proj_block if name == "down_proj" else None, spec.act_symmetric, transform, leaves)
                # act_clip.search tunes the global clip only, not an act_overrides one
                lin.clip_searched = act_override(spec.act_overrides, name) is None
                setattr(owner, name, lin)
                names.add(prefix)
    return names
