"""Checkpoint format v1 of rotquant: the one place that knows names, schema and packing, and the
one place that reads and writes a checkpoint's config.json and safetensors files.

Both the offline calibrator (writer, `rotquant eval`'s simulation) and the vLLM plugin (reader, at
server start) import this module, so the format and its checks cannot drift between them. See
DESIGN.md section 3. `validate_checkpoint` is the one validation both run before any weight is
used: config.json, the quantization_config and its TP-divisibility rules, every safetensors
header (bounded, fully covering its file), every tensor's name, shape and dtype against the
model config, and finite values in every floating tensor. Each refusal is one `CheckpointError`
line naming the file and the tensor or field.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import socket
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

QUANT_METHOD = "rotquant"
FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# per-head RMSNorms on query and key before RoPE (kept as they are: no rotation acts on what they normalize)
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM",)
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED_SUFFIX = "weight_packed"
SCALE_SUFFIX = "weight_scale"
ROTATIONS = ("none", "hadamard", "dartquant", "spinquant")
SUPPORTED_WEIGHT_BITS = (4,)
SUPPORTED_ACT_BITS = (4, 8, 16)
# The inputs a layer quantizes, by the projections that read them (vLLM fuses each group into one
# linear, so a group has one activation quantizer): the keys of `act_overrides`.
INPUT_KINDS = {"qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj"), "o": ("o_proj",),
               "gate_up": ("gate_proj", "up_proj", "gate_up_proj"), "down": ("down_proj",)}


def input_kind(module: str) -> str:
    """The input kind ('qkv', 'o', 'gate_up', 'down') of a projection, by its name or dotted path
    (checkpoint or vLLM naming)."""
    last = module.rsplit(".", 1)[-1]
    for kind, names in INPUT_KINDS.items():
        if last in names:
            return kind
    raise CheckpointError(f"{module!r} is not a quantized projection (known: {', '.join(QUANTIZED_PROJECTIONS)})")


def act_override(overrides: tuple[tuple[str, int, float], ...], module: str) -> tuple[int, float] | None:
    """(bits, clip) that `overrides` ((input kind, bits, clip), ...) give `module`'s input, or None."""
    if overrides:
        kind = input_kind(module)
        for k, bits, clip in overrides:
            if k == kind:
                return bits, clip
    return None
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- input transforms
# A declared online transform of a linear's input, applied right before its per-token quantizer
# (issue 21); its inverse is absorbed into the weights offline, so the float product is unchanged.
#   block_rotation (DuQuant): y = ((x * diag) @ blockdiag(rot1))[:, perm] @ blockdiag(rot2),
#       rot1/rot2 [K/block, block, block] orthogonal blocks, perm [K] a channel permutation
#       (y[:, j] = t[:, perm[j]]);
#   kronecker (FlatQuant): y = (x * diag) @ (left (x) right), i.e. per token the [n1, n2] matrix
#       X = reshape(x * diag) becomes left^T X right (left [n1, n1], right [n2, n2] invertible).
# The tensors live under the first projection that reads the input (TRANSFORM_OWNERS), float32
# but perm (int32). On a row-parallel input (o, down) a transform must be rank-local at every
# recorded TP size: blocks and perm within each rank's K/tp columns; a Kronecker pair mixes all
# columns, so it serves tp 1 only there.
TRANSFORM_TYPES = ("block_rotation", "kronecker")
TRANSFORM_OWNERS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj",
                    "down": "mlp.down_proj"}
ROW_PARALLEL_KINDS = ("o", "down")
TRANSFORM_PREFIX = "transform_"
MAX_TRANSFORM_BLOCK = 128  # the largest block (or Kronecker factor) the kernels serve


