"""Checkpoint format v1 of rotquant: the one place that knows names, schema and packing.

Both the offline calibrator (writer) and the vLLM plugin (reader) import this module, so the
format cannot drift between them. See DESIGN.md section 3.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

QUANT_METHOD = "rotquant"
FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED_SUFFIX = "weight_packed"
SCALE_SUFFIX = "weight_scale"
ROTATIONS = ("none", "hadamard", "dartquant")
SUPPORTED_WEIGHT_BITS = (4,)
SUPPORTED_ACT_BITS = (4, 8, 16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CheckpointError(ValueError):
    """A rotquant checkpoint (or its quantization_config) is malformed; the message names what."""


@dataclasses.dataclass(frozen=True)
class RotQuantSpec:
    """The validated `quantization_config` of a rotquant checkpoint."""

    weight_bits: int = 4
    group_size: int | None = None
    act_bits: int = 4
    act_symmetric: bool = True
    act_clip_ratio: float = 0.9
    rotation: str = "hadamard"
    seed: int = 0
    down_proj_block: int | None = None  # R4: online block Hadamard on the down_proj input
    qk_block: int | None = None  # R3: per-head Hadamard on query/key after RoPE
    tp_sizes: tuple[int, ...] = (1,)
    ignore: tuple[str, ...] = ("lm_head",)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        online: dict[str, Any] = {}
        if self.down_proj_block:
            online["down_proj"] = {"block": self.down_proj_block, "tp_sizes": list(self.tp_sizes)}
        if self.qk_block:
            online["qk"] = {"block": self.qk_block}
        return {
            "quant_method": QUANT_METHOD,
            "version": FORMAT_VERSION,
            "weight_bits": self.weight_bits,
            "group_size": self.group_size,
            "act_bits": self.act_bits,
            "act_symmetric": self.act_symmetric,
            "act_clip_ratio": self.act_clip_ratio,
            "rotation": self.rotation,
            "seed": self.seed,
            "online_hadamard": online,
            "ignore": list(self.ignore),
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "quantization_config") -> "RotQuantSpec":
        """Validate a `quantization_config` dict; raise CheckpointError naming the bad field."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")

        def field(name: str, types, required: bool = True, default=None):
            if name not in cfg:
                if required:
                    raise CheckpointError(f"{source}: missing field '{name}'")
                return default
            value = cfg[name]
            allowed = types if isinstance(types, tuple) else (types,)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise CheckpointError(f"{source}.{name}: expected {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
            return value

        if field("quant_method", str) != QUANT_METHOD:
            raise CheckpointError(f"{source}.quant_method: expected '{QUANT_METHOD}', got {cfg['quant_method']!r}")
        version = field("version", int)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}.version: unknown rotquant format version {version!r} "
                f"(this build reads version {FORMAT_VERSION}); upgrade vllm-rotquant or re-quantize")
        weight_bits = field("weight_bits", int)
        if weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise CheckpointError(f"{source}.weight_bits: unsupported {weight_bits} (supported: {SUPPORTED_WEIGHT_BITS})")
        act_bits = field("act_bits", int)
        if act_bits not in SUPPORTED_ACT_BITS:
            raise CheckpointError(f"{source}.act_bits: unsupported {act_bits} (supported: {SUPPORTED_ACT_BITS})")
        group_size = field("group_size", (int, type(None)), required=False)
        if group_size is not None and (group_size <= 0 or group_size % 2):
            raise CheckpointError(f"{source}.group_size: must be a positive even integer or null, got {group_size}")
        clip = float(field("act_clip_ratio", (int, float)))
        if not (0.0 < clip <= 1.0) or math.isnan(clip):
            raise CheckpointError(f"{source}.act_clip_ratio: must be in (0, 1], got {clip}")
        rotation = field("rotation", str)
        if rotation not in ROTATIONS:
            raise CheckpointError(f"{source}.rotation: unknown {rotation!r} (known: {ROTATIONS})")
        online = field("online_hadamard", dict, required=False, default={})
        down = online.get("down_proj")
        qk = online.get("qk")
        down_block = _block(down, f"{source}.online_hadamard.down_proj")
        qk_block = _block(qk, f"{source}.online_hadamard.qk")
        tp_sizes = tuple(down.get("tp_sizes", [1])) if isinstance(down, dict) else (1,)
        if not all(isinstance(t, int) and t > 0 for t in tp_sizes):
            raise CheckpointError(f"{source}.online_hadamard.down_proj.tp_sizes: expected positive integers, got {tp_sizes}")
        ignore = field("ignore", list, required=False, default=["lm_head"])
        return cls(
            weight_bits=weight_bits,
            group_size=group_size,
            act_bits=act_bits,
            act_symmetric=field("act_symmetric", bool, required=False, default=True),
            act_clip_ratio=clip,
            rotation=rotation,
            seed=int(field("seed", int, required=False, default=0)),
            down_proj_block=down_block,
            qk_block=qk_block,
            tp_sizes=tp_sizes,
            ignore=tuple(ignore),
            calibration=field("calibration", dict, required=False, default={}),
        )

    def check_model_config(self, config: dict[str, Any], source: str = "config.json") -> None:
        """Check this spec against the model's shapes (architecture, R4 block vs TP, groups)."""
        archs = config.get("architectures") or []
        if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}.architectures: unsupported architecture {archs!r} "
                f"(rotquant supports {', '.join(SUPPORTED_ARCHITECTURES)})")
        inter = config.get("intermediate_size")
        if self.down_proj_block:
            for tp in self.tp_sizes:
                if inter % tp or (inter // tp) % self.down_proj_block:
                    raise CheckpointError(
                        f"{source}: online_hadamard.down_proj.block {self.down_proj_block} does not divide "
                        f"intermediate_size/tp = {inter}/{tp}")
        head_dim = head_dim_of(config)
        if self.qk_block and head_dim % self.qk_block:
            raise CheckpointError(f"{source}: online_hadamard.qk.block {self.qk_block} does not divide head_dim {head_dim}")
        if self.group_size:
            for name, width in (("hidden_size", config["hidden_size"]), ("intermediate_size", inter)):
                if width % self.group_size:
                    raise CheckpointError(f"{source}: group_size {self.group_size} does not divide {name} {width}")


def _block(entry: Any, source: str) -> int | None:
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("block"), int) or entry["block"] < 1:
        raise CheckpointError(f"{source}: expected {{\"block\": positive int}}, got {entry!r}")
    from vllm_rotquant.kernels.hadamard import hadamard_supported

    if not hadamard_supported(entry["block"]):
        raise CheckpointError(f"{source}.block: no Hadamard matrix of order {entry['block']}")
    return entry["block"]


