"""Fixtures shared by the test files (the helpers themselves live in `vllm_rotquant.testing`).

Session-scoped models are read-only: a test that changes one works on a copy (`shutil.copytree`,
`ckpt_factory.with_config`) or builds its own.
"""
from __future__ import annotations

import os

import pytest

from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint
from vllm_rotquant.testing.hf_factory import CALIB_TEXT, build_hf_model
from vllm_rotquant.testing.vllm_server import VllmServer, remove_leaked_shm, shm_objects


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """Calibration text the tiny tokenizer knows (a path, as the CLI and the options take it)."""
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return str(p)


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """A tiny floating-point HF Llama (the input `rotquant quantize` expects)."""
    return build_hf_model(tmp_path_factory.mktemp("src") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The default tiny rotquant checkpoint (`build_tiny_checkpoint` with no arguments: W4A4,
    R4 block 128, R3 on the head dim, TP 1 and 2)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def start_server():
    """`start_server(model, *args, **kw)`: a started `VllmServer` (same arguments), stopped with
    its whole process group after the module's last test."""
    servers: list[VllmServer] = []

    def start(model, *args, **kw) -> VllmServer:
        srv = VllmServer(model, *args, **kw)
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Remove the /dev/shm objects (psm_*, vllm_dist_*, sem.mp-*) created during the session that no
    live process uses any more (vLLM engines killed by a test cannot unlink theirs); objects that
    existed before the session, or that a running process still maps, are left alone."""
    before = shm_objects()
    yield
    remove_leaked_shm(shm_objects() - before)


@pytest.fixture(scope="module")
def vllm_engine_env():
    """For the modules that start vLLM engines (set at import, it would leak into every test
    collected with them): spawn the engine core, since the test process builds checkpoints with
    multi-threaded torch first and a forked child would deadlock on the OpenMP pool
    (tests/test_fork_safety.py); R3 in the served graph even with the bf16 KV cache; and IEEE
    float32 dots in vLLM's Triton attention, which by Triton's default multiplies float32 q/k/v in
    TF32 (1e-3 relative): measured on the H200, that alone flipped enough 4-bit activations to put
    the float32 engine 8e-2 nat (median) off the simulation at A4. The quantized GEMMs are integer
    dots and our Hadamard's are exact bf16 splits: neither sees the setting."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("VLLM_WORKER_MULTIPROC_METHOD", "spawn"), ("ROTQUANT_R3", "on"),
                            ("TRITON_F32_DEFAULT", "ieee")):
            if name not in os.environ:
                mp.setenv(name, value)
        yield
