"""GPU tests of the Triton W4A4 GEMM and the composed linear (run: pytest -m gpu)."""
import pytest
import torch

from vllm_rotquant.format import pack_int4
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels import triton_gemm
from vllm_rotquant.kernels.layout import prepare_weight

pytestmark = pytest.mark.gpu

# (K, N) of the linear layers the bench covers: Llama-2-7B, Llama-3-8B, SmolLM2
SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096),
          (4096, 6144), (4096, 28672), (14336, 4096),
          (576, 960), (576, 3072), (1536, 576)]
MS = [1, 3, 16, 17, 100, 129, 300]


def _weights(n, k, groups, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    sw = (torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 1e-4).to(torch.bfloat16)
    return w, sw


def _qacts(m, k, bits, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qm = 2 ** (bits - 1) - 1
    qa = torch.randint(-qm - 1, qm + 1, (m, k), generator=g, device="cuda", dtype=torch.int8)
    if m > 4:
        qa[2] = 0  # all-zero row
        qa[3] = qm  # extreme row
    sa = torch.rand(m, 1, generator=g, device="cuda") * 0.1 + 1e-3
    return qa, sa


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_gemm_per_channel_exact(k, n, bits, poison):
    w, sw = _weights(n, k, 1, seed=k + n)
    wk = prepare_weight(pack_int4(w))
    for m in MS:
        qa, sa = _qacts(m, k, bits, seed=m * 7 + bits)
        want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)
        poison()
        out = ops.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        assert torch.equal(out, want), (m, (out.float() - want.float()).abs().max().item())


@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096), (1536, 576)])
def test_gemm_fp16_out_and_large_m(k, n):
    w, sw = _weights(n, k, 1, seed=3)
    sw = sw.to(torch.float16)
    wk = prepare_weight(w)
    for m in (2048, 2051):
        qa, sa = _qacts(m, k, 4, seed=m)
        out = ops.w4a4_gemm(qa, sa, wk, sw, torch.float16)
        assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.float16))


def _close_bf16(out, want):
    """Equal up to one rounding of the output dtype (the fp32 summation order of the groups)."""
    o, r = out.float(), want.float()
    tol = r.abs() * 2 ** -7 + 1e-6
    return bool(((o - r).abs() <= tol).all())


@pytest.mark.parametrize("k,n", [(4096, 12288), (11008, 4096), (14336, 4096), (1536, 576)])
@pytest.mark.parametrize("group", [128, 64])
def test_gemm_grouped(k, n, group, poison):
    w, sw = _weights(n, k, k // group, seed=group + k)
    wk = prepare_weight(w)
    for m in (1, 16, 129):
        qa, sa = _qacts(m, k, 4, seed=m)
        poison()
        out = ops.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16)
        want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)
        assert _close_bf16(out, want)
        assert (out != want).float().mean().item() < 0.05


CONFIGS = [  # every tile shape the bench sweeps, split-K included
    triton_gemm._cfg(16, 16, 256, 4, 4, split=4), triton_gemm._cfg(16, 32, 256, 4, 4, split=2),
    triton_gemm._cfg(16, 64, 128, 4, 4, split=8), triton_gemm._cfg(16, 32, 512, 4, 3),
    triton_gemm._cfg(32, 64, 128, 4, 4), triton_gemm._cfg(64, 64, 128, 4, 4),
    triton_gemm._cfg(128, 128, 64, 8, 4), triton_gemm._cfg(128, 128, 128, 8, 3),
    triton_gemm._cfg(256, 128, 64, 8, 3), triton_gemm._cfg(256, 128, 128, 8, 2),
    triton_gemm._cfg(128, 256, 64, 8, 3), triton_gemm._cfg(256, 64, 64, 4, 3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "bm{BM}_bn{BN}_bkp{BKP}_s{SPLIT_K}_w{num_warps}".format(**c))
def test_gemm_every_config(cfg):
    for k, n in [(4096, 4096), (576, 960), (11008, 4096)]:
        w, sw = _weights(n, k, 1, seed=k)
        wk = prepare_weight(w)
        for m in (1, 16, 33, 300):
            qa, sa = _qacts(m, k, 4, seed=m + k)
            out = triton_gemm.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16, config=cfg)
            assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)), (k, n, m)


def test_gemm_accepts_canonical_layout():
    w, sw = _weights(256, 1024, 1, seed=1)
    qa, sa = _qacts(5, 1024, 4, seed=2)
    want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)
    assert torch.equal(ops.w4a4_gemm(qa, sa, pack_int4(w), sw, torch.bfloat16), want)
    assert torch.equal(ops.w4a4_gemm(qa, sa, w, sw, torch.bfloat16), want)


def test_nonfinite_rows_do_not_leak():
    k, n, m = 4096, 4096, 24
    w, sw = _weights(n, k, 1, seed=9)
    wk = prepare_weight(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bad = x.clone()
    bad[4, 7] = float("nan")
    bad[5] = float("inf")
    out = ops.rotquant_linear(bad, wk, sw, None, 4, 0.9, None)
    good = ops.rotquant_linear(x, wk, sw, None, 4, 0.9, None)
    keep = torch.ones(m, dtype=torch.bool)
    keep[[4, 5]] = False
    assert torch.equal(out[keep], good[keep])
    assert torch.isfinite(out[keep]).all()


def _linear_case(k, n, block, m, seed=0):
    w, sw = _weights(n, k, 1, seed=seed)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    return w, sw, bias, x


@pytest.mark.parametrize("k,n,block", [(4096, 12288, None), (11008, 4096, 256), (1536, 576, 1536)])
def test_linear_matches_reference(k, n, block):
    w, sw, bias, x = _linear_case(k, n, block, 37)
    out = ops.rotquant_linear(x, prepare_weight(w), sw, bias, 4, 0.9, block)
    if block:
        qa, sa = ops.hadamard_quant(x, block, 0.9, 4)  # (Hadamard order differs: tested above)
    else:
        qa, sa = (t.cuda() for t in ref.quant_act_ref(x.cpu(), 0.9, 4))
    want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16) + bias
    assert torch.equal(out, want)
    # on CPU, the reference linear with the canonical layout
    cpu = ops.rotquant_linear(x.cpu(), pack_int4(w).cpu(), sw.cpu(), bias.cpu(), 4, 0.9, block)
    close = ((out.cpu().float() - cpu.float()).abs() <= cpu.float().abs() * 0.02 + 0.05).float().mean()
    assert close.item() > 0.99  # Hadamard rounding may flip a few int4 values


@pytest.mark.parametrize("block", [None, 256])
def test_linear_compile_and_cuda_graph(block):
    k, n = (11008, 4096) if block else (4096, 6144)
    w, sw, bias, x = _linear_case(k, n, block, 16, seed=4)
    wk = prepare_weight(w)

    def f(inp):
        return ops.rotquant_linear(inp, wk, sw, bias, 4, 0.9, block)

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), eager)

    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as torch.cuda.graphs recommends
        for _ in range(2):
            compiled(static_x)
            f(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g_eager, g_comp = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_eager):  # capture fails on any host synchronisation
        out_eager = f(static_x)
    with torch.cuda.graph(g_comp):
        out_comp = compiled(static_x)
    for seed in (1, 2):
        x2 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(device="cuda").manual_seed(seed))
        static_x.copy_(x2)
        g_eager.replay()
        g_comp.replay()
        want = f(x2)
        assert torch.equal(out_eager, want) and torch.equal(out_comp, want)
