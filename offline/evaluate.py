"""Perplexity of an HF model or a simulated rotquant checkpoint on token windows."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_rotquant.format import CheckpointError, read_config
from vllm_rotquant.offline import data
from vllm_rotquant.offline.model_io import load_hf_model, load_tokenizer
from vllm_rotquant.offline.simulate import is_rotquant_checkpoint, load_simulated


def load_for_eval(model_dir: str | Path, dtype: torch.dtype):
    """The simulation for a rotquant checkpoint, the plain model otherwise."""
    if is_rotquant_checkpoint(model_dir):
        return load_simulated(model_dir, dtype)
    return load_hf_model(model_dir, dtype)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu",
               progress: bool = True) -> dict:
    """exp(mean next-token NLL) over all windows (each window scored from its first token)."""
    model.to(device)
    nll, count = 0.0, 0
    t0 = time.time()
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="eval", unit="batch", disable=not progress):
        ids = windows[i: i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"non-finite logits in windows {i}..{i + ids.shape[0] - 1}")
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "seconds": round(time.time() - t0, 2)}


def check_eval_options(config: dict, seq_len: int, windows: int, batch_size: int, device: str,
                       source: str = "config.json") -> None:
    """ValueError naming the option (library argument and CLI flag) for a value eval cannot use."""
    def positive(name: str, flag: str, value, least: int, why: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} ({flag}): {why}, got {value!r}")

    positive("windows", "--windows", windows, 1, "expected a positive number of windows")
    positive("seq_len", "--seq-len", seq_len, 2, "expected at least 2 tokens a window (one predicts the next)")
    positive("batch_size", "--batch-size", batch_size, 1, "expected a positive batch size")
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len (--seq-len): {seq_len} tokens exceed the model's max_position_embeddings "
                         f"{limit} ({source})")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device (--device): unknown device {device!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device (--device): {device!r}, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device (--device): {device!r} is not supported (expected cpu, cuda or cuda:N)")


def evaluate(model_dir: str | Path, text: str, seq_len: int = 512, windows: int = 16,
             dtype: torch.dtype = torch.bfloat16, batch_size: int = 4, device: str = "cpu",
             progress: bool = True) -> dict:
    """Perplexity of the model or rotquant checkpoint at `model_dir` on `windows` windows of
    `seq_len` tokens from the middle third of `text` (a file or corpus name). Options, the
    config and the text are checked before the model is loaded."""
    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a model or rotquant checkpoint folder)")
    config = read_config(model_dir)
    check_eval_options(config, seq_len, windows, batch_size, device, source=f"{model_dir}/config.json")
    raw = data.load_text(text, option="--data")
    model = load_for_eval(model_dir, dtype)
    tokenizer = load_tokenizer(model_dir)
    win = data.eval_windows(data.tokenize(tokenizer, raw), seq_len, windows)
    result = perplexity(model, win, batch_size, device, progress)
    spec = getattr(model, "rotquant_spec", None)
    result.update(model=str(model_dir), data=text, dtype=str(dtype).split(".")[-1],
                  quantization=None if spec is None else {"rotation": spec.rotation, "act_bits": spec.act_bits,
                                                          **({"act_overrides": spec.to_dict()["act_overrides"]}
                                                             if spec.act_overrides else {}),
                                                          "weight_bits": spec.weight_bits,
                                                          "method": spec.calibration.get("method")})
    return result
