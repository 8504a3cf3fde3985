"""Online input transforms calibrated layer by layer (issue 21): `--method duquant | flatquant`.

Each transformed input kind (qkv, o, gate_up, down; format.InputTransform) gets a per-layer
transform M applied online right before the served quantizer, x -> x M, and the inverse absorbed
into the weights of the projections that read it, W -> W M^-T (in float64), so the float model is
unchanged and only the quantizer sees the flatter x M. They run after R1/R2 are absorbed, on the
rotated float model; a transform on the down input replaces R4.

DuQuant (Lin et al., NeurIPS 2024), per layer and input, from calibration activations:
  1. smoothing: diag = 1/s, s_j = max|x_j|^alpha / max|w_j|^(1-alpha) over the readers' weights;
  2. block rotations built greedily: in each block the channel holding the largest |value| is sent
     by a Householder reflection onto the uniform direction (its energy spread over the block), a
     step kept only while it lowers the block's maximum (`steps` at most);
  3. a zigzag permutation: channels sorted by their maximum after step 2 are dealt to the blocks
     0, 1, ..., G-1, G-1, ..., 0, ... so each block gets a balanced share of the large ones (within
     each tensor-parallel rank's columns on a row-parallel input);
  4. a second greedy block rotation.
The paper's R = E_d R~ Q steps swap the outlier channel to the first position and apply a
matrix with a uniform first row; the reflection is one such matrix.

FlatQuant (Sun et al., ICML 2025): per layer, for every transformed input a Kronecker pair
(left n1 x n1, right n2 x n2, n1 * n2 = K, each started from the normalized Hadamard of its
order where there is one, else the identity: on the down input that start is a K-wide Hadamard,
what R4 does, which the training then improves on) and a per-channel
factor, trained with AdamW to make the layer with fake-quantized weights (RTN, per channel) and
activations (the served quantizers, straight-through rounding) reproduce the float layer's output
on the calibration windows (MSE). The paper's learnable clipping is left to the checkpoint's
clip search and GPTQ.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vllm_rotquant.format import MAX_TRANSFORM_BLOCK, ROW_PARALLEL_KINDS, InputTransform
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.hadamard import hadamard_matrix, hadamard_supported
from vllm_rotquant.offline import calibrate
from vllm_rotquant.offline.arch import ArchMapping, arch_of

log = logging.getLogger(__name__)

EPS = 1e-5


def kind_readers(arch: ArchMapping) -> dict[str, tuple[str, ...]]:
    """Input kind -> layer-level paths of the projections that read it."""
    return {"qkv": tuple(arch.attn_readers), "o": (arch.o_proj,), "gate_up": tuple(arch.mlp_readers),
            "down": (arch.down_proj,)}


@dataclasses.dataclass
class Transform:
    """One layer's transform of one input: its declaration and tensors (float32, perm int32)."""

    spec: InputTransform
    tensors: dict[str, torch.Tensor]
    # the tensors on each device the hooks have run on (moved once, not on every forward)
    _on: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x M (float32), as the served model computes it."""
        if x.device not in self._on:
            self._on[x.device] = {k: v.to(x.device) for k, v in self.tensors.items()}
        return ref.input_transform_ref(x, self.spec.type, self._on[x.device])

    def absorb(self, w: torch.Tensor) -> torch.Tensor:
        """W M^-T in float64 for a reader's weight [N, K], exact for the stored (float32) M."""
        t = {k: v.to(w.device, torch.float64) for k, v in self.tensors.items()}
        inv_t = lambda m: torch.linalg.inv(m).mT  # noqa: E731 (an orthogonal block: itself, up to rounding)
        if self.spec.type == "block_rotation":  # M^-T = D^-1 rot1^-T P rot2^-T: the same transform
            return ref.block_rotation_ref(w, 1.0 / t["diag"], inv_t(t["rot1"]), t["perm"], inv_t(t["rot2"]),
                                          torch.float64)
        # M^-T = D^-1 (left^-T (x) right^-T)
        return ref.kronecker_ref(w, 1.0 / t["diag"], inv_t(t["left"]), inv_t(t["right"]), torch.float64)


