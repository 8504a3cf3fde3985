"""vLLM on the CPU: bf16 SmolLM2 against its rotquant W4A4 (and W4A8) checkpoint, through the
OpenAI server (`python -m vllm.entrypoints.openai.api_server`, tests/vllm_server.py), same run.

All servers are started first (default CPU compilation: Dynamo + Inductor; each with a fresh
compile cache), then each workload runs on one server after the other, for `--rounds` rounds, each
round starting with the next model, so that a machine shared with other jobs slows every model
alike; the table shows each metric's best round and the ratio to bf16, and each round's ratios. Through /v1/completions (greedy, ignore_eos):
- prompt: 8 prompts of 512 tokens, one at a time, max_tokens 1 -> prompt tokens / s;
- decode, 1 request: 128 generated tokens after a 32-token prompt -> tokens / s;
- decode, 32 concurrent requests x 32 generated tokens -> all generated tokens / s;
- startup: process start to /health = 200, cold compile cache;
- peak RSS: the largest sum of resident memory over the server's process tree (API server,
  engine core, worker), sampled every 0.2 s from start to the end of the run.
Every request of a round uses prompts no server has seen (distinct austen windows: no
prefix-cache hits).

    python bench/bench_vllm_cpu.py [--rounds 3] [--w4a8] [--bf16 DIR] [--rotquant DIR] [--out FILE]

--w4a8 serves the W4A4 checkpoint's weights with 8-bit activations (a copy of its config.json
with act_bits 8 next to links to its tensors), as bench/RESULTS.md's W4A8 rows do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_server import VllmServer  # noqa: E402

PROMPT_LEN, PROMPTS = 512, 8
DECODE_PROMPT, DECODE_TOKENS = 32, 128
CONCURRENT, CONCURRENT_TOKENS = 32, 32


class TreeRss:
    """Peak resident memory of a process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._pid, self._stop = interval, 0, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int) -> None:
        self._pid = pid
        if not self._thread.is_alive():
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._pid is not None:
                try:
                    root = psutil.Process(self._pid)
                    procs = [root, *root.children(recursive=True)]
                    total = 0
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    self.peak = max(self.peak, total)
                except psutil.Error:
                    pass
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


def complete(srv: VllmServer, prompt, max_tokens: int) -> dict:
    r = requests.post(f"{srv.base_url}/v1/completions", timeout=1800, json={
        "model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()


def prompt_rate(srv: VllmServer, windows: list[list[int]]) -> float:
    t0 = time.perf_counter()
    n = sum(complete(srv, w[:PROMPT_LEN], 1)["usage"]["prompt_tokens"] for w in windows)
    return n / (time.perf_counter() - t0)


def decode1_rate(srv: VllmServer, window: list[int]) -> float:
    t0 = time.perf_counter()
    got = complete(srv, window[:DECODE_PROMPT], DECODE_TOKENS)["usage"]["completion_tokens"]
    return got / (time.perf_counter() - t0)


def decode32_rate(srv: VllmServer, windows: list[list[int]]) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(windows)) as pool:
        outs = list(pool.map(lambda p: complete(srv, p[:DECODE_PROMPT], CONCURRENT_TOKENS), windows))
    return sum(o["usage"]["completion_tokens"] for o in outs) / (time.perf_counter() - t0)


def round_windows(windows: list[list[int]], rnd: int, model_index: int, n_models: int) -> dict:
    """Distinct windows per (round, model, workload)."""
    per = PROMPTS + 1 + CONCURRENT
    base = (rnd * n_models + model_index) * per
    w = windows[base: base + per]
    return {"prompt": w[:PROMPTS], "decode1": w[PROMPTS], "decode32": w[PROMPTS + 1:]}


def w4a8_copy(w4a4: Path, root: Path) -> Path:
    """The W4A4 checkpoint's tensors (links) with act_bits 8 in its config."""
    out = root / "w4a8"
    out.mkdir(parents=True, exist_ok=True)
    for f in w4a4.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((w4a4 / "config.json").read_text())
    cfg["quantization_config"]["act_bits"] = 8
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    except OSError:
        pass
    import torch
    import vllm

    from vllm_rotquant.kernels import cpu_native

    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "platform": platform.platform(), "torch": torch.__version__, "vllm": vllm.__version__,
            "rotquant_cpu_kernel": cpu_native.unavailable_reason() or cpu_native.isa()}


