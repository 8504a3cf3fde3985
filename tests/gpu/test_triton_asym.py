"""GPU tests of the asymmetric-activation path (act_symmetric: false) against kernels/reference.py:
the quantizers' zero points and the GEMM's zero-point correction (run: pytest -m gpu)."""
import pytest
import torch

from vllm_rotquant.format import pack_int4
from vllm_rotquant.kernels import ops, triton_gemm, triton_quant
from vllm_rotquant.kernels import triton_ops as tops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.layout import prepare_weight

pytestmark = pytest.mark.gpu


def _cuda(t):
    return tuple(v.cuda() for v in t)


def _acts(m, k, dtype, seed):
    """Shifted activations with the edge rows: outliers, all zero, all positive, all negative."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda") + 0.4
    if m > 5:
        x[1] *= 40.0
        x[2, (k * 7) // 11] = 300.0
        x[3] = 0.0
        x[4] = x[4].abs() + 0.1
        x[5] = -x[5].abs()
    return x.to(dtype)


@pytest.mark.parametrize("k", [576, 1536, 4096, 11008, 14336])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_act_asym_bit_exact(k, bits, dtype, poison):
    for m in (1, 7, 300):
        x = _acts(m, k, dtype, seed=k + m + bits)
        poison()
        q, s, z = tops.quant_act_asym(x, 0.9, bits)
        qr, sr, zr = _cuda(ref.quant_act_asym_ref(x.cpu(), 0.9, bits))
        assert q.dtype == torch.int8 and z.dtype == torch.int32 and z.shape == (m, 1)
        assert torch.equal(s, sr) and torch.equal(z, zr) and torch.equal(q, qr)


@pytest.mark.parametrize("block,k", [(128, 4096), (256, 11008), (1536, 1536), (2048, 14336), (576, 576)])
@pytest.mark.parametrize("bits", [4, 8])
def test_hadamard_quant_asym(block, k, bits, poison):
    m = 133
    x = _acts(m, k, torch.bfloat16, seed=block + k)
    poison()
    f = torch.empty(m, k, dtype=torch.float32, device="cuda")
    q, s, z = triton_quant.hadamard_quant(x, block, 0.9, bits, float_out=f, asymmetric=True)
    # bit-exact on the kernel's own Hadamard output
    qf, sf, zf = _cuda(ref.quant_act_asym_ref(f.cpu(), 0.9, bits))
    assert torch.equal(s, sf) and torch.equal(z, zf) and torch.equal(q, qf)
    # against the fp32 reference: the Hadamard's summation order differs, so rare +-1
    qr, sr, zr = _cuda(ref.hadamard_quant_asym_ref(x.cpu(), block, 0.9, bits))
    assert ((s - sr).abs() / sr).max().item() < 1e-5 and (z - zr).abs().max().item() <= 1
    d = (q.int() - qr.int()).abs()
    assert d.max().item() <= 1 and d.float().mean().item() < 1e-3
    q2, s2, z2 = tops.hadamard_quant_asym(x, block, 0.9, bits)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)


def _case(m, n, k, groups, bits, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda") + 0.5
    qa, sa, za = tops.quant_act_asym(x, 0.9, bits)
    w = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    sw = (torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 1e-4).to(torch.bfloat16)
    return qa, sa, za, w, sw


@pytest.mark.parametrize("k,n", [(4096, 12288), (11008, 4096), (14336, 4096), (576, 960), (1536, 576)])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_asym_per_channel_exact(k, n, bits, poison):
    for m in (1, 3, 16, 17, 129, 300):  # split-K (small M), mid and large tiles
        qa, sa, za, w, sw = _case(m, n, k, 1, bits, seed=m + k + n + bits)
        wk = prepare_weight(pack_int4(w))
        wsum = ops.weight_sums(wk, 1)
        assert torch.equal(wsum, w.int().sum(1, keepdim=True))
        poison()
        out = tops.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16, za, wsum)
        assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16, za)), (m, k, n)


@pytest.mark.parametrize("k,n", [(4096, 12288), (11008, 4096), (1536, 576)])
@pytest.mark.parametrize("group", [128, 64])
def test_gemm_asym_grouped(k, n, group):
    for m in (1, 16, 129, 600):  # split-free decode, mid tiles, 8-warp 128x128 tiles (large N)
        qa, sa, za, w, sw = _case(m, n, k, k // group, 4, seed=m + group)
        wk = prepare_weight(w)
        out = tops.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16, za, ops.weight_sums(wk, k // group))
        want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16, za)
        tol = want.float().abs() * 2 ** -7 + 1e-6  # one output rounding: fp32 group-sum order
        assert ((out.float() - want.float()).abs() <= tol).all()
        assert (out != want).float().mean().item() < 0.05


@pytest.mark.parametrize("group", [128, 64])
def test_gemm_asym_grouped_skewed_activations(group):
    """All-positive activations (zero point -8 on every token): the za * sum_g sw * wsum correction
    is as large as the products it is taken from, and must still cancel to one output rounding."""
    k, n = 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(group)
    for m in (5, 700):
        x = torch.rand(m, k, generator=g, device="cuda") * 0.1 + 5.0
        qa, sa, za = tops.quant_act_asym(x, 0.9, 4)
        assert (za == -8).all()
        w = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
        sw = (torch.rand(n, k // group, generator=g, device="cuda") * 0.02 + 1e-4).to(torch.bfloat16)
        wk = prepare_weight(w)
        out = tops.w4a4_gemm(qa, sa, wk, sw, torch.float32, za, ops.weight_sums(wk, k // group))
        want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.float32, za)
        # fp32 sums in another order: a few fp32 ulps of the terms; a wrong correction is O(1)
        assert ((out - want).abs() <= want.abs() * 2 ** -10 + want.abs().mean() * 2 ** -14).all(), (m, group)


@pytest.mark.parametrize("cfg", [triton_gemm._cfg(16, 16, 256, 4, 4, split=4), triton_gemm._cfg(16, 64, 128, 4, 4, split=8),
                                 triton_gemm._cfg(64, 64, 128, 4, 4), triton_gemm._cfg(128, 128, 64, 8, 4)],
                         ids=lambda c: "bm{BM}_bn{BN}_s{SPLIT_K}".format(**c))
def test_gemm_asym_every_config(cfg):
    k, n = 4096, 4096
    for m in (1, 33, 300):
        qa, sa, za, w, sw = _case(m, n, k, 1, 4, seed=m)
        wk = prepare_weight(w)
        out = triton_gemm.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16, config=cfg, za=za, wsum=ops.weight_sums(wk, 1))
        assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16, za)), m


def test_gemm_asym_argument_errors():
    qa, sa, za, w, sw = _case(4, 64, 256, 1, 4, seed=0)
    wk = prepare_weight(w)
    with pytest.raises(ValueError, match="both za and wsum"):
        triton_gemm.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16, za=za)
    with pytest.raises(ValueError, match="wsum int32"):
        triton_gemm.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16, za=za, wsum=ops.weight_sums(wk, 1).float())


@pytest.mark.parametrize("block", [None, 256])
def test_asym_linear_matches_reference_compiles_and_captures(block):
    k, n = (11008, 4096) if block else (4096, 6144)
    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    sw = (torch.rand(n, 1, generator=g, device="cuda") * 0.02 + 1e-4).to(torch.bfloat16)
    x = torch.randn(16, k, generator=g, device="cuda", dtype=torch.bfloat16) * 3 + 1
    wk = prepare_weight(w)
    wsum = ops.weight_sums(wk, 1)

    def f(inp):
        return tops.rotquant_linear(inp, wk, sw, None, 4, 0.9, block, False, wsum)

    eager = f(x)
    if block:
        qa, sa, za = tops.hadamard_quant_asym(x, block, 0.9, 4)
    else:
        qa, sa, za = _cuda(ref.quant_act_asym_ref(x.cpu(), 0.9, 4))
    assert torch.equal(eager, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16, za))
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), eager)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            compiled(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(static_x)
    x2 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16) + 1
    static_x.copy_(x2)
    graph.replay()
    assert torch.equal(out, f(x2))
