"""vLLM itself on the GPU (device machine, vLLM staged there): tiny rotquant checkpoints served by
`vllm.LLM` in vLLM's default mode (torch.compile + CUDA graphs) give the prompt logprobs of the
offline simulation on the same GPU (vllm_rotquant/testing/engine_check.py says how and why in
float32 from independent prompts); a bad checkpoint fails at start-up with the plugin's message.

Each case starts its own engines with a fixed KV cache (`kv_cache_memory_bytes`: vLLM's memory
profile reads the GPU's free memory, so engines starting side by side would count each other's
allocations and find none left), so the cases run in parallel
(`pytest -m gpu tests/gpu/test_vllm_engine.py -n 7`). Each case serves twice, in the default mode
and in eager mode; the failure message also gives the distance to the CPU reference, so that a
failure says whether the compiled graph, the engine or the GPU simulation is off.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("vllm_engine_env")]

from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint  # noqa: E402
from vllm_rotquant.testing.engine_check import (CASES, assert_follows, check_served_follows_simulation,  # noqa: E402
                                                served_logprobs)


@pytest.mark.parametrize("case", list(CASES))
def test_served_logprobs_follow_the_simulation(case, tmp_path):
    check = check_served_follows_simulation(case, tmp_path, "cuda")
    print(check.report)
    assert_follows(check)


def test_bad_checkpoint_fails_at_startup_with_the_plugin_message(tmp_path):
    import vllm_rotquant

    vllm_rotquant.register()
    missing = "model.layers.1.mlp.up_proj.weight_scale"
    ckpt = build_tiny_checkpoint(tmp_path / "bad", mutate=lambda t, c: t.pop(missing))
    with pytest.raises(Exception, match=f"missing tensor '{missing}'"):
        served_logprobs(ckpt, [list(range(3, 40))])
