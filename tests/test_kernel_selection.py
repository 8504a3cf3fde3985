"""Kernel selection (kernels/linear_kernel.py): the declared order per device, the reasons a
kernel gives, the refusal of a CUDA layer no fast kernel serves, and ROTQUANT_KERNEL."""
from __future__ import annotations

import pytest
import torch

from vllm_rotquant.format import CheckpointError
from vllm_rotquant.kernels import cpu_native, linear_kernel
from vllm_rotquant.kernels.linear_kernel import (ENV_VAR, LinearSpec, NoKernelError, choose_kernel, hadamard_op,
                                                 kernel_class)


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    linear_kernel._choose.cache_clear()
    yield
    linear_kernel._choose.cache_clear()


def spec(device="cpu", k=576, n=960, bits=4, group=None, block=None, sym=True, dtype=torch.bfloat16):
    return LinearSpec(k, n, group, bits, sym, 0.9, block, False, device, dtype)


def names(s, **kw):
    cls, passed_over = choose_kernel(s, **kw)
    return cls.name, passed_over


needs_native = pytest.mark.skipif(cpu_native.unavailable_reason() is not None, reason="no native CPU kernel here")


@needs_native
def test_cpu_order_fast_kernel_then_reference():
    assert names(spec()) == ("CpuInt8", ())
    assert names(spec(group=32, block=192, k=576, sym=False, bits=8)) == ("CpuInt8", ())
    name, why = names(spec(bits=16))  # W4A16: activations are not quantized
    assert name == "Reference" and len(why) == 1 and why[0].startswith("CpuInt8: act_bits 16")
    name, why = names(spec(group=36))
    assert name == "Reference" and "group_size 36: the native GEMM needs a multiple of 8" in why[0]


def test_cpu_without_a_compiler_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_native, "unavailable_reason", lambda: "rotquant CPU kernel unavailable: no C compiler found")
    name, why = names(spec())
    assert name == "Reference" and why == ("CpuInt8: rotquant CPU kernel unavailable: no C compiler found",)


def test_cuda_layer_refused_with_every_reason():
    """No silent fallback on CUDA: the layer is refused at load, naming the kernel and its reason,
    and the error says how to run the reference instead. Triton's rules are checked without a GPU."""
    if isinstance(kernel_class("Triton"), str):
        pytest.skip(f"Triton: {kernel_class('Triton')}")
    assert names(spec("cuda")) == ("Triton", ())
    assert names(spec("cuda", k=1536, n=576, block=1536)) == ("Triton", ())
    assert names(spec("cuda", bits=16)) == ("Triton", ())  # W4A16: de-quantized weights, cuBLAS
    cases = {
        "group_size 48 with 576 input features per rank": spec("cuda", group=48),
        "no fused Triton plan for block 1376": spec("cuda", k=1376, block=1376),
        "act_bits 3": spec("cuda", bits=3),
        "input features per rank (580) must be a multiple of 8": spec("cuda", k=580),
    }
    for reason, s in cases.items():
        with pytest.raises(NoKernelError) as err:
            choose_kernel(s)
        msg = str(err.value)
        assert isinstance(err.value, CheckpointError)
        assert f"on cuda: Triton: {reason}" in msg and f"{ENV_VAR}=reference" in msg, msg
        assert s.describe() in msg
    # the offline simulation may end the list with the reference (logged by its caller)
    name, why = names(spec("cuda", group=48), fallback_to_reference=True)
    assert name == "Reference" and why[0].startswith("Triton: group_size 48")


def test_env_asks_for_the_reference_or_a_named_kernel(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert names(spec()) == ("Reference", ())
    assert names(spec("cuda", group=48)) == ("Reference", ())
    linear_kernel._choose.cache_clear()
    monkeypatch.setenv(ENV_VAR, "CpuInt8")
    with pytest.raises(NoKernelError, match="CpuInt8: runs on the CPU only"):
        choose_kernel(spec("cuda"))
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="ROTQUANT_KERNEL='fastest': expected 'auto', 'reference' or one of"):
        choose_kernel(spec())
    monkeypatch.setenv(ENV_VAR, "auto")
    assert names(spec())[0] == ("CpuInt8" if cpu_native.unavailable_reason() is None else "Reference")


def test_kernel_refuses_a_spec_it_cannot_serve():
    cls = kernel_class("CpuInt8")
    with pytest.raises(NoKernelError, match="rotquant kernel CpuInt8 cannot serve .*: runs on the CPU only"):
        cls(spec("cuda"))


def test_unknown_device_has_no_kernel():
    with pytest.raises(NoKernelError, match="no kernels for device type 'xpu'"):
        choose_kernel(spec("xpu"))


def test_spec_describes_the_layer():
    s = LinearSpec(1536, 576, 128, 4, False, 0.9, 1536, True, "cpu", torch.bfloat16)
    assert s.groups == 12
    assert s.describe() == ("1536 -> 576, W4A4, asymmetric, group 128, bfloat16, R4 block 1536, "
                            "TP-global activation range")


@needs_native
def test_r3_hadamard_op_per_device(monkeypatch):
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    fn, name = hadamard_op("cpu", 64)
    assert name == "CpuInt8"
    from vllm_rotquant.kernels import ops

    want = ops.hadamard(x, 64)  # reference: float32 transform rounded to x's dtype
    got = fn(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert (got != want).float().mean() < 0.02 and torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    if not isinstance(kernel_class("Triton"), str):
        assert hadamard_op("cuda", 128)[1] == "Triton"
    monkeypatch.setenv(ENV_VAR, "reference")
    fn, name = hadamard_op("cpu", 64)
    assert name == "Reference" and torch.equal(fn(x), want)
