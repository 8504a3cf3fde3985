"""Computational invariance: fold RMSNorm weights into the next linears, then absorb the
orthogonal rotations R1 (residual stream), R2 (per KV head, value/output space) and the R4
block Hadamard (down_proj input) into the weights. All products run in float64 and are stored
back in the model's dtype, so fusion does not drift.

Conventions (HF Linear computes y = x W^T, activations are row vectors):
  readers of the residual stream (q/k/v, gate/up, lm_head):  W <- W R1
  writers (embeddings rows, o_proj, down_proj, their biases): E <- E R1, W <- R1^T W, b <- b R1
  R2 for KV head h: v_proj rows of h <- R2^T W_v[h] (bias too); o_proj columns of every query
  head in h's GQA group <- W_o[:, head] R2
  R4: down_proj W <- W H_bd, and the served model applies x <- x H_bd online.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from vllm_rotquant.kernels.hadamard import hadamard_matrix

log = logging.getLogger(__name__)


def layers_of(model) -> nn.ModuleList:
    return model.model.layers


def untie_embeddings(model) -> None:
    """Give lm_head its own copy of the embedding matrix, so rotating one does not rotate both."""
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight is emb or model.lm_head.weight.data_ptr() == emb.data_ptr():
        model.lm_head.weight = nn.Parameter(emb.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = []


def _scale_columns(linear: nn.Linear, gamma: torch.Tensor) -> None:
    w = linear.weight.data
    linear.weight.data = (w.double() * gamma.double()[None, :]).to(w.dtype)


def fold_norms(model) -> None:
    """Fold every RMSNorm gain into the linears that read its output; the gains become ones."""
    untie_embeddings(model)
    for layer in layers_of(model):
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            gamma = norm.weight.data.clone()
            for lin in readers:
                _scale_columns(lin, gamma)
            norm.weight.data.fill_(1.0)
    gamma = model.model.norm.weight.data.clone()
    _scale_columns(model.lm_head, gamma)
    model.model.norm.weight.data.fill_(1.0)


def _right(linear: nn.Linear, r: torch.Tensor) -> None:
    w = linear.weight.data
    linear.weight.data = (w.double() @ r).to(w.dtype)


def _left_t(linear: nn.Linear, r: torch.Tensor) -> None:
    w = linear.weight.data
    linear.weight.data = (r.T @ w.double()).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        linear.bias.data = (b.double() @ r).to(b.dtype)


def rotate_residual(model, r1: torch.Tensor) -> None:
    """Absorb R1 (hidden x hidden, orthogonal, float64) into every reader and writer."""
    r1 = r1.double()
    emb = model.model.embed_tokens.weight
    emb.data = (emb.data.double() @ r1).to(emb.dtype)
    for layer in layers_of(model):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _right(lin, r1)
        for lin in (attn.o_proj, mlp.down_proj):
            _left_t(lin, r1)
    _right(model.lm_head, r1)


def head_geometry(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim)."""
    nq = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nq
    hd = getattr(config, "head_dim", None) or config.hidden_size // nq
    return nq, nkv, hd


def rotate_values(layer, r2: torch.Tensor, config) -> None:
    """Absorb R2 [num_kv_heads, head_dim, head_dim] into v_proj rows and o_proj columns."""
    nq, nkv, hd = head_geometry(config)
    if tuple(r2.shape) != (nkv, hd, hd):
        raise ValueError(f"R2 has shape {tuple(r2.shape)}, expected {(nkv, hd, hd)}")
    r2 = r2.double()
    v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
    wv = v.weight.data.double().reshape(nkv, hd, -1)
    v.weight.data = torch.einsum("hji,hjk->hik", r2, wv).reshape(nkv * hd, -1).to(v.weight.dtype)
    if v.bias is not None:
        bv = v.bias.data.double().reshape(nkv, hd)
        v.bias.data = torch.einsum("hj,hjk->hk", bv, r2).reshape(-1).to(v.bias.dtype)
    group = nq // nkv
    r2_q = r2.repeat_interleave(group, dim=0)  # query head i uses KV head i // group
    wo = o.weight.data.double().reshape(o.weight.shape[0], nq, hd)
    o.weight.data = torch.einsum("ohj,hjk->ohk", wo, r2_q).reshape(o.weight.shape[0], -1).to(o.weight.dtype)


def block_hadamard_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] @ blockdiag(H_block) in float64 (the offline twin of the online R4)."""
    h = hadamard_matrix(block, device=x.device)
    k = x.shape[-1]
    return (x.double().reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def absorb_down_hadamard(layer, block: int) -> None:
    """down_proj W <- W H_bd; the online Hadamard on its input restores the product."""
    down = layer.mlp.down_proj
    down.weight.data = block_hadamard_rows(down.weight.data, block).to(down.weight.dtype)


class OnlineHadamard:
    """Forward pre-hook that applies x <- x H_bd to a module's input (the fp model's R4)."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, module, args):
        x = args[0]
        return (block_hadamard_rows(x, self.block).to(x.dtype), *args[1:])


def install_online_hadamard(model, block: int) -> list:
    """Hook R4 into every down_proj of an fp model whose down_proj weights absorbed H_bd."""
    return [layer.mlp.down_proj.register_forward_pre_hook(OnlineHadamard(block)) for layer in layers_of(model)]
