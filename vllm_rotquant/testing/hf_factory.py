"""Tiny random Hugging Face source models (Llama, Qwen2 with biases, Mistral, Qwen3 with per-head
q/k norms) for calibrator tests: written as ordinary HF folders with a small tokenizer, seeded."""
from __future__ import annotations

from pathlib import Path

import torch

from vllm_rotquant.testing.ckpt_factory import write_tokenizer

# Calibration text for the tiny-model calibrator tests (the tiny tokenizer knows these words).
CALIB_TEXT = " ".join(f"Sentence number {i} tells of fortune, wives, foxes and dogs." for i in range(400))

TINY_SRC = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-5)


ARCHS = ("llama", "qwen2", "mistral", "qwen3")


def build_hf_model(out: str | Path, arch: str = "llama", tie: bool = True, seed: int = 0, **kw) -> Path:
    """Write a random `arch` model (norm gains and biases randomised so folding matters)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    model = build_hf_module(arch, vocab, tie, seed, **kw)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_hf_module(arch: str = "llama", vocab: int = 384, tie: bool = True, seed: int = 0, **kw):
    """The in-memory random `arch` model of `build_hf_model` (float32, eval mode)."""
    import transformers

    family = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}[arch]
    cls_cfg, cls_model = getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")
    cfg = cls_cfg(vocab_size=vocab, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **{**TINY_SRC, **kw})
    torch.manual_seed(seed)
    model = cls_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.rand_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 1 / p.shape[-1] ** 0.5))
    return model.eval()
