"""The CPU kernel (kernels/cpu_kernel.py, CpuInt8) against the reference (kernels/reference.py) and
exact integer / float64 ground truth, on fresh random data at odd shapes, and on the real SmolLM2
checkpoint's layers: integer accumulation bit-exact, epilogue equal to the reference's (groups:
within the stated one-float32-ulp bound), the native Hadamard within float32 rounding of float64,
and the traced pieces bit-exact under torch.compile (Inductor)."""
from __future__ import annotations

import pytest
import torch

from vllm_rotquant.format import pack_int4
from vllm_rotquant.kernels import cpu_kernel, cpu_native, ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.hadamard import hadamard_matrix
from vllm_rotquant.kernels.linear_kernel import LinearSpec
from vllm_rotquant.kernels.reference_kernel import ReferenceKernel

pytestmark = pytest.mark.skipif(cpu_native.unavailable_reason() is not None,
                                reason=f"native CPU kernel unavailable: {cpu_native.unavailable_reason()}")

# (M, K, N): odd M on both sides of NATIVE_MAX_M (native GEMM / oneDNN), K not a multiple of 64
# (200) nor of 8 (94), N not a multiple of the 64-channel blocks, SmolLM2's shapes
SHAPES = [(1, 576, 960), (3, 200, 17), (5, 94, 100), (7, 1536, 576), (33, 576, 3072), (129, 200, 64), (300, 64, 7)]


def _spec(k, n, bits=4, sym=True, group=None, block=None, dtype=torch.bfloat16, clip=0.9, tp_range=False):
    return LinearSpec(k, n, group, bits, sym, clip, block, tp_range, "cpu", dtype)


def _weights(n, k, groups, gen):
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    sw = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    return w, sw


def _acts(m, k, gen, dtype, shift=0.0):
    x = torch.randn(m, k, generator=gen) * 2 + shift
    x[0, k // 3] = 40.0  # an outlier
    if m > 2:
        x[1] = 0.0  # an all-zero row
    if m > 4:
        x[2] = x[2].abs() + 0.3  # all positive (asymmetric: zero point at the bottom)
        x[3] = -x[3].abs()  # all negative
    return x.to(dtype)


def _kernel(spec, w, sw):
    k = cpu_kernel.CpuInt8Kernel(spec)
    return k, k.prepare(pack_int4(w), sw)


def _ulp32(x: torch.Tensor) -> torch.Tensor:
    x = x.float().abs()
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).double()