class OnlineTransform:
    """Forward pre-hook: the float model's twin of a served input transform (x <- x M)."""

    def __init__(self, transform: Transform):
        self.transform = transform

    def __call__(self, module, args):
        x = args[0]
        return (self.transform.apply(x).to(x.dtype), *args[1:])


def absorb_and_hook(layer, arch: ArchMapping, kind: str, transform: Transform) -> list:
    """Absorb M^-T into every reader of `kind` in `layer` and hook M before each; the handles."""
    handles = []
    for path in kind_readers(arch)[kind]:
        lin = arch.get(layer, path)
        lin.weight.data = transform.absorb(lin.weight.data).to(lin.weight.dtype)
        handles.append(lin.register_forward_pre_hook(OnlineTransform(transform)))
    return handles


# ----------------------------------------------------------------------------- shapes
def rank_chunk(kind: str, k: int, tp_sizes: tuple[int, ...]) -> int:
    """The columns a transform must keep to themselves: one rank's K/tp on a row-parallel input."""
    return k // max(tp_sizes) if kind in ROW_PARALLEL_KINDS else k


def duquant_block(kind: str, k: int, tp_sizes: tuple[int, ...], requested: int | None) -> int:
    """The block: `requested`, or the largest divisor <= MAX_TRANSFORM_BLOCK of the rank chunk."""
    chunk = rank_chunk(kind, k, tp_sizes)
    if requested is not None:
        if chunk % requested or requested > MAX_TRANSFORM_BLOCK:
            raise ValueError(f"--tf-block {requested}: must divide the {kind} input's {chunk} columns per rank and be "
                             f"<= {MAX_TRANSFORM_BLOCK}")
        return requested
    block = max(d for d in range(1, MAX_TRANSFORM_BLOCK + 1) if chunk % d == 0)
    if block < 8:
        raise ValueError(f"--method duquant: the {kind} input's {chunk} columns per rank have no divisor in "
                         f"[8, {MAX_TRANSFORM_BLOCK}] to use as a block (pass --tf-block or --tf-kinds without it)")
    return block


def kronecker_factors(k: int, kind: str) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = K, n1 <= n2 <= MAX_TRANSFORM_BLOCK, n1 as large as possible."""
    for n1 in range(math.isqrt(k), 0, -1):
        if k % n1 == 0 and k // n1 <= MAX_TRANSFORM_BLOCK:
            return n1, k // n1
    raise ValueError(f"--method flatquant: the {kind} input's {k} features have no factorisation n1 x n2 with both "
                     f"<= {MAX_TRANSFORM_BLOCK} (pass --tf-kinds without {kind})")


# ----------------------------------------------------------------------------- DuQuant
def _householder_to_uniform(c: torch.Tensor, b: int) -> torch.Tensor:
    """[G, b, b] orthogonal reflections H_g with e_{c_g}^T H_g = (1, ..., 1)/sqrt(b)."""
    g = c.shape[0]
    u = torch.full((g, b), 1.0 / math.sqrt(b), dtype=torch.float64, device=c.device)
    v = -u
    v[torch.arange(g, device=c.device), c] += 1.0
    norm2 = (v * v).sum(-1, keepdim=True)
    eye = torch.eye(b, dtype=torch.float64, device=c.device).expand(g, b, b)
    ok = norm2 > 1e-12  # e_c already uniform (b = 1): no reflection
    h = eye - 2.0 * v[:, :, None] * v[:, None, :] / torch.where(ok, norm2, torch.ones_like(norm2))[:, :, None]
    return torch.where(ok[:, :, None], h, eye)


def greedy_block_rotation(s: torch.Tensor, block: int, steps: int) -> torch.Tensor:
    """DuQuant's greedy rotation of every block of s [n, K] (float64, on its device) -> [K/block, block, block]."""
    n, k = s.shape
    g = k // block
    sb = s.reshape(n, g, block).transpose(0, 1)  # [G, n, b]
    rot = torch.eye(block, dtype=torch.float64, device=s.device).repeat(g, 1, 1)
    cur = sb.abs().amax(dim=(1, 2))
    for _ in range(steps):
        z = sb @ rot
        c = z.abs().amax(dim=1).argmax(dim=-1)  # each block's outlier channel
        cand = rot @ _householder_to_uniform(c, block)
        new = (sb @ cand).abs().amax(dim=(1, 2))
        better = new < cur
        if not bool(better.any()):
            break
        rot = torch.where(better[:, None, None], cand, rot)
        cur = torch.where(better, new, cur)
    return rot


