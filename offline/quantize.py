"""Weight quantizers: symmetric INT4 per output channel (or per group), RTN with a clipping
search, and GPTQ (act-order, dampening, lazy block updates) on calibration Hessians."""
from __future__ import annotations

import contextlib
import math

import torch

from vllm_rotquant.kernels.reference import qmax, quantize_weight_ref

CLIP_GRID = torch.linspace(1.0, 0.5, 21).tolist()


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    n, k = w.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"group_size {g} does not divide in_features {k}")
    return w.reshape(n, k // g, g)


def search_scales(w: torch.Tensor, bits: int, group_size: int | None, norm: float = 2.4) -> torch.Tensor:
    """Per-row (or per-group) scales [N, G]: the clip ratio on max|w| that minimises the
    |w - q(w)|^norm error, searched on a grid (the GPTQ/QuaRot MSE-clip heuristic)."""
    wg = _grouped(w.float(), group_size)
    amax = wg.abs().amax(dim=-1).clamp_min(1e-12)
    best_err = torch.full_like(amax, math.inf)
    best = amax / qmax(bits)
    for ratio in CLIP_GRID:
        scale = amax * ratio / qmax(bits)
        q = torch.clamp(torch.round(wg / scale[..., None]), -qmax(bits) - 1, qmax(bits))
        err = (q * scale[..., None] - wg).abs_().pow_(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def rtn(w: torch.Tensor, bits: int = 4, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with clipping search -> (int8 [N, K], scales [N, G] float32)."""
    scales = search_scales(w, bits, group_size)
    return quantize_weight_ref(w, scales, bits), scales.float()


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = None,
         damp: float = 0.01, block: int = 128, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) -> (int8 [N, K], scales [N, G] float32).

    Scales are fixed up front from the clip search on the original weight ("static groups"), so
    act-order permutes columns freely without changing which scale a column uses.
    hessian: sum of x^T x over calibration tokens, [K, K].
    """
    n, k = w.shape
    w = w.float().clone()
    h = hessian.to(w.device, torch.float64).clone()
    scales = search_scales(w, bits, group_size)
    g = k // scales.shape[1]
    col_scale = scales.float().repeat_interleave(g, dim=1)  # [N, K]: scale of every column
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=h.device)
    w = w[:, perm]
    col_scale = col_scale[:, perm]
    h = h[perm][:, perm]
    h += torch.eye(k, dtype=h.dtype, device=h.device) * damp * torch.diagonal(h).mean()
    chol = torch.linalg.cholesky(h)
    chol_inv = torch.linalg.solve_triangular(chol, torch.eye(k, dtype=h.dtype, device=h.device), upper=False)
    hinv = torch.linalg.cholesky(chol_inv.T @ chol_inv, upper=True).float()  # upper Cholesky of H^-1
    # columns of W are rows of W^T: keep them contiguous for the column-by-column loop
    wt, st = w.T.contiguous(), col_scale.T.contiguous()
    q_all = torch.zeros_like(wt)
    lo, hi = -qmax(bits) - 1, qmax(bits)
    with _single_thread_on_cpu(w.device):  # tiny ops: thread hand-offs cost more than they save
        _gptq_columns(wt, st, q_all, hinv, block, lo, hi)
    q_all = q_all.T
    inv = torch.argsort(perm)
    return q_all[:, inv].to(torch.int8), scales.float()


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device):
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gptq_columns(wt, st, q_all, hinv, block, lo, hi) -> None:
    """The GPTQ sweep over columns (rows of wt = W^T), lazy block updates of the rest."""
    k = wt.shape[0]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = w1[i], st[i1 + i]
            q = torch.clamp(torch.round(col / s), lo, hi)
            q_all[i1 + i] = q
            err = (col - q * s) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:, None] * err[None, :]
            err1[i] = err
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1


class HessianAccumulator:
    """Running sum of x^T x (float64) over a linear's inputs; forward hook friendly."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        self.h += (x.T @ x).double()  # float32 products, float64 running sum
        self.tokens += x.shape[0]

    def hook(self, module, args, output) -> None:
        self.add(args[0].detach())
