"""The checkpoint check that vLLM's front-end process runs must leave that process safe to fork.

On CUDA vLLM forks its engine core after `maybe_update_config` has validated the checkpoint; a GNU
OpenMP pool created by a multi-threaded torch op before the fork deadlocks the child at its first
parallel op (seen on the H200: every rotquant engine hung before loading, bf16 did not). The CPU
platform spawns instead, so only this test catches it on CPU CI.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(2)
    from vllm_rotquant.format import validate_checkpoint
    validate_checkpoint(sys.argv[1])          # what the front end runs (values included)
    pid = os.fork()
    if pid == 0:                              # the "engine core": parallel torch ops
        x = torch.randn(1024, 1024)
        (x @ x).sum(); torch.zeros(1 << 22).add_(1).amax()
        os._exit(0)
    deadline = time.time() + float(sys.argv[2])
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.1)
    os.kill(pid, 9)
    print("forked child hung", flush=True)
    sys.exit(3)
""")


def _run(ckpt, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(timeout_s)], capture_output=True,
                          text=True, timeout=timeout_s + 120)


def test_validated_process_can_fork_an_engine(tmp_path):
    # floating tensors (embeddings, lm_head) above torch's parallel grain, so a multi-threaded scan
    # would open an OpenMP parallel region
    ckpt = build_tiny_checkpoint(tmp_path / "ck", hidden_size=256, intermediate_size=512,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    r = _run(ckpt)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])


def test_one_torch_thread_restores_the_thread_count():
    from vllm_rotquant.format import one_torch_thread

    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
