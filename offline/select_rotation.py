"""Score a candidate rotation by what it is for: the loss of the quantized model on calibration
text. Used to pick among DartQuant rotations learned from several Hadamard starts when the
weights are RTN.

Why: with RTN weights the perplexity depends mostly on which rounding noise a rotation draws,
not on how flat the activations are. The attention-sink token's normalized input is almost
1-sparse on a channel whose folded weights are small, so RTN leaves its q/v/up outputs 25-85 %
noise (the same share for every orthogonal R1), and every token attends to it. Random-Hadamard
seeds 0-4 alone span 110-127 W4A4 perplexity on SmolLM2, and that ranking shows on any text: the
quantized model's loss on brown orders the checkpoints as their austen perplexity does. The
whip loss cannot see weight rounding, so several learned rotations are scored here and the
best one is kept. GPTQ feeds the rounding error back through the calibration Hessian and needs
no such search.

The model is run layer by layer like the calibrator itself (one rotated, quantized layer copy
on the device at a time). Arithmetic: weights RTN-dequantized in float32, activations
fake-quantized per token (symmetric or asymmetric, clip, `a_bits`) at every linear's input, the R4 block
Hadamard online before down_proj's quantizer. lm_head stays in full precision, as served."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from vllm_rotquant.kernels.reference import dequant_weight_ref, fake_quant_act
from vllm_rotquant.offline import calibrate, quantize, rotate


def _fake_quant_hook(clip: float, bits: int, symmetric: bool = True):
    def hook(module, args):
        return (fake_quant_act(args[0], clip, bits, symmetric), *args[1:])
    return hook


def _quantized_layer(layer, r1: torch.Tensor, r2: torch.Tensor, r4_block: int | None, config,
                     device: torch.device, w_bits: int | None, group_size: int | None,
                     a_bits: int, clip: float, act_symmetric: bool = True):
    """A rotated, quantized copy of `layer` on `device`, with its activation hooks installed."""
    q = copy.deepcopy(layer).to(device)
    rotate.rotate_layer_residual(q, r1)
    rotate.rotate_values(q, r2, config, device)
    if r4_block:
        rotate.absorb_down_hadamard(q, r4_block, device)
        q.mlp.down_proj.register_forward_pre_hook(rotate.OnlineHadamard(r4_block))  # before the quantizer
    for _, lin in rotate.quantized_linears(q):
        if w_bits is not None:
            w, s = quantize.rtn(lin.weight.data, w_bits, group_size)
            lin.weight.data = dequant_weight_ref(w, s, lin.weight.dtype)
        if a_bits < 16:
            lin.register_forward_pre_hook(_fake_quant_hook(clip, a_bits, act_symmetric))
    return q


@torch.no_grad()
def quantized_nll(model, windows: torch.Tensor, r1: torch.Tensor, r2: list[torch.Tensor],
                  r4_block: int | None, *, w_bits: int | None = 4, group_size: int | None = None,
                  a_bits: int = 4, clip: float = 0.9, act_symmetric: bool = True, device: str | torch.device = "cpu",
                  batch_size: int = 4) -> float:
    """Mean next-token NLL on `windows` [n, T] of `model` (folded, unrotated, fp32, on the CPU;
    left unchanged) rotated by r1 / r2 (+ R4 blocks) with RTN `w_bits` weights (None: full
    precision) and per-token `a_bits` activations (16: full precision)."""
    device = torch.device(device)
    config = model.config
    r1 = r1.to(device, torch.float64)
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, batch_size)
    hidden = inputs.hidden
    inputs.hidden = (hidden.to(device).double() @ r1).float().to(hidden.device)  # embeddings E R1
    for i, layer in enumerate(rotate.layers_of(model)):
        q = _quantized_layer(layer, r1, r2[i], r4_block, config, device, w_bits, group_size, a_bits, clip,
                             act_symmetric)
        inputs.hidden = calibrate.run_layer(q, inputs)
        del q
    norm = copy.deepcopy(model.model.norm).to(device)
    head = (model.lm_head.weight.detach().to(device).double() @ r1).float()
    total, count = 0.0, 0
    for i in range(windows.shape[0]):
        h = norm(inputs.hidden[i: i + 1].to(device))
        logits = (h @ head.T)[0, :-1]
        target = windows[i, 1:].to(device)
        total += F.cross_entropy(logits.float(), target, reduction="sum").item()
        count += target.numel()
    return total / count
