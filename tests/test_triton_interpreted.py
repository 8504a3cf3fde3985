"""The Triton kernels' numerics on the CPU, through Triton's interpreter (`TRITON_INTERPRET=1`):
per-token quantization (symmetric and asymmetric, 4 and 8 bits), the fused block Hadamard +
quantization, the declared input transforms, and the W4A4 GEMM (per-channel, grouped, zero points,
split-K) against
kernels/reference.py, at small odd shapes.

CI has no GPU, so without this a kernel edit made between device sessions would meet its first
test on the device. The interpreter runs the kernels' own index arithmetic, masks and integer
accumulation; the PTX paths (`USE_ASM`: rounding through inline asm) are the device's
(tests/gpu/). The interpreter is chosen when triton is imported, so the checks run in a child
process (this file run as a script).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_triton_kernels_match_the_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "checked" in run.stdout, run.stdout[-2000:]


# ----------------------------------------------------------------------------- the child process
def _acts(m, k, seed, dtype):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if m > 3:
        x[1] *= 40.0  # an outlier row
        x[2, (k * 7) // 11] = 300.0  # an outlier channel
        x[3] = 0.0  # an all-zero row
    return x.to(dtype)


def _qacts(m, k, bits, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    qm = 2 ** (bits - 1) - 1
    qa = torch.randint(-qm - 1, qm + 1, (m, k), generator=g, dtype=torch.int8)
    sa = torch.rand(m, 1, generator=g) * 0.1 + 1e-3
    return qa, sa


def _weights(n, k, groups, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    sw = (torch.rand(n, groups, generator=g) * 0.02 + 1e-4).to(torch.bfloat16)
    return w, sw


def _check() -> None:
    import torch

    from vllm_rotquant.kernels import ops, triton_gemm, triton_quant
    from vllm_rotquant.kernels import reference as ref
    from vllm_rotquant.kernels.hadamard import hadamard_matrix
    from vllm_rotquant.kernels.layout import prepare_weight

    assert triton_gemm.INTERPRET and triton_quant.INTERPRET, "TRITON_INTERPRET=1 was not seen"
    n_checks = 0
    # per-token quantization: bit-exact, both modes, both widths, input dtypes
    for k, m, bits, dtype in [(64, 5, 4, torch.bfloat16), (200, 37, 4, torch.float32), (136, 1, 8, torch.float16),
                              (64, 9, 8, torch.bfloat16)]:
        x = _acts(m, k, seed=k + m + bits, dtype=dtype)
        q, s = triton_quant.quant_act(x, 0.9, bits)
        qr, sr = ref.quant_act_ref(x, 0.9, bits)
        assert torch.equal(q, qr) and torch.equal(s, sr), ("quant_act", k, m, bits, dtype)
        q, s, z = triton_quant.quant_act(x, 0.9, bits, asymmetric=True)
        qr, sr, zr = ref.quant_act_asym_ref(x, 0.9, bits)
        assert torch.equal(q, qr) and torch.equal(s, sr) and torch.equal(z, zr), ("quant_act asym", k, m, bits)
        n_checks += 2
    # fused block Hadamard + quantization: bit-exact on the kernel's own Hadamard output, which is
    # the float64 Hadamard up to float32 summation order
    for block, k, m, asym in [(64, 128, 7, False), (32, 96, 5, True), (128, 256, 3, False)]:
        x = _acts(m, k, seed=block + k, dtype=torch.bfloat16)
        f = torch.empty(m, k, dtype=torch.float32)
        out = triton_quant.hadamard_quant(x, block, 0.9, 4, float_out=f, asymmetric=asym)
        want = ref.quant_act_asym_ref(f, 0.9, 4) if asym else ref.quant_act_ref(f, 0.9, 4)
        assert all(torch.equal(a, b) for a, b in zip(out, want)), ("hadamard_quant", block, k, asym)
        h64 = (x.double().reshape(m, k // block, block) @ hadamard_matrix(block, torch.float64)).reshape(m, k)
        rowmax = h64.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert ((f.double() - h64).abs() / rowmax).max().item() < 5e-6, ("hadamard", block, k)
        n_checks += 1
    # the GEMM, per channel: exact against the reference, with the tile choice and with split-K.
    # float32 out: the interpreter's bf16 cast is numpy's, not the device's round-to-nearest-even
    split = triton_gemm._cfg(16, 16, 64, 4, 2, split=2)
    for k, n, m, bits, cfg in [(128, 40, 1, 4, None), (136, 24, 5, 8, None), (256, 72, 33, 4, None),
                               (256, 32, 3, 4, split), (512, 16, 17, 4, split)]:
        w, sw = _weights(n, k, 1, seed=k + n)
        qa, sa = _qacts(m, k, bits, seed=m + bits)
        out = triton_gemm.w4a4_gemm(qa, sa, prepare_weight(w), sw, torch.float32, config=cfg)
        assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.float32)), ("gemm", k, n, m, cfg)
        n_checks += 1
    # grouped scales: equal up to the float32 summation order of the groups
    for k, n, m, group in [(128, 40, 3, 32), (256, 24, 20, 64)]:
        w, sw = _weights(n, k, k // group, seed=group)
        qa, sa = _qacts(m, k, 4, seed=m)
        out = triton_gemm.w4a4_gemm(qa, sa, prepare_weight(w), sw, torch.float32)
        want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.float32)
        assert ((out - want).abs() <= want.abs() * 1e-5 + 1e-7).all(), ("gemm grouped", k, n, m, group)
        n_checks += 1
    # zero points (asymmetric activations): exact per channel
    for k, n, m in [(128, 40, 5), (256, 16, 1)]:
        w, sw = _weights(n, k, 1, seed=n)
        x = _acts(m, k, seed=k, dtype=torch.float32) + 2.0  # skewed: zero points far from the middle
        qa, sa, za = ref.quant_act_asym_ref(x, 0.9, 4)
        wk = prepare_weight(w)
        out = triton_gemm.w4a4_gemm(qa, sa, wk, sw, torch.float32, za=za, wsum=ops.weight_sums(wk, 1))
        assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw.float(), torch.float32, za)), ("gemm asym", k, n, m)
        n_checks += 1
    # declared input transforms (DuQuant block rotations, FlatQuant Kronecker pairs) in the
    # kernel's two-stage form: the reference's float32 values up to summation order
    from vllm_rotquant.format import InputTransform
    from vllm_rotquant.kernels import triton_transform
    from vllm_rotquant.testing.ckpt_factory import random_transform

    gen = torch.Generator().manual_seed(3)
    for t, k, m in [(InputTransform("o", "block_rotation", block=32), 96, 5),
                    (InputTransform("down", "block_rotation", block=24), 72, 17),  # odd block, padded to 32
                    (InputTransform("qkv", "kronecker", factors=(6, 10)), 60, 1),
                    (InputTransform("gate_up", "kronecker", factors=(16, 16)), 256, 33)]:
        tensors = random_transform(t, k, 1, gen)
        x = _acts(m, k, seed=k + m, dtype=torch.bfloat16)
        p = triton_transform.prepare(t, tensors)
        y = triton_transform.block_transform(x, *(p[f"t_{n}"] for n in ("diag", "src1", "b1", "src2", "b2")))
        want = ref.input_transform_ref(x, t.type, tensors)
        scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert ((y - want).abs() / scale).max().item() < 1e-5, ("transform", t, k, m)
        n_checks += 1
        if t.type == "kronecker":  # fused with the quantizer: bit-exact on its own float output
            for asym in (False, True):
                f = torch.empty(m, k)
                out = triton_transform.kron_quant(x, p["t_diag"], p["t_left"], p["t_right"], 0.9, 4, asym, f)
                ref_q = ref.quant_act_asym_ref(f, 0.9, 4) if asym else ref.quant_act_ref(f, 0.9, 4)
                assert all(torch.equal(a, b) for a, b in zip(out, ref_q)), ("kron_quant", t, asym)
                assert ((f - want).abs() / scale).max().item() < 1e-5, ("kron_quant float", t)
                n_checks += 1
    print(f"checked {n_checks} kernel cases under the Triton interpreter")


if __name__ == "__main__":
    _check()
