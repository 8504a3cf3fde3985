"""Probes of the activation quantizer on a rotquant checkpoint, outside the served format (issue 17's
candidates that were measured and not kept; bench/RESULTS.md "Four candidates that did not help"):

    mixed-bits CKPT T...   per-token 8 bits (clip 1) for the tokens whose rotated max/rms exceeds T,
                           4 bits for the rest; prints austen perplexity and the share of 8-bit tokens
    kind-clip CKPT         one clip per input kind (qkv / o / gate_up / down), coordinate descent on
                           the calibration loss (act_clip.descend from the checkpoint's clip, 2 sweeps);
                           prints the clips and both evaluation texts against the global clip
    kind-bits CKPT KIND... 8-bit activations (clip 1.0, the W4A8 twin's) for the linears of the
                           named input kinds (qkv / o / gate_up / down, or all), the checkpoint's
                           4 bits and clip for the rest; both evaluation texts per choice. The
                           weights stay fitted to 4-bit inputs (GPTQ on served inputs), so a
                           re-quantized checkpoint would do slightly better
    smooth SRC OUT ALPHA   SmoothQuant at the down_proj input of the HF model SRC (diag(1/s) into
                           up_proj rows, diag(s) into down_proj columns; function-preserving), saved to
                           OUT for `rotquant quantize OUT ...`

    python bench/probe_act_quant.py mixed-bits runs/table/w4a4-hadamard-gptq-served 8 6 5 4
    python bench/probe_act_quant.py kind-clip runs/table/w4a4-hadamard-gptq-served
    python bench/probe_act_quant.py kind-bits runs/table/w4a4-hadamard-gptq-served qkv o gate_up down all
    python bench/probe_act_quant.py smooth models/smollm2 runs/smollm2-smooth05 0.5
"""
from __future__ import annotations

import argparse
import json
import logging

import torch

from vllm_rotquant.format import input_kind
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.offline import act_clip, data
from vllm_rotquant.offline.evaluate import evaluate, perplexity
from vllm_rotquant.offline.model_io import load_tokenizer

log = logging.getLogger("probe")


def mixed_bits(ckpt: str, thresholds: list[float], seq_len: int, windows: int) -> None:
    """Swap the simulation's quantizer (ops.quantize_activations, CPU reference path) for one that
    gives the spiky tokens 8 bits."""
    plain = ops.quantize_activations
    state = {"t": None, "tokens": 0, "wide": 0}

    def quantize(x, act_bits, clip, block, symmetric):
        if state["t"] is None or not symmetric:
            return plain(x, act_bits, clip, block, symmetric)
        y = (ref.hadamard_ref(x, block) if block else x).float()
        ratio = y.abs().amax(-1, keepdim=True) / y.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
        wide = ratio > state["t"]
        q4, s4 = ref.quant_act_ref(y, clip, act_bits)
        q8, s8 = ref.quant_act_ref(y, 1.0, 8)
        state["tokens"] += wide.numel()
        state["wide"] += int(wide.sum())
        return torch.where(wide, q8, q4), torch.where(wide, s8, s4), None

    ops.quantize_activations = quantize
    try:
        for t in [None, *thresholds]:
            state.update(t=t, tokens=0, wide=0)
            ppl = evaluate(ckpt, "austen", seq_len, windows, progress=False)["ppl"]
            print(json.dumps({"threshold": t, "austen_ppl": round(ppl, 3),
                              "share_8bit": round(state["wide"] / max(state["tokens"], 1), 4)}), flush=True)
    finally:
        ops.quantize_activations = plain


