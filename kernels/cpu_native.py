"""Build and load kernels/cpu_native.c: the CPU kernel's own C code (see that file for what it
computes and why).

Built on first use with the system C compiler (`$CC`, else `cc`/`gcc`/`clang`: the compiler
torch.compile's Inductor needs on the CPU anyway) for this machine's instruction set
(`-march=native`), cached under `$ROTQUANT_CACHE_DIR` or `~/.cache/vllm-rotquant/cpu-kernels`
by a hash of the source, the flags, the compiler and the CPU's feature flags, and loaded with
ctypes into the process; its OpenMP threads are torch's (the same libgomp). Building takes a
few seconds; concurrent builders (tensor-parallel workers) each write their own temporary file
and rename it into place. `unavailable_reason()` says why it cannot be used (no compiler, a
failed build), so kernel selection can report it.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11",
         "-shared", "-fPIC")
ABI_VERSION = 5
ISA_NAMES = {3: "AVX512-VNNI", 2: "AVX-VNNI", 1: "AVX2", 0: "portable C"}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("ROTQUANT_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "vllm-rotquant" / "cpu-kernels"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.machine() + " " + platform.processor()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), *version, _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"rotquant_cpu_{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    cmd = [cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"]
    log.info("rotquant: building the CPU kernel (%s)", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for name, args in {
        "rq_abi_version": [], "rq_isa": [], "rq_has_amx": [],
        "rq_pack_weights": [p, i64, i64, p],
        "rq_gemm": [p, i64, i64, i64, p, i64, p, p, p, i64, p, p, i64, i32, i32],
        "rq_gemm_amx": [p, i64, i64, i64, p, i64, p, p, p, p, p, i64, i32, i32],
        "rq_hadamard": [p, i32, i64, p, i32, i64, i64, i64, i64, p, f32, i32],
        "rq_hadamard_quant": [p, i32, i64, p, p, p, i64, i64, i64, i64, p, f32, f32, i32, i32],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = i32 if name in ("rq_abi_version", "rq_isa", "rq_has_amx") else None


def library() -> ctypes.CDLL:
    """The loaded native library (built on first call); RuntimeError with the reason if it cannot be."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler found (set $CC or install gcc)")
                lib = ctypes.CDLL(str(_build(cc)))
                _declare(lib)
                if lib.rq_abi_version() != ABI_VERSION:
                    raise RuntimeError(f"stale build (ABI {lib.rq_abi_version()}, expected {ABI_VERSION})")
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _error = str(e)
        if _lib is None:
            raise RuntimeError(f"rotquant CPU kernel unavailable: {_error}")
        return _lib


def unavailable_reason() -> str | None:
    try:
        library()
        return None
    except RuntimeError as e:
        return str(e)


def isa() -> str:
    """The GEMM instruction set this build uses, e.g. "AVX512-VNNI + AMX"."""
    lib = library()
    return ISA_NAMES[lib.rq_isa()] + (" + AMX" if has_amx() else "")


_amx: bool | None = None


