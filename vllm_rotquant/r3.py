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
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
from vllm.platforms import current_platform

from vllm_rotquant.format import CheckpointError
from vllm_rotquant.kernels import ops  # noqa: F401  (registers torch.ops.rotquant.*)
from vllm_rotquant.kernels.linear_kernel import hadamard_op

log = init_logger("vllm.rotquant")


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
        rotate, kernel = hadamard_op(current_platform.device_type, self.block)
        layer.rotquant_r3_block = self.block
        layer._rotquant_r3_hook = layer.register_forward_pre_hook(make_r3_pre_hook(self.block, rotate), with_kwargs=True)
        log.info_once("rotquant: R3 per-head Hadamard (block %d) on query/key after RoPE, "
                      "as a forward pre-hook of every attention layer (kernel %s)", self.block, kernel)
