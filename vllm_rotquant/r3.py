"""R3: the per-head Hadamard on query and key after RoPE, inside the served model.

Hook: vLLM asks the quantization config for a method for every `Attention` layer
(`get_quant_method`), and calls that method's `create_weights(layer)` while the layer is built;
a `BaseKVCacheMethod` subclass is the documented kind of method for attention layers (it owns the
KV-cache scales). `RotQuantR3Method.create_weights` keeps the base behaviour and registers a
standard `torch.nn.Module` forward pre-hook on that layer, which replaces the `query` and `key`
arguments of `Attention.forward` by `H q` and `H k` (block-diagonal normalized Hadamard with block
= `online_hadamard.qk.block`, i.e. per head). The model's attention module calls
`self.attn(q, k, v)` after its rotary embedding, so the hook sees post-RoPE tensors. Nothing of
vLLM is patched; Dynamo traces module pre-hooks, so the compiled graph contains the op.

Since H is orthogonal, (H q)·(H k) = q·k: in exact arithmetic attention is unchanged (the keys in
the KV cache are rotated, the values are not). What changes is how the keys quantize in a
low-precision KV cache: H spreads the few large key channels of a head over all of them.

So R3 only runs where it can matter: when the layer's KV cache is quantized (`--kv-cache-dtype
fp8...`). With a 16/32-bit cache it would cost two Hadamards per layer and step for nothing but a
last-bit rounding difference, and is skipped. `ROTQUANT_R3=on` installs it anyway (the tests
use that to check the hook inside vLLM's compiled graph), `ROTQUANT_R3=auto` (or unset) is the
default.
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
from vllm.platforms import current_platform

import os

from vllm_rotquant.format import CheckpointError
from vllm_rotquant.kernels import ops  # noqa: F401  (registers torch.ops.rotquant.*)
from vllm_rotquant.kernels.linear_kernel import hadamard_op

log = init_logger("vllm.rotquant")

ENV_VAR = "ROTQUANT_R3"
UNQUANTIZED_KV = frozenset({"auto", "bfloat16", "float16", "half", "float32", "float"})


def r3_wanted(kv_cache_dtype: str) -> bool:
    """Whether R3 runs for an attention layer whose KV cache has `kv_cache_dtype` (vLLM's string):
    always with ROTQUANT_R3=on, else only when that cache is quantized."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on"):
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 'auto' (R3 only with a quantized KV "
                         "cache, the default) or 'on' (always)")
    return mode == "on" or str(kv_cache_dtype) not in UNQUANTIZED_KV


def make_r3_pre_hook(block: int, rotate=None):
    """A forward pre-hook (with_kwargs=True) for vLLM's Attention: query, key -> per-head Hadamard.
    `rotate(x)` computes it (kernels.linear_kernel.hadamard_op); default: the reference op."""
    if rotate is None:
        def rotate(x):
            return torch.ops.rotquant.hadamard(x, block)

    def r3_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
        args = list(args)
        for i, name in ((0, "query"), (1, "key")):
            if len(args) > i:
                if args[i] is not None:
                    args[i] = rotate(args[i])
            elif kwargs.get(name) is not None:
                kwargs[name] = rotate(kwargs[name])
        return tuple(args), kwargs

    return r3_pre_hook


class RotQuantR3Method(BaseKVCacheMethod):
    """KV-cache method of rotquant: the base KV-scale handling plus the R3 pre-hook."""

    def __init__(self, quant_config):
        super().__init__(quant_config)
        self.block = quant_config.spec.qk_block

    def create_weights(self, layer: torch.nn.Module):
        super().create_weights(layer)
        head_size = getattr(layer, "head_size", None)
        if head_size is None or head_size % self.block:
            raise CheckpointError(f"rotquant: online_hadamard.qk.block {self.block} does not divide the "
                                  f"head size {head_size} of attention layer '{getattr(layer, 'layer_name', '?')}'")
        kv = str(getattr(layer, "kv_cache_dtype", "auto"))
        if not r3_wanted(kv):
            log.info_once("rotquant: R3 skipped: the KV cache (%s) is not quantized, so the per-head "
                          "Hadamard on query/key would not change attention (set %s=on to run it anyway)",
                          kv, ENV_VAR)
            return
        rotate, kernel = hadamard_op(current_platform.device_type, self.block)
        layer.rotquant_r3_block = self.block
        layer._rotquant_r3_hook = layer.register_forward_pre_hook(make_r3_pre_hook(self.block, rotate), with_kwargs=True)
        log.info_once("rotquant: R3 per-head Hadamard (block %d) on query/key after RoPE, "
                      "as a forward pre-hook of every attention layer (kernel %s)", self.block, kernel)
