"""`RotQuantConfig`: vLLM's view of a rotquant checkpoint (registered as quantization "rotquant").

vLLM builds it from `config.json["quantization_config"]` (`from_config`), then calls
`maybe_update_config` with the model folder: there the checkpoint's tensor names, shapes and dtypes
are checked from the safetensors headers (no tensor data is read), so a bad checkpoint stops the
server at startup with one `CheckpointError` naming the tensor or field, before any engine
process starts. The per-layer methods then come from `get_quant_method`:

- q/k/v (merged `qkv_proj`), `o_proj`, gate/up (merged `gate_up_proj`), `down_proj`:
  `RotQuantLinearMethod` (packed INT4 weights, per-token activation quantization, R4 on down_proj);
- attention layers: `RotQuantR3Method` when the checkpoint asks for R3 (`online_hadamard.qk`);
- everything else (embeddings, lm_head, norms): unquantized.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_rotquant.compat import is_ignored
from vllm_rotquant.format import QUANT_METHOD, CheckpointError, RotQuantSpec, validate_tensors

log = init_logger("vllm.rotquant")  # under vLLM's logger, so it prints in vLLM's format

# safetensors header dtype names -> torch dtypes (only the ones a checkpoint may reasonably hold)
_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_headers(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """{tensor name: (shape, dtype)} of every *.safetensors file in model_dir, from headers only."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (rotquant checkpoints are safetensors only)")
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors header ({e})") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            out[name] = (tuple(info["shape"]), _ST_DTYPES.get(info["dtype"], info["dtype"]))
    return out


@register_quantization_config(QUANT_METHOD)
class RotQuantConfig(QuantizationConfig):
    """Rotated W4A4 (QuaRot / DartQuant-style) checkpoints written by `rotquant quantize`."""

    def __init__(self, spec: RotQuantSpec):
        super().__init__()  # sets packed_modules_mapping, filled in by the model
        self.spec = spec

    def __repr__(self) -> str:
        return f"RotQuantConfig({self.spec})"

    # ------------------------------------------------------------------ vLLM interface
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        from vllm.platforms import current_platform

        # float32 only on CPU, where the torch reference ops run: the numerics checks need it,
        # because with 4-bit activations one bf16 rounding flip moves a token's logprob by ~1 nat
        if current_platform.is_cpu():
            return [torch.bfloat16, torch.float16, torch.float32]
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # CUDA: int8 tensor-core dot (Ampere+); the CPU platform has no capability check

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json["quantization_config"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RotQuantConfig":
        return cls(RotQuantSpec.from_dict(config, source="config.json: quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None):
        """Validate the checkpoint against the spec before any weight is loaded."""
        model_dir = Path(model_name)
        if hf_config is not None:
            cfg = hf_config.to_dict()
            self.spec.check_model_config(cfg, source=f"{model_name}/config.json")
        if not model_dir.is_dir():
            # Hub ids are resolved later by the loader; the load-time checks in the linear
            # method still catch missing or mis-shaped tensors there.
            log.warning("rotquant: %s is not a local folder; tensor headers are checked at load time only",
                        model_name)
            return
        if hf_config is None:
            cfg = json.loads((model_dir / "config.json").read_text())
        validate_tensors(self.spec, cfg, read_safetensors_headers(model_dir), source=str(model_dir))
        sp = self.spec
        log.info("rotquant: checkpoint %s validated (W%dA%d %s, rotation %s, group %s, R4 block %s, R3 block %s)",
                 model_name, sp.weight_bits, sp.act_bits, "symmetric" if sp.act_symmetric else "asymmetric",
                 sp.rotation, sp.group_size, sp.down_proj_block, sp.qk_block)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm_rotquant.linear_method import QUANTIZED_LAYER_NAMES, RotQuantLinearMethod
        from vllm_rotquant.r3 import RotQuantR3Method

        if isinstance(layer, LinearBase):
            name = prefix.rsplit(".", 1)[-1]
            if name not in QUANTIZED_LAYER_NAMES or is_ignored(prefix, self.spec.ignore, self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            return RotQuantLinearMethod(self, prefix)
        if isinstance(layer, Attention) and self.spec.qk_block:
            return RotQuantR3Method(self)
        return None
