"""SmoothQuant-style per-channel smoothing, or AWQ's activation-aware scales (`awq_model`),
absorbed into the weights where it commutes with the rotations (issue 21): the value path (v_proj's output channels / o_proj's input columns) and the
MLP's up path (up_proj's output channels / down_proj's input columns).

For an input channel j of o_proj or down_proj with calibration max |x_j| = a_j and weight column
max |W[:, j]| = w_j, s_j = a_j^alpha / w_j^(1-alpha) (SmoothQuant, Xiao et al. 2023): the producer's
channel j is divided by s_j and the consumer's column multiplied by it. That is exact in float:
attention is linear in v (softmax weights do not depend on it) and silu(gate) * up is linear in up.
R2 (per head, on v/o) and R4 (block Hadamard on down's input) are then absorbed on top, so what the
quantizer sees is the rotation of a flatter input. The residual-stream inputs (qkv, gate/up) are not
smoothed: their scale would have to live in the RMSNorm weight, which R1 requires to be folded away.
With grouped-query attention one v channel feeds the o_proj columns of every query head of its
group: the scale is per v channel, from the maximum over those columns.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from vllm_rotquant.offline.arch import arch_of, head_geometry
from vllm_rotquant.offline.calibrate import capture_first_layer_inputs, run_layer
from vllm_rotquant.offline.options import SMOOTH_METHODS
from vllm_rotquant.offline.rotate import _scale_columns

logger = logging.getLogger(__name__)

EPS = 1e-5


class _AbsMax:
    """Forward pre-hook: running max |x| per input channel of a linear."""

    def __init__(self):
        self.amax: torch.Tensor | None = None

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float().cpu()
        self.amax = x if self.amax is None else torch.maximum(self.amax, x)


@torch.no_grad()
def input_maxima(model, windows: torch.Tensor, device: str, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, (max |x| per o_proj input channel, max |x| per down_proj input channel)
    of the (folded, unrotated) float model on the calibration windows, layer by layer."""
    arch = arch_of(model)
    inputs = capture_first_layer_inputs(model, windows, device, batch_size)
    out = []
    for layer in tqdm(arch.decoder_layers(model), desc="smoothing statistics", unit="layer", leave=False):
        layer.to(device)
        hooks = {name: _AbsMax() for name in (arch.o_proj, arch.down_proj)}
        handles = [arch.get(layer, name).register_forward_pre_hook(h) for name, h in hooks.items()]
        try:
            inputs.hidden = run_layer(layer, inputs)
        finally:
            for h in handles:
                h.remove()
            layer.to("cpu")
        out.append((hooks[arch.o_proj].amax, hooks[arch.down_proj].amax))
    return out


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^alpha / w^(1-alpha) per channel (float64), 1 where a channel never activates."""
    if not (torch.isfinite(act_max).all() and torch.isfinite(weight_max).all()):
        raise ValueError("smoothing: non-finite scales (NaN or inf in the calibration activations or the weights)")
    a = act_max.double().clamp_min(EPS)
    w = weight_max.double().clamp_min(EPS)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where(act_max.double() > 0, s, torch.ones_like(s))


def _scale_rows(linear, s: torch.Tensor, inverse: bool) -> None:
    f = (1.0 / s) if inverse else s
    w = linear.weight.data
    linear.weight.data = (w.double() * f.to(w.device)[:, None]).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        linear.bias.data = (b.double() * f.to(b.device)).to(b.dtype)


@torch.no_grad()
def apply_smoothing(model, maxima: list[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict:
    """Absorb the scales into every layer's v/o and up/down pairs; returns a summary (the mean
    channel max/median ratio of the two inputs before and after, the quantizer-visible flatness)."""
    arch = arch_of(model)
    heads, kv_heads, head_dim = head_geometry(model.config)
    group = heads // kv_heads
    # o_proj column c (query head c // head_dim) reads v channel kv(c)
    q_head = torch.arange(heads * head_dim) // head_dim
    kv_of_col = (q_head // group) * head_dim + torch.arange(heads * head_dim) % head_dim
    before, after = [], []
    for layer, (a_o, a_down) in zip(arch.decoder_layers(model), maxima):
        v, o = arch.get(layer, arch.v_proj), arch.get(layer, arch.o_proj)
        up, down = arch.get(layer, arch.up_proj), arch.get(layer, arch.down_proj)
        if a_o.numel() != heads * head_dim or a_down.numel() != down.in_features:
            raise ValueError(f"smoothing: statistics of {a_o.numel()} / {a_down.numel()} channels for o_proj / "
                             f"down_proj inputs of {heads * head_dim} / {down.in_features}")
        # per v channel: the max over the query heads that read it
        kv_ch = kv_heads * head_dim
        a_v = torch.zeros(kv_ch).scatter_reduce(0, kv_of_col, a_o.float(), "amax")
        w_v = torch.zeros(kv_ch).scatter_reduce(0, kv_of_col, o.weight.data.abs().amax(dim=0).float().cpu(), "amax")
        s_v = smoothing_scales(a_v, w_v, alpha)
        s_down = smoothing_scales(a_down, down.weight.data.abs().amax(dim=0).float().cpu(), alpha)
        _scale_rows(v, s_v, inverse=True)
        _scale_columns(o, s_v[kv_of_col])
        _scale_rows(up, s_down, inverse=True)
        _scale_columns(down, s_down)
        before.append((_spread(a_o), _spread(a_down)))
        after.append((_spread(a_o.double() / s_v[kv_of_col]), _spread(a_down.double() / s_down)))
    n = max(1, len(before))
    summary = {"alpha": alpha,
               "o_input_max_over_median": (sum(b[0] for b in before) / n, sum(a[0] for a in after) / n),
               "down_input_max_over_median": (sum(b[1] for b in before) / n, sum(a[1] for a in after) / n)}
    logger.info("smoothing (alpha %.2f): o_proj input channel max/median %.1f -> %.1f, down_proj %.1f -> %.1f "
                "(mean over layers)", alpha, *summary["o_input_max_over_median"], *summary["down_input_max_over_median"])
    return summary


def _spread(a: torch.Tensor) -> float:
    a = a.double()
    return float(a.max() / a.median().clamp_min(1e-12))


class _Stats:
    """Forward pre-hook: mean |x| per input channel and a seeded sample of `keep` token rows."""

    def __init__(self, keep: int, gen: torch.Generator):
        self.keep, self.gen = keep, gen
        self.total, self.count, self.rows = None, 0, []

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        a = x.abs().sum(dim=0).cpu()
        self.total = a if self.total is None else self.total + a
        self.count += x.shape[0]
        self.rows.append(x[torch.randperm(x.shape[0], generator=self.gen)[: self.keep].to(x.device)].cpu())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total / max(self.count, 1), torch.cat(self.rows)


AWQ_GRID = 20  # alphas 0, 1/20, ..., 19/20, as AWQ's search (llm-awq: auto_scale, n_grid 20)


def _rtn(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per-output-channel symmetric RTN, de-quantized (AWQ's search quantizer)."""
    qm = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1, keepdim=True) / qm).clamp_min(1e-8)
    return torch.clamp(torch.round(w / scale), -qm - 1, qm) * scale