def head_dim_of(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def read_spec(model_dir: str | Path) -> tuple[RotQuantSpec | None, dict[str, Any]]:
    """(spec or None for an unquantized model, config dict) of a model folder."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (is {model_dir} a Hugging Face model folder?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    qcfg = config.get("quantization_config")
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        return None, config
    spec = RotQuantSpec.from_dict(qcfg, source=f"{path}: quantization_config")
    spec.check_model_config(config, source=str(path))
    return spec, config


# ----------------------------------------------------------------------------- packing
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], shape [out, in] (in even) -> uint8 [out, in/2].

    Column 2j goes to the low nibble and 2j+1 to the high nibble, two's complement.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension must be even, got {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    u = q.to(torch.uint8) & 0x0F
    return u[..., 0::2] | (u[..., 1::2] << 4)


def signed_nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 bytes -> (low nibble, high nibble) as two's-complement int8 in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"expected uint8 packed INT4, got {packed.dtype}")
    lo = (packed & 0x0F).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    return lo - ((lo >= 8).to(torch.int8) << 4), hi - ((hi >= 8).to(torch.int8) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int8 [out, in] in [-8, 7] (inverse of pack_int4)."""
    lo, hi = signed_nibbles(packed)
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def expected_tensor_shapes(prefix: str, out_features: int, in_features: int,
                           group_size: int | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes a quantized linear `prefix` must have in the checkpoint."""
    groups = 1 if not group_size else in_features // group_size
    return {
        f"{prefix}.{PACKED_SUFFIX}": (out_features, in_features // 2),
        f"{prefix}.{SCALE_SUFFIX}": (out_features, groups),
    }


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each quantized projection of one decoder layer, from a HF config."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    hd = head_dim_of(config)
    nq = config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nq
    return {
        "self_attn.q_proj": (nq * hd, hidden),
        "self_attn.k_proj": (nkv * hd, hidden),
        "self_attn.v_proj": (nkv * hd, hidden),
        "self_attn.o_proj": (hidden, nq * hd),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def validate_tensors(spec: RotQuantSpec, config: dict[str, Any],
                     tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                     source: str) -> None:
    """Check names, shapes and dtypes of every quantized linear; raise CheckpointError on the first bad one."""
    n_layers = config["num_hidden_layers"]
    expected: dict[str, tuple[int, ...]] = {}
    for i in range(n_layers):
        for name, (out_f, in_f) in linear_shapes(config).items():
            expected.update(expected_tensor_shapes(f"model.layers.{i}.{name}", out_f, in_f, spec.group_size))
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor '{name}'")
        got_shape, got_dtype = tensors[name]
        if tuple(got_shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(got_shape)}, expected {shape}")
        if name.endswith(PACKED_SUFFIX) and got_dtype != torch.uint8:
            raise CheckpointError(f"{source}: tensor '{name}' has dtype {got_dtype}, expected torch.uint8")
        if name.endswith(SCALE_SUFFIX) and got_dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{source}: tensor '{name}' has dtype {got_dtype}, expected one of {SCALE_DTYPES}")
    for name in tensors:
        stem = name.rsplit(".", 1)[0]
        if stem.endswith(QUANTIZED_PROJECTIONS) and name.endswith(".weight"):
            raise CheckpointError(f"{source}: unexpected unquantized tensor '{name}' in a rotquant checkpoint")
        if name.endswith((PACKED_SUFFIX, SCALE_SUFFIX)) and name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor '{name}'")
