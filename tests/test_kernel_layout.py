"""CPU tests of the CUDA kernels' weight layout (kernels/layout.py) and its dispatch in ops."""
import pytest
import torch

from vllm_rotquant.format import pack_int4, unpack_int4
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.layout import (gemm_group_supported, is_kernel_layout, kernel_layout_to_int, prepare_weight,
                                          weight_in_features)


@pytest.mark.parametrize("n,k", [(3, 8), (96, 576), (64, 1536), (17, 4096)])
def test_round_trip(n, k):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    packed = pack_int4(w)
    kl = prepare_weight(packed)
    assert kl.dtype == torch.int32 and kl.shape == (n, k // 8) and is_kernel_layout(kl)
    assert weight_in_features(kl) == weight_in_features(packed) == weight_in_features(w) == k
    assert torch.equal(kernel_layout_to_int(kl), w)
    assert torch.equal(prepare_weight(w), kl)  # from unpacked int8 too
    assert prepare_weight(kl) is kl  # idempotent
    # byte j holds w[:, j] (low nibble) and w[:, K/2 + j] (high nibble)
    b = kl.view(torch.uint8)
    lo = ((b & 15).to(torch.int16) ^ 8) - 8
    hi = ((b >> 4).to(torch.int16) ^ 8) - 8
    assert torch.equal(lo.to(torch.int8), w[:, : k // 2]) and torch.equal(hi.to(torch.int8), w[:, k // 2:])


def test_bad_k():
    with pytest.raises(ValueError):
        prepare_weight(torch.zeros(4, 6, dtype=torch.int8))


@pytest.mark.parametrize("groups", [1, 4])
def test_ops_accept_kernel_layout(groups):
    g = torch.Generator().manual_seed(7)
    n, k, m = 48, 512, 5
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    sw = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g, dtype=torch.bfloat16)
    qa, sa = ops.quant_act(x, 0.9, 4)
    want = ref.w4a4_gemm_ref(qa, sa, w, sw, torch.bfloat16)
    for layout in (w, pack_int4(w), prepare_weight(pack_int4(w))):
        assert torch.equal(ops.w4a4_gemm(qa, sa, layout, sw, torch.bfloat16), want)
        out = ops.rotquant_linear(x, layout, sw, None, 4, 0.9, None)
        assert torch.equal(out, want)
    assert torch.equal(unpack_int4(pack_int4(w)), w)


def test_gemm_group_supported_needs_a_power_of_two_dividing_half_of_k():
    assert gemm_group_supported(4096, 128) and gemm_group_supported(11008, 128) and gemm_group_supported(576, 32)
    assert not gemm_group_supported(5504, 128)  # Llama-2-7B down_proj at TP 2: 2752 is not a multiple of 128
    assert not gemm_group_supported(576, 64)  # divides K but not K/2: a group would straddle the halves
    assert not gemm_group_supported(4096, 48) and not gemm_group_supported(4096, 16)
    assert not gemm_group_supported(4096, 1024)