def awq_scale(x: torch.Tensor, mean_abs: torch.Tensor, w: torch.Tensor, expand: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, float]:
    """AWQ's activation-aware scale of one linear: s = mean|x|^alpha (normalised to geometric mean
    1) with alpha on a grid, the one minimising ||x W^T - (x / s) Q(W s)^T|| on the token sample x,
    Q the per-channel INT4 RTN. `expand` maps the scale's channels to W's columns (a v channel to
    the o_proj columns of every query head of its group). Returns (s float64, alpha)."""
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32  # float32 on the calibration device
    x, w, mean_abs = x.to(w.device, dt), w.to(dt), mean_abs.to(w.device, dt)
    if expand is not None:
        expand = expand.to(w.device)
    y = x @ w.T
    best = (float("inf"), torch.ones_like(mean_abs), 0.0)
    for i in range(AWQ_GRID):
        alpha = i / AWQ_GRID
        sc = mean_abs.clamp_min(EPS).pow(alpha)
        sc = sc / (sc.max() * sc.min()).sqrt()
        col = sc[expand] if expand is not None else sc
        err = (y - (x / col) @ _rtn(w * col).T).pow(2).mean().item()
        if err < best[0]:
            best = (err, sc, alpha)
    return best[1].double().cpu(), best[2]


