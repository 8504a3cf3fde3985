"""Computational invariance: fold RMSNorm weights into the next linears, then absorb the
orthogonal rotations R1 (residual stream), R2 (per KV head, value/output space) and the R4
block Hadamard (down_proj input) into the weights. All products run in float64 and are stored
back in the model's dtype, so fusion does not drift.

The rotations are a value (`Rotations`) and one function applies them (`apply_rotations` for a
model, `apply_layer_rotations` for one decoder layer, which the first calls for every layer):
the calibrator, the rotation scoring (select_rotation.py) and the tests all go through it.
Which module plays which role comes from offline/arch.py.

Conventions (HF Linear computes y = x W^T, activations are row vectors):
  readers of the residual stream (q/k/v, gate/up, lm_head):  W <- W R1
  writers (embeddings rows, o_proj, down_proj, their biases): E <- E R1, W <- R1^T W, b <- b R1
  R2 for KV head h: v_proj rows of h <- R2^T W_v[h] (bias too); o_proj columns of every query
  head in h's GQA group <- W_o[:, head] R2
  R4: down_proj W <- W H_bd, and the served model applies x <- x H_bd online.
  R3: a per-head Hadamard on query and key after RoPE, online only (q.k is unchanged by it, so
  the fp model needs nothing; it makes the quantized KV cache accurate when served).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from vllm_rotquant.kernels.hadamard import hadamard_matrix, rotation_matrix
from vllm_rotquant.offline.arch import ArchMapping, arch_of, head_geometry

log = logging.getLogger(__name__)

__all__ = ["Rotations", "apply_rotations", "apply_layer_rotations", "fold_norms", "untie_embeddings",
           "block_hadamard_rows", "OnlineHadamard", "install_online_hadamard", "head_geometry"]


@dataclasses.dataclass(frozen=True)
class Rotations:
    """The rotations of one checkpoint. r1: [hidden, hidden] (residual stream); r2: per decoder
    layer [num_kv_heads, head_dim, head_dim]; r4_block: order of the block-diagonal Hadamard
    absorbed into down_proj (its twin runs online); r3_block: order of the per-head query/key
    Hadamard applied online after RoPE. None: that rotation is not used."""

    r1: torch.Tensor | None = None
    r2: tuple[torch.Tensor, ...] | None = None
    r4_block: int | None = None
    r3_block: int | None = None

    def __post_init__(self):
        if self.r2 is not None and not isinstance(self.r2, tuple):
            object.__setattr__(self, "r2", tuple(self.r2))

    @classmethod
    def hadamard(cls, config, seed: int, r4_block: int | None = None, r3_block: int | None = None) -> "Rotations":
        """QuaRot-style random Hadamard R1 (hidden) and per-layer, per-KV-head R2, seeded and
        reproducible (a seeded random orthogonal matrix where no Hadamard of the order exists)."""
        _, nkv, hd = head_geometry(config)
        r1 = rotation_matrix(config.hidden_size, seed)
        r2 = tuple(torch.stack([rotation_matrix(hd, seed + 1 + 1000 * (i + 1) + h) for h in range(nkv)])
                   for i in range(config.num_hidden_layers))
        return cls(r1=r1, r2=r2, r4_block=r4_block, r3_block=r3_block)

    def replace(self, **changes) -> "Rotations":
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "Rotations":
        """The same rotations as float64 on `device` (where the absorption products run)."""
        return self.replace(r1=None if self.r1 is None else self.r1.to(device, torch.float64),
                            r2=None if self.r2 is None else tuple(r.to(device, torch.float64) for r in self.r2))


def apply_rotations(model, rotations: Rotations, device: torch.device | str = "cpu", *,
                    online: bool = False) -> list:
    """Absorb `rotations` into a folded model (embeddings, every decoder layer, lm_head); the
    float64 products run on `device`, the weights stay where they are. With `online`, also hook
    the fp twin of R4 into every down_proj (the served model's online Hadamard) and return the
    hook handles, so that the fp model computes what it did before the rotations."""
    arch = arch_of(model)
    rot = rotations.to(device)
    layers = arch.decoder_layers(model)
    if rot.r2 is not None and len(rot.r2) != len(layers):
        raise ValueError(f"R2 has {len(rot.r2)} layers, the model {len(layers)}")
    if rot.r1 is not None:
        emb = arch.get(model, arch.embeddings).weight
        emb.data = (_on(emb.data, rot.r1) @ rot.r1).to(emb.dtype).to(emb.device)
        _right(arch.get(model, arch.lm_head), rot.r1)
    handles = []
    for i, layer in enumerate(layers):
        handles += apply_layer_rotations(layer, rot, i, arch, device, online=online)
    return handles


def apply_layer_rotations(layer, rotations: Rotations, index: int, arch: ArchMapping,
                          device: torch.device | str = "cpu", *, online: bool = False) -> list:
    """Absorb R1, layer `index`'s R2 and R4 into one decoder layer (float64 on `device`);
    with `online`, hook the fp twin of R4 into its down_proj. Returns the hook handles."""
    if rotations.r1 is not None:
        r1 = rotations.r1.to(device, torch.float64)
        for lin in arch.linears(layer, arch.attn_readers + arch.mlp_readers):
            _right(lin, r1)
        for lin in arch.linears(layer, (arch.o_proj, arch.down_proj)):
            _left_t(lin, r1)
    if rotations.r2 is not None:
        _rotate_values(arch.get(layer, arch.v_proj), arch.get(layer, arch.o_proj), rotations.r2[index], device)
    handles = []
    if rotations.r4_block:
        down = arch.get(layer, arch.down_proj)
        w = down.weight.data
        down.weight.data = block_hadamard_rows(w.to(device), rotations.r4_block).to(w.dtype).to(w.device)
        if online:
            handles.append(down.register_forward_pre_hook(OnlineHadamard(rotations.r4_block)))
    return handles


def untie_embeddings(model) -> None:
    """Give lm_head its own copy of the embedding matrix, so rotating one does not rotate both."""
    arch = arch_of(model)
    emb = arch.get(model, arch.embeddings).weight
    head = arch.get(model, arch.lm_head)
    if head.weight is emb or head.weight.data_ptr() == emb.data_ptr():
        head.weight = nn.Parameter(emb.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []


def _scale_columns(linear: nn.Linear, gamma: torch.Tensor) -> None:
    w = linear.weight.data
    linear.weight.data = (w.double() * gamma.to(w.device, torch.float64)[None, :]).to(w.dtype)


def fold_norms(model) -> None:
    """Fold every residual-stream RMSNorm gain into the linears that read its output; the gains
    become ones (norms the rotations leave alone, e.g. Qwen3's q/k norms, keep theirs)."""
    arch = arch_of(model)
    arch.check(model)
    untie_embeddings(model)
    for layer in arch.decoder_layers(model):
        for norm, readers in ((arch.attn_norm, arch.attn_readers), (arch.mlp_norm, arch.mlp_readers)):
            norm = arch.get(layer, norm)
            gamma = norm.weight.data.clone()
            for lin in arch.linears(layer, readers):
                _scale_columns(lin, gamma)
            norm.weight.data.fill_(1.0)
    norm = arch.get(model, arch.final_norm)
    gamma = norm.weight.data.clone()
    _scale_columns(arch.get(model, arch.lm_head), gamma)
    norm.weight.data.fill_(1.0)


def _on(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """t in float64 on r's device (where the product runs: the accelerator's float64 units are
    ~100x a CPU's, which matters for a 7B model's ~50 TFLOP of absorption)."""
    return t.to(r.device).to(torch.float64)  # move, then widen (on the device)


def _right(linear: nn.Linear, r: torch.Tensor) -> None:
    w = linear.weight.data
    linear.weight.data = (_on(w, r) @ r).to(w.dtype).to(w.device)


def _left_t(linear: nn.Linear, r: torch.Tensor) -> None:
    w = linear.weight.data
    linear.weight.data = (r.T @ _on(w, r)).to(w.dtype).to(w.device)
    if linear.bias is not None:
        b = linear.bias.data
        linear.bias.data = (_on(b, r) @ r).to(b.dtype).to(b.device)


def _rotate_values(v: nn.Linear, o: nn.Linear, r2: torch.Tensor, device: torch.device | str = "cpu") -> None:
    """Absorb R2 [num_kv_heads, head_dim, head_dim] into v_proj rows and o_proj columns
    (float64 products on `device`); the head geometry is read off the shapes."""
    nkv, hd = r2.shape[0], r2.shape[-1]
    if r2.dim() != 3 or r2.shape[1] != hd or v.weight.shape[0] != nkv * hd or o.weight.shape[1] % hd:
        raise ValueError(f"R2 has shape {tuple(r2.shape)}, which does not fit v_proj {tuple(v.weight.shape)} "
                         f"and o_proj {tuple(o.weight.shape)}")
    nq = o.weight.shape[1] // hd
    r2 = r2.to(device, torch.float64)
    wv = _on(v.weight.data, r2).reshape(nkv, hd, -1)
    v.weight.data = torch.einsum("hji,hjk->hik", r2, wv).reshape(nkv * hd, -1).to(v.weight.dtype).to(v.weight.device)
    if v.bias is not None:
        bv = _on(v.bias.data, r2).reshape(nkv, hd)
        v.bias.data = torch.einsum("hj,hjk->hk", bv, r2).reshape(-1).to(v.bias.dtype).to(v.bias.device)
    group = nq // nkv
    r2_q = r2.repeat_interleave(group, dim=0)  # query head i uses KV head i // group
    wo = _on(o.weight.data, r2).reshape(o.weight.shape[0], nq, hd)
    o.weight.data = torch.einsum("ohj,hjk->ohk", wo, r2_q).reshape(o.weight.shape[0], -1).to(o.weight.dtype).to(o.weight.device)


def block_hadamard_rows(x: torch.Tensor, block: int, dtype: torch.dtype = torch.float64,
                        chunk_rows: int = 4096) -> torch.Tensor:
    """x [..., K] @ blockdiag(H_block), computed in float64 and returned as `dtype` (the offline
    twin of the online R4). Rows go through in chunks so that a calibration batch (16k tokens x
    11008 on a 7B model) never has a whole float64 copy on the accelerator."""
    h = hadamard_matrix(block, device=x.device)
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"block {block} does not divide the last dimension {k}")
    flat = x.reshape(-1, k)
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    for i in range(0, flat.shape[0], chunk_rows):
        part = flat[i: i + chunk_rows].double().reshape(-1, k // block, block) @ h
        out[i: i + chunk_rows] = part.reshape(-1, k)
    return out.reshape(x.shape)


class OnlineHadamard:
    """Forward pre-hook that applies x <- x H_bd to a module's input (the fp model's R4)."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, module, args):
        x = args[0]
        return (block_hadamard_rows(x, self.block, x.dtype), *args[1:])


def install_online_hadamard(model, block: int) -> list:
    """Hook R4 into every down_proj of an fp model whose down_proj weights absorbed H_bd."""
    arch = arch_of(model)
    return [arch.get(layer, arch.down_proj).register_forward_pre_hook(OnlineHadamard(block))
            for layer in arch.decoder_layers(model)]
