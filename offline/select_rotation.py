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
fake-quantized per token (symmetric or asymmetric, clip, `act_bits`) at every linear's input, the R4 block
Hadamard online before down_proj's quantizer. lm_head stays in full precision, as served."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from vllm_rotquant.format import act_override
from vllm_rotquant.kernels.reference import dequant_weight_ref, fake_quant_act
from vllm_rotquant.offline import calibrate, quantize
from vllm_rotquant.offline.arch import ArchMapping, arch_of
from vllm_rotquant.offline.rotate import Rotations, apply_layer_rotations


def _fake_quant_hook(clip: float, bits: int, symmetric: bool = True):
    def hook(module, args):
        return (fake_quant_act(args[0], clip, bits, symmetric), *args[1:])
    return hook


def _quantized_layer(layer, index: int, rotations: Rotations, arch: ArchMapping, device: torch.device,
                     weight_bits: int | None, group_size: int | None, act_bits: int, clip: float,
                     act_symmetric: bool = True, act_overrides: tuple = ()):
    """A rotated, quantized copy of decoder layer `index` on `device`, with its activation hooks
    installed (the online R4 first: it runs before down_proj's quantizer); `act_overrides`:
    ((input kind, bits, clip), ...) as RotQuantSpec's."""
    q = copy.deepcopy(layer).to(device)
    apply_layer_rotations(q, rotations, index, arch, device, online=True)
    for path, lin in arch.quantized_linears(q):
        if weight_bits is not None:
            w, s = quantize.rtn(lin.weight.data, weight_bits, group_size)
            lin.weight.data = dequant_weight_ref(w, s, lin.weight.dtype)
        bits, c = act_override(act_overrides, path) or (act_bits, clip)
        if bits < 16:
            lin.register_forward_pre_hook(_fake_quant_hook(c, bits, act_symmetric))
    return q


@torch.no_grad()
def quantized_nll(model, windows: torch.Tensor, rotations: Rotations, *, weight_bits: int | None = 4,
                  group_size: int | None = None, act_bits: int = 4, clip: float = 0.9, act_symmetric: bool = True,
                  device: str | torch.device = "cpu", batch_size: int = 4, act_overrides: tuple = ()) -> float:
    """Mean next-token NLL on `windows` [n, T] of `model` (folded, unrotated, fp32, on the CPU;
    left unchanged) rotated by `rotations` (R1, R2, R4 with its online twin) with RTN
    `weight_bits` weights (None: full precision) and per-token `act_bits` activations (16: full
    precision)."""
    device = torch.device(device)
    arch = arch_of(model)
    rot = rotations.to(device)
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, batch_size)
    if rot.r1 is not None:
        hidden = inputs.hidden
        inputs.hidden = (hidden.to(device).double() @ rot.r1).float().to(hidden.device)  # embeddings E R1
    for i, layer in enumerate(arch.decoder_layers(model)):
        q = _quantized_layer(layer, i, rot, arch, device, weight_bits, group_size, act_bits, clip, act_symmetric,
                             act_overrides)
        inputs.hidden = calibrate.run_layer(q, inputs)
        del q
    norm = copy.deepcopy(arch.get(model, arch.final_norm)).to(device)
    head = arch.get(model, arch.lm_head).weight.detach().to(device)
    head = (head.double() @ rot.r1).float() if rot.r1 is not None else head.float()
    total, count = 0.0, 0
    for i in range(windows.shape[0]):
        h = norm(inputs.hidden[i: i + 1].to(device))
        logits = (h @ head.T)[0, :-1]
        target = windows[i, 1:].to(device)
        total += F.cross_entropy(logits.float(), target, reduction="sum").item()
        count += target.numel()
    return total / count
