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
ABI_VERSION = 2
ISA_NAMES = {3: "AVX512-VNNI", 2: "AVX-VNNI", 1: "AVX2", 0: "portable C"}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # rq_hadamard input

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
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rq_abi_version.restype = i32
    lib.rq_isa.restype = i32
    lib.rq_pack_weights.argtypes = [p, i64, i64, p]
    lib.rq_pack_weights.restype = None
    lib.rq_gemm.argtypes = [p, i64, i64, i64, p, i64, p, p, i64, p, p, i64, i32]
    lib.rq_gemm.restype = None
    lib.rq_hadamard.argtypes = [p, i32, i64, p, i64, i64, i64, i64, p, ctypes.c_float, i32]
    lib.rq_hadamard.restype = None


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
    return ISA_NAMES[library().rq_isa()]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pack_weights(w_int: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> the native GEMM's nib64 layout, uint8 [ceil(N/64) * ceil(K/8) * 256]."""
    w = w_int.contiguous()
    n, k = w.shape
    out = torch.empty(((n + 63) // 64) * ((k + 7) // 8) * 256, dtype=torch.uint8)
    library().rq_pack_weights(w.data_ptr(), n, k, out.data_ptr())
    return out


def int_gemm(q: torch.Tensor, za: torch.Tensor | None, w_nib: torch.Tensor, n: int, sw: torch.Tensor,
             wsum: torch.Tensor | None) -> torch.Tensor:
    """q int8 [M, K], za int32 [M, 1] or None, w_nib from pack_weights of an [n, K] weight, sw
    float32 [n, G], wsum int32 [n, G] (with za) -> float32 [M, n]: per channel the exact integer
    sums sum_k (q - za) w, with groups fl32(sum_g sw[:, g] * (group g's exact sum))."""
    m, k = q.shape
    kp = -(-k // 8) * 8
    if kp != k or q.stride(1) != 1:  # the kernel reads whole 8-column chunks
        qp = q.new_zeros((m, kp))
        qp[:, :k] = q
        q = qp
    out = torch.empty((m, n), dtype=torch.float32)
    if m == 0 or n == 0:
        return out
    za = None if za is None else za.reshape(m).contiguous()
    library().rq_gemm(q.data_ptr(), q.stride(0), m, k, w_nib.data_ptr(), n, _ptr(za), sw.data_ptr(), sw.shape[1],
                      _ptr(wsum), out.data_ptr(), n, torch.get_num_threads())
    return out


def hadamard(x: torch.Tensor, block: int, core: torch.Tensor, norm: float) -> torch.Tensor:
    """Block Hadamard kron(core, Sylvester)/sqrt(block) along the last dim of x [M, K] -> float32.
    `core`: float32 [A, A] of +-1 (A = 1: pure Sylvester)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    y = torch.empty((m, k), dtype=torch.float32)
    if m:
        library().rq_hadamard(x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), y.data_ptr(), m, k, block,
                              core.shape[0], core.data_ptr(), norm, torch.get_num_threads())
    return y