def kind_clip(ckpt: str, seq_len: int, windows: int, sweeps: int = 2) -> None:
    from vllm_rotquant.offline.simulate import SimQuantLinear, load_simulated

    tok = load_tokenizer(ckpt)
    calib = data.calibration_windows(data.tokenize(tok, data.load_text("brown")), 512, act_clip.SCORE_TOKENS, 0)
    model = load_simulated(ckpt, torch.bfloat16)
    groups: dict[str, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, SimQuantLinear):
            groups.setdefault(input_kind(name), []).append(m)
    start = next(iter(groups.values()))[0].clip
    clips = {k: start for k in groups}

    def nll(win, chosen) -> float:
        for k, ms in groups.items():
            for m in ms:
                m.clip = chosen[k]
        return perplexity(model, win, 1, "cpu", progress=False)["nll"]

    for sweep in range(sweeps):
        for kind in groups:
            best, scores = act_clip.descend(lambda c, kind=kind: nll(calib, {**clips, kind: c}), start=start)
            clips[kind] = best
            print(json.dumps({"sweep": sweep, "kind": kind, "best": best,
                              "nll": {f"{c:.2f}": round(v, 4) for c, v in sorted(scores.items())}}), flush=True)
    for text in ("austen", "brown-heldout"):
        win = data.eval_windows(data.tokenize(tok, data.load_text(text)), seq_len, windows)
        for k, ms in groups.items():
            for m in ms:
                m.clip = clips[k]
        per_kind = perplexity(model, win, 4, "cpu", progress=False)["ppl"]
        for ms in groups.values():
            for m in ms:
                m.clip = start
        glob = perplexity(model, win, 4, "cpu", progress=False)["ppl"]
        print(json.dumps({"text": text, "clips": clips, "per_kind_ppl": round(per_kind, 3),
                          f"global_{start}_ppl": round(glob, 3)}), flush=True)


@torch.no_grad()
def smooth(src: str, out: str, alpha: float, calib_tokens: int = 16384) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = load_tokenizer(src)
    win = data.calibration_windows(data.tokenize(tok, data.load_text("brown")), 512, calib_tokens, 0)
    amax: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(module, args):
            a = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[i] = torch.maximum(amax[i], a) if i in amax else a
        return record

    layers = model.model.layers
    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    before = model(input_ids=win[:1]).logits
    for b in range(0, win.shape[0], 4):
        model(input_ids=win[b: b + 4])
    for h in handles:
        h.remove()
    for i, layer in enumerate(layers):
        wmax = layer.mlp.down_proj.weight.abs().amax(0).clamp_min(1e-8)
        s = (amax[i].clamp_min(1e-8) ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)
        layer.mlp.up_proj.weight.div_(s[:, None])
        layer.mlp.down_proj.weight.mul_(s[None, :])
    change = (model(input_ids=win[:1]).logits - before).abs().max().item()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(json.dumps({"out": out, "alpha": alpha, "fp_logit_change": change}), flush=True)


@torch.no_grad()
def kind_bits(ckpt: str, kinds: list[str], seq_len: int, windows: int) -> None:
    from vllm_rotquant.offline.simulate import SimQuantLinear, load_simulated

    tok = load_tokenizer(ckpt)
    model = load_simulated(ckpt, torch.bfloat16)
    lins = [(input_kind(n), m) for n, m in model.named_modules() if isinstance(m, SimQuantLinear)]
    bits, clip = lins[0][1].act_bits, lins[0][1].clip
    texts = {t: data.eval_windows(data.tokenize(tok, data.load_text(t)), seq_len, windows)
             for t in ("austen", "brown-heldout")}
    for choice in ["none", *kinds]:
        for kind, m in lins:
            wide = choice == "all" or kind == choice
            m.act_bits, m.clip = (8, 1.0) if wide else (bits, clip)
        ppl = {t: round(perplexity(model, w, 4, "cpu", progress=False)["ppl"], 3) for t, w in texts.items()}
        print(json.dumps({"8-bit kind": choice, **ppl}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["mixed-bits", "kind-clip", "kind-bits", "smooth"])
    p.add_argument("args", nargs="+")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.probe == "mixed-bits":
        mixed_bits(a.args[0], [float(t) for t in a.args[1:]], a.seq_len, a.windows)
    elif a.probe == "kind-clip":
        kind_clip(a.args[0], a.seq_len, a.windows)
    elif a.probe == "kind-bits":
        kind_bits(a.args[0], a.args[1:], a.seq_len, a.windows)
    else:
        smooth(a.args[0], a.args[1], float(a.args[2]))


if __name__ == "__main__":
    main()
