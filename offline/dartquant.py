"""DartQuant: learned R1 / R2 rotations by rotational distribution calibration.

Method (Shao et al., "DartQuant: Efficient Rotational Distribution Calibration for LLM
Quantization", NeurIPS 2025, arXiv 2511.04063; reference code CAS-CLab/DartQuant): instead of
training the rotations end to end through the quantized model (SpinQuant), learn each rotation
on the activations it acts on, so that the rotated activations become flat and uniform on a
bounded range, which is what a per-token INT4 quantizer wants.

1. Capture (no whole model on the accelerator). The folded (RMSNorm gains = 1), not yet rotated
   model runs the calibration windows layer by layer (`calibrate.run_layer`, one layer on the
   device at a time). Forward hooks keep a seeded random sub-sample of `samples` tokens per
   layer of
     - the inputs of q_proj and of up_proj (the normalized residual stream that R1 rotates;
       every layer's two inputs are pooled into one training set for the one shared R1), and
     - the inputs of o_proj, per head (what R2 rotates; one training set per layer).
   The fp model is computationally invariant, so capturing on the unrotated model and rotating
   inside the loss (x @ R) equals capturing on the rotated model.
2. Whip loss (paper eq. 4), on rotated activations o = x R, averaged over tokens:
       L(R) = mean_tokens  sum_{i=1..C}  exp(-|o_i|)
   Its gradient -sign(o_i) exp(-|o_i|) is largest near zero: small values are pushed away from
   zero while the rotation preserves the norm of every token, so the large values (outliers)
   must shrink; a Laplace-like distribution is driven toward a uniform one on a smaller range
   (the CDF map of Laplace(0, b) to U[-t, t] expands the centre and compresses the tails, and
   exp(-|x|) is the shape of that map). It is applied to the raw activations, exactly as the
   reference code does (the R1 data have per-token RMS 1 because the norms are folded).
   For R2 the channels are those of the o_proj input: head i's slice is rotated by
   R2[i // group] (GQA), and the loss sums over all heads' channels.
3. QR-Orth (paper Alg. 1): a free latent matrix Z, initialised to the random Hadamard that the
   pipeline would use otherwise, gives R = Q of the QR decomposition of Z at every step, with
   the sign fix Q <- Q diag(sign(diag(R_qr))) (the unique QR with a positive diagonal, so R is a
   continuous function of Z and R(Z0) = Z0 exactly for an orthogonal Z0). Z is optimised with
   plain SGD + momentum on the whip loss; only R is kept: at the end R = QR(Z) in float64
   (orthogonal to ~1e-15). R2 is one matrix per layer and KV head; all layers' R2 are
   independent problems and are optimised together in one batched QR (the loss is their sum,
   so each gets its own gradient).

4. Outlier-token oversampling (our addition; `outliers=0` gives the reference behaviour). Besides
   the uniform token sample, the capture keeps, per layer and input, the `outliers` tokens with
   the largest max|x| / rms(x) (the massive-activation tokens: the attention sink at the start of
   every window, some delimiters; their normalized input is almost 1-sparse). Each SGD step adds
   batch/8 of them and minimises (1 - w) whip(sample) + w whip(outliers), w = `outlier_weight`.
   Why: a random Hadamard maps a 1-sparse vector to a perfectly flat one, the global minimum of
   the whip loss for that token; but these tokens are ~1/2000 of a uniform sample, so plain
   DartQuant trades their flatness for the average token's, and since every later token attends
   to the sink, the quantized model gets worse than with the Hadamard (bench/RESULTS.md).

Hyper-parameters: `options.DartQuantOptions` (CLI `--dq-*`), with their defaults. Two are ours:
  weight_rows  share of R1's loss given to the q/k/v/gate/up weight rows, each scaled to RMS 1
               (off by default): W <- W R1 rotates a row exactly as a token, and RTN quantizes
               rows as the activation quantizer does tokens. Off by default: its gain on
               SmolLM2 was within the seed-to-seed spread of RTN perplexity.
  starts       Hadamard starts to learn from (one shared capture); by default 4 with RTN weights,
               1 with GPTQ. The pipeline keeps the start whose RTN-quantized model has the lowest
               loss on `score_windows` calibration windows: offline/select_rotation.py says why.
What a run did (loss curves, timings, sizes) is returned as a `DartQuantRun`.
The reference trains R1 for 10 epochs on 10 % of 128 x 2048-token sequences per epoch (about
130 steps of 64 x 2048 tokens) from all layers' q_proj / up_proj inputs, and R2 per layer;
here the pools are token sub-samples kept in memory (a few hundred MB for a 7B model) instead of
the full activations on disk (hundreds of GB), and steps are smaller and more numerous. QR-Orth
is scale-invariant (Q(cZ) = Q(Z)) and the gradient is orthogonal to Z, so |Z| grows and the
effective step shrinks by itself; results were insensitive to lr in 1e-3..1e-2 on SmolLM2.
Everything is seeded; on the CPU the result is bitwise reproducible for a given number of torch
threads. Another thread count changes float reductions, and 10 epochs of SGD carry that to a
visible change of R1 (with RTN weights, enough to move perplexity by a few per cent).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_rotquant.offline import calibrate
from vllm_rotquant.offline.arch import arch_of, head_geometry
from vllm_rotquant.offline.options import DartQuantOptions
from vllm_rotquant.offline.rotate import Rotations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartRun:
    """Training record of one start: whip loss of the Hadamard init and after each epoch."""

    r1_loss_init: float
    r1_loss: tuple[float, ...]
    r2_loss_init: float
    r2_loss: tuple[float, ...]
    r1_s: float
    r2_s: float


@dataclass(frozen=True)
class DartQuantRun:
    """What one DartQuant calibration did: its options, each start's training, the capture, and
    (with several starts, filled in by the pipeline) the starts' quantized scores and the pick."""

    options: DartQuantOptions
    starts: tuple[StartRun, ...]
    capture_s: float
    total_s: float
    samples: int
    layers: int
    start_scores: tuple[float, ...] | None = None
    chosen_start: int = 0
    score_s: float | None = None

    @property
    def chosen(self) -> StartRun:
        return self.starts[self.chosen_start]

    @property
    def r1_loss(self) -> tuple[float, ...]:
        return self.chosen.r1_loss

    @property
    def r2_loss(self) -> tuple[float, ...]:
        return self.chosen.r2_loss

    @property
    def r1_s(self) -> float:
        return sum(r.r1_s for r in self.starts)

    @property
    def r2_s(self) -> float:
        return sum(r.r2_s for r in self.starts)

    def summary(self) -> dict[str, Any]:
        """Flat, rounded record (for reports and the benchmark table): the chosen start's curves,
        the times summed over all starts."""
        out: dict[str, Any] = {
            "starts": len(self.starts), "chosen_start": self.chosen_start, "samples": self.samples,
            "layers": self.layers, "capture_s": round(self.capture_s, 2), "r1_s": round(self.r1_s, 2),
            "r2_s": round(self.r2_s, 2), "total_s": round(self.total_s, 2),
            "r1_loss_init": round(self.chosen.r1_loss_init, 4), "r1_loss": [round(v, 4) for v in self.r1_loss],
            "r2_loss_init": round(self.chosen.r2_loss_init, 4), "r2_loss": [round(v, 4) for v in self.r2_loss],
        }
        if self.start_scores is not None:
            out.update(start_scores=[round(v, 5) for v in self.start_scores], score_s=round(self.score_s or 0.0, 2))
        return out


