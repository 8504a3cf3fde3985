"""Normalized Hadamard matrices of the sizes real LLM widths need.

A Hadamard matrix of order n is built as the Kronecker product of a Sylvester 2^k matrix and a
"core" of order m that a Paley construction gives (Paley I: q+1 for a prime power q = 3 mod 4;
Paley II: 2(q+1) for q = 1 mod 4), e.g. 576 = 36*16, 1536 = 12*128, 14336 = 28*512,
4864 = 76*64, 18944 = 148*128. Orders with no such factorisation (11008 = 172*64: no Paley
construction of 172 exists) are reported unsupported; callers then fall back to a block
Hadamard or a seeded random orthogonal matrix (see `rotation_matrix`).

Everything is built in float64 and cached: these matrices are fused into weights, where bf16
drift accumulates, and used online by the kernels' reference path.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "hadamard_supported",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_transform",
    "random_hadamard",
    "random_orthogonal",
    "rotation_matrix",
    "largest_block",
]


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p**e for a prime p, else None."""
    if q < 2:
        return None
    for p in range(2, int(math.isqrt(q)) + 1):
        if q % p == 0:
            e = 0
            while q % p == 0:
                q //= p
                e += 1
            return (p, e) if q == 1 else None
    return (q, 1)


def _poly_mulmod(a: list[int], b: list[int], mod: list[int], p: int) -> list[int]:
    """Product of two GF(p) polynomials (coefficient lists, low degree first) modulo monic `mod`."""
    m = len(mod) - 1
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                out[i + j] = (out[i + j] + ai * bj) % p
    for d in range(len(out) - 1, m - 1, -1):  # reduce x^d using the monic modulus
        c = out[d]
        if c:
            for k in range(m + 1):
                out[d - m + k] = (out[d - m + k] - c * mod[k]) % p
    return (out + [0] * m)[:m]