@torch.no_grad()
def awq_model(model, windows: torch.Tensor, device: str, batch_size: int = 8, keep: int = 256, seed: int = 0) -> dict:
    """AWQ's scales on every layer's v/o and up/down pairs (the pairs smoothing can use under the
    rotations), searched per layer on calibration activations of the folded float model, layer by
    layer, and absorbed as SmoothQuant's are. Returns a summary (the alphas chosen)."""
    arch = arch_of(model)
    heads, kv_heads, head_dim = head_geometry(model.config)
    group = heads // kv_heads
    q_head = torch.arange(heads * head_dim) // head_dim
    kv_of_col = (q_head // group) * head_dim + torch.arange(heads * head_dim) % head_dim
    gen = torch.Generator().manual_seed(seed)
    inputs = capture_first_layer_inputs(model, windows, device, batch_size)
    per_batch = max(1, keep * batch_size // max(1, windows.shape[0]))
    alphas = []
    for layer in tqdm(arch.decoder_layers(model), desc="AWQ scales", unit="layer", leave=False):
        layer.to(device)
        hooks = {name: _Stats(per_batch, gen) for name in (arch.o_proj, arch.down_proj)}
        handles = [arch.get(layer, name).register_forward_pre_hook(h) for name, h in hooks.items()]
        try:
            run_layer(layer, inputs, keep_outputs=False)
        finally:
            for h in handles:
                h.remove()
        v, o = arch.get(layer, arch.v_proj), arch.get(layer, arch.o_proj)
        up, down = arch.get(layer, arch.up_proj), arch.get(layer, arch.down_proj)
        mean_o, x_o = hooks[arch.o_proj].result()
        mean_d, x_d = hooks[arch.down_proj].result()
        mean_v = torch.zeros(kv_heads * head_dim).scatter_reduce(0, kv_of_col, mean_o.float(), "amax")
        s_v, a_v = awq_scale(x_o, mean_v, o.weight.data, kv_of_col)
        s_down, a_d = awq_scale(x_d, mean_d, down.weight.data)
        _scale_rows(v, s_v, inverse=True)
        _scale_columns(o, s_v[kv_of_col])
        _scale_rows(up, s_down, inverse=True)
        _scale_columns(down, s_down)
        alphas.append((a_v, a_d))
        inputs.hidden = run_layer(layer, inputs)  # the layer computes what it did: the next one's inputs
        layer.to("cpu")
    n = max(1, len(alphas))
    summary = {"alpha_o_mean": sum(a for a, _ in alphas) / n, "alpha_down_mean": sum(d for _, d in alphas) / n,
               "alphas": [list(a) for a in alphas], "tokens_per_input": keep}
    logger.info("AWQ: mean alpha %.2f (v/o), %.2f (up/down) over %d layers", summary["alpha_o_mean"],
                summary["alpha_down_mean"], n)
    return summary


def smooth_model(model, windows: torch.Tensor, method: str, alpha: float, device: str, batch_size: int = 8,
                 seed: int = 0) -> dict:
    """`method` ("smoothquant" or "awq") on a folded float model, in place, before the rotations."""
    if method not in SMOOTH_METHODS or method == "none":
        raise ValueError(f"--smooth {method!r}: expected one of {', '.join(SMOOTH_METHODS[1:])}")
    if method == "awq":
        return {"method": "awq", **awq_model(model, windows, device, batch_size, seed=seed)}
    maxima = input_maxima(model, windows, device, batch_size)
    return apply_smoothing(model, maxima, alpha)
