"""Triton kernels for per-token activation quantization, fused with the online block Hadamard.

Semantics are those of kernels/reference.py (run on the CPU). Per-token symmetric quantization is
bit-exact (float32 max, `amax*clip` then a correctly rounded division by qmax, correctly rounded
x/scale, round-half-even, clamp). The block Hadamard differs from the reference only in float
summation order. A row holding NaN takes its scale from its non-NaN values (the reference: 1); its
output is meaningless either way and never touches other rows.

Hadamard of order p = A*B read off hadamard_matrix(p) = H_A (x) H_B / sqrt(p) (H_B Sylvester, H_A
a Paley core (x) Sylvester, both +-1 tables loaded once per program), two tensor-core stages:
  fast-first: x [blocks*A, B] @ H_B (16-bit inputs times +-1: exact products, fp32 accumulation),
              then [blocks*B, A] @ H_A with the fp32 intermediate split exactly into three bf16
              parts (hi+mid+lo, three dots);
  core-first: x [blocks*B, A] @ H_A exactly, then along B by butterflies (B <= 8, fp32 adds) or
              the split-bf16 dot;
then the 1/sqrt(p) normalisation in fp32. `hadamard_plan` picks the order and factors (measured
preferences, else a MAC model); a factor over 256 (e.g. 1376 = 344*4) does not fit shared memory:
such a block is refused (`no_plan_reason`; no per-call fallback). Programs are persistent over groups of
token rows (next group prefetched into registers); a group's rows stay in registers, so the
per-token max is a register reduction and the Hadamard output never touches device memory.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.hadamard import hadamard_factors, hadamard_matrix
from vllm_rotquant.kernels.triton_gemm import num_sms


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to the nearest even integer
MAX_ELEMS = 32768  # padded elements one program keeps in registers


@triton.jit
def _rint(v, INTERP: tl.constexpr):
    if INTERP:
        return (v + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(v)


@triton.jit
def _scale(amax, clip, QMAX: tl.constexpr):
    """Per-token scale, bit-exact with reference.quant_act_ref: (amax*clip)/qmax correctly
    rounded (torch's CPU division; CUDA torch would multiply by fl(1/qmax) instead)."""
    scale = tl.math.div_rn(amax * clip, QMAX * 1.0)
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _div_rn_by(y, scale, INTERP: tl.constexpr):
    """Correctly rounded y / scale for a scale shared by many elements: with r = RN(1/scale)
    (once per row), q0 = RN(y*r) and two FMA corrections q <- RN(q + RN(y - scale*q)*r).
    The first correction makes q faithful, the second returns RN(y/scale) (Markstein's
    theorem: r within 1/2 ulp of 1/scale, q within 1 ulp, residual exact by FMA). Five flops
    per element instead of a full IEEE division. No over/underflow here: |y/scale| <= qmax/clip."""
    if INTERP:
        return tl.math.div_rn(y, scale)
    else:
        r = tl.math.div_rn(1.0, scale)
        q = y * r
        q = tl.fma(tl.fma(-q, scale, y), r, q)
        return tl.fma(tl.fma(-q, scale, y), r, q)


@triton.jit
def _quant(y, scale, QMAX: tl.constexpr, INTERP: tl.constexpr):
    v = _rint(_div_rn_by(y, scale, INTERP), INTERP)
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    return v.to(tl.int8)


@triton.jit
def _quantize(y, amax, clip, QMAX: tl.constexpr, INTERP: tl.constexpr):
    """y float32 (any shape), amax broadcastable -> (q int8, scale float32)."""
    scale = _scale(amax, clip, QMAX)
    return _quant(y, scale, QMAX, INTERP), scale


@triton.jit
def _mul_rn(a, b, INTERP: tl.constexpr):
    """a*b rounded on its own: a plain product followed by a subtraction would be contracted
    into an FMA, which the CPU reference does not do."""
    if INTERP:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def _asym_params(vmax, vmin, clip, QMAX: tl.constexpr, INTERP: tl.constexpr):
    """Asymmetric per-token parameters, bit-exact with reference.quant_act_asym_ref: levels
    L = 2*QMAX + 1, scale = (clip*max(vmax, 0) - clip*min(vmin, 0)) / L (1 if 0), and the
    unsigned zero point u = clamp(rint(-lo/scale), 0, L) as float32."""
    L: tl.constexpr = 2 * QMAX + 1
    hi = _mul_rn(tl.maximum(vmax, 0.0), clip, INTERP)
    lo = _mul_rn(tl.minimum(vmin, 0.0), clip, INTERP)
    scale = tl.math.div_rn(hi - lo, L * 1.0)
    scale = tl.where(scale > 0, scale, 1.0)
    u = _rint(tl.math.div_rn(-lo, scale), INTERP)
    return scale, tl.minimum(tl.maximum(u, 0.0), L * 1.0)


@triton.jit
def _quant_asym(y, scale, u, QMAX: tl.constexpr, INTERP: tl.constexpr):
    """q = clamp(rint(y/scale) + u, 0, L) - (QMAX + 1) as int8 (signed storage)."""
    v = _rint(_div_rn_by(y, scale, INTERP), INTERP) + u
    v = tl.minimum(tl.maximum(v, 0.0), 2.0 * QMAX + 1.0) - (QMAX + 1.0)
    return v.to(tl.int8)


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, z_ptr, M, K, stride_xm, stride_qm, clip,
                      QMAX: tl.constexpr, ROWS: tl.constexpr, KP: tl.constexpr,
                      ASYM: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, KP)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if ASYM:  # padding is 0, which the range includes anyway
        scale, u = _asym_params(tl.max(x, axis=1), tl.min(x, axis=1), clip, QMAX, INTERP)
        q = _quant_asym(x, scale[:, None], u[:, None], QMAX, INTERP)
        tl.store(z_ptr + rows, (u - (QMAX + 1.0)).to(tl.int32), mask=rmask)
    else:
        amax = tl.max(tl.abs(x), axis=1)  # (NaN ignored: a NaN row is garbage either way)
        q, scale = _quantize(x, amax[:, None], clip, QMAX, INTERP)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows, tl.reshape(scale, [ROWS]), mask=rmask)