def table(results: dict, base: str) -> str:
    names = list(results)
    rows = [("decode, 1 request x 128 tokens (tok/s)", "decode1_tok_s"),
            (f"decode, {CONCURRENT} concurrent x {CONCURRENT_TOKENS} tokens (total tok/s)", "decode32_tok_s"),
            (f"prompt, {PROMPTS} x {PROMPT_LEN} tokens (tok/s)", "prompt_tok_s"),
            ("server ready after, cold compile cache (s)", "startup_cold_s"),
            ("peak RSS of the server's processes (GiB)", "peak_rss_gib")]
    for name in names:  # each throughput's best round
        for key in ("decode1_tok_s", "decode32_tok_s", "prompt_tok_s"):
            vals = [r[key] for r in results[name]["rounds"] if r.get(key)]
            results[name][key] = max(vals) if vals else None
    out = ["| SmolLM2-135M | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, key in rows:
        cells = []
        for name in names:
            v = results[name].get(key)
            if v is None:
                cells.append("-")
                continue
            cell = f"{v:.2f}" if key == "peak_rss_gib" else f"{v:.1f}"
            if name != base and results[base].get(key):
                cell += f" ({v / results[base][key]:.2f}x)"
            cells.append(cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    ratios = []
    for key in ("decode1_tok_s", "decode32_tok_s", "prompt_tok_s"):
        for name in names[1:]:
            per_round = [r[key] / b[key] for r, b in zip(results[name]["rounds"], results[base]["rounds"])
                         if r.get(key) and b.get(key)]
            if per_round:
                ratios.append(f"{key} {name}/bf16 per round: " + ", ".join(f"{x:.2f}" for x in per_round))
    return "\n".join(out + [""] + ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", help="bf16 HF folder (default: tests' SmolLM2)")
    ap.add_argument("--rotquant", help="W4A4 rotquant checkpoint (default: tests' SmolLM2 hadamard+GPTQ W4A4)")
    ap.add_argument("--w4a8", action="store_true", help="also serve the W4A4 weights with 8-bit activations")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_cpu_kernels.json"))
    args = ap.parse_args()
    from real_model import smollm2_dir, smollm2_rotquant_dir
    from transformers import AutoTokenizer

    from vllm_rotquant.offline import data

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_cpu_"))
    models = {"bf16": Path(args.bf16) if args.bf16 else smollm2_dir(),
              "rotquant W4A4": Path(args.rotquant) if args.rotquant else smollm2_rotquant_dir()}
    if args.w4a8:
        models["rotquant W4A8"] = w4a8_copy(models["rotquant W4A4"], tmp)
    ids = data.tokenize(AutoTokenizer.from_pretrained(models["bf16"]), data.load_text("austen"))
    per_round = len(models) * (PROMPTS + 1 + CONCURRENT)
    # short windows from the whole text: enough distinct prompts for every round and model
    windows = ids[: (ids.numel() // PROMPT_LEN) * PROMPT_LEN].reshape(-1, PROMPT_LEN)
    if windows.shape[0] < per_round * args.rounds + 1:
        raise SystemExit(f"austen has {windows.shape[0]} windows of {PROMPT_LEN} tokens: too few for {args.rounds} rounds")
    windows = windows.tolist()
    result = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "loadavg_start": os.getloadavg(),
              "models": {name: {"path": str(p), "rounds": [{} for _ in range(args.rounds)]} for name, p in models.items()}}
    print(json.dumps(result["machine"]), flush=True)
    servers, watchers = {}, {}
    try:
        for name, model in models.items():
            tag = name.split()[-1]
            rss = TreeRss()
            srv = VllmServer(model, env={"VLLM_CACHE_ROOT": str(tmp / f"cache_{tag}"), "VLLM_CPU_CI_ENV": "0"},
                             log_path=tmp / f"{tag}.log")
            threading.Thread(target=_watch_when_started, args=(srv, rss), daemon=True).start()
            servers[name], watchers[name] = srv.start(), rss
            result["models"][name]["startup_cold_s"] = srv.startup_s
            complete(srv, windows[-1][:16], 4)  # the first request traces the decode shapes
            print(f"{name}: ready after {srv.startup_s:.0f} s", flush=True)
        for rnd in range(args.rounds):
            load = os.getloadavg()
            # each round starts with another model: none always runs right after another's work
            order = list(servers.items())
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for workload, fn in (("prompt_tok_s", prompt_rate), ("decode1_tok_s", decode1_rate),
                                 ("decode32_tok_s", decode32_rate)):
                for name, srv in order:
                    i = list(servers).index(name)
                    w = round_windows(windows, rnd, i, len(models))[workload.split("_")[0]]
                    time.sleep(2)  # let the previous server go idle
                    result["models"][name]["rounds"][rnd][workload] = fn(srv, w)
            for name in servers:
                entry = result["models"][name]["rounds"][rnd]
                entry["loadavg"] = load
                print(f"round {rnd} {name}: " + json.dumps({k: round(v, 1) for k, v in entry.items() if k != "loadavg"}),
                      flush=True)
    finally:
        for name, srv in servers.items():
            srv.stop()
            result["models"][name]["peak_rss_gib"] = watchers[name].stop() / 2 ** 30
    result["loadavg_end"] = os.getloadavg()
    print()
    print(table(result["models"], "bf16"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nraw numbers: {args.out}; server logs: {tmp}")


def _watch_when_started(srv: VllmServer, rss: TreeRss) -> None:
    """Start sampling as soon as the server process exists (VllmServer.start sets srv.proc)."""
    while srv.proc is None:
        time.sleep(0.05)
    rss.watch(srv.proc.pid)


if __name__ == "__main__":
    main()
