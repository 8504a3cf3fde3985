"""GPU tests of the Triton activation kernels against kernels/reference.py (run: pytest -m gpu).

References run on the CPU: that is where they define the semantics. (CUDA torch computes the
reference's `amax * clip / qmax` as a multiplication by fl(1/qmax), which differs from the CPU's
correctly rounded division in the last bit of about half the scales; the kernels follow the CPU.)
"""
import pytest
import torch

from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels import triton_ops as tops
from vllm_rotquant.kernels.hadamard import hadamard_matrix

pytestmark = pytest.mark.gpu

KS = [576, 960, 1536, 3072, 4096, 6144, 11008, 14336]


def _cuda(t):
    return tuple(v.cuda() for v in t)


def _acts(m, k, dtype, seed, outliers=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda", dtype=torch.float32)
    if outliers and m > 3:
        x[1] *= 40.0  # an outlier row
        x[2, (k * 7) // 11] = 300.0  # an outlier channel
        x[3] = 0.0  # an all-zero row
    return x.to(dtype)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_act_bit_exact(k, bits, dtype, poison):
    for m in (1, 5, 37, 300):
        x = _acts(m, k, dtype, seed=k * 31 + m + bits)
        poison()
        q, s = tops.quant_act(x, 0.9, bits)
        qr, sr = _cuda(ref.quant_act_ref(x.cpu(), 0.9, bits))
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1)
        assert torch.equal(s, sr)
        assert torch.equal(q, qr)


def test_quant_act_3d_and_clip():
    x = _acts(24, 4096, torch.bfloat16, seed=5).reshape(2, 12, 4096)
    for clip in (1.0, 0.75):
        q, s = tops.quant_act(x, clip, 4)
        qr, sr = _cuda(ref.quant_act_ref(x.cpu(), clip, 4))
        assert q.shape == x.shape and s.shape == (2, 12, 1)
        assert torch.equal(q, qr) and torch.equal(s, sr)


# (block, K): powers of two 64..2048; Paley cores: 1536 = 12*128, 768 = 12*64, 1792 = 28*64 (I), 576 = 36*16 (II)
HQ_CASES = [(64, 4096), (128, 4096), (256, 11008), (512, 4096), (1024, 4096), (2048, 14336),
            (1536, 1536), (1536, 3072), (768, 1536), (1792, 14336), (576, 576), (64, 576),
            (1184, 4736), (1216, 4864)]  # Paley II 148*8, 76*16


@pytest.mark.parametrize("block,k", HQ_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hadamard_quant(block, k, dtype, poison):
    bits = 4
    m = 133
    x = _acts(m, k, dtype, seed=block + k)
    poison()
    f = torch.empty(m, k, dtype=torch.float32, device="cuda")
    from vllm_rotquant.kernels import triton_quant
    q, s = triton_quant.hadamard_quant(x, block, 0.9, bits, float_out=f)
    # the quant stage is bit-exact on the kernel's own Hadamard output
    qf, sf = _cuda(ref.quant_act_ref(f.cpu(), 0.9, bits))
    assert torch.equal(s, sf) and torch.equal(q, qf)
    # the Hadamard stage against float64
    h64 = (x.double().reshape(m, k // block, block) @ hadamard_matrix(block, torch.float64, "cuda")).reshape(m, k)
    rowmax = h64.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    assert ((f.double() - h64).abs() / rowmax).max().item() < 5e-6
    # against the fp32 reference: scales ~1e-7 apart, ints equal but for rare +-1 at boundaries
    qr, sr = _cuda(ref.hadamard_quant_ref(x.cpu(), block, 0.9, bits))
    assert ((s - sr).abs() / sr).max().item() < 1e-5
    d = (q.int() - qr.int()).abs()
    assert d.max().item() <= 1
    assert d.float().mean().item() < 1e-3
    # the custom op gives the same as the direct call
    q2, s2 = tops.hadamard_quant(x, block, 0.9, bits)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_block_without_a_plan_is_refused():
    """1376 = 344 * 4: the 344 core does not fit shared memory. No per-call fallback: the ops raise
    with the reason, which kernel selection gives at load (and refuses the layer)."""
    x = _acts(5, 11008, torch.bfloat16, seed=1)
    from vllm_rotquant.kernels import triton_quant
    assert "no fused Triton plan for block 1376" in triton_quant.no_plan_reason(1376, 11008)
    for call in (lambda: tops.hadamard_quant(x, 1376, 0.9, 4), lambda: tops.hadamard(x, 1376),
                 lambda: tops.hadamard_quant_asym(x, 1376, 0.9, 4)):
        with pytest.raises(ValueError, match="no fused Triton plan for block 1376 over K=11008"):
            call()
    with pytest.raises(ValueError, match="activation bits must be 4 or 8"):
        tops.quant_act(x, 0.9, 16)


@pytest.mark.parametrize("order,a", [("fast", 1), ("core", 16), ("core", 32), ("fast", 16)])
def test_hadamard_quant_every_factorisation(order, a):
    """Every (stage order, factor) the plan can pick computes the same block Hadamard."""
    from vllm_rotquant.kernels import triton_quant
    x = _acts(19, 11008, torch.bfloat16, seed=a)
    f = torch.empty(19, 11008, dtype=torch.float32, device="cuda")
    q, s = triton_quant.hadamard_quant(x, 256, 0.9, 4, float_out=f, order=order, a_force=a)
    qf, sf = _cuda(ref.quant_act_ref(f.cpu(), 0.9, 4))
    assert torch.equal(s, sf) and torch.equal(q, qf)
    h64 = (x.double().reshape(19, 43, 256) @ hadamard_matrix(256, torch.float64, "cuda")).reshape(19, 11008)
    assert ((f.double() - h64).abs().max() / h64.abs().max()).item() < 5e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_hadamard_quant_bits_small_m(bits):
    for m in (1, 2, 17):
        x = _acts(m, 11008, torch.bfloat16, seed=m)
        q, s = tops.hadamard_quant(x, 256, 0.9, bits)
        qr, sr = _cuda(ref.hadamard_quant_ref(x.cpu(), 256, 0.9, bits))
        assert ((s - sr).abs() / sr).max().item() < 1e-5
        d = (q.int() - qr.int()).abs()
        assert d.max().item() <= 1 and d.float().mean().item() < 1e-3


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [8, 32])
def test_hadamard_r3(head_dim, heads):
    x = _acts(77, heads * head_dim, torch.bfloat16, seed=head_dim * heads, outliers=False)
    out = tops.hadamard(x, head_dim)
    want = ref.hadamard_ref(x.cpu(), head_dim).cuda()  # fp32
    assert out.dtype == x.dtype and out.shape == x.shape
    # within one bf16 ulp of the fp32 reference (plus fp32 summation-order noise near zero),
    # and mostly its correct rounding
    noise = 1e-6 * want.abs().amax(dim=-1, keepdim=True)
    assert ((out.float() - want).abs() <= want.abs() * 2 ** -7 + noise).all()
    assert (out != want.to(x.dtype)).float().mean().item() < 1e-2
    x3 = x.reshape(77, heads, head_dim)
    assert torch.equal(tops.hadamard(x3, head_dim), out.reshape(77, heads, head_dim))


@pytest.mark.parametrize("fn", ["quant_act", "hadamard_quant"])
def test_nonfinite_rows_isolated(fn):
    m, k = 40, 4096
    x = _acts(m, k, torch.bfloat16, seed=11)
    bad = x.clone()
    bad[7, 100] = float("nan")
    bad[9, 5] = float("inf")
    bad[10] = float("-inf")
    call = (lambda t: tops.quant_act(t, 0.9, 4)) if fn == "quant_act" else (lambda t: tops.hadamard_quant(t, 128, 0.9, 4))
    q, s = call(bad)
    q0, s0 = call(x)
    keep = torch.ones(m, dtype=torch.bool)
    keep[[7, 9, 10]] = False
    assert torch.equal(q[keep], q0[keep]) and torch.equal(s[keep], s0[keep])


def test_division_is_correctly_rounded():
    """The quantizer's y/scale (reciprocal + two FMA corrections) against IEEE division."""
    import triton
    import triton.language as tl

    from vllm_rotquant.kernels import triton_quant

    @triton.jit
    def _k(y_ptr, s_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < n
        y = tl.load(y_ptr + offs, mask=msk, other=1.0)
        s = tl.load(s_ptr + offs, mask=msk, other=1.0)
        tl.store(o_ptr + offs, triton_quant._div_rn_by(y, s, False), mask=msk)

    g = torch.Generator(device="cuda").manual_seed(0)
    n = 1 << 24
    for _ in range(4):
        # scales over many binades, some with all-ones significands; quotients within +-300
        e = torch.randint(-30, 20, (n,), device="cuda", generator=g).float()
        s = torch.ldexp(1 + torch.rand(n, device="cuda", generator=g), e)
        s[: n // 8] = torch.ldexp(torch.full((n // 8,), 2 - 2 ** -23, device="cuda"), e[: n // 8])
        u = (torch.rand(n, device="cuda", generator=g) * 2 - 1) * 300
        u[n // 8: n // 4] = torch.round(u[n // 8: n // 4]) + 0.5  # near ties after the product
        y = u * s
        out = torch.empty_like(y)
        _k[(triton.cdiv(n, 1024),)](y, s, out, n, BLOCK=1024)
        want = (y.double() / s.double()).float()  # correctly rounded (double rounding is safe)
        assert torch.equal(out, want)