# ----------------------------------------------------------------------------- the GEMM paths
def _paths(w, sw, spec):
    """Every GEMM path of the CPU kernel for these weights: name -> fn(q, sa, za, out_dtype)."""
    n = w.shape[0]
    t = {"w_nib": cpu_native.pack_weights(w), "w_scale": sw.float().contiguous(),
         "w_sum": ref.weight_sums_ref(w, sw.shape[1]).contiguous()}
    paths = {"vnni": lambda q, sa, za, dt: cpu_native.gemm(q, sa, za, t["w_nib"], n, t["w_scale"],
                                                           None if za is None else t["w_sum"], dt)}
    if sw.shape[1] == 1:
        if cpu_native.has_amx():
            paths["amx"] = lambda q, sa, za, dt: cpu_native.gemm_amx(q, sa, za, t["w_nib"], n, t["w_scale"],
                                                                     None if za is None else t["w_sum"], dt)
        if cpu_kernel.onednn_unavailable_reason() is None and cpu_kernel._onednn_exact(
                w.shape[1], spec.act_bits, not spec.act_symmetric):
            handle = cpu_kernel._register_onednn(w)

            def onednn(q, sa, za, dt):  # the op's branch for CPUs without AMX
                saved, cpu_native.has_amx = cpu_native.has_amx, lambda: False
                try:
                    return torch.ops.rotquant.cpu_gemm(q, sa, za, t["w_nib"], handle, t["w_scale"],
                                                       None if za is None else t["w_sum"], n, dt)
                finally:
                    cpu_native.has_amx = saved
            paths["onednn"] = onednn
    return paths


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_integer_accumulation_is_exact(m, k, n, bits, sym):
    """Every GEMM path with unit scales and a float32 output returns the exact integer sums
    sum_k (q - za) * w (all below 2^24 here, so float32 holds them)."""
    gen = torch.Generator().manual_seed(m * 1000 + k + n + bits)
    x = _acts(m, k, gen, torch.float32, 0.0 if sym else 0.7)
    q, s, z = (*ref.quant_act_ref(x, 0.9, bits), None) if sym else ref.quant_act_asym_ref(x, 0.9, bits)
    w, _ = _weights(n, k, 1, gen)
    exact = (q.long() - (0 if z is None else z.long())) @ w.long().T
    ones_m, ones_n = torch.ones(m, 1), torch.ones(n, 1)
    for name, fn in _paths(w, ones_n, _spec(k, n, bits, sym)).items():
        acc = fn(q, ones_m, z, torch.float32)
        assert acc.dtype == torch.float32 and acc.shape == (m, n)
        assert torch.equal(acc.double(), exact.double()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,sym", [(4, True), (8, True), (4, False), (8, False)])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_epilogue_equals_reference(m, k, n, bits, sym, dtype):
    """Per channel: fl(fl(acc * sa) * sw) rounded once, the reference's bits, on every path."""
    gen = torch.Generator().manual_seed(m * 7 + k + n + bits)
    x = _acts(m, k, gen, torch.float32, 0.0 if sym else 0.7)
    q, s, z = (*ref.quant_act_ref(x, 0.9, bits), None) if sym else ref.quant_act_asym_ref(x, 0.9, bits)
    w, sw = _weights(n, k, 1, gen)
    want = ref.w4a4_gemm_ref(q, s, w, sw, dtype, z)
    for name, fn in _paths(w, sw, _spec(k, n, bits, sym)).items():
        out = fn(q, s, z, dtype)
        assert out.dtype == dtype and torch.equal(out, want), name


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m,k,n,group", [(1, 576, 960, 32), (3, 200, 17, 8), (7, 1536, 576, 128), (33, 576, 100, 64),
                                         (130, 96, 40, 32)])
