"""GPU tests of the Triton W4A4 GEMM, the composed linear and the Triton kernel chosen at load
(run: pytest -m gpu)."""
import pytest
import torch

from vllm_rotquant.format import pack_int4
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels import triton_gemm
from vllm_rotquant.kernels import triton_ops as tops
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
        out = tops.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        assert torch.equal(out, want), (m, (out.float() - want.float()).abs().max().item())


@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096), (1536, 576)])
def test_gemm_fp16_out_and_large_m(k, n):
    w, sw = _weights(n, k, 1, seed=3)
    sw = sw.to(torch.float16)
    wk = prepare_weight(w)
    for m in (2048, 2051):
        qa, sa = _qacts(m, k, 4, seed=m)
        out = tops.w4a4_gemm(qa, sa, wk, sw, torch.float16)
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
        out = tops.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16)
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


def test_gemm_tuned_tiles_exact():
    """Every tile of the measured table in force for this GPU (shipped, or $ROTQUANT_GEMM_TILES)
    is exact at its shape, at its bucket's M and below."""
    from vllm_rotquant.kernels import tuned_tiles
    table = triton_gemm._tuned_table(torch.device("cuda"))
    if not table:
        pytest.skip(f"no tuned-tile table for {torch.cuda.get_device_name()}")
    for (n, k), (ms, cfgs) in table.items():
        w, sw = _weights(n, k, 1, seed=n + k)
        wk = prepare_weight(w)
        for m, cfg in zip(ms, cfgs):
            for mm in sorted({1, max(1, m // 2 + 1), m}):
                assert triton_gemm.pick_config(mm, n, k, 0, torch.device("cuda")) == tuned_tiles.lookup(table, mm, n, k)
                qa, sa = _qacts(mm, k, 4, seed=mm + k)
                out = triton_gemm.w4a4_gemm(qa, sa, wk, sw, torch.bfloat16)
                assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)), (n, k, mm, cfg)


def test_gemm_refuses_other_layouts():
    """The Triton GEMM reads the kernel layout only (made once at load): a canonical or unpacked
    weight is an error, not a per-call repack; the reference op takes every layout on CUDA too."""
    w, sw = _weights(256, 1024, 1, seed=1)
    qa, sa = _qacts(5, 1024, 4, seed=2)
    want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)
    for layout in (pack_int4(w), w):
        with pytest.raises(ValueError, match="must be in the kernel layout"):
            tops.w4a4_gemm(qa, sa, layout, sw, torch.bfloat16)
        assert torch.equal(ops.w4a4_gemm(qa, sa, layout, sw, torch.bfloat16), want)
    assert torch.equal(tops.w4a4_gemm(qa, sa, prepare_weight(w), sw, torch.bfloat16), want)
    with pytest.raises(ValueError, match="unsupported group size 48"):  # 21 groups: 48 columns, not dividing K
        tops.w4a4_gemm(qa, sa, prepare_weight(w), _weights(256, 1024, 21, seed=1)[1], torch.bfloat16)


def test_nonfinite_rows_do_not_leak():
    k, n, m = 4096, 4096, 24
    w, sw = _weights(n, k, 1, seed=9)
    wk = prepare_weight(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bad = x.clone()
    bad[4, 7] = float("nan")
    bad[5] = float("inf")
    out = tops.rotquant_linear(bad, wk, sw, None, 4, 0.9, None)
    good = tops.rotquant_linear(x, wk, sw, None, 4, 0.9, None)
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
    out = tops.rotquant_linear(x, prepare_weight(w), sw, bias, 4, 0.9, block)
    if block:
        qa, sa = tops.hadamard_quant(x, block, 0.9, 4)  # (Hadamard order differs: tested above)
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
        return tops.rotquant_linear(inp, wk, sw, bias, 4, 0.9, block)

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


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k,n,block,tp_range", [(4096, 6144, None, False), (1536, 576, 1536, False),
                                                (11008, 4096, 256, True)])
def test_triton_kernel_chosen_at_load(k, n, block, tp_range, sym):
    """What the linear method runs on CUDA: choose_kernel picks Triton, its prepare makes the
    kernel layout (and weight sums), its forward equals the Triton ops' composition, compiles
    with fullgraph, and with a gathered per-token range (row-parallel at tp > 1) quantizes with
    that range."""
    from vllm_rotquant.kernels.linear_kernel import LinearSpec, choose_kernel

    spec = LinearSpec(k, n, None, 4, sym, 0.9, block, tp_range, "cuda", torch.bfloat16)
    cls, passed_over = choose_kernel(spec)
    assert cls.name == "Triton" and passed_over == ()
    kernel = cls(spec)
    w, sw = _weights(n, k, 1, seed=k + n)
    t = kernel.prepare(pack_int4(w), sw)
    assert t["w_q"].dtype == torch.int32 and t["w_scale"].dtype == torch.float32 and ("w_sum" in t) != sym
    x = torch.randn(9, k, device="cuda", dtype=torch.bfloat16) * 2 + (0.0 if sym else 0.5)
    gather = (lambda v, dim: torch.cat([v, v * 1.5], dim=dim)) if tp_range else None
    out = kernel.apply(x, t, None, gather)
    if not tp_range:
        assert torch.equal(out, tops.rotquant_linear(x, t["w_q"], t["w_scale"], None, 4, 0.9, block, sym, t.get("w_sum")))
    else:  # the range of a "row" whose other rank spans 1.5x: the reference quantizer with that range
        y = tops.hadamard(x.float(), block)
        vmax, vmin = ref.row_range(y)
        vmax, vmin = torch.maximum(vmax, vmax * 1.5), torch.minimum(vmin, vmin * 1.5)
        q, s, z = (v.cuda() if v is not None else None for v in ref.quant_act_in_range_ref(
            y.cpu(), vmax.cpu(), vmin.cpu(), 0.9, 4, sym))
        assert torch.equal(out, ref.w4a4_gemm_ref(q, s, w, sw.float(), torch.bfloat16, z))
    compiled = torch.compile(lambda inp: kernel.apply(inp, t, None, gather), fullgraph=True)
    assert torch.equal(compiled(x), out)