@triton.jit
def _dot16(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b for 16-bit float operands, fp32 accumulation (the interpreter's numpy has no
    bf16: there the exactly widened fp32 values are multiplied instead)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _split3_dot(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b with a float32 split exactly into three bf16 parts; b is +-1/0 (bf16)."""
    if INTERP:
        return tl.dot(a, b.to(tl.float32), acc)
    hi = a.to(tl.bfloat16)
    r = a - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(lo, b, acc)
    acc = tl.dot(mid, b, acc)
    acc = tl.dot(hi, b, acc)
    return acc


@triton.jit
def _fwht_last(v, T: tl.constexpr, AP: tl.constexpr, B: tl.constexpr):
    """Sylvester WHT (unnormalized, exact fp32 adds) along the last dim of v [T, AP, B], B in
    {2, 4, 8}: j = 2p + q; (q=0, q=1) butterflies, then the WHT of half size along p."""
    w = tl.reshape(v, [T, AP, B // 2, 2])
    e, o = tl.split(w)
    sm = e + o
    df = e - o
    if B == 4:
        s0, s1 = tl.split(sm)
        d0, d1 = tl.split(df)
        sm = tl.join(s0 + s1, s0 - s1)
        df = tl.join(d0 + d1, d0 - d1)
    if B == 8:
        sm = _fwht4(sm, T, AP)
        df = _fwht4(df, T, AP)
    return tl.reshape(tl.join(sm, df), [T, AP, B])


@triton.jit
def _fwht4(v, T: tl.constexpr, AP: tl.constexpr):
    w = tl.reshape(v, [T, AP, 2, 2])
    e, o = tl.split(w)
    sm = e + o
    df = e - o
    s0, s1 = tl.split(sm)
    d0, d1 = tl.split(df)
    return tl.reshape(tl.join(tl.join(s0 + s1, s0 - s1), tl.join(d0 + d1, d0 - d1)), [T, AP, 4])


@triton.jit
def _hadamard_rows(x, hb, ha, norm, T: tl.constexpr, AP: tl.constexpr, B: tl.constexpr,
                   CORE_FIRST: tl.constexpr, SPLIT_IN: tl.constexpr, INTERP: tl.constexpr):
    """Normalized block Hadamard in float32 of a zero-padded tile.

    fast-first: x [T, AP, B] (t, i, j) -> [T, B, AP] (t, j, i') (or [T, 1, B] when AP == 1):
        exact 16-bit dot with H_B along j, then the split-precision dot with H_A along i.
    core-first: x [T, B, AP] (t, j, i) -> [T, AP, B] (t, i', j') (or [T, 1, AP] when B == 1):
        exact 16-bit dot with H_A along i, then H_B along j: butterflies for B <= 8, else the
        split-precision dot."""
    if CORE_FIRST:
        x2 = tl.reshape(x, [T * B, AP])
        if SPLIT_IN:
            y = _split3_dot(x2.to(tl.float32), ha, tl.zeros([T * B, AP], dtype=tl.float32), INTERP)
        else:
            y = _dot16(x2, ha, tl.zeros([T * B, AP], dtype=tl.float32), INTERP)
        if B == 1:
            return tl.reshape(y * norm, [T, 1, AP])
        yt = tl.permute(tl.reshape(y, [T, B, AP]), (0, 2, 1))  # [T, AP, B]
        if B <= 8:
            z = _fwht_last(yt, T, AP, B)
        else:
            z2 = _split3_dot(tl.reshape(yt, [T * AP, B]), hb, tl.zeros([T * AP, B], dtype=tl.float32), INTERP)
            z = tl.reshape(z2, [T, AP, B])
        return z * norm
    else:
        x2 = tl.reshape(x, [T * AP, B])
        if SPLIT_IN:
            y = _split3_dot(x2.to(tl.float32), hb, tl.zeros([T * AP, B], dtype=tl.float32), INTERP)
        else:
            y = _dot16(x2, hb, tl.zeros([T * AP, B], dtype=tl.float32), INTERP)
        if AP > 1:
            yt = tl.reshape(tl.permute(tl.reshape(y, [T, AP, B]), (0, 2, 1)), [T * B, AP])
            z = _split3_dot(yt, ha, tl.zeros([T * B, AP], dtype=tl.float32), INTERP)
            return tl.reshape(z * norm, [T, B, AP])
        else:
            return tl.reshape(y * norm, [T, 1, B])


@triton.jit
def _hadamard_quant_kernel(x_ptr, q_ptr, s_ptr, z_ptr, f_ptr, hb_ptr, ha_ptr, M,
                           stride_xm, stride_qm, stride_fm, clip, norm,
                           R: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
                           A: tl.constexpr, AP: tl.constexpr, B: tl.constexpr,
                           CORE_FIRST: tl.constexpr, QMAX: tl.constexpr,
                           SPLIT_IN: tl.constexpr, OUT_Q: tl.constexpr, OUT_F: tl.constexpr,
                           ASYM: tl.constexpr, INTERP: tl.constexpr):
    """Persistent over groups of R token rows. A block of order P = A*B is indexed
    (i, j) -> i*B + j (i slow: Paley core (x) Sylvester, j fast: Sylvester); the group is a
    zero-padded tile of R*NBP blocks. The next group's load is issued before the current one is
    transformed (register prefetch); H_B and H_A are loaded once per program."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    P: tl.constexpr = A * B
    T: tl.constexpr = R * NBP
    rb = tl.arange(0, B)
    hb = tl.load(hb_ptr + rb[:, None] * B + rb[None, :])
    ra = tl.arange(0, AP)
    ha = tl.load(ha_ptr + ra[:, None] * AP + ra[None, :])

    t = tl.arange(0, T)[:, None, None]
    if CORE_FIRST:  # input tile (t, j, i)
        jj = tl.arange(0, B)[None, :, None]
        ii = tl.arange(0, AP)[None, None, :]
    else:  # input tile (t, i, j)
        ii = tl.arange(0, AP)[None, :, None]
        jj = tl.arange(0, B)[None, None, :]
    in_off = (t % NBP) * P + ii * B + jj
    in_mask = ((t % NBP) < NB) & (ii < A) & (jj < B)
    in_row = t // NBP
    # output index space of _hadamard_rows
    if CORE_FIRST:
        if B == 1:
            i3 = tl.arange(0, AP)[None, None, :]
            j3 = tl.arange(0, 1)[None, :, None]
        else:
            i3 = tl.arange(0, AP)[None, :, None]
            j3 = tl.arange(0, B)[None, None, :]
    else:
        if AP > 1:
            j3 = tl.arange(0, B)[None, :, None]
            i3 = tl.arange(0, AP)[None, None, :]
        else:
            j3 = tl.arange(0, B)[None, None, :]
            i3 = tl.arange(0, 1)[None, :, None]
    t3 = tl.arange(0, T)[:, None, None]
    off = (t3 % NBP) * P + i3 * B + j3
    omask = ((t3 % NBP) < NB) & (i3 < A) & (j3 < B)
    out_row = t3 // NBP
    rr = tl.arange(0, R)

    groups = tl.cdiv(M, R)
    rows = pid * R + in_row
    x = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + in_off, mask=in_mask & (rows < M), other=0.0)
    for grp in range(pid, groups, nprog):
        nrows = (grp + nprog) * R + in_row
        x_next = tl.load(x_ptr + nrows.to(tl.int64) * stride_xm + in_off,
                         mask=in_mask & (nrows < M), other=0.0)
        z3 = _hadamard_rows(x, hb, ha, norm, T, AP, B, CORE_FIRST, SPLIT_IN, INTERP)
        orows = grp * R + out_row
        m3 = omask & (orows < M)
        optr = orows.to(tl.int64)
        if OUT_F:
            tl.store(f_ptr + optr * stride_fm + off, z3.to(f_ptr.dtype.element_ty), mask=m3)
        if OUT_Q:
            srow = grp * R + rr
            if ASYM:  # per-row max and min over its blocks (padding is 0, inside the range anyway)
                vmax = tl.max(tl.reshape(tl.max(tl.max(z3, axis=2), axis=1), [R, NBP]), axis=1)  # [R]
                vmin = tl.min(tl.reshape(tl.min(tl.min(z3, axis=2), axis=1), [R, NBP]), axis=1)
                scale, u = _asym_params(vmax, vmin, clip, QMAX, INTERP)
                st = tl.reshape(tl.broadcast_to(scale[:, None], [R, NBP]), [T])[:, None, None]
                ut = tl.reshape(tl.broadcast_to(u[:, None], [R, NBP]), [T])[:, None, None]
                q = _quant_asym(z3, st, ut, QMAX, INTERP)
                tl.store(z_ptr + srow, (u - (QMAX + 1.0)).to(tl.int32), mask=srow < M)
            else:
                a = tl.max(tl.max(tl.abs(z3), axis=2), axis=1)  # [T] (padding is 0)
                amax = tl.max(tl.reshape(a, [R, NBP]), axis=1)  # [R]
                scale = _scale(amax, clip, QMAX)
                st = tl.reshape(tl.broadcast_to(scale[:, None], [R, NBP]), [T])[:, None, None]
                q = _quant(z3, st, QMAX, INTERP)
            tl.store(q_ptr + optr * stride_qm + off, q, mask=m3)
            tl.store(s_ptr + srow, scale, mask=srow < M)
        x = x_next


# ----------------------------------------------------------------------------- host side
def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8, got {bits}")
    return ref.qmax(bits)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _stage_cost(n: int, split: bool) -> float:
    """Relative cost per element of one Hadamard stage of size n (MACs, with a fixed overhead
    per stage; butterflies for n <= 8)."""
    if n == 1:
        return 0.0
    if n <= 8:
        return 8.0 + 2 * n
    return 32.0 + (3 * n if split else n)


def _candidates(block: int, max_b: int):
    """(core_first, A, B) factorisations block = A*B, A = core*2^j (any +-1 matrix read off
    hadamard_matrix), B = 2^m Sylvester."""
    core, pow2 = hadamard_factors(block)
    out = []
    m = 0
    while (1 << m) <= pow2:
        b = 1 << m
        a = block // b
        if b <= max_b:
            if b >= 16 or (a == 1 and b >= 16):
                out.append((False, a, b))  # fast-first: exact dot along B
            if a >= 16:
                out.append((True, a, b))  # core-first: exact dot along A
        m += 1
    return out


# block -> (stage order, A): the fastest factorisation measured on H100 (bench/RESULTS.md)
_PREFERRED = {2048: ("fast", 16), 1536: ("fast", 12)}


@functools.lru_cache(maxsize=None)
def hadamard_plan(block: int, k: int, max_b: int = 256, rows: int | None = None,
                  warps: int | None = None, order: str | None = None,
                  a_force: int | None = None) -> dict | None:
    """Kernel parameters for a block Hadamard of order `block` over rows of `k`, or None when
    the kernel cannot do it (the layer is then refused at load, see `no_plan_reason`). The factorisation
    (A, B) and stage order minimise a MAC + overhead model (checked against the H100 sweep in
    bench/RESULTS.md); `order` ("fast"/"core") and `a_force` override it."""
    if block < 16 or k % block or hadamard_factors(block) is None:
        return None
    if order is None and a_force is None and block in _PREFERRED:
        order, a_force = _PREFERRED[block]
    elif order is None and a_force is None and block <= max_b and block & (block - 1) == 0:
        order, a_force = "fast", 1  # one dense stage
    best = None
    for core_first, a, b in _candidates(block, max_b):
        if order is not None and core_first != (order == "core"):
            continue
        if a_force is not None and a != a_force:
            continue
        ap = 1 if a == 1 else max(16, _next_pow2(a))
        if ap > 256 or b > 256:  # a +-1 factor must fit in shared memory as a dot operand
            continue
        waste = ap / a
        if core_first:
            cost = waste * (_stage_cost(ap, False) + _stage_cost(b, True))
        else:
            cost = waste * (_stage_cost(b, False) + _stage_cost(ap, True))
        if best is None or cost < best[0]:
            best = (cost, core_first, a, b, ap)
    if best is None:
        return None
    _, core_first, a, b, ap = best
    nb = k // block
    nbp = _next_pow2(nb)
    per_row = nbp * ap * b
    if rows is None:
        rows = max(1, min(8, 8192 // per_row))
    lead = b if core_first else ap  # rows of the first dot per block
    while rows * nbp * lead < 16:  # the first dot needs >= 16 rows
        rows *= 2
    elems = rows * per_row
    if elems > MAX_ELEMS:
        return None
    if warps is None:
        warps = max(4, min(8, elems // 2048))
    return dict(R=rows, NB=nb, NBP=nbp, A=a, AP=ap, B=b, CORE_FIRST=core_first,
                norm=float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32)),
                num_warps=warps)


def _max_b(block: int) -> int:
    """Largest fast-axis (Sylvester) factor; from the device sweep (bench/RESULTS.md)."""
    return 256 if block <= 256 else 128


_H_CACHE: dict = {}


def _h_tables(block: int, a: int, ap: int, b: int, dtype_b: torch.dtype, dtype_a: torch.dtype,
              device) -> tuple:
    """(H_B [b, b] in dtype_b, H_A [ap, ap] in dtype_a, zero padded): unnormalized +-1 factors
    read off hadamard_matrix(block) = H_A (x) H_B / sqrt(block) itself; cached per device. The
    first call for a key must not be inside a CUDA-graph capture (vLLM's warm-up runs first)."""
    key = (block, b, dtype_b, dtype_a, str(device))
    t = _H_CACHE.get(key)
    if t is None:
        h = torch.sign(hadamard_matrix(block))  # float64 +-1
        ha = h[::b, ::b]
        hb = h[:b, :b] * ha[0, 0]
        if not torch.equal(torch.kron(ha, hb), h):
            raise AssertionError(f"hadamard({block}) is not H_{a} (x) H_{b}")
        hap = torch.zeros(ap, ap, dtype=torch.float64)
        hap[:a, :a] = ha
        t = (hb.to(dtype_b).contiguous().to(device), hap.to(dtype_a).contiguous().to(device))
        _H_CACHE[key] = t
    return t


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def quant_act(x: torch.Tensor, clip: float, bits: int, asymmetric: bool = False):
    """Per-token quantization of x [..., K] -> (int8 [..., K], float32 scale [..., 1]), plus
    int32 zero points [..., 1] when `asymmetric` (reference.quant_act_asym_ref)."""
    qm = _qmax(bits)
    x2 = _rows2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    z = torch.empty((m, 1), dtype=torch.int32, device=x.device) if asymmetric else None
    if m:
        kp = _next_pow2(k)
        rows = max(1, min(16, 4096 // kp))
        warps = 4 if kp * rows <= 4096 else 8
        _quant_act_kernel[(triton.cdiv(m, rows),)](
            x2, q, s, z if asymmetric else s, m, k, x2.stride(0), q.stride(0), float(clip),
            QMAX=qm, ROWS=rows, KP=kp, ASYM=asymmetric, INTERP=INTERPRET, num_warps=warps)
    lead = (*x.shape[:-1], 1)
    out = (q.reshape(x.shape), s.reshape(lead))
    return out + (z.reshape(lead),) if asymmetric else out


def _launch_hadamard(x2, plan, block, clip, qm, q, s, f, num_warps=None, ctas_per_sm=None, z=None):
    m = x2.shape[0]
    split_in = x2.dtype == torch.float32
    exact = torch.bfloat16 if split_in else x2.dtype  # the first stage multiplies x itself
    if plan["CORE_FIRST"]:
        dt_b, dt_a = torch.bfloat16, exact
    else:
        dt_b, dt_a = exact, torch.bfloat16
    hb, ha = _h_tables(block, plan["A"], plan["AP"], plan["B"], dt_b, dt_a, x2.device)
    warps = num_warps or plan["num_warps"]
    if ctas_per_sm is None:
        ctas_per_sm = max(1, 32 // warps)
    groups = triton.cdiv(m, plan["R"])
    grid = min(groups, num_sms(x2.device, interpreted=4) * ctas_per_sm)
    _hadamard_quant_kernel[(grid,)](
        x2, q if q is not None else f, s if s is not None else hb, z if z is not None else hb,
        f if f is not None else x2,
        hb, ha, m, x2.stride(0), q.stride(0) if q is not None else 0,
        f.stride(0) if f is not None else 0, float(clip), plan["norm"],
        R=plan["R"], NB=plan["NB"], NBP=plan["NBP"], A=plan["A"], AP=plan["AP"], B=plan["B"],
        CORE_FIRST=plan["CORE_FIRST"], QMAX=qm, SPLIT_IN=split_in, OUT_Q=q is not None, OUT_F=f is not None,
        ASYM=z is not None, INTERP=INTERPRET, num_warps=warps, num_stages=1)


def no_plan_reason(block: int, k: int, dtype: torch.dtype | None = None) -> str | None:
    """Why the fused kernel cannot do a block Hadamard of order `block` over rows of `k` (None if
    it can): the kernel has no per-call fallback, kernel selection asks this at load."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"input dtype {dtype} (bf16, fp16 or fp32)"
    if k % block or hadamard_factors(block) is None:
        return f"no Hadamard of order {block} dividing K={k}"
    if hadamard_plan(block, k, _max_b(block)) is None:
        return (f"no fused Triton plan for block {block} over K={k} (a +-1 factor over 256 does not fit shared "
                f"memory, or a row over {MAX_ELEMS} padded elements)")
    return None


def hadamard_quant(x: torch.Tensor, block: int, clip: float, bits: int,
                   float_out: torch.Tensor | None = None, num_warps: int | None = None,
                   ctas_per_sm: int | None = None, max_b: int | None = None,
                   rows: int | None = None, order: str | None = None,
                   a_force: int | None = None, asymmetric: bool = False):
    """Fused block Hadamard + per-token quantization of x [..., K] -> (q, scale[, zero]) as
    `quant_act`. `float_out` (float32, same shape, optional) also receives the Hadamard output
    the quantizer saw (for tests); the other keywords override the tuned plan (sweeps)."""
    qm = _qmax(bits)
    x2 = _rows2d(x)
    m, k = x2.shape
    lead = (*x.shape[:-1], 1)
    plan = hadamard_plan(block, k, max_b or _max_b(block), rows, num_warps, order, a_force)
    if plan is None or x2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hadamard_quant: {no_plan_reason(block, k, x2.dtype) or 'no plan for the given overrides'}")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    z = torch.empty((m, 1), dtype=torch.int32, device=x.device) if asymmetric else None
    f = float_out.view(m, k) if float_out is not None else None
    if m:
        _launch_hadamard(x2, plan, block, clip, qm, q, s, f, num_warps, ctas_per_sm, z)
    out = (q.reshape(x.shape), s.reshape(lead))
    return out + (z.reshape(lead),) if asymmetric else out


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard along the last dim, result in x's dtype."""
    x2 = _rows2d(x)
    m, k = x2.shape
    if k == block and x2.is_contiguous() and m:  # e.g. [tokens, heads, head_dim]: merge rows
        g = 16
        while m % g:
            g //= 2
        x2 = x2.view(m // g, g * k)
        m, k = x2.shape
    plan = hadamard_plan(block, k, _max_b(block))
    if plan is None or x2.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hadamard: {no_plan_reason(block, k, x2.dtype)}")
    f = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m:
        _launch_hadamard(x2, plan, block, 1.0, 7, None, None, f)
    return f.reshape(x.shape)
