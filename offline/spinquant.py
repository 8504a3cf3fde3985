"""Rotations learned end to end through the quantized model (SpinQuant-style).

Method (Liu et al., "SpinQuant: LLM quantization with learned rotations", ICLR 2025; code
facebookresearch/SpinQuant): R1 (residual stream) and R2 (per layer and KV head) are trained so
that the model *with its activations quantized as served* predicts what the full-precision model
predicts. Unlike DartQuant's whip loss, which only flattens the activations each rotation sees, the
loss here is the model's own output, so a rotation is also judged by where it puts the quantization
noise (which directions of the next layers it excites).

- The model is the folded fp model (RMSNorm gains 1, unrotated). The rotations act inside hooks,
  so no weight is rotated during training: a reader's input x becomes Q(x R1) R1^T (Q: per-token
  fake quantization as the kernels do it, scale = clip max|x| / qmax), o_proj's input is rotated
  per head by R2 before Q and back after, down_proj's input gets the fixed R4 block Hadamard.
  With full-precision weights this is exactly the served model's arithmetic (W16A4) for the
  rotations R1, R2: `W R1` applied to `Q(x R1)` equals `W` applied to `Q(x R1) R1^T`. As SpinQuant
  does when GPTQ quantizes the weights afterwards, the weights stay unquantized while learning.
- Quantizer gradient: straight-through for the rounding only; the scale is a function of the
  rotated token's max, so the gradient also sees that a rotation making a token spikier makes its
  step coarser (a plain identity STE on Q(y) - y would not: the noise would be a constant).
- Loss: KL(p_fp || p_quant) of the next-token distributions, restricted to the fp model's `topk`
  most likely tokens plus one bucket for the rest (OSTQuant's "KL-top"); the fp targets are
  computed once per window (no grad) and cached.
- Parametrisation: QR-Orth (DartQuant's): R = QR(Z) sign-fixed, Z initialised to the start
  rotation (the random Hadamard, or DartQuant's result), optimised with Adam (cosine decay of
  the learning rate to zero); only R is kept.
  The lm_head and embeddings stay unquantized (they are not rotated differently by R1 than the
  residual stream is: E R1 and W_head R1 are absorbed exactly as before).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from tqdm.auto import tqdm

from vllm_rotquant.kernels.hadamard import hadamard_matrix
from vllm_rotquant.kernels.reference import qmax
from vllm_rotquant.offline.arch import arch_of, head_geometry
from vllm_rotquant.offline.dartquant import qr_orth
from vllm_rotquant.offline.rotate import Rotations

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpinRun:
    """What one training run did: the KL per step (and before), its timings."""

    loss_init: float
    loss: tuple[float, ...]
    steps: int
    tokens_per_step: int
    seconds: float
    target_s: float
    clip: float | None = None  # the activation clip learned for

    def record(self) -> dict:
        """What config.json keeps of the run (calibration.spinquant)."""
        tail = self.loss[-8:]
        return {"kl_init": round(self.loss_init, 5), "kl_last8": round(sum(tail) / len(tail), 5) if tail else None,
                "trained_clip": self.clip, "tokens_per_step": self.tokens_per_step,
                "seconds": round(self.seconds, 1)}


def fake_quant_ste(x: torch.Tensor, clip: float, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Per-token fake quantization (kernels/reference.py semantics, float32) whose gradient passes
    straight through the rounding and through the scale (a function of the token's max/min)."""
    xf = x.float()
    if symmetric:
        qm = qmax(bits)
        scale = (xf.abs().amax(-1, keepdim=True) * (clip / qm)).clamp_min(1e-12)
        v = xf / scale
        q = torch.clamp(v + (torch.round(v) - v).detach(), -qm - 1, qm)
        return (q * scale).to(x.dtype)
    levels = 2 ** bits - 1
    hi = xf.amax(-1, keepdim=True).clamp_min(0) * clip
    lo = xf.amin(-1, keepdim=True).clamp_max(0) * clip
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale).detach()
    v = xf / scale
    q = torch.clamp(v + (torch.round(v) - v).detach() + zero, 0, levels)
    return ((q - zero) * scale).to(x.dtype)


class _State:
    """The current rotations the hooks read (set once per step) and the quantizer's settings."""

    def __init__(self, bits: int, clip: float, symmetric: bool, r4: torch.Tensor | None, group: int):
        self.bits, self.clip, self.symmetric, self.r4, self.group = bits, clip, symmetric, r4, group
        self.r1: torch.Tensor | None = None
        self.r2: torch.Tensor | None = None  # [L, nkv, hd, hd]
        self.enabled = True

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bits >= 16 else fake_quant_ste(x, self.clip, self.bits, self.symmetric)


def _reader_hook(state: _State):
    def hook(module, args, output):  # norm output = the readers' input
        if not state.enabled:
            return None
        r1 = state.r1
        return state.q(output @ r1) @ r1.T
    return hook


def _o_proj_hook(state: _State, layer: int, head_dim: int):
    def hook(module, args):
        if not state.enabled:
            return None
        x = args[0]
        lead = x.shape[:-1]
        r2 = state.r2[layer]  # [nkv, hd, hd]
        nkv = r2.shape[0]
        xh = x.reshape(*lead, nkv, -1, head_dim)  # [..., nkv, group, hd]
        y = torch.einsum("...kgi,kij->...kgj", xh, r2).reshape(x.shape)
        y = state.q(y).reshape(xh.shape)
        return (torch.einsum("...kgj,kij->...kgi", y, r2).reshape(x.shape), *args[1:])
    return hook


