"""`RotQuantConfig`: vLLM's view of a rotquant checkpoint (registered as quantization "rotquant").

vLLM builds it from `config.json["quantization_config"]` (`from_config`), then calls
`maybe_update_config` with the model folder while it builds its config, before any engine process
starts or any weight is loaded: there the checkpoint gets the same validation `rotquant eval` runs
(`format.validate_checkpoint`: config, TP rules, safetensors headers and coverage, every tensor's
name, shape and dtype, finite values), so a bad checkpoint stops the server at startup with one
line naming the file and the tensor or field (`install_refusal_hook`: no traceback). The
per-layer methods then come from `get_quant_method`:

- q/k/v (merged `qkv_proj`), `o_proj`, gate/up (merged `gate_up_proj`), `down_proj`:
  `RotQuantLinearMethod` (packed INT4 weights, per-token activation quantization, R4 on down_proj);
- attention layers: `RotQuantR3Method` when the checkpoint asks for R3 (`online_hadamard.qk`);
- everything else (embeddings, lm_head, norms): unquantized.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_rotquant.compat import is_ignored
from vllm_rotquant.format import QUANT_METHOD, CheckpointError, RotQuantSpec, validate_checkpoint

log = init_logger("vllm.rotquant")  # under vLLM's logger, so it prints in vLLM's format


# ----------------------------------------------------------------------------- refusals
def bad_input_message(exc: BaseException) -> str | None:
    """The one-line reason when an uncaught exception is a refused input, None otherwise.

    vLLM 0.32 runs `maybe_update_config` inside pydantic's validation of `VllmConfig`, which wraps
    our CheckpointError in a `ValidationError`; uncaught, that prints a 40-line traceback. A
    config.json that is not JSON fails earlier, in transformers (an OSError from a JSONDecodeError,
    84 lines). Both are found here, through causes, contexts and pydantic's error list."""
    seen: set[int] = set()
    todo, chain = [exc], []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        if isinstance(e, CheckpointError):
            return str(e).replace("\n", " ")
        errors = getattr(e, "errors", None)
        if callable(errors) and type(e).__name__ == "ValidationError":  # pydantic
            try:
                todo.extend(err.get("ctx", {}).get("error") for err in errors())
            except Exception:  # noqa: BLE001 - a foreign exception type; look no further into it
                pass
        todo.extend((e.__cause__, e.__context__))
    decode = next((e for e in chain if isinstance(e, json.JSONDecodeError)), None)
    if decode is not None:  # only where an exception names the file (transformers' "config file at '...'")
        for e in chain:
            m = re.search(r"'([^']+\.json)'", str(e))
            if m:
                return f"{m.group(1)}: invalid JSON: {decode}"
    return None


def install_refusal_hook() -> None:
    """Print a refused input (bad checkpoint, config.json not JSON) as one error line instead of
    a traceback when it ends a vLLM process; every other exception goes to the previous hook.
    Installed once per process when vLLM imports this module (through `register()`)."""
    previous = sys.excepthook
    if getattr(previous, "_rotquant", False):
        return

    def hook(exc_type, exc, tb):
        message = bad_input_message(exc) if isinstance(exc, Exception) else None
        if message is None:
            return previous(exc_type, exc, tb)
        log.error("rotquant: refusing to serve: %s", message)

    hook._rotquant = True
    sys.excepthook = hook


install_refusal_hook()


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
        # float32 too, on CUDA as on the CPU: the kernels take it, and the engine tests need it
        # (with 4-bit activations one bf16 rounding flip moves a token's logprob by ~1 nat)
        return [torch.bfloat16, torch.float16, torch.float32]

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
        """Validate the checkpoint before any weight is loaded (vLLM calls this while it builds its
        config, in the API server process): the same checks as `rotquant eval`."""
        model_dir = Path(model_name)
        if not model_dir.is_dir():
            if hf_config is not None:
                self.spec.check_model_config(hf_config.to_dict(), source=f"{model_name}/config.json")
            # Hub ids are resolved later by the loader; the load-time checks in the linear
            # method still catch missing or mis-shaped tensors there.
            log.warning("rotquant: %s is not a local folder; tensor headers are checked at load time only",
                        model_name)
            return
        t0 = time.monotonic()
        validate_checkpoint(model_dir)
        if hf_config is not None:  # vLLM's view of the config (it may carry --hf-overrides)
            self.spec.check_model_config(hf_config.to_dict(), source=f"{model_name}/config.json")
        sp = self.spec
        log.info("rotquant: checkpoint %s validated in %.1f s (W%d%s %s, rotation %s, group %s, R4 block %s, "
                 "R3 block %s)", model_name, time.monotonic() - t0, sp.weight_bits, sp.describe_acts(),
                 "symmetric" if sp.act_symmetric else "asymmetric", sp.rotation, sp.group_size,
                 sp.down_proj_block, sp.qk_block)

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
