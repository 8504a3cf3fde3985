import math

import pytest
import torch

from vllm_rotquant.kernels.hadamard import (hadamard_factors, hadamard_matrix, hadamard_supported,
                                            hadamard_transform, largest_block, random_hadamard,
                                            random_orthogonal, rotation_matrix)

LLM_WIDTHS = [576, 768, 960, 1536, 2048, 3072, 3584, 4096, 4864, 5120, 8192, 11008, 13824, 14336, 18944, 28672]


def _orth_error(h: torch.Tensor) -> float:
    return (h @ h.T - torch.eye(h.shape[0], dtype=h.dtype)).abs().max().item()


@pytest.mark.parametrize("n", [n for n in range(1, 513) if hadamard_supported(n)])
def test_dense_orthogonal_and_pm1(n):
    h = hadamard_matrix(n)
    assert _orth_error(h) < 1e-12
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))


@pytest.mark.parametrize("n", [576, 1536, 3584, 4864])
def test_dense_llm_sizes(n):
    assert _orth_error(hadamard_matrix(n)) < 1e-12


def test_every_supported_size_up_to_32768_is_orthogonal():
    """Every supported width that is a multiple of 64, up to 32768 (dense is too large): H
    preserves the Gram matrix of random vectors (orthogonality, checked without forming H)."""
    sizes = [n for n in range(64, 32769, 64) if hadamard_supported(n)]
    assert set(LLM_WIDTHS) - {13824} <= set(sizes)
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        x = torch.randn(4, n, generator=gen, dtype=torch.float64)
        y = hadamard_transform(x, n)
        assert torch.allclose(y @ y.T, x @ x.T, rtol=1e-10, atol=1e-9 * n), n


def test_transform_matches_dense():
    for n in (12, 20, 28, 36, 344, 576, 1536):
        x = torch.randn(3, n, dtype=torch.float64)
        assert torch.allclose(hadamard_transform(x, n), x @ hadamard_matrix(n), atol=1e-12)


def test_known_factorisations_and_unsupported():
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(14336) == (28, 512)  # Paley I over GF(27)
    assert hadamard_factors(4864) == (76, 64)  # Paley II, q = 37
    assert hadamard_factors(18944) == (148, 128)  # Paley II, q = 73
    assert hadamard_factors(11008) == (344, 32)  # Paley I over GF(343): 172 itself has no Paley
    assert not hadamard_supported(172)
    assert not hadamard_supported(6)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 172"):
        hadamard_matrix(172)


def test_random_rotations_are_seeded_orthogonal():
    a, b = random_hadamard(64, seed=3), random_hadamard(64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_hadamard(64, seed=4))
    assert _orth_error(a) < 1e-12
    r = random_orthogonal(50, seed=1)
    assert _orth_error(r) < 1e-12 and torch.equal(r, random_orthogonal(50, seed=1))
    assert _orth_error(rotation_matrix(172, 0)) < 1e-12  # falls back to random orthogonal


def test_largest_block():
    assert largest_block(1536) == 1536
    assert largest_block(768) == 768
    assert largest_block(11008) == 256  # 344 * 32 exists, but its core is too big for the fused kernel
    assert largest_block(11008, max_core=1024) == 1376
    for width in (192, 1376, 5504, 14336, 18944):
        b = largest_block(width)
        assert width % b == 0 and hadamard_supported(b) and hadamard_factors(b)[0] <= 256
