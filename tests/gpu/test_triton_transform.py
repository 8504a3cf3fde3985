"""GPU tests of the declared input transforms (kernels/triton_transform.py) against the CPU
reference (run: pytest -m gpu): the transform against float64, the quantizer bit-exact on the
kernel's own output (the two-stage form, and the fused Kronecker + quantization kernel), the codes
against the float32 reference (rare +-1 at rounding boundaries), and the Triton linear with a
transform against the reference kernel."""
import pytest
import torch

from vllm_rotquant.format import InputTransform
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels import triton_ops as tops
from vllm_rotquant.kernels import triton_transform
from vllm_rotquant.kernels.linear_kernel import LinearSpec
from vllm_rotquant.kernels.reference_kernel import ReferenceKernel
from vllm_rotquant.kernels.triton_kernel import TritonKernel
from vllm_rotquant.testing.ckpt_factory import random_transform

pytestmark = pytest.mark.gpu

CASES = [(InputTransform("qkv", "block_rotation", block=128), 4096),
         (InputTransform("down", "block_rotation", block=86), 11008),  # padded to 128
         (InputTransform("down", "block_rotation", block=128), 14336),
         (InputTransform("o", "block_rotation", block=96), 576),
         (InputTransform("qkv", "kronecker", factors=(64, 64)), 4096),
         (InputTransform("down", "kronecker", factors=(86, 128)), 11008),
         (InputTransform("down", "kronecker", factors=(112, 128)), 14336),
         (InputTransform("qkv", "kronecker", factors=(24, 24)), 576)]


def _acts(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if m > 3:
        x[1] *= 40.0
        x[2, (k * 7) // 11] = 300.0
        x[3] = 0.0
    return x.to(dtype)


def _float64(t, tensors, x):
    return ref.input_transform_ref(x, t.type, tensors, torch.float64)


@pytest.mark.parametrize("t,k", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transform_then_quant(t, k, dtype, poison):
    tensors = random_transform(t, k, 1, torch.Generator().manual_seed(k))
    p = {n: v.cuda() for n, v in triton_transform.prepare(t, tensors).items()}
    for m in (1, 7, 133):
        x = _acts(m, k, dtype, seed=m + k)
        poison()
        y = tops.block_transform(x.cuda(), *(p[f"t_{n}"] for n in ("diag", "src1", "b1", "src2", "b2")))
        want = _float64(t, tensors, x)
        rowmax = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert ((y.cpu().double() - want).abs() / rowmax).max().item() < 5e-6, (t, k, m)
        q, s = tops.quant_act(y, 0.9, 4)  # bit-exact on the kernel's own transform output
        qr, sr = ref.quant_act_ref(y.cpu(), 0.9, 4)
        assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
        q32, s32 = ref.quant_act_ref(ref.input_transform_ref(x, t.type, tensors), 0.9, 4)
        d = (q.cpu().int() - q32.int()).abs()
        assert d.max().item() <= 1 and d.float().mean().item() < 2e-3
        assert ((s.cpu() - s32).abs() / s32).max().item() < 1e-5


@pytest.mark.parametrize("t,k", [c for c in CASES if c[0].type == "kronecker"], ids=lambda v: str(v))
@pytest.mark.parametrize("asym", [False, True])
def test_fused_kronecker_quant(t, k, asym, poison):
    tensors = random_transform(t, k, 1, torch.Generator().manual_seed(k + 1))
    p = {n: v.cuda() for n, v in triton_transform.prepare(t, tensors).items()}
    for m in (1, 7, 133):
        x = _acts(m, k, torch.bfloat16, seed=m + k + 1)
        poison()
        f = torch.empty(m, k, dtype=torch.float32, device="cuda")
        out = triton_transform.kron_quant(x.cuda(), p["t_diag"], p["t_left"], p["t_right"], 0.9, 4, asym, f)
        want = _float64(t, tensors, x)
        rowmax = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert ((f.cpu().double() - want).abs() / rowmax).max().item() < 5e-6, (t, m)
        mine = ref.quant_act_asym_ref(f.cpu(), 0.9, 4) if asym else ref.quant_act_ref(f.cpu(), 0.9, 4)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(out, mine))  # bit-exact on its own transform
        op = (tops.kron_quant_asym if asym else tops.kron_quant)(x.cuda(), p["t_diag"], p["t_left"], p["t_right"],
                                                                  0.9, 4)
        assert all(torch.equal(a, b) for a, b in zip(op, out))
        y32 = ref.input_transform_ref(x, t.type, tensors)
        q32 = (ref.quant_act_asym_ref(y32, 0.9, 4) if asym else ref.quant_act_ref(y32, 0.9, 4))[0]
        d = (out[0].cpu().int() - q32.int()).abs()
        assert d.max().item() <= 1 and d.float().mean().item() < 2e-3


@pytest.mark.parametrize("t,k", [CASES[1], CASES[6]], ids=lambda v: str(v))
@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False)])
def test_triton_linear_with_a_transform_follows_the_reference(t, k, bits, symmetric):
    n = 256
    g = torch.Generator().manual_seed(5)
    tensors = random_transform(t, k, 1, g)
    w_int = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    from vllm_rotquant.format import pack_int4
    packed, scale = pack_int4(w_int), (torch.rand(n, 1, generator=g) + 0.5) / (4.6 * k ** 0.5)
    outs = []
    for cls, dev in ((TritonKernel, "cuda"), (ReferenceKernel, "cpu")):
        spec = LinearSpec(k, n, None, bits, symmetric, 0.9, None, False, dev, torch.bfloat16, t)
        kern = cls(spec)
        w = kern.prepare(packed.to(dev), scale.to(dev))
        w.update(kern.prepare_transform({a: b.to(dev) for a, b in tensors.items()}))
        outs.append(kern.apply(_acts(9, k, torch.bfloat16, 3).to(dev), w).float().cpu())
    got, want = outs
    assert ((got - want).abs().amax() / want.abs().amax()).item() < 2e-2
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999


def test_too_large_a_block_is_refused():
    spec = LinearSpec(512, 64, None, 4, True, 0.9, None, False, "cuda", torch.bfloat16,
                      InputTransform("qkv", "block_rotation", block=256))
    assert "blocks up to 128" in TritonKernel.can_implement(spec)
