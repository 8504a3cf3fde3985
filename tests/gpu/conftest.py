import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Fill freed allocator memory with 0xFF bytes (NaN / -1) so that an output element a kernel
    forgets to write shows up as a mismatch instead of a stale correct value."""
    def _poison(nbytes: int = 512 << 20):
        t = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
        del t
    return _poison


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
