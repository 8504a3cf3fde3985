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

from vllm_rotquant.format import QUANTIZED_PROJECTIONS
from vllm_rotquant.kernels.hadamard import hadamard_matrix

log = logging.getLogger(__name__)


def layers_of(model) -> nn.ModuleList:
    return model.model.layers


def quantized_linears(layer):
    """("self_attn.q_proj", module), ... for the layer's linears that the checkpoint quantizes."""
    for parent in ("self_attn", "mlp"):
        for name, lin in getattr(layer, parent).named_children():
            if name in QUANTIZED_PROJECTIONS:
                yield f"{parent}.{name}", lin


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


def rotate_residual(model, r1: torch.Tensor, device: torch.device | str = "cpu") -> None:
    """Absorb R1 (hidden x hidden, orthogonal) into every reader and writer; the float64 products
    run on `device`, the weights stay where they are."""
    r1 = r1.to(device, torch.float64)
    emb = model.model.embed_tokens.weight
    emb.data = (_on(emb.data, r1) @ r1).to(emb.dtype).to(emb.device)
    for layer in layers_of(model):
        rotate_layer_residual(layer, r1)
    _right(model.lm_head, r1)


def rotate_layer_residual(layer, r1: torch.Tensor) -> None:
    """R1 into one decoder layer: readers W <- W R1, writers W <- R1^T W (products on r1's device)."""
    attn, mlp = layer.self_attn, layer.mlp
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        _right(lin, r1)
    for lin in (attn.o_proj, mlp.down_proj):
        _left_t(lin, r1)


def head_geometry(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim)."""
    nq = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nq
    hd = getattr(config, "head_dim", None) or config.hidden_size // nq
    return nq, nkv, hd


def rotate_values(layer, r2: torch.Tensor, config, device: torch.device | str = "cpu") -> None:
    """Absorb R2 [num_kv_heads, head_dim, head_dim] into v_proj rows and o_proj columns
    (float64 products on `device`)."""
    nq, nkv, hd = head_geometry(config)
    if tuple(r2.shape) != (nkv, hd, hd):
        raise ValueError(f"R2 has shape {tuple(r2.shape)}, expected {(nkv, hd, hd)}")
    r2 = r2.to(device, torch.float64)
    v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
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


def absorb_down_hadamard(layer, block: int, device: torch.device | str = "cpu") -> None:
    """down_proj W <- W H_bd (float64 on `device`); the online Hadamard on its input restores the product."""
    down = layer.mlp.down_proj
    w = down.weight.data
    down.weight.data = block_hadamard_rows(w.to(device), block).to(w.dtype).to(w.device)


class OnlineHadamard:
    """Forward pre-hook that applies x <- x H_bd to a module's input (the fp model's R4)."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, module, args):
        x = args[0]
        return (block_hadamard_rows(x, self.block, x.dtype), *args[1:])


def install_online_hadamard(model, block: int) -> list:
    """Hook R4 into every down_proj of an fp model whose down_proj weights absorbed H_bd."""
    return [layer.mlp.down_proj.register_forward_pre_hook(OnlineHadamard(block)) for layer in layers_of(model)]