@dataclasses.dataclass(frozen=True)
class InputTransform:
    """One declared input transform (see above): its input kind, type and block / factors."""

    kind: str
    type: str
    block: int | None = None  # block_rotation
    factors: tuple[int, int] | None = None  # kronecker (n1, n2), n1 * n2 = K

    @property
    def leaves(self) -> tuple[str, ...]:
        """The names of its tensors (after TRANSFORM_PREFIX)."""
        return ("diag", "rot1", "perm", "rot2") if self.type == "block_rotation" else ("diag", "left", "right")

    def tensors(self, k: int) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Leaf name -> (shape, dtypes) of this transform on an input of K features."""
        f32 = (torch.float32,)
        out = {"diag": ((k,), f32)}
        if self.type == "block_rotation":
            g = k // self.block
            out.update(rot1=((g, self.block, self.block), f32), perm=((k,), (torch.int32,)),
                       rot2=((g, self.block, self.block), f32))
        else:
            n1, n2 = self.factors
            out.update(left=((n1, n1), f32), right=((n2, n2), f32))
        return out

    def describe(self) -> str:
        return (f"{self.type} block {self.block}" if self.type == "block_rotation"
                else f"kronecker {self.factors[0]}x{self.factors[1]}")

    def to_dict(self) -> dict[str, Any]:
        return ({"type": self.type, "block": self.block} if self.type == "block_rotation"
                else {"type": self.type, "factors": list(self.factors)})

    @classmethod
    def from_dict(cls, kind: str, entry: Any, source: str) -> "InputTransform":
        where = f"{source}.input_transforms.{kind}"
        if kind not in INPUT_KINDS:
            raise CheckpointError(f"{where}: unknown input kind (known: {', '.join(INPUT_KINDS)})")
        if not isinstance(entry, dict) or entry.get("type") not in TRANSFORM_TYPES:
            raise CheckpointError(f"{where}: expected {{'type': one of {TRANSFORM_TYPES}, ...}}, got {entry!r}")

        def positive(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_TRANSFORM_BLOCK

        if entry["type"] == "block_rotation":
            if set(entry) != {"type", "block"} or not positive(entry["block"]):
                raise CheckpointError(f"{where}: expected {{'type': 'block_rotation', 'block': int in "
                                      f"[1, {MAX_TRANSFORM_BLOCK}]}}, got {entry!r}")
            return cls(kind, "block_rotation", block=entry["block"])
        f = entry.get("factors")
        if set(entry) != {"type", "factors"} or not isinstance(f, list) or len(f) != 2 or not all(map(positive, f)):
            raise CheckpointError(f"{where}: expected {{'type': 'kronecker', 'factors': [n1, n2]}} with n1, n2 in "
                                  f"[1, {MAX_TRANSFORM_BLOCK}], got {entry!r}")
        return cls(kind, "kronecker", factors=(f[0], f[1]))

    def check_width(self, k: int, what: str, tp: int | None, source: str) -> None:
        """Refuse a transform that does not fit an input of K features (per rank at `tp`)."""
        at = "" if tp is None else f" at tp {tp}"
        where = f"{source}: quantization_config.input_transforms.{self.kind}"
        if self.type == "block_rotation":
            if k % self.block:
                raise CheckpointError(f"{where}: block {self.block} does not divide the {what} = {k}{at}")
        elif tp not in (None, 1):
            raise CheckpointError(f"{where}: a Kronecker transform mixes all {what.split(' per rank')[0]} columns, so "
                                  f"it is not rank-local on a row-parallel input; this checkpoint cannot list tp {tp}")
        elif self.factors[0] * self.factors[1] != k:
            raise CheckpointError(f"{where}: factors {list(self.factors)} multiply to "
                                  f"{self.factors[0] * self.factors[1]}, not the {what} = {k}")


def check_transform_values(transform: InputTransform, tensors: dict[str, torch.Tensor], k: int,
                           tp_sizes: tuple[int, ...], where: str) -> None:
    """Value checks the shapes cannot make: perm is a permutation of range(K) and, on a
    row-parallel input, maps every rank's K/tp columns into themselves at each TP size."""
    if transform.type != "block_rotation":
        return
    perm = tensors["perm"].long()
    if not torch.equal(torch.sort(perm).values, torch.arange(k, device=perm.device)):
        raise CheckpointError(f"{where}.{TRANSFORM_PREFIX}perm: not a permutation of 0..{k - 1}")
    if transform.kind in ROW_PARALLEL_KINDS:
        for tp in tp_sizes:
            chunk = torch.arange(k, device=perm.device) // (k // tp)
            if not torch.equal(perm // (k // tp), chunk):
                raise CheckpointError(f"{where}.{TRANSFORM_PREFIX}perm: moves columns between tensor-parallel ranks "
                                      f"at tp {tp} (a row-parallel input's permutation must stay within each "
                                      f"rank's {k // tp} columns)")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # embeddings, norms, lm_head, biases
INDEX_FILE = "model.safetensors.index.json"
# Written into a checkpoint folder while `rotquant quantize` fills it and removed just before the
# final rename: a folder that still holds it is an interrupted run's output, never a checkpoint.
INCOMPLETE_MARKER = ".rotquant-incomplete"


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
    # per input kind (INPUT_KINDS) an activation width and clip other than act_bits/act_clip_ratio:
    # ((kind, bits, clip), ...), e.g. (("gate_up", 8, 1.0),) for 8-bit MLP inputs
    act_overrides: tuple[tuple[str, int, float], ...] = ()
    # declared online input transforms (DuQuant, FlatQuant), at most one per input kind
    input_transforms: tuple[InputTransform, ...] = ()

    def transform_for(self, module: str) -> InputTransform | None:
        """The input transform in front of `module` (a projection's name or path), or None."""
        kind = input_kind(module)
        return next((t for t in self.input_transforms if t.kind == kind), None)

    def act_for(self, module: str) -> tuple[int, float]:
        """(bits, clip) of the activation quantizer in front of `module` (a projection's name or path)."""
        return act_override(self.act_overrides, module) or (self.act_bits, self.act_clip_ratio)

    def describe_acts(self) -> str:
        """'A4' or e.g. 'A4, gate_up A8' for logs and tables."""
        return f"A{self.act_bits}" + "".join(f", {k} A{b}" for k, b, _ in self.act_overrides)

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
            **({"act_overrides": {k: {"act_bits": b, "act_clip_ratio": c} for k, b, c in self.act_overrides}}
               if self.act_overrides else {}),
            **({"input_transforms": {t.kind: t.to_dict() for t in self.input_transforms}}
               if self.input_transforms else {}),
            # the TP sizes live under online_hadamard.down_proj when R4 is used, else here
            **({} if self.down_proj_block else {"tp_sizes": list(self.tp_sizes)}),
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
        if "tp_sizes" in cfg:  # written since input transforms (older checkpoints: under down_proj only)
            top = field("tp_sizes", list)
            if not top or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in top):
                raise CheckpointError(f"{source}.tp_sizes: expected a list of positive integers, got {top!r}")
            if isinstance(down, dict) and "tp_sizes" in down and tuple(top) != tp_sizes:
                raise CheckpointError(f"{source}.tp_sizes {top} disagrees with online_hadamard.down_proj.tp_sizes "
                                      f"{list(tp_sizes)}")
            tp_sizes = tuple(top)
        transforms = tuple(InputTransform.from_dict(kind, entry, source) for kind, entry
                           in field("input_transforms", dict, required=False, default={}).items())
        if down_block and any(t.kind == "down" for t in transforms):
            raise CheckpointError(f"{source}: input_transforms.down and online_hadamard.down_proj both transform the "
                                  f"down_proj input; a checkpoint declares one of them")
        ignore = field("ignore", list, required=False, default=["lm_head"])
        overrides = []
        for kind, entry in field("act_overrides", dict, required=False, default={}).items():
            where = f"{source}.act_overrides.{kind}"
            if kind not in INPUT_KINDS:
                raise CheckpointError(f"{where}: unknown input kind (known: {', '.join(INPUT_KINDS)})")
            if not isinstance(entry, dict) or set(entry) != {"act_bits", "act_clip_ratio"}:
                raise CheckpointError(f"{where}: expected {{'act_bits': int, 'act_clip_ratio': number}}, got {entry!r}")
            bits, oclip = entry["act_bits"], entry["act_clip_ratio"]
            if isinstance(bits, bool) or bits not in SUPPORTED_ACT_BITS:
                raise CheckpointError(f"{where}.act_bits: unsupported {bits!r} (supported: {SUPPORTED_ACT_BITS})")
            if isinstance(oclip, bool) or not isinstance(oclip, (int, float)) or not 0.0 < oclip <= 1.0:
                raise CheckpointError(f"{where}.act_clip_ratio: must be in (0, 1], got {oclip!r}")
            overrides.append((kind, int(bits), float(oclip)))
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
            act_overrides=tuple(overrides),
            input_transforms=transforms,
        )

    def check_model_config(self, config: dict[str, Any], source: str = "config.json") -> None:
        """Check this spec against the model's shapes: the architecture, the dimensions config.json
        must hold, and every divisibility rule the served layers need at each recorded TP size
        (INT4 packing, weight groups, the R4 block), so that vLLM's `create_weights` cannot fail
        later on a checkpoint that passed here."""
        archs = config.get("architectures") or []
        if not isinstance(archs, list) or not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}: architectures: unsupported architecture {archs!r} "
                f"(rotquant supports {', '.join(SUPPORTED_ARCHITECTURES)})")
        dims = model_dims(config, source)
        hidden, inter, nq, nkv, hd = (dims[k] for k in ("hidden", "inter", "heads", "kv_heads", "head_dim"))
        if self.qk_block and hd % self.qk_block:
            raise CheckpointError(f"{source}: online_hadamard.qk.block {self.qk_block} does not divide head_dim {hd}")
        group = self.group_size
        tp_field = "quantization_config.online_hadamard.down_proj.tp_sizes"
        widths = [("hidden_size (q/k/v/gate/up input)", hidden, None)]
        for tp in self.tp_sizes:
            if nq % tp or (nkv % tp and tp % nkv):
                raise CheckpointError(
                    f"{source}: {tp_field} lists tp {tp}, but num_attention_heads {nq} / num_key_value_heads "
                    f"{nkv} cannot be split over {tp} ranks")
            if inter % tp:
                raise CheckpointError(f"{source}: {tp_field} lists tp {tp}, which does not divide "
                                      f"intermediate_size {inter}")
            widths.append((f"o_proj input per rank at tp {tp}", nq * hd // tp, tp))
            widths.append((f"down_proj input per rank at tp {tp}", inter // tp, tp))
            if self.down_proj_block and (inter // tp) % self.down_proj_block:
                raise CheckpointError(
                    f"{source}: online_hadamard.down_proj.block {self.down_proj_block} does not divide "
                    f"intermediate_size/tp = {inter}/{tp}")
        kind_of = {"hidden_size (q/k/v/gate/up input)": ("qkv", "gate_up"), "o_proj": ("o",), "down_proj": ("down",)}
        for name, width, tp in widths:
            for t in self.input_transforms:
                if t.kind in next(v for key, v in kind_of.items() if name.startswith(key)):
                    t.check_width(width, name, tp, source)
            at = "" if tp is None else f" ({tp_field} lists {tp})"
            if width % 2:
                raise CheckpointError(f"{source}: the {name} = {width} is odd; INT4 packs two columns a byte{at}")
            if group and width % group:
                raise CheckpointError(f"{source}: quantization_config.group_size {group} does not divide the "
                                      f"{name} = {width}{at}")


def model_dims(config: dict[str, Any], source: str = "config.json") -> dict[str, int]:
    """The dimensions the format needs from a HF config, each checked to be a positive integer
    (a missing or mistyped field is named here, not a KeyError or a shape error later)."""

    def dim(name: str, required: bool = True) -> int | None:
        value = config.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            what = "missing" if name not in config else f"got {value!r}"
            raise CheckpointError(f"{source}: {name}: expected a positive integer ({what})")
        return value

    hidden, heads = dim("hidden_size"), dim("num_attention_heads")
    kv_heads = dim("num_key_value_heads", required=False) or heads
    if heads % kv_heads:
        raise CheckpointError(f"{source}: num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}")
    head_dim = dim("head_dim", required=False)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                                  f"(and there is no head_dim)")
        head_dim = hidden // heads
    return {"hidden": hidden, "inter": dim("intermediate_size"), "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "layers": dim("num_hidden_layers"), "vocab": dim("vocab_size")}


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
    config = read_config(model_dir)
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        return None, config
    spec = RotQuantSpec.from_dict(qcfg, source=f"{path}: quantization_config")
    spec.check_model_config(config, source=str(path))
    return spec, config


def is_rotquant_checkpoint(model_dir: str | Path) -> bool:
    """Whether config.json asks for rotquant (a folder without config.json is not one; a config.json
    that is not JSON is a CheckpointError naming it)."""
    if not (Path(model_dir) / "config.json").is_file():
        return False
    qc = read_config(model_dir).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


# ----------------------------------------------------------------------------- config.json
def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model folder as a dict; CheckpointError naming the file otherwise."""
    path = Path(model_dir) / "config.json"
    try:
        text = path.read_bytes().decode("utf-8")
        config = json.loads(text)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (is {model_dir} a Hugging Face model folder?)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                              f"{e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def write_config(model_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write config.json atomically (a temporary sibling, flushed, renamed over it): a reader or
    a crash sees the old file or the new one, never half of one."""
    path = Path(model_dir) / "config.json"
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def update_config(model_dir: str | Path, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Edit config.json in place: `edit(config)` changes the dict, a rotquant quantization_config
    is validated again, and the file is replaced in one rename. Returns the new config."""
    config = read_config(model_dir)
    edit(config)
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD:
        path = Path(model_dir) / "config.json"
        spec = RotQuantSpec.from_dict(qcfg, source=f"{path}: quantization_config (after the update)")
        spec.check_model_config(config, source=str(path))
    write_config(model_dir, config)
    return config


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


def biased_projections(config: dict[str, Any]) -> tuple[str, ...]:
    """Projections (of QUANTIZED_PROJECTIONS) that carry a bias in this architecture: Qwen2 has
    q/k/v biases; Llama/Mistral only when `attention_bias` / `mlp_bias` say so (as vLLM builds them)."""
    arch = (config.get("architectures") or [""])[0]
    if arch == "Qwen2ForCausalLM":
        return ("q_proj", "k_proj", "v_proj")
    out: tuple[str, ...] = ()
    if config.get("attention_bias"):
        out += ("q_proj", "k_proj", "v_proj", "o_proj")
    if config.get("mlp_bias"):
        out += ("gate_proj", "up_proj", "down_proj")
    return out


def expected_tensors(spec: RotQuantSpec, config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
    """Every tensor a rotquant checkpoint of this config holds: {name: (shape, allowed dtypes)}.
    `lm_head.weight` is listed even when the embeddings are tied (it may then be absent)."""
    dims = model_dims(config)
    hidden, vocab = dims["hidden"], dims["vocab"]
    out: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]] = {
        "model.embed_tokens.weight": ((vocab, hidden), FLOAT_DTYPES),
        "model.norm.weight": ((hidden,), FLOAT_DTYPES),
        "lm_head.weight": ((vocab, hidden), FLOAT_DTYPES),
    }
    biased = biased_projections(config)
    shapes = linear_shapes(config)
    for i in range(dims["layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = ((hidden,), FLOAT_DTYPES)
        out[f"{p}.post_attention_layernorm.weight"] = ((hidden,), FLOAT_DTYPES)
        if (config.get("architectures") or [""])[0] in QK_NORM_ARCHITECTURES:
            for norm in ("q_norm", "k_norm"):
                out[f"{p}.self_attn.{norm}.weight"] = ((head_dim_of(config),), FLOAT_DTYPES)
        for name, (out_f, in_f) in shapes.items():
            for tensor, shape in expected_tensor_shapes(f"{p}.{name}", out_f, in_f, spec.group_size).items():
                out[tensor] = (shape, (torch.uint8,) if tensor.endswith(PACKED_SUFFIX) else SCALE_DTYPES)
            if name.rsplit(".", 1)[1] in biased:
                out[f"{p}.{name}.bias"] = ((out_f,), FLOAT_DTYPES)
        for t in spec.input_transforms:
            owner = TRANSFORM_OWNERS[t.kind]
            for leaf, entry in t.tensors(shapes[owner][1]).items():
                out[f"{p}.{owner}.{TRANSFORM_PREFIX}{leaf}"] = entry
    return out


def _where(info: Any, source: str) -> str:
    return str(info.file) if isinstance(info, TensorInfo) else source


def validate_tensors(spec: RotQuantSpec, config: dict[str, Any], tensors: dict[str, Any],
                     source: str) -> None:
    """Check the name, shape and dtype of every tensor (quantized linears, embeddings, norms,
    lm_head, biases) against the model config: nothing missing, nothing extra. `tensors` maps
    names to TensorInfo or to (shape, dtype); raise CheckpointError on the first bad one."""
    expected = expected_tensors(spec, config)
    optional = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    for name, (shape, dtypes) in expected.items():
        if name not in tensors:
            if name in optional:
                continue
            raise CheckpointError(f"{source}: missing tensor '{name}'")
        got_shape, got_dtype = tensors[name][:2]
        where = _where(tensors[name], source)
        if tuple(got_shape) != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {tuple(got_shape)}, expected {shape} "
                                  f"(from config.json)")
        if got_dtype not in dtypes:
            allowed = str(dtypes[0]) if len(dtypes) == 1 else f"one of {dtypes}"
            raise CheckpointError(f"{where}: tensor '{name}' has dtype {got_dtype}, expected {allowed}")
    for name in sorted(set(tensors) - set(expected)):
        where = _where(tensors[name], source)
        stem = name.rsplit(".", 1)[0]
        if stem.endswith(QUANTIZED_PROJECTIONS) and name.endswith(".weight"):
            raise CheckpointError(f"{where}: unexpected unquantized tensor '{name}' in a rotquant checkpoint")
        raise CheckpointError(f"{where}: unexpected tensor '{name}' (a {config['architectures'][0]} with this "
                              f"config.json has no such tensor)")


# ----------------------------------------------------------------------------- safetensors
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
# safetensors dtype names -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "U16": (torch.uint16, 2),
    "I16": (torch.int16, 2), "U32": (torch.uint32, 4), "I32": (torch.int32, 4), "U64": (torch.uint64, 8),
    "I64": (torch.int64, 8), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4),
    "F64": (torch.float64, 8), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}


class TensorInfo(NamedTuple):
    """One tensor of a safetensors file, from its validated header; `begin`/`end` are absolute
    byte offsets in `file`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    begin: int
    end: int


def _st_error(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({why})")


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of one safetensors file, with the checks the format requires: the header
    length bounded (checked before anything is allocated), the header UTF-8 JSON, every entry
    well formed, its byte range the size its shape and dtype need, and the data section covered
    exactly (no gaps, no overlaps, nothing cut off). No tensor data is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _st_error(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _st_error(path, f"header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes: "
                                      f"random or corrupt bytes")
            if 8 + n > size:
                raise _st_error(path, f"header length {n} but the file holds {size} bytes: truncated or corrupt")
            raw = fh.read(n)
    except OSError as e:
        raise _st_error(path, e.strerror or str(e)) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _st_error(path, f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise _st_error(path, f"header is a JSON {type(header).__name__}, expected an object")
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor '{name}'"
        if not isinstance(info, dict):
            raise _st_error(path, f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_DTYPES:
            raise _st_error(path, f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise _st_error(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _st_error(path, f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
        torch_dtype, itemsize = ST_DTYPES[dtype]
        nbytes = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _st_error(path, f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, its data_offsets "
                                  f"{offsets} span {offsets[1] - offsets[0]}")
        out[name] = TensorInfo(tuple(shape), torch_dtype, path, data_start + offsets[0], data_start + offsets[1])
    spans = sorted((t.begin - data_start, t.end - data_start, name) for name, t in out.items())
    last = max((end for _, end, _ in spans), default=0)
    if last > data_size:
        cut = next(name for _, end, name in spans if end > data_size)
        raise _st_error(path, f"truncated: the header describes {last} bytes of tensor data, the file holds "
                              f"{data_size} (tensor '{cut}' is cut off)")
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise _st_error(path, f"tensors '{prev}' and '{name}' overlap")
        if begin > pos:
            raise _st_error(path, f"bytes {pos}..{begin} of the data before tensor '{name}' belong to no tensor")
        pos, prev = end, name
    if pos != data_size:
        raise _st_error(path, f"the last {data_size - pos} bytes of the file belong to no tensor")
    return out


def read_safetensors_headers(model_dir: str | Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} over every *.safetensors file of a model folder (headers only): each file
    checked by `read_safetensors_header`, no name in two files, and the shard index (if any) naming
    exactly these files and tensors."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (rotquant reads safetensors only)")
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in out:
                raise CheckpointError(f"{f}: tensor '{name}' is also in {out[name].file.name}")
            out[name] = info
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a safetensors index (expected JSON with a 'weight_map' object)") from None
        for name, info in out.items():
            if weight_map.get(name) != info.file.name:
                raise CheckpointError(f"{index}: weight_map puts tensor '{name}' in {weight_map.get(name)!r}, but it "
                                      f"is in {info.file.name}")
        extra = sorted(set(weight_map) - set(out))
        if extra:
            raise CheckpointError(f"{index}: weight_map lists tensor '{extra[0]}' that no *.safetensors file holds")
    return out


def read_tensors(model_dir: str | Path, headers: dict[str, TensorInfo] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files (headers validated first, so a bad file
    is named before any data is read)."""
    from safetensors import SafetensorError, safe_open

    headers = read_safetensors_headers(model_dir) if headers is None else headers
    out: dict[str, torch.Tensor] = {}
    for f in sorted({info.file for info in headers.values()}):
        try:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    out[name] = fh.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise _st_error(f, str(e)) from None
    return out


def first_nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """(count, first flat index) of the NaN/Inf values of a floating tensor, None if all finite.
    Scanned in chunks with one min/max reduction each (NaN propagates through both, an Inf is one
    of them; 10x faster than `isfinite` on 2 cores), counted only when something is found."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        lo, hi = torch.aminmax(flat[start:start + chunk])
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            bad = ~torch.isfinite(flat)
            return int(bad.sum()), int(bad.nonzero()[0, 0])
    return None


def _nonfinite_in_file(mm: mmap.mmap, info: TensorInfo) -> tuple[int, int] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the given buffer is not writable": it is only read
        t = torch.frombuffer(mm, dtype=info.dtype, count=math.prod(info.shape), offset=info.begin)
    return first_nonfinite(t)


@contextlib.contextmanager
def one_torch_thread():
    """Run torch's CPU ops on the calling thread only, restoring the thread count after.

    Why: vLLM validates the checkpoint in its front-end process (`maybe_update_config`) and then,
    on CUDA, *forks* the engine core. A GNU OpenMP thread pool that exists at fork time deadlocks
    the child at its first parallel op (the engine hung before loading the model). With one thread
    torch never opens a parallel region, so no pool is created."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def check_finite(headers: dict[str, TensorInfo], names: Iterable[str] | None = None) -> None:
    """Read the data of every floating tensor (memory-mapped, one at a time) and refuse NaN/Inf,
    naming the file and tensor: a NaN in a norm weight would otherwise be served. Single-threaded
    (`one_torch_thread`): it runs in vLLM's front-end process before the engine core is forked."""
    with one_torch_thread():
        _check_finite(headers, names)


def _check_finite(headers: dict[str, TensorInfo], names: Iterable[str] | None) -> None:
    wanted = set(headers if names is None else names)
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in headers.items():
        if name in wanted and info.dtype.is_floating_point and info.dtype.itemsize >= 2 and info.end > info.begin:
            by_file.setdefault(info.file, []).append((name, info))
    for f, items in sorted(by_file.items()):
        bad = None
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, info in sorted(items, key=lambda x: x[1].begin):
                found = _nonfinite_in_file(mm, info)
                if found:
                    bad = (name, *found)
                    break
        if bad:
            name, count, index = bad
            raise CheckpointError(f"{f}: tensor '{name}' holds {count} NaN/Inf value(s) (first at flat index {index})")


# ----------------------------------------------------------------------------- whole checkpoint
@dataclasses.dataclass
class Checkpoint:
    """A validated rotquant checkpoint folder."""

    path: Path
    spec: RotQuantSpec
    config: dict[str, Any]
    headers: dict[str, TensorInfo]


def validate_checkpoint(model_dir: str | Path, check_values: bool = True) -> Checkpoint:
    """The one validation of a rotquant checkpoint, run by `rotquant eval` (via `load_checkpoint`)
    and by the vLLM plugin at server start, before any weight is used: not an interrupted
    `rotquant quantize` output, config.json and its quantization_config (with every TP rule),
    the safetensors headers, every tensor against the config and, with `check_values`, finite
    values in every floating tensor (this reads the data of the floating tensors; the packed
    INT4 weights are bytes and need no check)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a rotquant checkpoint folder)")
    check_complete(path)
    spec, config = read_spec(path)
    if spec is None:
        raise CheckpointError(f"{path}/config.json: not a rotquant checkpoint (no quantization_config with "
                              f"quant_method '{QUANT_METHOD}')")
    headers = read_safetensors_headers(path)
    validate_tensors(spec, config, headers, source=str(path))
    if check_values:
        check_finite(headers)
    return Checkpoint(path, spec, config, headers)


def load_checkpoint(model_dir: str | Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """`validate_checkpoint` and every tensor read into memory (finite values checked there)."""
    ckpt = validate_checkpoint(model_dir, check_values=False)
    tensors = read_tensors(ckpt.path, ckpt.headers)
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = first_nonfinite(t)
            if bad:
                raise CheckpointError(f"{ckpt.headers[name].file}: tensor '{name}' holds {bad[0]} NaN/Inf value(s) "
                                      f"(first at flat index {bad[1]})")
    shapes = linear_shapes(ckpt.config)
    for t in ckpt.spec.input_transforms:
        owner = TRANSFORM_OWNERS[t.kind]
        for i in range(ckpt.config["num_hidden_layers"]):
            stem = f"model.layers.{i}.{owner}.{TRANSFORM_PREFIX}"
            check_transform_values(t, {leaf: tensors[stem + leaf] for leaf in t.leaves}, shapes[owner][1],
                                   ckpt.spec.tp_sizes, f"{ckpt.headers[stem + 'diag'].file}: model.layers.{i}.{owner}")
    return ckpt, tensors


# ----------------------------------------------------------------------------- incomplete marker
def mark_incomplete(folder: str | Path, writer: str = "rotquant quantize") -> Path:
    """Mark `folder` as being written by this process (pid, host, the process's start time, so a
    later run can tell whether the writer is still alive)."""
    path = Path(folder) / INCOMPLETE_MARKER
    info = {"writer": writer, "pid": os.getpid(), "host": socket.gethostname(),
            "pid_start": process_start_ticks(os.getpid())}
    path.write_text(json.dumps(info) + "\n")
    return path


def read_incomplete_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker's record, {} if it is unreadable, None if the folder holds none."""
    path = Path(folder) / INCOMPLETE_MARKER
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def check_complete(folder: str | Path) -> None:
    """Refuse a folder that still holds the incomplete marker, unless this very process is writing
    it (the activation clip search reads the checkpoint inside the atomic write)."""
    info = read_incomplete_marker(folder)
    if info is None:
        return
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return
    who = f" (pid {info.get('pid')} on {info.get('host')})" if info.get("pid") else ""
    raise CheckpointError(
        f"{folder}: an incomplete `{info.get('writer', 'rotquant quantize')}` output{who}: the run was "
        f"interrupted or is still writing ({INCOMPLETE_MARKER} is present); it is not a checkpoint: delete "
        f"the folder and quantize again")


def process_start_ticks(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown:
    with the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None