def test_grouped_gemm_within_one_float32_ulp_of_exact(m, k, n, group, sym):
    """Group-wise: fl32(sum_g sw * acc_g) summed in float64, times sa; the exact value is rounded
    to float32 but for ties within ~K * 2^-53 relative of a boundary, where it is one ulp away."""
    gen = torch.Generator().manual_seed(m + k + n + group)
    x = _acts(m, k, gen, torch.float32, 0.0 if sym else 0.5)
    q, s, z = (*ref.quant_act_ref(x, 0.9, 4), None) if sym else ref.quant_act_asym_ref(x, 0.9, 4)
    w, sw = _weights(n, k, k // group, gen)
    paths = _paths(w, sw, _spec(k, n, 4, sym, group))
    assert list(paths) == ["vnni"]  # groups: the VNNI kernel only
    ones = torch.ones(m, 1)
    acc = paths["vnni"](q, ones, z, torch.float32)  # sa = 1: the float32 group sum itself
    g = k // group
    xi = q.long() - (0 if z is None else z.long())
    sums = (xi.reshape(m, 1, g, group) * w.long().reshape(1, n, g, group)).sum(-1)  # exact [m, n, g]
    exact = (sums.double() * sw.double()[None]).sum(-1)  # products exact, G-term float64 sum
    assert ((acc.double() - exact).abs() <= _ulp32(exact)).all()
    assert (acc.double() != exact.float().double()).float().mean() < 1e-3
    out = paths["vnni"](q, s, z, torch.float32)
    assert torch.equal(out, (acc * s))  # then times sa, rounded once


# ----------------------------------------------------------------------------- the whole linear
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,sym", [(4, True), (8, True), (4, False), (8, False)])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_linear_equals_reference(m, k, n, bits, sym, dtype):
    """Per channel, no Hadamard: the CPU kernel's linear is the reference's, bit for bit."""
    gen = torch.Generator().manual_seed(m + 7 * k + n + bits)
    x = _acts(m, k, gen, dtype, 0.0 if sym else 0.6)
    w, sw = _weights(n, k, 1, gen)
    spec = _spec(k, n, bits, sym, dtype=dtype)
    kern, t = _kernel(spec, w, sw)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = kern.apply(x, t, bias)
    want = ops.rotquant_linear(x, w, sw, bias, bits, 0.9, None, sym)
    assert out.dtype == dtype and torch.equal(out, want)
    refk = ReferenceKernel(spec)
    assert torch.equal(refk.apply(x, refk.prepare(pack_int4(w), sw), bias), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("m,k,n,group", [(1, 576, 960, 32), (5, 200, 17, 8), (33, 1536, 576, 128), (300, 96, 40, 32)])
def test_grouped_linear_matches_reference(m, k, n, group, sym, dtype):
    gen = torch.Generator().manual_seed(3 * m + k + group)
    x = _acts(m, k, gen, dtype, 0.0 if sym else 0.6)
    w, sw = _weights(n, k, k // group, gen)
    kern, t = _kernel(_spec(k, n, 4, sym, group, dtype=dtype), w, sw)
    out = kern.apply(x, t)
    want = ops.rotquant_linear(x, w, sw, None, 4, 0.9, None, sym)
    # the reference's float64 sum of the same exact products, in another order: equal but for a
    # rare one-float32-ulp difference before the final rounding
    tol = (want.float().abs() * (2 ** -23 if dtype == torch.float32 else 2 ** -8)).double() + 1e-30
    assert ((out.double() - want.double()).abs() <= tol).all()
    assert (out != want).float().mean() < 1e-3


@pytest.mark.parametrize("block,k", [(64, 576), (128, 256), (192, 576), (576, 576), (1536, 1536), (12, 96), (28, 56),
                                     (1376, 1376)])  # the last: a 344 x 344 Paley core
def test_native_hadamard_against_float64(block, k):
    """kron(core, Sylvester) butterflies + dense core: float32 rounding of the float64 transform
    (the reference's float32 matmul differs from it by the same order)."""
    gen = torch.Generator().manual_seed(block)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(9, k, generator=gen) * 3).to(dtype)
        y = torch.ops.rotquant.cpu_hadamard(x, block)
        h64 = (x.double().reshape(9, k // block, block) @ hadamard_matrix(block)).reshape(9, k)
        rowmax = h64.abs().amax(-1, keepdim=True)
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert ((y.double() - h64).abs() / rowmax).max() < 2e-6
        assert ((ref.hadamard_ref(x, block).double() - h64).abs() / rowmax).max() < 2e-6
        # R3's variant stores x's dtype: the float32 result rounded once, as torch rounds it
        assert torch.equal(torch.ops.rotquant.cpu_hadamard_as_input(x, block), y.to(dtype))
    y3 = torch.ops.rotquant.cpu_hadamard(x.reshape(3, 3, k), block)  # any leading shape
    assert torch.equal(y3.reshape(9, k), y)
    with pytest.raises(ValueError, match="not a multiple of block"):
        torch.ops.rotquant.cpu_hadamard(torch.randn(2, block + 2), block)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 172"):
        torch.ops.rotquant.cpu_hadamard(torch.randn(2, 344), 172)


@pytest.mark.parametrize("bits,sym", [(4, True), (8, True), (4, False)])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_r4_linear_exact_on_its_hadamard_and_close_to_reference(m, bits, sym):
    """down_proj with R4 (SmolLM2: 1536 = 12 x 128): bit-exact with the reference given the
    kernel's own Hadamard output; against the reference's Hadamard only rare +-1 flips."""
    k, n, block = 1536, 576, 1536
    gen = torch.Generator().manual_seed(m + bits)
    x = _acts(m, k, gen, torch.bfloat16, 0.0 if sym else 0.4)
    w, sw = _weights(n, k, 1, gen)
    kern, t = _kernel(_spec(k, n, bits, sym, block=block), w, sw)
    out = kern.apply(x, t)
    y = torch.ops.rotquant.cpu_hadamard(x, block)
    qa, sa, za = ops.quantize_activations(y, bits, 0.9, None, sym)
    # the fused native Hadamard + quantization quantizes exactly as the reference does
    fused = kern.quantize_input(x)
    assert torch.equal(fused[0], qa) and torch.equal(fused[1], sa) and (sym or torch.equal(fused[2], za))
    assert torch.equal(out, ops.w4a4_gemm(qa, sa, w, sw, torch.bfloat16, za))
    q_ref, s_ref, z_ref = ops.quantize_activations(x, bits, 0.9, block, sym)
    d = (qa.int() - q_ref.int()).abs()
    assert d.max() <= 1 and d.float().mean() < 1e-3
    assert ((sa - s_ref).abs() / s_ref).max() < 1e-5
    want = ops.rotquant_linear(x, w, sw, None, bits, 0.9, block, sym)
    assert torch.allclose(out.float(), want.float(), rtol=0.02, atol=0.02 * want.float().abs().max().item())


def test_tp_global_range_quantizes_as_tp1():
    """Row-parallel at tp > 1: each rank's columns quantize with the whole row's scale (and zero
    point): the concatenated ranks' integers are tp 1's."""
    gen = torch.Generator().manual_seed(0)
    m, k = 5, 576
    x = _acts(m, 2 * k, gen, torch.bfloat16, 0.3)
    for sym in (True, False):
        full = _spec(2 * k, 8, 4, sym)
        q1, s1, z1 = cpu_kernel.CpuInt8Kernel(full).quantize_input(x)
        ranks = [x[:, :k], x[:, k:]]
        ranges = [torch.cat(ref.row_range(r), -1) for r in ranks]  # what each rank contributes

        def gather(t, dim, _all=ranges):
            return torch.cat(_all, dim=dim)

        part = cpu_kernel.CpuInt8Kernel(_spec(k, 8, 4, sym, tp_range=True))
        outs = [part.quantize_input(r, gather) for r in ranks]
        assert torch.equal(torch.cat([o[0] for o in outs], -1), q1)
        for o in outs:
            assert torch.equal(o[1], s1) and (sym or torch.equal(o[2], z1))


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("sym,block", [(True, None), (False, None), (True, 192), (False, 192)])
def test_compiled_linear_is_bit_exact(sym, block):
    """vLLM compiles the model with Dynamo (fullgraph) + Inductor: the traced quantization and
    epilogue, fused into C++ by Inductor, must give the eager (= reference) bits, at any M."""
    k, n = 576, 960
    gen = torch.Generator().manual_seed(5)
    w, sw = _weights(n, k, 1, gen)
    kern, t = _kernel(_spec(k, n, 4, sym, block=block), w, sw)

    def f(inp):
        return kern.apply(inp, t)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 3, 7, 64):
        x = _acts(m, k, gen, torch.bfloat16, 0.0 if sym else 0.5)
        assert torch.equal(compiled(x), f(x)), m


def test_tp_range_path_compiles():
    k = 576
    gen = torch.Generator().manual_seed(9)
    w, sw = _weights(64, k, 1, gen)
    kern, t = _kernel(_spec(k, 64, 4, False, block=192, tp_range=True), w, sw)

    def gather(v, dim):  # a second rank whose rows span a wider range
        return torch.cat([v, v * 2], dim=dim)

    def f(inp):
        return kern.apply(inp, t, None, gather)

    x = _acts(4, k, gen, torch.bfloat16, 0.5)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    assert not torch.equal(f(x), kern.apply(x, t))  # the gathered range is used


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_layers_match_the_reference():
    """Every quantized linear of layers 0, 15 and 29 of the real W4A4 SmolLM2 checkpoint, on the
    activations the simulated model gives them for a real text: the CPU kernel's output equals
    the reference's (the down_proj layers given the kernel's own R4 Hadamard)."""
    from vllm_rotquant.testing.real_model import smollm2_rotquant_dir
    from transformers import AutoTokenizer

    from vllm_rotquant.offline import data
    from vllm_rotquant.offline.simulate import SimQuantLinear, load_simulated

    ckpt = smollm2_rotquant_dir()
    model = load_simulated(ckpt, torch.bfloat16)
    ids = data.tokenize(AutoTokenizer.from_pretrained(ckpt), data.load_text("austen"))[1000:1097]
    captured = {}
    wanted = [f"model.layers.{i}.{p}" for i in (0, 15, 29) for p in
              ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    def keep(name):
        def hook(mod, inp, out):
            captured[name] = (inp[0].detach(), out.detach())
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(keep(name)) for name in wanted]
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids).reshape(1, -1))
    for h in hooks:
        h.remove()
    for name in wanted:
        lin = model.get_submodule(name)
        assert isinstance(lin, SimQuantLinear)
        x, want = captured[name]
        x = x.reshape(-1, lin.in_features)
        want = want.reshape(-1, lin.out_features)
        spec = _spec(lin.in_features, lin.out_features, lin.act_bits, lin.act_symmetric, None, lin.hadamard_block,
                     torch.bfloat16, lin.clip)
        kern, t = _kernel(spec, lin.w_int, lin.scale)
        for rows in (slice(0, 1), slice(0, 5), slice(None)):  # decode-sized (native) and prompt (oneDNN)
            out = kern.apply(x[rows], t)
            if lin.hadamard_block:
                qa, sa, za = ops.quantize_activations(torch.ops.rotquant.cpu_hadamard(x[rows], lin.hadamard_block),
                                                      lin.act_bits, lin.clip, None, lin.act_symmetric)
                assert torch.equal(out, ops.w4a4_gemm(qa, sa, lin.w_int, lin.scale, torch.bfloat16, za)), name
                close = (out.float() - want[rows].float()).abs() <= 0.02 * want[rows].float().abs() + 0.02
                assert close.float().mean() > 0.99, name
            else:
                assert torch.equal(out, want[rows]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 17, 34, 576, 1000])