def has_amx() -> bool:
    """Whether the AMX GEMM was built and the kernel lets this process use the tiles."""
    global _amx
    if _amx is None:
        _amx = bool(library().rq_has_amx())
    return _amx


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pack_weights(w_int: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> the native GEMMs' nib64 layout (0.5 byte a weight; see
    cpu_native.c), uint8 [ceil(N/64) * ceil(K/64) * 8 * 256]."""
    w = w_int.contiguous()
    n, k = w.shape
    out = torch.empty(((n + 63) // 64) * ((k + 63) // 64) * 8 * 256, dtype=torch.uint8)
    library().rq_pack_weights(w.data_ptr(), n, k, out.data_ptr())
    return out


def _padded(q: torch.Tensor, k_mult: int, m_mult: int = 1) -> torch.Tensor:
    """q with zero columns up to a multiple of k_mult and zero rows up to one of m_mult (the
    kernels read whole chunks); q itself when nothing is missing."""
    m, k = q.shape
    kp, mp = -(-k // k_mult) * k_mult, -(-m // m_mult) * m_mult
    if kp == k and mp == m and q.stride(1) == 1:
        return q
    qp = q.new_zeros((mp, kp))
    qp[:m, :k] = q
    return qp


def gemm(q: torch.Tensor, sa: torch.Tensor, za: torch.Tensor | None, w_nib: torch.Tensor, n: int,
         sw: torch.Tensor, wsum: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The VNNI GEMM: q int8 [M, K], sa float32 [M, 1], za int32 [M, 1] or None, w_nib from
    pack_weights of an [n, K] weight, sw float32 [n, G], wsum int32 [n, G] (with za) -> [M, n].
    (Called once per layer and token batch: kept lean, the arguments' types are the caller's.)"""
    m, k = q.shape
    out = torch.empty((m, n), dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    qp = q if k % 8 == 0 and q.is_contiguous() else _padded(q, 8)
    sa = sa if sa.is_contiguous() else sa.contiguous()  # [M, 1]: the same bytes as [M]
    library().rq_gemm(qp.data_ptr(), qp.stride(0), m, k, w_nib.data_ptr(), n, sa.data_ptr(),
                      None if za is None else za.contiguous().data_ptr(), sw.data_ptr(), sw.shape[1],
                      None if wsum is None else wsum.data_ptr(), out.data_ptr(), n, DTYPE_CODES[out_dtype],
                      torch.get_num_threads())
    return out


def gemm_amx(q: torch.Tensor, sa: torch.Tensor, za: torch.Tensor | None, w_nib: torch.Tensor, n: int,
             sw: torch.Tensor, wsum: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The AMX GEMM on the same nib64 weights (per-channel scales sw float32 [n, 1]); arguments
    as `gemm`."""
    if not has_amx():
        raise RuntimeError("rotquant CPU GEMM: AMX is not available here")
    m, k = q.shape
    out = torch.empty((m, n), dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    qp = q if k % 64 == 0 and m % 32 == 0 and q.is_contiguous() else _padded(q, 64, 32)
    sa = sa if sa.is_contiguous() else sa.contiguous()
    library().rq_gemm_amx(qp.data_ptr(), qp.stride(0), m, qp.shape[1], w_nib.data_ptr(), n, sa.data_ptr(),
                          None if za is None else za.contiguous().data_ptr(), sw.data_ptr(),
                          None if wsum is None else wsum.data_ptr(), out.data_ptr(), n, DTYPE_CODES[out_dtype],
                          torch.get_num_threads())
    return out


def hadamard(x: torch.Tensor, block: int, core: torch.Tensor, norm: float,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block Hadamard kron(core, Sylvester)/sqrt(block) along the last dim of x [M, K], computed in
    float32 and stored in out_dtype (rounded once). `core`: float32 [A, A] of +-1 (A = 1: pure
    Sylvester)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    y = torch.empty((m, k), dtype=out_dtype)
    if m:
        library().rq_hadamard(x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), y.data_ptr(), DTYPE_CODES[out_dtype],
                              m, k, block, core.shape[0], core.data_ptr(), norm, torch.get_num_threads())
    return y


def hadamard_quant(x: torch.Tensor, block: int, core: torch.Tensor, norm: float, clip: float, bits: int,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`hadamard` then the reference's per-token quantization of each row -> (q int8 [M, K],
    scale float32 [M, 1], zero int32 [M, 1] or None)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty((m, 1), dtype=torch.float32)
    z = None if symmetric else torch.empty((m, 1), dtype=torch.int32)
    if m:
        library().rq_hadamard_quant(x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), q.data_ptr(), s.data_ptr(),
                                    _ptr(z), m, k, block, core.shape[0], core.data_ptr(), norm, clip, bits,
                                    torch.get_num_threads())
    return q, s, z
