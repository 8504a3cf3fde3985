"""Layer-by-layer execution of a decoder on calibration tokens, so that calibration never needs
the whole model on the accelerator: only the embeddings (once) and one decoder layer at a time
move to `device`; hidden states between layers stay on `store` (CPU by default)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vllm_rotquant.offline.arch import arch_of


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records its inputs and stops the forward pass."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states.detach())
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Stop


@dataclass
class LayerInputs:
    """Hidden states entering the current layer ([n, T, hidden], on `store`) and the
    layer call's keyword arguments (rotary embeddings, mask) on `device`."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    device: torch.device
    batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


def choose_store(store: str, device: torch.device | str, hidden_bytes: int) -> torch.device:
    """Where hidden states live between layers: "cpu", "device", or "auto" = the device when three
    copies (inputs, outputs, headroom for a batch's temporaries) fit in min(14 GiB, half its free memory):
    moving GBs of hidden states to and from the host per layer costs more than the layer's forward."""
    if store not in ("auto", "cpu", "device"):
        raise ValueError(f"store must be auto, cpu or device, not {store!r}")
    device = torch.device(device)
    if store == "cpu" or device.type != "cuda":
        return torch.device("cpu")
    if store == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 3 * hidden_bytes <= min(14 * 2 ** 30, free // 2) else torch.device("cpu")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def capture_first_layer_inputs(model, token_windows: torch.Tensor, device: torch.device | str,
                               batch_size: int = 8, store: torch.device | str = "cpu") -> LayerInputs:
    """Run the embeddings on `token_windows` [n, T] and return what enters layer 0."""
    device = torch.device(device)
    arch = arch_of(model)
    moved = [arch.get(model, arch.embeddings), arch.get(model, arch.rotary)]
    for m in moved:
        m.to(device)
    layers = arch.decoder_layers(model)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for i in range(0, token_windows.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=token_windows[i: i + batch_size].to(device), use_cache=False)
    finally:
        layers[0] = catcher.layer
        for m in moved:
            m.to("cpu")
    kwargs = {k: _to(v, device) for k, v in catcher.kwargs.items()
              if k not in ("past_key_values", "use_cache", "cache_position")}
    hidden = torch.cat([h.to(store) for h in catcher.inputs])
    return LayerInputs(hidden=hidden, kwargs=kwargs, device=device, batch_size=batch_size)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, keep_outputs: bool = True,
              stop_at: nn.Module | None = None) -> torch.Tensor | None:
    """Forward `layer` (already on inputs.device) over all hidden states, batch by batch.
    Hooks registered on the layer's modules observe every batch. With `stop_at`, each batch
    stops right after that module ran (its hooks included): what follows is not computed."""
    if stop_at is not None:
        if keep_outputs:
            raise ValueError("run_layer: stop_at and keep_outputs exclude each other")
        handle = stop_at.register_forward_hook(_raise_stop)
        try:
            for i in range(0, inputs.hidden.shape[0], inputs.batch_size):
                with contextlib.suppress(_Stop):
                    _forward(layer, inputs, i)
        finally:
            handle.remove()
        return None
    out = torch.empty_like(inputs.hidden) if keep_outputs else None  # no list + cat: one copy less at the peak
    for i in range(0, inputs.hidden.shape[0], inputs.batch_size):
        y = _forward(layer, inputs, i)
        if out is not None:
            out[i: i + y.shape[0]].copy_(y)
    return out


def _raise_stop(module, args, output):
    raise _Stop


def _forward(layer: nn.Module, inputs: LayerInputs, i: int) -> torch.Tensor:
    """Layer output for the batch of hidden states starting at index i."""
    x = inputs.hidden[i: i + inputs.batch_size].to(inputs.device)
    kwargs = dict(inputs.kwargs)
    pe = kwargs.get("position_embeddings")
    if pe is not None and pe[0].shape[0] not in (1, x.shape[0]):
        kwargs["position_embeddings"] = tuple(t[: x.shape[0]] for t in pe)
    y = layer(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y