@pytest.mark.parametrize("bits", [4, 8])
def test_native_quant_without_hadamard_is_the_reference(k, bits, dtype):
    """Block 0: the per-token quantization alone (the layers without R4), bit for bit the
    reference's, including an all-zero row and rows of very different ranges."""
    gen = torch.Generator().manual_seed(k + bits)
    x = torch.randn(37, k, generator=gen) * torch.logspace(-3, 3, 37)[:, None]
    x[5] = 0
    x = x.to(dtype)
    q, s = torch.ops.rotquant.cpu_hadamard_quant(x, 0, 0.9, bits)
    q_ref, s_ref = ref.quant_act_ref(x, 0.9, bits)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q, s, z = torch.ops.rotquant.cpu_hadamard_quant_asym(x + 0.5, 0, 0.9, bits)
    q_ref, s_ref, z_ref = ref.quant_act_asym_ref(x + 0.5, 0.9, bits)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and torch.equal(z, z_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [None, 192])
@pytest.mark.parametrize("group", [None, 32])
def test_w4a16_on_the_reference_kernel_is_the_reference_linear(block, group, dtype):
    """act_bits 16 (no activation quantizer; CpuInt8 refuses it): the weight de-quantized once at
    load, the input rotated in its own dtype, as ops.rotquant_linear does it."""
    k, n = 576, 40
    gen = torch.Generator().manual_seed(11)
    w, sw = _weights(n, k, k // group if group else 1, gen)
    x = _acts(7, k, gen, dtype)
    kern = ReferenceKernel(_spec(k, n, 16, True, group, block, dtype))
    bias = torch.randn(n, generator=gen).to(dtype)
    out = kern.apply(x, kern.prepare(pack_int4(w), sw), bias)
    assert out.dtype == dtype and torch.equal(out, ops.rotquant_linear(x, w, sw, bias, 16, 0.9, block))
