"""The torch reference ops against float64 / integer ground truth, at odd shapes and edges."""
import pytest
import torch

from vllm_rotquant.format import pack_int4
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels.hadamard import hadamard_matrix
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.reference import dequant_weight_ref

SHAPES = [(1, 64, 8), (3, 576, 960), (17, 1536, 576), (128, 192, 7)]


def _acts(m, k, gen):
    x = torch.randn(m, k, generator=gen)
    x[0, 0] = 40.0  # an outlier
    if m > 2:
        x[1] = 0.0  # an all-zero row
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quant_act_matches_float64(bits, m, k, n):
    gen = torch.Generator().manual_seed(m * k)
    x = _acts(m, k, gen).to(torch.bfloat16)
    q, s = ops.quant_act(x, 0.9, bits)
    qmax = 2 ** (bits - 1) - 1
    xd = x.double()
    amax = xd.abs().amax(-1, keepdim=True)
    s64 = torch.where(amax > 0, amax * 0.9 / qmax, torch.ones_like(amax))
    assert torch.allclose(s.double(), s64, rtol=1e-6)
    q64 = torch.clamp(torch.round(xd / s.double()), -qmax - 1, qmax)
    assert (q.double() - q64).abs().max() <= 1 and (q.double() != q64).float().mean() < 1e-3
    assert q.dtype == torch.int8 and q.min() >= -qmax - 1 and q.max() <= qmax
    if m > 2:
        assert (q[1] == 0).all() and s[1].item() == 1.0