def zigzag_permutation(m: torch.Tensor, block: int, chunk: int) -> torch.Tensor:
    """perm [K] (int32): channels of each `chunk` sorted by m descending and dealt to its blocks in
    zigzag order; y[:, j] = t[:, perm[j]]."""
    k = m.shape[0]
    perm = torch.empty(k, dtype=torch.int64)
    blocks = chunk // block
    zig = list(range(blocks)) + list(range(blocks - 1, -1, -1))
    for start in range(0, k, chunk):
        order = torch.argsort(m[start: start + chunk], descending=True, stable=True) + start
        fill = [0] * blocks
        for r, ch in enumerate(order.tolist()):
            b = zig[r % len(zig)]
            perm[start + b * block + fill[b]] = ch
            fill[b] += 1
    return perm.to(torch.int32)


def duquant_transform(kind: str, sample: torch.Tensor, amax: torch.Tensor, weights: list[torch.Tensor],
                      tp_sizes: tuple[int, ...], opts, device: torch.device | str = "cpu") -> Transform:
    """DuQuant's transform of one input from a token sample [n, K], its channel maxima over all
    calibration tokens [K] and the readers' weights [N_i, K]; the greedy rotations run in float64
    on `device` (the calibration device), the tensors come back on the CPU."""
    k = sample.shape[1]
    block = duquant_block(kind, k, tp_sizes, opts.block)
    amax = amax.to(device, torch.float64)
    if opts.alpha > 0:
        wmax = torch.cat([w.detach().to(device, torch.float64).abs() for w in weights]).amax(dim=0)
        s = amax.clamp_min(EPS) ** opts.alpha / wmax.clamp_min(EPS) ** (1 - opts.alpha)
        diag = (1.0 / s).float()
    else:
        diag = torch.ones(k, device=device)
    # the sampled tokens and the maxima (DuQuant's statistic), smoothed
    rows = torch.cat([sample.to(device, torch.float64), amax[None]]) * diag.double()
    rot1 = greedy_block_rotation(rows, block, opts.steps)
    y = torch.einsum("mgi,gij->mgj", rows.reshape(-1, k // block, block), rot1).reshape(-1, k)
    perm = zigzag_permutation(y.abs().amax(dim=0).cpu(), block, rank_chunk(kind, k, tp_sizes))
    rot2 = greedy_block_rotation(y[:, perm.long().to(device)], block, opts.steps)
    return Transform(InputTransform(kind, "block_rotation", block=block),
                     {"diag": diag.cpu(), "rot1": rot1.float().cpu(), "perm": perm, "rot2": rot2.float().cpu()})


class _Collect:
    """Forward pre-hook: channel maxima of all tokens and a seeded sample of `per_batch` tokens per batch."""

    def __init__(self, per_batch: int, gen: torch.Generator):
        self.per_batch, self.gen = per_batch, gen
        self.amax, self.rows = None, []

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        m = x.abs().amax(dim=0).cpu()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)
        idx = torch.randperm(x.shape[0], generator=self.gen)[: self.per_batch]
        self.rows.append(x[idx.to(x.device)].cpu())


# ----------------------------------------------------------------------------- FlatQuant
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_quant_act(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    qm = ref.qmax(bits)
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip / qm).clamp_min(1e-8)
    return torch.clamp(_round_ste(x / scale), -qm - 1, qm) * scale


def _fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    qm = ref.qmax(bits)
    scale = (w.abs().amax(dim=-1, keepdim=True) / qm).clamp_min(1e-8)
    return torch.clamp(_round_ste(w / scale), -qm - 1, qm) * scale


def _start(n: int) -> torch.Tensor:
    """A factor's starting value: the normalized Hadamard of order n where one exists (then left (x)
    right is itself a Hadamard of order K: on the down input, R4's rotation), else the identity."""
    return hadamard_matrix(n, torch.float32) if hadamard_supported(n) else torch.eye(n)


class _Kron(torch.nn.Module):
    """A learnable Kronecker transform x -> (x * exp(log_d)) (left (x) right) and its absorption."""

    def __init__(self, k: int, factors: tuple[int, int]):
        super().__init__()
        n1, n2 = factors
        self.left = torch.nn.Parameter(_start(n1))
        self.right = torch.nn.Parameter(_start(n2))
        self.log_d = torch.nn.Parameter(torch.zeros(k))

    def forward(self, x):
        lead, k = x.shape[:-1], x.shape[-1]
        t = (x * self.log_d.exp()).reshape(-1, self.left.shape[0], self.right.shape[0])
        return (self.left.T @ t @ self.right).reshape(*lead, k)

    def absorb(self, w):
        n, k = w.shape
        wm = (w / self.log_d.exp()).reshape(n, self.left.shape[0], self.right.shape[0])
        return (torch.linalg.inv(self.left) @ wm @ torch.linalg.inv(self.right).T).reshape(n, k)


def flatquant_layer(layer, arch: ArchMapping, inputs: calibrate.LayerInputs, kinds: tuple[str, ...],
                    act_for, weight_bits: int, opts) -> dict[str, Transform]:
    """Train one layer's Kronecker transforms (see the module docstring) on `inputs` (the float
    model's stream into it). `act_for(path) -> (bits, clip)`: the served activation quantizers."""
    readers = kind_readers(arch)
    target = calibrate.run_layer(layer, inputs)
    mods = {}
    for kind in kinds:
        k = arch.get(layer, readers[kind][0]).in_features
        mods[kind] = _Kron(k, kronecker_factors(k, kind)).to(inputs.device)
    params = [p for m in mods.values() for p in m.parameters()]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    base = {path: arch.get(layer, path).weight.detach().clone() for kind in kinds for path in readers[kind]}
    others = [(p, lin) for p, lin in arch.quantized_linears(layer) if p not in base]
    for p in layer.parameters():
        p.requires_grad_(False)

    def pre(kind, path):
        bits, clip = act_for(path)

        def hook(module, args):
            y = mods[kind](args[0].float()) if kind in mods else args[0].float()
            return ((_fake_quant_act(y, bits, clip) if bits < 16 else y).to(args[0].dtype), *args[1:])
        return hook

    handles = [arch.get(layer, path).register_forward_pre_hook(pre(kind, path))
               for kind in kinds for path in readers[kind]]
    handles += [lin.register_forward_pre_hook(pre(None, p)) for p, lin in others]
    saved_others = {p: lin.weight.data for p, lin in others}
    for p, lin in others:  # the untransformed readers see RTN weights too
        lin.weight.data = _fake_quant_weight(lin.weight.data.float(), weight_bits).to(lin.weight.dtype)
    n = inputs.hidden.shape[0]
    for path in base:
        del arch.get(layer, path).weight
    try:
        for _ in range(opts.epochs):
            for i in range(0, n, opts.batch):
                x = inputs.hidden[i: i + opts.batch].to(inputs.device)
                kwargs = _batch_kwargs(inputs, x.shape[0])
                with torch.enable_grad():
                    for kind in kinds:
                        for path in readers[kind]:
                            # a plain tensor attribute (the Parameter was removed): autograd reaches the transform
                            arch.get(layer, path).weight = _fake_quant_weight(mods[kind].absorb(base[path].float()),
                                                                              weight_bits)
                    y = layer(x, **kwargs)
                    y = y[0] if isinstance(y, tuple) else y
                    loss = F.mse_loss(y.float(), target[i: i + opts.batch].to(inputs.device).float())
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                optim.step()
    finally:
        for h in handles:
            h.remove()
        for path, w in base.items():
            lin = arch.get(layer, path)
            lin.__dict__.pop("weight", None)
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
        for p, lin in others:
            lin.weight.data = saved_others[p]
    out = {}
    for kind, m in mods.items():
        k = m.log_d.shape[0]
        out[kind] = Transform(InputTransform(kind, "kronecker", factors=(m.left.shape[0], m.right.shape[0])),
                              {"diag": m.log_d.detach().exp().float().cpu().reshape(k),
                               "left": m.left.detach().float().cpu(), "right": m.right.detach().float().cpu()})
    return out


def _batch_kwargs(inputs: calibrate.LayerInputs, rows: int) -> dict:
    kwargs = dict(inputs.kwargs)
    pe = kwargs.get("position_embeddings")
    if pe is not None and pe[0].shape[0] not in (1, rows):
        kwargs["position_embeddings"] = tuple(t[:rows] for t in pe)
    return kwargs


# ----------------------------------------------------------------------------- the pass
@torch.no_grad()
def calibrate_transforms(model, windows: torch.Tensor, opts, tp_sizes: tuple[int, ...]) -> tuple[list, dict, dict]:
    """Calibrate, absorb and hook the transforms of `opts.method` into the (folded, rotated,
    float32) model, layer by layer on `opts.device`. Returns (hook handles, {(layer, kind):
    Transform}, record)."""
    t0 = time.time()
    device = torch.device(opts.device)
    arch = arch_of(model)
    readers = kind_readers(arch)
    kinds = opts.transform_kinds
    topt = opts.transform
    gen = torch.Generator().manual_seed(opts.seed)
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, opts.batch_size)
    n_batches = math.ceil(inputs.hidden.shape[0] / inputs.batch_size)
    handles, transforms = [], {}
    for i, layer in enumerate(tqdm(arch.decoder_layers(model), desc=f"{opts.method} transforms", unit="layer")):
        layer.to(device)
        outputs = None  # the next layer's inputs, when a calibration pass already made them
        if opts.method == "duquant":
            collect = {kind: _Collect(math.ceil(topt.tokens / n_batches), gen) for kind in kinds}
            hs = [arch.get(layer, readers[kind][0]).register_forward_pre_hook(collect[kind]) for kind in kinds]
            try:
                # the float layer's outputs are the transformed layer's (M and W M^-T cancel up to
                # float32 rounding): the statistics pass gives the next layer's inputs, one pass less
                outputs = calibrate.run_layer(layer, inputs)
            finally:
                for h in hs:
                    h.remove()
            found = {}
            for kind in kinds:
                ws = [arch.get(layer, p).weight.data for p in readers[kind]]
                found[kind] = duquant_transform(kind, torch.cat(collect[kind].rows), collect[kind].amax, ws,
                                                tp_sizes, topt, device)
        else:
            inputs.batch_size, saved = topt.batch, inputs.batch_size
            try:
                found = flatquant_layer(layer, arch, inputs, kinds, lambda p: opts.act_for(p, opts.initial_clip),
                                        opts.weight_bits, topt)
            finally:
                inputs.batch_size = saved
        for kind, t in found.items():
            handles += absorb_and_hook(layer, arch, kind, t)
            transforms[(i, kind)] = t
        inputs.hidden = outputs if outputs is not None else calibrate.run_layer(layer, inputs)
        layer.to("cpu")
    record = {"method": opts.method, **dataclasses.asdict(topt), "kinds": list(kinds),
              "seconds": round(time.time() - t0, 1)}
    log.info("%s transforms on %s inputs of %d layers in %.1f s", opts.method, ", ".join(kinds),
             len(arch.decoder_layers(model)), record["seconds"])
    return handles, transforms, record


def checkpoint_tensors(transforms: dict, arch: ArchMapping) -> dict[str, torch.Tensor]:
    """The transforms' checkpoint tensors under each input's first reader (format.TRANSFORM_OWNERS)."""
    from vllm_rotquant.format import TRANSFORM_OWNERS, TRANSFORM_PREFIX

    out = {}
    for (i, kind), t in transforms.items():
        stem = f"{arch.layer_prefix(i)}.{TRANSFORM_OWNERS[kind]}.{TRANSFORM_PREFIX}"
        for leaf, tensor in t.tensors.items():
            out[stem + leaf] = tensor.contiguous()
    return out