def _irreducible(p: int, e: int) -> list[int]:
    """Smallest monic irreducible polynomial of degree e over GF(p) (brute force; e is tiny)."""
    import itertools

    for coeffs in itertools.product(range(p), repeat=e):
        poly = list(coeffs) + [1]
        if poly[0] == 0:
            continue
        # irreducible iff it has no monic factor of degree 1..e//2: test by trial division
        if all(_has_no_factor(poly, d, p) for d in range(1, e // 2 + 1)):
            return poly
    raise ValueError(f"no irreducible polynomial of degree {e} over GF({p})")


def _has_no_factor(poly: list[int], d: int, p: int) -> bool:
    import itertools

    for coeffs in itertools.product(range(p), repeat=d):
        f = list(coeffs) + [1]
        rem = list(poly)
        for i in range(len(rem) - 1, d - 1, -1):  # long division by monic f
            c = rem[i]
            if c:
                for k in range(d + 1):
                    rem[i - d + k] = (rem[i - d + k] - c * f[k]) % p
        if not any(rem[:d]):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> torch.Tensor:
    """chi(a - b) for all field elements a, b of GF(q), as a q x q int64 table of 0/+1/-1."""
    p, e = _prime_power(q)
    if e == 1:
        is_square = torch.zeros(q, dtype=torch.bool)
        is_square[(torch.arange(1, q, dtype=torch.int64) ** 2) % q] = True
        idx = torch.arange(q)
        diff = (idx[:, None] - idx[None, :]) % q
        chi = torch.where(is_square[diff], 1, -1)
        chi.fill_diagonal_(0)
        return chi
    mod = _irreducible(p, e)
    elems = [[(i // p**k) % p for k in range(e)] for i in range(q)]  # index -> coefficients
    index = {tuple(c): i for i, c in enumerate(elems)}
    squares = set()
    for c in elems[1:]:
        squares.add(tuple(_poly_mulmod(c, c, mod, p)))
    square_idx = torch.zeros(q, dtype=torch.bool)
    square_idx[[index[c] for c in squares]] = True
    coeffs = torch.tensor(elems, dtype=torch.int64)  # [q, e]
    diff = (coeffs[:, None, :] - coeffs[None, :, :]) % p  # [q, q, e]
    diff_idx = (diff * (p ** torch.arange(e))).sum(-1)
    chi = torch.where(square_idx[diff_idx], 1, -1)
    chi.fill_diagonal_(0)
    return chi


def _paley_core(m: int) -> torch.Tensor | None:
    """Unnormalized +-1 Hadamard matrix of order m from Paley I or II, or None."""
    q = m - 1
    pp = _prime_power(q)
    if pp is not None and q % 4 == 3:  # Paley I
        chi = _quadratic_character(q).to(torch.float64)
        h = torch.ones(m, m, dtype=torch.float64)
        h[1:, 0] = -1
        h[1:, 1:] = chi + torch.eye(q, dtype=torch.float64)
        return h
    if m % 2 == 0:
        q = m // 2 - 1
        pp = _prime_power(q)
        if pp is not None and q % 4 == 1:  # Paley II
            chi = _quadratic_character(q).to(torch.float64)
            s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            s[0, 1:] = 1
            s[1:, 0] = 1
            s[1:, 1:] = chi
            a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            eye = torch.eye(q + 1, dtype=torch.float64)
            return torch.kron(s, a) + torch.kron(eye, b)
    return None


MAX_CORE = 1024  # Paley cores above this are slow to build and no real width needs them


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(core, pow2) with n = core * pow2, core 1 or a Paley order <= MAX_CORE, largest power of
    two first."""
    if n < 1:
        return None
    pow2 = n & -n
    while pow2 >= 1:
        core = n // pow2
        if core > MAX_CORE:
            return None
        if core == 1 or core % 4 == 0 and _paley_core_exists(core):
            return core, pow2
        pow2 //= 2
    return None


def _paley_core_exists(m: int) -> bool:
    q = m - 1
    if _prime_power(q) is not None and q % 4 == 3:
        return True
    if m % 2 == 0:
        q = m // 2 - 1
        return _prime_power(q) is not None and q % 4 == 1
    return False


def hadamard_supported(n: int) -> bool:
    """True when a Hadamard matrix of order n can be built here."""
    return hadamard_factors(n) is not None


@functools.lru_cache(maxsize=16)
def _hadamard_cached(n: int) -> torch.Tensor:
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix of order {n}: it must be 2^k times a Paley order "
            f"(q+1 with q = 3 mod 4 a prime power, or 2(q+1) with q = 1 mod 4)")
    core, pow2 = factors
    h = torch.ones(1, 1, dtype=torch.float64)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(int(math.log2(pow2))):
        h = torch.kron(h, sylvester)
    if core > 1:
        h = torch.kron(_paley_core(core), h)
    return h / math.sqrt(n)


def hadamard_transform(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[..., n] @ H_n without forming H_n (Kronecker structure: dense core, fast Walsh-Hadamard
    on the power-of-two factor), float64. For sizes too large for a dense matrix."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n}")
    core, pow2 = factors
    lead = x.shape[:-1]
    y = x.double().reshape(-1, core, pow2)
    h = 1
    while h < pow2:  # in-place-free butterfly over the power-of-two axis
        y = y.reshape(-1, core, pow2 // (2 * h), 2, h)
        y = torch.cat((y[:, :, :, 0] + y[:, :, :, 1], y[:, :, :, 0] - y[:, :, :, 1]), dim=-1)
        y = y.reshape(-1, core, pow2)
        h *= 2
    if core > 1:
        y = torch.einsum("ci,bcp->bip", _paley_core(core), y)
    return (y / math.sqrt(n)).reshape(*lead, n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalized Hadamard matrix H of order n (H @ H.T == I). Raises ValueError if unsupported."""
    return _hadamard_cached(n).to(dtype=dtype, device=device)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """QuaRot's random Hadamard diag(s) @ H with seeded random signs s, float64."""
    signs = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64) * 2 - 1
    return signs.to(torch.float64)[:, None] * hadamard_matrix(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Seeded Haar-random orthogonal matrix (QR of a Gaussian, sign-fixed), float64."""
    z = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_matrix(n: int, seed: int) -> torch.Tensor:
    """Random Hadamard of order n where one exists, else a seeded random orthogonal matrix."""
    return random_hadamard(n, seed) if hadamard_supported(n) else random_orthogonal(n, seed)


def largest_block(width: int, max_block: int = 2048, max_core: int = 256) -> int:
    """Largest Hadamard order <= max_block dividing `width` whose Paley core is <= max_core
    (block-diagonal R4). The fused CUDA Hadamard+quant kernel handles cores up to 256; larger
    ones (e.g. 344 for 11008) would fall back to a dense matmul there."""
    for b in range(min(width, max_block), 0, -1):
        if width % b == 0 and hadamard_supported(b) and hadamard_factors(b)[0] <= max_core:
            return b
    return 1
