"""Where each architecture keeps the modules the calibrator touches, declared once.

The rotations need to know, for every decoder layer, which norm feeds which linears (the
norm's gain is folded into its readers, and R1 multiplies every reader of the residual stream
on the right), which linears write the residual stream (o_proj, down_proj: R1 on the left),
where the values live (v_proj rows / o_proj columns: R2) and what feeds the online Hadamard
(down_proj: R4). Everything else in `offline/` asks an `ArchMapping` instead of spelling out
Hugging Face attribute paths, so an architecture with the same roles under other names, or a
few extra modules the rotations leave alone, is one entry in `MAPPINGS` (as llm-compressor's
SpinQuant mappings do).

Paths are dotted attribute paths: model-level ones from the `...ForCausalLM` module, layer-level
ones from one decoder layer. The layer-level paths of the quantized linears are also their
names in the checkpoint (`model.layers.{i}.self_attn.q_proj.weight_packed`).
"""
from __future__ import annotations

import dataclasses
import operator

from torch import nn


@dataclasses.dataclass(frozen=True)
class ArchMapping:
    """The roles of one architecture's modules (see the module docstring)."""

    name: str
    # model level
    embeddings: str = "model.embed_tokens"
    rotary: str = "model.rotary_emb"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # decoder-layer level: each norm and the linears that read its output (the same input)
    attn_norm: str = "input_layernorm"
    attn_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_readers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    up_proj: str = "mlp.up_proj"  # the linear factor of SiLU(gate) * up (smoothing, offline/smooth.py)
    down_proj: str = "mlp.down_proj"
    # projections with a bias by default (rotated with their rows where R1 / R2 act on rows)
    biases: tuple[str, ...] = ()
    # modules the rotations leave alone, for the record (Qwen3's per-head q/k norms act on the
    # q_proj / k_proj outputs, which no rotation changes: R1 is absorbed on their input side)
    untouched: tuple[str, ...] = ()

    # ------------------------------------------------------------------ what the roles imply
    @property
    def quantized(self) -> tuple[str, ...]:
        """Layer-level paths of the linears the checkpoint stores as INT4 (every reader and writer)."""
        return (*self.attn_readers, self.o_proj, *self.mlp_readers, self.down_proj)

    @property
    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """GPTQ's "true-sequential" order: each group reads one input and is quantized after the
        groups before it, on inputs that already see their quantized weights."""
        return (self.attn_readers, (self.o_proj,), self.mlp_readers, (self.down_proj,))

    def layer_prefix(self, index: int) -> str:
        """The state-dict prefix of decoder layer `index` ('model.layers.3')."""
        return f"{self.layers}.{index}"

    # ------------------------------------------------------------------ lookups
    @staticmethod
    def get(root: nn.Module, path: str) -> nn.Module:
        return operator.attrgetter(path)(root)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.get(model, self.layers)

    def linears(self, layer: nn.Module, paths: tuple[str, ...]) -> list[nn.Linear]:
        return [self.get(layer, p) for p in paths]

    def quantized_linears(self, layer: nn.Module) -> list[tuple[str, nn.Linear]]:
        """[(layer-level path, module)] of the linears the checkpoint quantizes."""
        return [(p, self.get(layer, p)) for p in self.quantized]

    def check(self, model: nn.Module) -> None:
        """Every declared module exists: a wrong mapping fails here, naming the path, instead of
        later with an AttributeError deep in a rotation."""
        for path in (self.embeddings, self.layers, self.final_norm, self.lm_head):
            _must_have(model, path, f"{self.name}: the model")
        for i, layer in enumerate(self.decoder_layers(model)):
            for path in (self.attn_norm, self.mlp_norm, *self.quantized, *self.untouched):
                _must_have(layer, path, f"{self.name}: decoder layer {i}")


def _must_have(root: nn.Module, path: str, where: str) -> None:
    try:
        operator.attrgetter(path)(root)
    except AttributeError:
        raise ValueError(f"{where} has no module '{path}' (offline/arch.py mapping)") from None


LLAMA = ArchMapping("LlamaForCausalLM")
MAPPINGS: dict[str, ArchMapping] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": dataclasses.replace(LLAMA, name="MistralForCausalLM"),
    "Qwen2ForCausalLM": dataclasses.replace(LLAMA, name="Qwen2ForCausalLM", biases=LLAMA.attn_readers),
    "Qwen3ForCausalLM": dataclasses.replace(LLAMA, name="Qwen3ForCausalLM",
                                            untouched=("self_attn.q_norm", "self_attn.k_norm")),
}


def architecture_name(model_or_config) -> str:
    """config.architectures[0], or the model's class name for an in-memory model built from a
    config (transformers fills `architectures` only when it saves or loads a folder)."""
    config = getattr(model_or_config, "config", model_or_config)
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return archs[0]
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__
    raise ValueError(f"the model config names no architecture (model_type {getattr(config, 'model_type', '?')!r})")


def arch_of(model_or_config) -> ArchMapping:
    """The mapping of a model (or its config); ValueError naming the known ones otherwise."""
    name = architecture_name(model_or_config)
    try:
        return MAPPINGS[name]
    except KeyError:
        raise ValueError(f"unsupported architecture {name!r}: the calibrator knows "
                         f"{', '.join(MAPPINGS)} (offline/arch.py)") from None


def head_geometry(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from a HF config."""
    nq = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nq
    hd = getattr(config, "head_dim", None) or config.hidden_size // nq
    return nq, nkv, hd