def _down_hook(state: _State):
    def hook(module, args):
        if not state.enabled:
            return None
        x = args[0]
        h = state.r4
        b = h.shape[0]
        xb = x.reshape(*x.shape[:-1], -1, b)
        y = state.q((xb @ h).reshape(x.shape)).reshape(xb.shape)
        return ((y @ h.T).reshape(x.shape), *args[1:])
    return hook


def _install(model, state: _State) -> list:
    arch = arch_of(model)
    _, _, hd = head_geometry(model.config)
    handles = []
    for i, layer in enumerate(arch.decoder_layers(model)):
        handles.append(arch.get(layer, arch.attn_norm).register_forward_hook(_reader_hook(state)))
        handles.append(arch.get(layer, arch.mlp_norm).register_forward_hook(_reader_hook(state)))
        handles.append(arch.get(layer, arch.o_proj).register_forward_pre_hook(_o_proj_hook(state, i, hd)))
        if state.r4 is not None:
            handles.append(arch.get(layer, arch.down_proj).register_forward_pre_hook(_down_hook(state)))
    return handles


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [..., k], log-probabilities [..., k + 1]: the top k and the rest's mass)."""
    logp = torch.log_softmax(logits.float(), -1)
    top, idx = logp.topk(k, dim=-1)
    rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return idx, torch.cat([top, rest], -1)


def kl_top(logits: torch.Tensor, idx: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(target || model) on the target's top-k tokens + one bucket for the rest."""
    logq = torch.log_softmax(logits.float(), -1)
    top = logq.gather(-1, idx)
    rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    logq_k = torch.cat([top, rest], -1)
    p = target_logp.exp()
    return (p * (target_logp - logq_k)).sum(-1).mean()


def learn_rotations(model, windows: torch.Tensor, init: Rotations, *, steps: int = 64, lr: float = 1e-4,
                    batch: int = 1, act_bits: int = 4, clip: float = 0.75, symmetric: bool = True,
                    topk: int = 256, learn_r2: bool = True, seed: int = 0,
                    device: str | torch.device = "cpu") -> tuple[Rotations, SpinRun]:
    """Learn R1 (and R2) from `init` through the W16A`act_bits` model on calibration `windows`
    [n, T]: `steps` Adam steps of `batch` windows each (windows cycled in a seeded order).

    `model`: folded, untied, unrotated float32 HF model (left unchanged: hooks are removed, no
    parameter is modified). Returns (rotations with the learned r1/r2 in float64, the run record)."""
    t0 = time.time()
    arch = arch_of(model)
    device = torch.device(device)
    model.to(device)
    params = list(model.parameters())
    was_grad = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    cfg = model.config
    nq, nkv, hd = head_geometry(cfg)
    r4 = hadamard_matrix(init.r4_block, torch.float32, device) if init.r4_block else None
    state = _State(act_bits, clip, symmetric, r4, nq // nkv)
    handles = _install(model, state)
    g = torch.Generator().manual_seed(seed)
    try:
        state.enabled = False
        t = time.time()
        targets = []
        with torch.no_grad():
            for i in range(windows.shape[0]):
                logits = model(input_ids=windows[i: i + 1].to(device), use_cache=False).logits[:, :-1]
                targets.append(topk_targets(logits, topk))
        target_s = time.time() - t
        state.enabled = True
        z1 = init.r1.to(device, torch.float32).clone().requires_grad_(True)
        z2 = torch.stack([r.to(device, torch.float32) for r in init.r2]).clone().requires_grad_(learn_r2)
        opt = torch.optim.Adam([z1, z2] if learn_r2 else [z1], lr=lr)
        # cosine decay to zero: the late steps (batch-1 noise) refine instead of redrawing the rotation
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, steps))))
        order = torch.cat([torch.randperm(windows.shape[0], generator=g)
                           for _ in range(math.ceil(steps * batch / windows.shape[0]) + 1)])

        def loss_of(ids: torch.Tensor) -> torch.Tensor:
            total = 0.0
            for j in ids.tolist():
                logits = model(input_ids=windows[j: j + 1].to(device), use_cache=False).logits[:, :-1]
                total = total + kl_top(logits, *targets[j]) / len(ids)
            return total

        with torch.no_grad():
            state.r1, state.r2 = qr_orth(z1), qr_orth(z2)
            loss_init = float(loss_of(order[:batch]))
        history = []
        for step in tqdm(range(steps), desc="learn rotations", unit="step"):
            state.r1, state.r2 = qr_orth(z1), qr_orth(z2)
            loss = loss_of(order[step * batch: (step + 1) * batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            if step % 10 == 0 or step == steps - 1:
                log.info("learned rotation step %d: KL %.4f", step, history[-1])
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, was_grad):
            p.requires_grad_(flag)
    with torch.no_grad():
        r1 = qr_orth(z1.detach().double()).cpu()
        r2 = qr_orth(z2.detach().double()).cpu()
    n_layers = len(arch.decoder_layers(model))
    run = SpinRun(loss_init=loss_init, loss=tuple(history), steps=steps, tokens_per_step=batch * windows.shape[1],
                  seconds=time.time() - t0, target_s=target_s)
    log.info("learned rotations: KL %.4f -> %.4f (last 5 steps' mean) in %.1f s", loss_init,
             sum(history[-5:]) / max(1, len(history[-5:])), run.seconds)
    return init.replace(r1=r1, r2=tuple(r2[i].clone() for i in range(n_layers))), run
