"""Weight quantizers: symmetric INT4 per output channel (or per group), RTN with a clipping
search, and GPTQ (act-order, dampening, lazy block updates) on calibration Hessians."""
from __future__ import annotations

import contextlib
import math

import torch

from vllm_rotquant.format import one_torch_thread
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


def _single_thread_on_cpu(device: torch.device):
    return one_torch_thread() if device.type == "cpu" else contextlib.nullcontext()


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


class ServedInputAccumulator(HessianAccumulator):
    """Hessian of a linear's inputs as the served model quantizes them (per-token fake quantization
    at `clip` / `bits`), plus the cross term C = sum x_q^T x with the unquantized inputs.

    Why: GPTQ minimises ||X (W - Q)^T|| for the inputs X it is shown, but the served linear sees
    X_q = quant(X). With H = X_q^T X_q and W* = W C^T H^-1 (`refit`), the least-squares weight that
    maps quantized inputs to the full-precision outputs X W^T, rounding W* on H minimises
    ||X_q Q^T - X W^T|| up to the constant residual of the refit: the weights absorb the part of
    the activation noise that is predictable from X_q (in the directions where the activations
    carry less signal than quantization noise, W* shrinks), which plain GPTQ leaves in."""

    def __init__(self, in_features: int, device: torch.device | str, clip: float, bits: int, symmetric: bool = True):
        super().__init__(in_features, device)
        self.clip, self.bits, self.symmetric = clip, bits, symmetric
        self.c = torch.zeros_like(self.h)

    def add(self, x: torch.Tensor) -> None:
        from vllm_rotquant.kernels.reference import fake_quant_act

        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        xq = fake_quant_act(x, self.clip, self.bits, self.symmetric)
        self.h += (xq.T @ xq).double()
        self.c += (xq.T @ x).double()
        self.tokens += x.shape[0]

    def refit(self, w: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
        """W* = argmin ||X_q W*^T - X W^T||^2 + lam ||W* - W||^2 = (W C^T + lam W)(H + lam I)^-1,
        lam = ridge * mean(diag H) (float64 solve), in w's dtype. The ridge pulls toward W, not
        toward zero: in directions the calibration tokens hardly excite, W* stays W."""
        lam = ridge * torch.diagonal(self.h).mean().clamp_min(1e-30)
        h = self.h + lam * torch.eye(self.h.shape[0], dtype=self.h.dtype, device=self.h.device)
        w64 = w.to(self.h.device, torch.float64)
        return torch.linalg.solve(h, (self.c + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)) @ w64.T
                                  ).T.to(w.dtype)


class ServedActivations:
    """Forward pre-hook: the served per-token fake quantization of a linear's input (register it
    after the online R4 hook, which the served model applies first). `enabled = False` passes the
    input through (a ServedInputAccumulator then quantizes the raw input itself)."""

    def __init__(self, clip: float, bits: int, symmetric: bool = True):
        self.clip, self.bits, self.symmetric, self.enabled = clip, bits, symmetric, True

    def __call__(self, module, args):
        from vllm_rotquant.kernels.reference import fake_quant_act

        if not self.enabled:
            return None
        return (fake_quant_act(args[0], self.clip, self.bits, self.symmetric), *args[1:])
