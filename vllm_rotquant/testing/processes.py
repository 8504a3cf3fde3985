"""Run a vLLM engine in a child process and make sure nothing of it outlives the call
(benchmarks and GPU tests: an orphaned engine-core process keeps its memory)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def finish(llm) -> None:
    """Shut the engine core down, then leave at once: an engine that once hung at interpreter exit
    held its device call until the time limit (the parent also kills the worker's process group)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the process group is killed anyway
        pass
    sys.stdout.flush()
    os._exit(0)


def run_isolated(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> int | str:
    """Run `cmd` in its own session with stdout+stderr to `log_path`; kill its whole process group
    afterwards (vLLM's engine-core and worker processes must not outlive it and keep GPU memory).
    Returns the exit code, or "timeout"."""
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