# ----------------------------------------------------------------------------- the two pieces
def whip_loss(o: torch.Tensor) -> torch.Tensor:
    """DartQuant's whip loss, mean over tokens of sum_i exp(-|o_i|). `o` is [tokens, C] or
    [tokens, heads, head_dim] (then the sum runs over all C = heads * head_dim channels)."""
    per_token = torch.exp(-o.abs()).flatten(1).sum(-1)
    return per_token.mean()


def qr_orth(z: torch.Tensor) -> torch.Tensor:
    """R = Q of the QR decomposition of z (square, batched ok), sign-fixed so that the triangular
    factor has a positive diagonal: unique, continuous in z, and qr_orth(Q) == Q for orthogonal Q."""
    q, r = torch.linalg.qr(z)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d.unsqueeze(-2)


def rotate_heads(x: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """x [N, num_heads, head_dim] (o_proj input per query head), r2 [num_kv_heads, hd, hd]:
    query head i is rotated by r2[i // group]."""
    nq, nkv = x.shape[1], r2.shape[0]
    group = nq // nkv
    xg = x.reshape(x.shape[0], nkv, group, x.shape[2])
    return torch.einsum("nkgi,kij->nkgj", xg, r2).reshape(x.shape)


def rotate_heads_layers(x: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Batched over layers: x [L, N, num_heads, hd], r2 [L, num_kv_heads, hd, hd]."""
    L, n, nq, hd = x.shape
    nkv = r2.shape[1]
    xg = x.reshape(L, n, nkv, nq // nkv, hd)
    return torch.einsum("lnkgi,lkij->lnkgj", xg, r2).reshape(x.shape)


# ----------------------------------------------------------------------------- capture
class _TokenSampler:
    """Forward hook on a module: keeps the rows of its input whose global token index is selected
    (`mask`), and the `top` rows with the largest max|x| / rms(x) over all tokens seen (the
    massive-activation tokens: attention sinks, delimiters)."""

    def __init__(self, mask: torch.Tensor, top: int = 0):
        self.mask = mask  # bool [n_windows * T]
        self.offset = 0
        self.rows: list[torch.Tensor] = []
        self.top = top
        self.top_rows: torch.Tensor | None = None
        self.top_score: torch.Tensor | None = None

    def __call__(self, module, args, output=None):
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        m = self.mask[self.offset: self.offset + flat.shape[0]]
        self.offset += flat.shape[0]
        if m.any():
            self.rows.append(flat[m.to(flat.device)].float().cpu())
        if self.top:
            f = flat.float()
            score = f.abs().amax(-1) / f.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            rows = f
            if self.top_rows is not None:
                score = torch.cat([self.top_score, score])
                rows = torch.cat([self.top_rows, rows])
            idx = torch.topk(score, min(self.top, score.numel())).indices.sort().values
            self.top_score, self.top_rows = score[idx], rows[idx]

    def result(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0)

    def spiky(self) -> torch.Tensor:
        return self.top_rows.cpu() if self.top_rows is not None else torch.empty(0)


@dataclass
class Captured:
    """Sub-sampled activations: r1 [L, 2, S, hidden] (q_proj, up_proj inputs), r2 [L, S, nq, hd];
    and the `outliers` spikiest tokens of each: r1_spiky [L, 2, K, hidden], r2_spiky [L, K, nq, hd]."""

    r1: torch.Tensor
    r2: torch.Tensor
    r1_spiky: torch.Tensor | None = None
    r2_spiky: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _layer_mask(n_tokens: int, samples: int, seed: int, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (layer + 1))
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    if samples >= n_tokens:
        mask[:] = True
    else:
        mask[torch.randperm(n_tokens, generator=g)[:samples]] = True
    return mask


@torch.no_grad()
def capture(model, windows: torch.Tensor, device: str | torch.device = "cpu", samples: int = 2048,
            seed: int = 0, batch_size: int = 8, layers: list[int] | None = None, outliers: int = 0,
            store: str = "auto") -> Captured:
    """Run `windows` [n, T] through the model layer by layer (one layer on `device` at a time) and
    keep `samples` seeded random tokens per layer of the q_proj, up_proj and o_proj inputs, plus
    the `outliers` tokens of each with the largest max|x| / rms(x).
    `layers`: keep only these layers' samples (the forward still runs up to the last of them).
    `store`: where the hidden states between layers live: "cpu", "device", or "auto" (the device
    when three copies fit in min(14 GiB, half its free memory): moving 4 GB of hidden states to
    and from the host per layer costs more than the layer's forward on a 7B model)."""
    t0 = time.time()
    config = model.config
    nq, _, hd = head_geometry(config)
    arch = arch_of(model)
    decoder_layers = arch.decoder_layers(model)
    device = torch.device(device)
    n_tok = windows.numel()
    s = min(samples, n_tok)
    wanted = list(range(len(decoder_layers))) if layers is None else sorted(layers)
    where = calibrate.choose_store(store, device, n_tok * config.hidden_size * 4)
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, batch_size, store=where)
    r1, r2, r1_sp, r2_sp = [], [], [], []
    # R1's data: the input of each norm's readers (all readers of a norm see the same input);
    # R2's: the o_proj input (the attention values, per head)
    watched = (arch.attn_readers[0], arch.mlp_readers[0], arch.o_proj)
    for i, layer in enumerate(decoder_layers):
        if i > wanted[-1]:
            break
        keep = i in wanted
        layer.to(device)
        handles, samplers = [], []
        if keep:
            mask = _layer_mask(n_tok, s, seed, i)
            samplers = [_TokenSampler(mask, outliers) for _ in watched]
            for mod, smp in zip(arch.linears(layer, watched), samplers):
                handles.append(mod.register_forward_hook(smp))
        try:
            last = i == wanted[-1]
            out = calibrate.run_layer(layer, inputs, keep_outputs=not last)
        finally:
            for h in handles:
                h.remove()
            layer.to("cpu")
        if keep:
            q_in, up_in, o_in = (smp.result() for smp in samplers)
            r1.append(torch.stack([q_in, up_in]))
            r2.append(o_in.reshape(s, nq, hd))
            if outliers:
                q_sp, up_sp, o_sp = (smp.spiky() for smp in samplers)
                r1_sp.append(torch.stack([q_sp, up_sp]))
                r2_sp.append(o_sp.reshape(-1, nq, hd))
        if out is not None:
            inputs.hidden = out
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Captured(r1=torch.stack(r1), r2=torch.stack(r2),
                    r1_spiky=torch.stack(r1_sp) if r1_sp else None, r2_spiky=torch.stack(r2_sp) if r2_sp else None,
                    seconds=time.time() - t0, extra={"layers": wanted, "samples": s, "tokens_seen": n_tok})


# ----------------------------------------------------------------------------- optimisation
def _schedule(opt, total_steps: int, cosine: bool):
    if not cosine:
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=0.0)


def _spiky_batch(spiky: torch.Tensor | None, batch: int, g: torch.Generator, dim: int = 0):
    if spiky is None or spiky.shape[dim] == 0:
        return None
    idx = torch.randint(0, spiky.shape[dim], (min(spiky.shape[dim], max(1, batch // 8)),), generator=g)
    return spiky.index_select(dim, idx.to(spiky.device))


def train_r1(x: torch.Tensor, r1_init: torch.Tensor, *, epochs: int, lr: float, momentum: float,
             batch: int, seed: int, device: str | torch.device = "cpu", cosine: bool = False,
             spiky: torch.Tensor | None = None, spiky_weight: float = 0.0,
             rows: torch.Tensor | None = None, rows_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Learn one rotation R = QR(Z) of x [N, n] on the whip loss; returns (R float64, loss per epoch).
    With `spiky` [K, n] and spiky_weight a > 0, and `rows` [M, n] and rows_weight b > 0, the loss
    of a step is (1 - a - b) whip(batch) + a whip(batch // 8 rows of spiky) + b whip(batch rows of
    `rows`)."""
    device = torch.device(device)
    x = x.to(device, torch.float32)
    if spiky is not None:
        spiky = spiky.to(device, torch.float32) if spiky_weight > 0 else None
    if rows is not None:
        rows = rows.to(device, torch.float32) if rows_weight > 0 else None
    if (spiky_weight if spiky is not None else 0) + (rows_weight if rows is not None else 0) >= 1:
        raise ValueError("outlier_weight + weight_rows must be < 1 (the token sample needs a share)")
    z = torch.nn.Parameter(r1_init.to(device, torch.float32).clone())
    opt = torch.optim.SGD([z], lr=lr, momentum=momentum)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch))
    sched = _schedule(opt, epochs * steps_per_epoch, cosine)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        total, count = 0.0, 0
        for i in range(0, n, batch):
            xb = x[perm[i: i + batch]]
            r = qr_orth(z)
            loss = plain = whip_loss(xb @ r)
            share, extra = 1.0, []
            sp = _spiky_batch(spiky, batch, g)
            if sp is not None:
                share -= spiky_weight
                extra.append(spiky_weight * whip_loss(sp @ r))
            if rows is not None:
                pick = torch.randint(0, rows.shape[0], (min(batch, rows.shape[0]),), generator=g)
                share -= rows_weight
                extra.append(rows_weight * whip_loss(rows.index_select(0, pick.to(device)) @ r))
            if extra:
                loss = share * plain + sum(extra)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += plain.item() * xb.shape[0]  # the history is the whip loss of the token sample
            count += xb.shape[0]
        history.append(total / count)
    with torch.no_grad():
        r = qr_orth(z.detach().double()).cpu()
    return r, history


def train_r2(x: torch.Tensor, r2_init: torch.Tensor, *, epochs: int, lr: float, momentum: float,
             batch: int, seed: int, device: str | torch.device = "cpu", cosine: bool = False,
             spiky: torch.Tensor | None = None, spiky_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Learn per-layer, per-KV-head rotations R2 = QR(Z2) of o_proj inputs x [L, N, nq, hd]
    (r2_init [L, nkv, hd, hd]); the layers are independent problems optimised together.
    Returns (R2 float64 [L, nkv, hd, hd], mean per-layer loss per epoch).
    `spiky` [L, K, nq, hd]: outlier tokens mixed in as in `train_r1`."""
    device = torch.device(device)
    x = x.to(device, torch.float32)
    if spiky is not None:
        spiky = spiky.to(device, torch.float32) if spiky_weight > 0 else None
    z = torch.nn.Parameter(r2_init.to(device, torch.float32).clone())
    opt = torch.optim.SGD([z], lr=lr, momentum=momentum)
    n = x.shape[1]
    n_layers = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch))
    sched = _schedule(opt, epochs * steps_per_epoch, cosine)
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        total, count = 0.0, 0
        for i in range(0, n, batch):
            xb = x[:, perm[i: i + batch]]
            r = qr_orth(z)
            # sum over layers of each layer's whip loss (mean over its tokens)
            loss = plain = _whip_layers(rotate_heads_layers(xb, r))
            sp = _spiky_batch(spiky, batch, g, dim=1)
            if sp is not None:
                loss = (1 - spiky_weight) * plain + spiky_weight * _whip_layers(rotate_heads_layers(sp, r))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += plain.item() / n_layers * xb.shape[1]
            count += xb.shape[1]
        history.append(total / count)
    with torch.no_grad():
        r = qr_orth(z.detach().double()).cpu()
    return r, history


def _whip_layers(o: torch.Tensor) -> torch.Tensor:
    """Sum over layers of the whip loss of o [L, N, ...] (mean over each layer's tokens)."""
    return torch.exp(-o.abs()).flatten(2).sum(-1).mean(-1).sum()


def reader_weight_rows(model) -> torch.Tensor:
    """The rows of every residual-stream reader (q/k/v, gate/up) scaled to RMS 1 [rows, hidden]:
    R1 rotates them exactly as it rotates a token (W <- W R1) and the per-output-channel weight
    quantizer sees each row as the per-token activation quantizer sees a token."""
    arch = arch_of(model)
    rows = []
    for layer in arch.decoder_layers(model):
        for lin in arch.linears(layer, arch.attn_readers + arch.mlp_readers):
            w = lin.weight.detach().float()
            rows.append(w / w.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30))
    return torch.cat(rows)


def learn_rotations(model, calib_windows: torch.Tensor, init: Rotations,
                    options: DartQuantOptions = DartQuantOptions(), device: str = "cpu",
                    seed: int = 0) -> tuple[Rotations, DartQuantRun]:
    """Learn R1 [hidden, hidden] and R2 (per layer [nkv, hd, hd]) from the Hadamard start `init`
    (its R3/R4 are kept as they are).

    `model`: folded (norm gains 1), untied, unrotated, float32 on the CPU (left unchanged).
    Returns the learned rotations (float64, orthogonal) and the run's record."""
    learned, run = learn_candidates(model, calib_windows, [init], options, device, seed)
    return learned[0], run


def learn_candidates(model, calib_windows: torch.Tensor, inits: list[Rotations],
                     options: DartQuantOptions = DartQuantOptions(), device: str = "cpu",
                     seed: int = 0) -> tuple[list[Rotations], DartQuantRun]:
    """`learn_rotations` from each start in `inits`, on one shared capture (the captured
    activations do not depend on the start). Returns one learned `Rotations` per start."""
    o = options
    t0 = time.time()
    windows = calib_windows if o.windows is None else calib_windows[: o.windows]
    cap = capture(model, windows, device, o.samples, seed, o.capture_batch, outliers=o.outliers, store=o.store)
    n_layers = cap.r1.shape[0]
    log.info("DartQuant: captured %d tokens per layer x %d layers (%.1f s)", cap.extra["samples"], n_layers, cap.seconds)
    rows = reader_weight_rows(model) if o.weight_rows > 0 else None
    results, runs = [], []
    for init in inits:
        r1_new, r2_new, run = _learn_one(cap, init.r1, init.r2, rows, o, device, seed)
        results.append(init.replace(r1=r1_new, r2=tuple(r2_new[i].clone() for i in range(n_layers))))
        runs.append(run)
    record = DartQuantRun(options=o, starts=tuple(runs), capture_s=cap.seconds, total_s=time.time() - t0,
                          samples=cap.extra["samples"], layers=n_layers)
    del cap
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return results, record


def _learn_one(cap: Captured, r1: torch.Tensor, r2: tuple[torch.Tensor, ...], rows: torch.Tensor | None,
               o: DartQuantOptions, device, seed: int) -> tuple[torch.Tensor, torch.Tensor, StartRun]:
    n_layers = cap.r1.shape[0]
    hidden = cap.r1.shape[-1]
    t = time.time()
    x1 = cap.r1.reshape(-1, hidden)
    with torch.no_grad():  # the Hadamard's loss, in chunks (the pool can be GBs)
        r1f = r1.to(device, torch.float32)
        loss0_r1 = sum(whip_loss(c.to(device) @ r1f).item() * c.shape[0] for c in x1.split(16384)) / x1.shape[0]
    sp1 = cap.r1_spiky.reshape(-1, hidden) if cap.r1_spiky is not None else None
    r1_new, h1 = train_r1(x1, r1, epochs=o.epochs, lr=o.lr, momentum=o.momentum, batch=o.batch,
                          seed=seed, device=device, cosine=o.cosine, spiky=sp1, spiky_weight=o.outlier_weight,
                          rows=rows, rows_weight=o.weight_rows)
    r1_s = time.time() - t
    del x1
    log.info("DartQuant R1: whip %.4f (Hadamard) -> %s (per epoch), %.1f s",
             loss0_r1, " ".join(f"{v:.4f}" for v in h1), r1_s)

    t = time.time()
    r2_init = torch.stack([r.double() for r in r2])
    with torch.no_grad():
        r2f = r2_init.to(device, torch.float32)
        loss0_r2 = sum(_whip_layers(rotate_heads_layers(c.to(device), r2f)).item() * c.shape[1]
                       for c in cap.r2.split(1024, dim=1)) / cap.r2.shape[1] / n_layers
    r2_new, h2 = train_r2(cap.r2, r2_init, epochs=o.r2_epochs, lr=o.r2_lr, momentum=o.momentum,
                          batch=o.r2_batch, seed=seed, device=device, cosine=o.cosine,
                          spiky=cap.r2_spiky, spiky_weight=o.outlier_weight)
    r2_s = time.time() - t
    log.info("DartQuant R2: whip %.4f (Hadamard) -> %s (per epoch, mean over layers), %.1f s",
             loss0_r2, " ".join(f"{v:.4f}" for v in h2), r2_s)
    run = StartRun(r1_loss_init=loss0_r1, r1_loss=tuple(h1), r2_loss_init=loss0_r2, r2_loss=tuple(h2),
                   r1_s=r1_s, r2_s=r2_s)
    return r1_new, r2_new, run
