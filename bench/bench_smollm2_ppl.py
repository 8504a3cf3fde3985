"""Perplexity table of the calibrator on SmolLM2-135M: calibrate on brown, evaluate on austen and
on brown-heldout (Brown genres D/L/R, which the calibration text `brown` never holds; offline/data.py).

    python bench/bench_smollm2_ppl.py --work runs/table [--calib-tokens 16384] [--rows ...] [--texts ...]

Each row quantizes (unless its checkpoint already exists in --work) and evaluates with
`rotquant eval` arithmetic (the simulation of the served kernels). W4A8/W4A16 rows reuse the
W4A4 row's GPTQ weights with another `act_bits` (and the "asym" rows with asymmetric activations):
in the rows without "served" (GPTQ on the fp model's inputs, `--no-gptq-served-inputs`) the weight
quantizer never sees quantized activations (its Hessians come from full-precision
inputs), so re-running it would write the same tensors; with `--act-clip auto` (the default, as in
`rotquant quantize`) the derived copy's clip is searched again for its own activations. DartQuant+RTN is the exception (its
starts are scored with quantized activations), so its asym row quantizes afresh. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from vllm_rotquant.offline import act_clip, data
from vllm_rotquant.offline.evaluate import evaluate
from vllm_rotquant.offline.model_io import fetch_smollm2, load_tokenizer
from vllm_rotquant.offline.options import QuantizeOptions
from vllm_rotquant.offline.pipeline import quantize_checkpoint

# every input at the row's act_bits unless a row says otherwise (the default recipe's gate_up A8
# is the "gate_up A8" row)
SERVED = {"gptq": {"served_inputs": True}, "act_overrides": ()}  # the default since issue 17
PLAIN = {"gptq": {"served_inputs": False}, "act_overrides": ()}  # rows without SERVED: GPTQ on the fp model's inputs
# name -> (rotation, weights, act_bits, derived from[, other QuantizeOptions]); "asym" rows: per-token
# asymmetric activations; "served" rows: GPTQ fit to the served (quantized) inputs, quantized afresh
# at each act_bits (the refit depends on the activation quantizer)
ROWS = {
    "bf16": (None, None, None, None),
    "W4A4 none+RTN": ("none", "rtn", 4, None),
    "W4A4 hadamard+RTN": ("hadamard", "rtn", 4, None),
    "W4A8 hadamard+RTN": ("hadamard", "rtn", 8, "W4A4 hadamard+RTN"),
    "W4A4 hadamard+GPTQ": ("hadamard", "gptq", 4, None),
    "W4A8 hadamard+GPTQ": ("hadamard", "gptq", 8, "W4A4 hadamard+GPTQ"),
    "W4A16 hadamard+GPTQ": ("hadamard", "gptq", 16, "W4A4 hadamard+GPTQ"),
    "W4A4 dartquant+RTN": ("dartquant", "rtn", 4, None),
    "W4A4 dartquant+GPTQ": ("dartquant", "gptq", 4, None),
    "W4A8 dartquant+RTN": ("dartquant", "rtn", 8, "W4A4 dartquant+RTN"),
    "W4A8 dartquant+GPTQ": ("dartquant", "gptq", 8, "W4A4 dartquant+GPTQ"),
    "W4A16 dartquant+GPTQ": ("dartquant", "gptq", 16, "W4A4 dartquant+GPTQ"),
    "W4A4 hadamard+RTN asym": ("hadamard", "rtn", 4, "W4A4 hadamard+RTN"),
    "W4A4 hadamard+GPTQ asym": ("hadamard", "gptq", 4, "W4A4 hadamard+GPTQ"),
    "W4A4 dartquant+GPTQ asym": ("dartquant", "gptq", 4, "W4A4 dartquant+GPTQ"),
    # quantized afresh: with RTN, DartQuant's starts are scored with the activations as served
    "W4A4 dartquant+RTN asym": ("dartquant", "rtn", 4, None),
    "W4A8 hadamard+RTN asym": ("hadamard", "rtn", 8, "W4A4 hadamard+RTN"),
    "W4A8 dartquant+RTN asym": ("dartquant", "rtn", 8, "W4A4 dartquant+RTN asym"),
    "W4A8 hadamard+GPTQ asym": ("hadamard", "gptq", 8, "W4A4 hadamard+GPTQ"),
    "W4A8 dartquant+GPTQ asym": ("dartquant", "gptq", 8, "W4A4 dartquant+GPTQ"),
    "W4A4 hadamard+GPTQ served": ("hadamard", "gptq", 4, None, SERVED),
    # the MLP input (gate/up), the most sensitive kind (bench/probe_act_quant.py kind-bits), at 8 bits
    "W4A4 hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None,
                                             {**SERVED, "act_overrides": (("gate_up", 8, 1.0),)}),  # the default
    # SmoothQuant scales on v/o and up/down, absorbed before the rotations (offline/smooth.py, issue 21)
    "W4A4 smoothquant+hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None,
                                                          {**SERVED, "act_overrides": (("gate_up", 8, 1.0),),
                                                           "smooth": "smoothquant"}),
    "W4A8 smoothquant+hadamard+GPTQ served": ("hadamard", "gptq", 8, None, {**SERVED, "smooth": "smoothquant"}),
    "W4A4 awq+hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "smooth": "awq"}),
    "W4A8 hadamard+GPTQ served": ("hadamard", "gptq", 8, None, SERVED),
    "W4A8 awq+hadamard+GPTQ served": ("hadamard", "gptq", 8, None, {**SERVED, "smooth": "awq"}),
    "W4A4 awq+dartquant+GPTQ served gate_up A8": ("dartquant", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "smooth": "awq"}),
    # online input transforms on all four inputs (offline/transforms.py, issue 21): on top of R1/R2
    # (the down one replaces R4), or DuQuant alone as its paper runs it (no rotation)
    "W4A4 duquant+hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "method": "duquant"}),
    "W4A4 duquant+GPTQ served gate_up A8": ("none", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "method": "duquant"}),
    # DuQuant on the attention inputs only, R4 kept on down (its 128-blocks spread the down input's
    # outliers less than R4's Hadamard: bench/RESULTS.md)
    "W4A4 duquant-qkv-o+hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "method": "duquant",
        "transform": {"kinds": ("qkv", "o")}}),
    "W4A4 flatquant+hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "method": "flatquant"}),
    "W4A4 flatquant+awq+hadamard+GPTQ served gate_up A8": ("hadamard", "gptq", 4, None, {
        **SERVED, "act_overrides": (("gate_up", 8, 1.0),), "method": "flatquant", "smooth": "awq"}),
    "W4A8 duquant+hadamard+GPTQ served": ("hadamard", "gptq", 8, None, {**SERVED, "method": "duquant"}),
    "W4A8 flatquant+hadamard+GPTQ served": ("hadamard", "gptq", 8, None, {**SERVED, "method": "flatquant"}),
    "W4A4 dartquant+GPTQ served": ("dartquant", "gptq", 4, None, SERVED),
    "W4A8 dartquant+GPTQ served": ("dartquant", "gptq", 8, None, SERVED),
    "W4A4 dartquant+GPTQ served gate_up A8": ("dartquant", "gptq", 4, None,
                                              {**SERVED, "act_overrides": (("gate_up", 8, 1.0),)}),
    "W4A4 hadamard+GPTQ served asym": ("hadamard", "gptq", 4, None, SERVED),
    "W4A4 hadamard+GPTQ g32 served": ("hadamard", "gptq", 4, None, {**SERVED, "group_size": 32}),
    "W4A8 hadamard+GPTQ g32 served": ("hadamard", "gptq", 8, None, {**SERVED, "group_size": 32}),
    "W4A8 hadamard+GPTQ g32": ("hadamard", "gptq", 8, None, {"group_size": 32}),
    # R1/R2 learned end to end through the quantized model (offline/spinquant.py), then served GPTQ
    "W4A4 spinquant+GPTQ served": ("spinquant", "gptq", 4, None, SERVED),
    "W4A4 spinquant+GPTQ": ("spinquant", "gptq", 4, None),
    "W4A4 dartquant-spinquant+GPTQ served": ("spinquant", "gptq", 4, None, {**SERVED,
                                                                             "spinquant": {"start": "dartquant"}}),
}


def slug(name: str) -> str:
    return name.lower().replace("+", "-").replace(" ", "-")


def derive(src: Path, dst: Path, act_bits: int, symmetric: bool = True) -> None:
    """Copy of checkpoint src with another act_bits / act_symmetric (same weights)."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["quantization_config"]["act_bits"] = act_bits
    cfg["quantization_config"]["act_symmetric"] = symmetric
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/table")
    p.add_argument("--rows", nargs="+", default=list(ROWS)[:6], choices=list(ROWS))
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--act-clip", default="auto", help="activation clip ratio, or 'auto' (searched, the default)")
    p.add_argument("--texts", nargs="+", default=["austen", "brown-heldout"], help="evaluation texts")
    args = p.parse_args()
    clip = args.act_clip if args.act_clip == "auto" else float(args.act_clip)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work)
    src = fetch_smollm2(work / "smollm2")
    results = []
    for name in args.rows:
        rotation, weights, act_bits, parent, *extra = ROWS[name]
        # rows name their scales: "smooth" none unless the row says otherwise (AWQ is the default now)
        extra = {"act_overrides": (), "smooth": "none", **(PLAIN if weights == "gptq" else {}),
                 **(extra[0] if extra else {})}
        symmetric = not name.endswith(" asym")
        ckpt, quant = src, None
        if rotation is not None:
            ckpt = work / slug(name)
            if parent is not None:
                derive(work / slug(parent), ckpt, act_bits, symmetric)
                if clip == "auto" and act_bits < 16:
                    ids = data.tokenize(load_tokenizer(ckpt), data.load_text("brown"))
                    act_clip.tune(ckpt, data.calibration_windows(ids, args.calib_seq_len, args.calib_tokens, args.seed))
                elif clip != "auto":
                    act_clip.set_clip(ckpt, clip)
            elif not (ckpt / "config.json").is_file():
                quant = quantize_checkpoint(src, ckpt, QuantizeOptions(
                    rotation=rotation, weights=weights, act_bits=act_bits, act_symmetric=symmetric, calib="brown",
                    act_clip_ratio=clip, seed=args.seed, calib_tokens=args.calib_tokens,
                    calib_seq_len=args.calib_seq_len, **extra), overwrite=True)
        t = time.time()
        ppls = [evaluate(ckpt, text, args.seq_len, args.windows)["ppl"] for text in args.texts]
        results.append((name, ppls, round(quant.seconds, 1) if quant else None,
                        round(quant.peak_memory_mb, 1) if quant else None, time.time() - t))
        logging.info("%s: ppl %s", name, " / ".join(f"{v:.2f}" for v in ppls))
    base = next((r[1] for r in results if r[0] == "bf16"), None)
    print(f"\nSmolLM2-135M, {' / '.join(args.texts)} {args.windows}x{args.seq_len}, calibration brown "
          f"{args.calib_tokens} tokens (seq {args.calib_seq_len}), seed {args.seed}, act clip {args.act_clip}\n")
    cols = [f"{t} ppl" + (" (x bf16)" if base else "") for t in args.texts]
    print("| setting | " + " | ".join(cols) + " | quantize s | peak MB | eval s |")
    print("| --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | ---: |")
    for name, ppls, qs, mem, es in results:
        cells = [f"{v:,.2f}" + (f" ({v / b:.2f}x)" if base else "") for v, b in zip(ppls, base or ppls)]
        print(f"| {name} | " + " | ".join(cells) + f" | {qs or '-'} | {mem or '-'} | {es:.0f} |")


if __name__ == "__main__":
    main()