@pytest.mark.parametrize("groups", [None, 32])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w4a4_gemm_is_exact(groups, m, k, n):
    gen = torch.Generator().manual_seed(k + n)
    qa = torch.randint(-8, 8, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    sa = torch.rand(m, 1, generator=gen) + 0.1
    g = 1 if groups is None else k // groups
    sw = (torch.rand(n, g, generator=gen) + 0.1).to(torch.float16)
    out = ops.w4a4_gemm(qa, sa, pack_int4(w), sw, torch.float32)
    acc = (qa.long().reshape(m, g, -1)[:, None] * w.long().reshape(n, g, -1)[None]).sum(-1)  # exact [m, n, g]
    want = (acc.double() * sw.double()[None]).sum(-1) * sa.double()
    assert ((out.double() - want).abs() <= 2.5e-7 * want.abs() + 1e-30).all()
    bf = ops.w4a4_gemm(qa, sa, w, sw, torch.bfloat16)  # unpacked int8 weights give the same
    assert torch.allclose(bf.float(), out, rtol=8e-3, atol=1e-2)


def test_int_accumulation_exact_past_float32_range():
    k = 16384  # 16384 * 127 * 8 > 2^24: the reference must switch to float64
    qa = torch.full((2, k), 127, dtype=torch.int8)
    w = torch.full((3, k), 7, dtype=torch.int8)
    w[0, 0] = 6
    out = ops.w4a4_gemm(qa, torch.ones(2, 1), w, torch.ones(3, 1, dtype=torch.float16), torch.float32)
    # float32 output rounds, but the accumulation itself must see the -127 difference exactly
    assert out[0, 0].item() == float(torch.tensor(127 * 7 * k - 127, dtype=torch.float32))


@pytest.mark.parametrize("block", [16, 64, 12, 192])
def test_hadamard_quant_is_hadamard_then_quant(block):
    x = torch.randn(5, block * 3)
    h = hadamard_matrix(block)
    y = (x.double().reshape(5, 3, block) @ h).reshape(5, -1)
    q, s = ops.hadamard_quant(x, block, 0.9, 4)
    assert torch.allclose(s.double(), y.abs().amax(-1, keepdim=True) * 0.9 / 7, rtol=1e-5)
    q64 = torch.clamp(torch.round(y / s.double()), -8, 7)
    assert (q.double() - q64).abs().max() <= 1
    assert torch.allclose(ops.hadamard(x, block).double(), y, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of block"):
        ops.hadamard(torch.randn(2, block + 2), block)


@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_rotquant_linear_composition(act_bits):
    gen = torch.Generator().manual_seed(act_bits)
    x = torch.randn(2, 3, 64, generator=gen)
    w = torch.randint(-8, 8, (24, 64), generator=gen, dtype=torch.int8)
    sw = torch.rand(24, 1, generator=gen).to(torch.float16) / 10
    bias = torch.randn(24, generator=gen)
    out = ops.rotquant_linear(x, pack_int4(w), sw, bias, act_bits, 0.9, 16)
    xr = ops.hadamard(x.reshape(-1, 64), 16)
    wd = dequant_weight_ref(w, sw, torch.float32)
    if act_bits == 16:
        want = xr @ wd.T
    else:
        q, s = ops.quant_act(xr, 0.9, act_bits)
        want = (q.float() * s) @ wd.T
    assert out.shape == (2, 3, 24)
    assert torch.allclose(out.reshape(-1, 24), want + bias, rtol=1e-4, atol=1e-4)


def test_rotquant_linear_shape_error():
    with pytest.raises(ValueError, match="input has 32 features, weight expects 64"):
        ops.rotquant_linear(torch.randn(2, 32), torch.zeros(8, 32, dtype=torch.uint8),
                            torch.ones(8, 1, dtype=torch.float16), None, 4, 0.9, None)


def test_ops_compile_fullgraph():
    """Fake implementations let Dynamo trace the composed linear without graph breaks."""
    w = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    sw = torch.rand(16, 1).to(torch.float16)

    def f(x):
        return ops.rotquant_linear(x, w, sw, None, 4, 0.9, 32)

    x = torch.randn(5, 64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


# ----------------------------------------------------------------------------- asymmetric activations
def _asym64(x: torch.Tensor, clip: float, bits: int):
    """float64 ground truth of the asymmetric quantizer: (scale, unsigned zero point)."""
    xd = x.double()
    hi = xd.amax(-1, keepdim=True).clamp_min(0) * clip
    lo = xd.amin(-1, keepdim=True).clamp_max(0) * clip
    levels = 2 ** bits - 1
    scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    return scale, torch.round(-lo / scale)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quant_act_asym_matches_float64(bits, m, k, n):
    gen = torch.Generator().manual_seed(m * k + 1)
    x = _acts(m, k, gen) + 0.7  # skewed: the range is not symmetric about 0
    if m > 3:
        x[1] = 0.0  # all zero
        x[2] = x[2].abs() + 0.5  # all positive: zero point at the bottom of the range
        x[3] = -x[3].abs()  # all negative: zero point at the top
    x = x.to(torch.bfloat16)
    q, s, z = ops.quant_act_asym(x, 0.9, bits)
    half, levels = 2 ** (bits - 1), 2 ** bits - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and z.dtype == torch.int32
    assert s.shape == z.shape == (m, 1) and q.min() >= -half and q.max() <= half - 1
    s64, u64 = _asym64(x, 0.9, bits)
    assert torch.allclose(s.double(), s64, rtol=1e-6)
    assert ((z.double() + half) - u64).abs().max() <= 1
    q64 = torch.clamp(torch.round(x.double() / s.double()) + (z.double() + half), 0, levels) - half
    assert (q.double() - q64).abs().max() <= 1 and (q.double() != q64).float().mean() < 1e-3
    deq = (q.double() - z.double()) * s.double()
    u = z.double() + half
    inside = (x.double() >= -u * s.double()) & (x.double() <= (levels - u) * s.double())  # not clipped
    err = (deq - x.double()).abs() / s.double()
    assert (err[inside] <= 0.5 * (1 + 1e-4)).all()  # (1e-4: fp32 x/scale at rounding ties)
    if m > 3:
        assert (z[2] == -half).all() and (z[3] == half - 1).all()
        assert (q[1] == z[1]).all() and s[1].item() == 1.0  # the all-zero row dequantizes to 0


def test_asymmetric_quantization_halves_the_error_on_one_sided_rows():
    """What the zero point is for: a one-sided (post-activation-like) row uses all 16 levels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 512, generator=gen).abs()
    q, s = ops.quant_act(x, 1.0, 4)
    qa, sa, za = ops.quant_act_asym(x, 1.0, 4)
    err_sym = ((q.float() * s - x) ** 2).mean()
    err_asym = (((qa.float() - za.float()) * sa - x) ** 2).mean()
    assert err_asym < 0.35 * err_sym, (err_asym.item(), err_sym.item())


@pytest.mark.parametrize("groups", [None, 32])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w4a4_gemm_asym_is_exact(groups, bits, m, k, n):
    """(qa - za) * sa against the dequantized weights, in exact integer arithmetic."""
    gen = torch.Generator().manual_seed(k + n + bits)
    qa, sa, za = ops.quant_act_asym(_acts(m, k, gen) + 0.5, 0.9, bits)
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    g = 1 if groups is None else k // groups
    sw = (torch.rand(n, g, generator=gen) + 0.1).to(torch.float16)
    wsum = ops.weight_sums(w, g)
    assert wsum.dtype == torch.int32 and torch.equal(wsum.long(), w.long().reshape(n, g, -1).sum(-1))
    out = ops.w4a4_gemm(qa, sa, pack_int4(w), sw, torch.float32, za, wsum)
    xa = qa.long() - za.long()  # the integers the activations stand for
    acc = (xa.reshape(m, g, -1)[:, None] * w.long().reshape(n, g, -1)[None]).sum(-1)  # exact [m, n, g]
    want = (acc.double() * sw.double()[None]).sum(-1) * sa.double()
    # the exact value rounded to float32 twice (the sum, then the product with sa): per element
    assert ((out.double() - want).abs() <= 2.5e-7 * want.abs() + 1e-30).all()
    assert torch.equal(ops.w4a4_gemm(qa, sa, w, sw, torch.float32, za), out)  # sums recomputed: same
    sym = ops.w4a4_gemm(qa, sa, w, sw, torch.float32)
    assert not torch.allclose(sym, out)  # the zero point is really applied


@pytest.mark.parametrize("block", [16, 12, 192])
def test_hadamard_quant_asym_is_hadamard_then_quant(block):
    x = torch.randn(5, block * 3) + 0.3
    y = (x.double().reshape(5, 3, block) @ hadamard_matrix(block)).reshape(5, -1)
    q, s, z = ops.hadamard_quant_asym(x, block, 0.9, 4)
    s64, u64 = _asym64(y, 0.9, 4)
    assert torch.allclose(s.double(), s64, rtol=1e-5)
    q64 = torch.clamp(torch.round(y / s.double()) + z.double() + 8, 0, 15) - 8
    assert (q.double() - q64).abs().max() <= 1


@pytest.mark.parametrize("act_bits", [4, 8])
def test_rotquant_linear_asymmetric_composition(act_bits):
    gen = torch.Generator().manual_seed(act_bits + 10)
    x = torch.randn(2, 3, 64, generator=gen) + 0.5
    w = torch.randint(-8, 8, (24, 64), generator=gen, dtype=torch.int8)
    sw = torch.rand(24, 2, generator=gen).to(torch.float16) / 10  # two groups of 32
    out = ops.rotquant_linear(x, pack_int4(w), sw, None, act_bits, 0.9, 16, act_symmetric=False)
    xr = ops.hadamard(x.reshape(-1, 64), 16)
    q, s, z = ops.quant_act_asym(xr, 0.9, act_bits)
    want = ((q.float() - z.float()) * s) @ dequant_weight_ref(w, sw, torch.float32).T
    assert torch.allclose(out.reshape(-1, 24), want, rtol=1e-4, atol=1e-4)
    with_sums = ops.rotquant_linear(x, w, sw, None, act_bits, 0.9, 16, False, ops.weight_sums(w, 2))
    assert torch.equal(with_sums, out)
    # and closer to the float product than the symmetric quantizer on these shifted inputs
    exact = xr @ dequant_weight_ref(w, sw, torch.float32).T
    sym = ops.rotquant_linear(x, w, sw, None, 4, 0.9, 16).reshape(-1, 24)
    if act_bits == 4:
        assert (out.reshape(-1, 24) - exact).norm() < (sym - exact).norm()


def test_asymmetric_ops_compile_fullgraph():
    w = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    sw = torch.rand(16, 1).to(torch.float16)
    wsum = ops.weight_sums(w, 1)

    def f(x):
        return ops.rotquant_linear(x, w, sw, None, 4, 0.9, 32, False, wsum)

    x = torch.randn(5, 64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_act_in_range(bits):
    """A given per-token range (the whole row's, for a tensor-parallel rank's columns): the row's
    own range gives quant_act's result, a wider one a larger scale; the integers of two column
    halves quantized with the full row's range are the full row's."""
    gen = torch.Generator().manual_seed(bits)
    x = _acts(6, 512, gen) + 0.3
    vmax, vmin = ref.row_range(x)
    amax = torch.maximum(vmax.abs(), vmin.abs())
    assert torch.equal(amax, x.float().abs().amax(-1, keepdim=True))
    assert all(torch.equal(a, b) for a, b in zip(ops.quant_act_in_range(x, amax, 0.9, bits), ops.quant_act(x, 0.9, bits)))
    assert all(torch.equal(a, b) for a, b in zip(ops.quant_act_asym_in_range(x, vmax, vmin, 0.9, bits),
                                                 ops.quant_act_asym(x, 0.9, bits)))
    _, s2 = ops.quant_act_in_range(x, amax * 2, 0.9, bits)
    assert torch.allclose(s2, ops.quant_act(x, 0.9, bits)[1] * 2)
    for sym in (True, False):
        whole = ref.quant_act_in_range_ref(x, vmax, vmin, 0.9, bits, sym)
        halves = [ref.quant_act_in_range_ref(h, vmax, vmin, 0.9, bits, sym) for h in (x[:, :256], x[:, 256:])]
        assert torch.equal(torch.cat([h[0] for h in halves], -1), whole[0])
        assert all(torch.equal(h[1], whole[1]) for h in halves)
