"""`vllm serve` (CPU, OpenAI API) on SmolLM2-135M: the W4A4 rotquant checkpoint and the bf16
original, checked against `rotquant eval` (the offline simulation) on the same checkpoint and text.

Perplexities come from prompt logprobs of /v1/completions (echo + logprobs) on the same token
windows `rotquant eval` scores (4 x 512 tokens from the middle third of a fixed Austen excerpt).

About the tolerances. bf16 model: 1 %. W4A4: a per-token 4-bit activation quantizer makes the
model chaotic: one last-bit difference in any unquantized op (vLLM's RMSNorm, rotary or attention
kernels against transformers') flips a quantized value, and every later token of the window then
differs by ~0.8 nat on average. Two correct implementations therefore give perplexities that
scatter by ~5 % per 512-token window (measured: the simulation itself in bf16 vs fp32 differs by
1.2 %; vLLM on 16 windows: -2.2 % and +1.0 % in two compile modes, no bias). On 4 windows the
W4A4 check allows 8 % (~3 sigma). The sharp check of the same checkpoint's arithmetic is its W4A8
twin (same weights, rotations, R3/R4; act_bits 8 in config.json), where the chaos is gone: 1 %.

The servers use vLLM's CPU CI mode (Dynamo trace, eager backend: the custom ops and their fake
implementations still go through the full-graph trace) to skip Inductor's minutes of compilation;
test_vllm_serve_tiny.py covers the default Inductor mode.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_rotquant.testing.ckpt_factory import with_config  # noqa: E402
from vllm_rotquant.testing.real_model import smollm2_dir, smollm2_rotquant_dir  # noqa: E402
from vllm_rotquant.testing.vllm_server import VllmServer, perplexity  # noqa: E402

pytestmark = pytest.mark.slow

SEQ_LEN, WINDOWS = 512, 4
CI_MODE = {"VLLM_CPU_CI_ENV": "1"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A fixed excerpt of austen.txt (enough for 4 x 512 tokens from its middle third)."""
    from vllm_rotquant.offline import data

    path = tmp_path_factory.mktemp("text") / "austen_excerpt.txt"
    path.write_text(data.load_text("austen")[200_000:232_000])
    return path


def rotquant_eval(model: Path, text: Path) -> dict:
    exe = shutil.which("rotquant")
    cmd = ([exe] if exe else [sys.executable, "-m", "vllm_rotquant.offline.cli"]) + [
        "eval", str(model), "--data", str(text), "--seq-len", str(SEQ_LEN), "--windows", str(WINDOWS), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def windows(model: Path, text: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_rotquant.offline import data

    ids = data.tokenize(AutoTokenizer.from_pretrained(model), text.read_text())
    return data.eval_windows(ids, SEQ_LEN, WINDOWS).tolist()


def client(srv: VllmServer) -> "openai.OpenAI":
    return srv.openai_client(timeout=600)


def served_perplexity(srv: VllmServer, wins: list[list[int]]) -> float:
    lps: list[float] = []
    c = client(srv)
    for ids in wins:
        r = c.completions.create(model=srv.model, prompt=ids, max_tokens=1, echo=True, logprobs=0, temperature=0.0)
        got = r.choices[0].logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids) + 1
        lps += got[1:len(ids)]
    assert len(lps) == WINDOWS * (SEQ_LEN - 1)
    return perplexity(lps)


@pytest.fixture(scope="module")
def rotquant_ckpt() -> Path:
    return smollm2_rotquant_dir()


@pytest.fixture(scope="module")
def rotquant_server(rotquant_ckpt, start_server, tmp_path_factory):
    return start_server(rotquant_ckpt, "--quantization", "rotquant", env=CI_MODE,
                        log_path=tmp_path_factory.mktemp("logs") / "smollm2_rotquant.log")


def _agreement(name: str, served: float, simulated: dict, tol: float) -> None:
    rel = served / simulated["ppl"] - 1
    print(f"{name}: vLLM ppl {served:.3f}, rotquant eval ppl {simulated['ppl']:.3f} ({100 * rel:+.2f} %)")
    assert abs(rel) < tol, (name, served, simulated)


def test_rotquant_server_answers_chat_and_completion(rotquant_server):
    c = client(rotquant_server)
    log = rotquant_server.log_text()
    assert "quantization=rotquant" in log
    assert "R3 skipped: the KV cache (auto) is not quantized" in log  # the default: no R3 with a bf16 cache
    chat = c.chat.completions.create(model=rotquant_server.model, max_tokens=32, temperature=0.0,
                                     messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.choices[0].message.content.strip()
    comp = c.completions.create(model=rotquant_server.model, prompt="Once upon a time", max_tokens=24, temperature=0.0)
    assert comp.choices[0].text.strip() and comp.usage.completion_tokens > 0


def test_rotquant_server_32_concurrent_requests(rotquant_server):
    c = client(rotquant_server)
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]

    def ask(p):
        # ignore_eos: every request must produce its 16 tokens (an early EOS would give empty text)
        return c.completions.create(model=rotquant_server.model, prompt=p, max_tokens=16, temperature=0.7, seed=1,
                                    extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, prompts))
    assert len(results) == 32
    for r in results:
        assert r.choices[0].text and r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_rotquant_w4a4_perplexity_matches_rotquant_eval(rotquant_server, rotquant_ckpt, text_file):
    _agreement("SmolLM2 W4A4 rotquant", served_perplexity(rotquant_server, windows(rotquant_ckpt, text_file)),
               rotquant_eval(rotquant_ckpt, text_file), tol=0.08)


def test_rotquant_w4a8_twin_perplexity_within_1_percent(rotquant_ckpt, text_file, tmp_path):
    # clip 1.0: what `--act-clip auto` picks at 8 bits. The W4A4 checkpoint's searched 4-bit clip
    # (0.75) gave +1.23 % here on an AMD CPU against -0.25 % at 1.0: at 8 bits a 0.75 clip distorts
    # the model (+7 % perplexity) and makes it ~20x more sensitive to float rounding (the simulation
    # in bf16 vs fp32: -0.54 % at 0.75, +0.03 % at 1.0; bench/RESULTS.md). Clip < 1 is checked
    # bit-exactly on vLLM's layers in test_vllm_plugin.py.
    twin = with_config(rotquant_ckpt, tmp_path / "w4a8",
                       lambda c: c["quantization_config"].update(act_bits=8, act_clip_ratio=1.0))
    simulated = rotquant_eval(twin, text_file)
    with VllmServer(twin, env=CI_MODE, log_path=tmp_path / "w4a8.log") as srv:  # detected from config.json
        served = served_perplexity(srv, windows(twin, text_file))
        assert "quantization=rotquant" in srv.log_text()
    _agreement("SmolLM2 W4A8 rotquant twin", served, simulated, tol=0.01)


def test_bf16_perplexity_within_1_percent(text_file, tmp_path):
    model = smollm2_dir()
    simulated = rotquant_eval(model, text_file)
    with VllmServer(model, env=CI_MODE, log_path=tmp_path / "bf16.log") as srv:
        served = served_perplexity(srv, windows(model, text_file))
    _agreement("SmolLM2 bf16", served, simulated, tol=0.01)
    assert math.isfinite(served)
