"""Calibration cost of `rotquant quantize` (issue 4): wall time and peak memory of the whole
pipeline (fold, DartQuant capture + R1/R2 learning, absorption, GPTQ, write).

Two setups:
  --preset llama2-7b-random   a Llama-2-7B-shaped model (32 layers, hidden 4096, FFN 11008,
                              32 heads, vocab 32000) with random N(0, 0.02) weights, built in
                              memory (meta device, filled on the accelerator) -- no download;
                              calibration tokens are seeded random ids (a cost benchmark only).
  --model DIR                 a real HF folder (e.g. SmolLM2-135M), calibrated on --calib text.
The pipeline is the library's: for the preset, `pipeline.quantize_model` on the in-memory model
with seeded random calibration token windows, then `pipeline.save_checkpoint` (the atomic write
and the activation-clip search, as `rotquant quantize` does them); loading a 27 GB fp32
checkpoint from disk is not what is being measured, and the build time is reported apart. For
--model, `pipeline.quantize_checkpoint`. `--probe` also times one decoder layer's forward on the calibration batch in fp32 and
TF32, to show what the matmul precision costs. Writes <out>/calibration_<name>.json and .md.

  python bench/bench_calibration.py --preset llama2-7b-random --device cuda --out runs/cal
  python bench/bench_calibration.py --model /tmp/models/smollm2 --device cpu --calib-tokens 16384
  python bench/bench_calibration.py --preset tiny-random --device cpu      # dry run, seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_rotquant.offline import pipeline
from vllm_rotquant.offline.options import DartQuantOptions, QuantizeOptions, default_device, defaults

log = logging.getLogger("bench_calibration")

PRESETS = {
    "llama2-7b-random": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny-random": dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}


def random_windows(vocab_size: int, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """ceil(tokens / seq_len) windows of seeded random token ids (a cost benchmark needs no text)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (-(-tokens // seq_len), seq_len), generator=g)


@torch.no_grad()
def build_random_llama(preset: str, fill_device: str, seed: int = 0, layers: int | None = None):
    """A float32 LlamaForCausalLM on the CPU with N(0, 0.02) weights and unit norms, built on the
    meta device and filled tensor by tensor (on the accelerator when there is one: fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    shape = dict(PRESETS[preset], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                      rms_norm_eps=1e-5, torch_dtype="bfloat16")
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffers were lost on meta
    g = torch.Generator(device=fill_device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=fill_device).mul_(0.02))
    return model.eval()


def probe_forward(model, device: str, batch: int, seq_len: int) -> dict:
    """Seconds for one decoder layer's forward on [batch, seq_len] hidden states, fp32 vs TF32."""
    from vllm_rotquant.offline import calibrate

    layer = model.model.layers[0].to(device)
    windows = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, batch)
    out = {}
    prev = torch.backends.cuda.matmul.allow_tf32
    for name, tf32 in (("fp32", False), ("tf32", True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        calibrate.run_layer(layer, inputs, keep_outputs=False)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            calibrate.run_layer(layer, inputs, keep_outputs=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[f"layer_forward_{name}_s"] = (time.perf_counter() - t) / 3
    torch.backends.cuda.matmul.allow_tf32 = prev
    layer.to("cpu")
    out["probe_tokens"] = batch * seq_len
    return out


def main(argv=None) -> int:
    q = defaults(QuantizeOptions)  # the library's defaults (the same as `rotquant quantize`'s)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--model", help="HF model folder")
    ap.add_argument("--name", default=None, help="label for the result files (default: preset or folder name)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--rotation", default=q["rotation"], choices=["none", "hadamard", "dartquant"],
                    help="(default: %(default)s, the library's)")
    ap.add_argument("--weights", default=q["weights"], choices=["rtn", "gptq"])
    ap.add_argument("--act-bits", "--a-bits", dest="act_bits", type=int, default=q["act_bits"])
    ap.add_argument("--act-clip", default=q["act_clip_ratio"], help="activation clip ratio, or 'auto' (searched)")
    ap.add_argument("--calib", default=q["calib"], help="calibration text (--model only; the preset uses random ids)")
    ap.add_argument("--calib-tokens", type=int, default=q["calib_tokens"])
    ap.add_argument("--calib-seq-len", type=int, default=q["calib_seq_len"])
    ap.add_argument("--batch-size", type=int, default=q["batch_size"])
    ap.add_argument("--dq", default="{}", help="JSON dict of DartQuant options (options.DartQuantOptions fields)")
    ap.add_argument("--method", default=q["method"], choices=["none", "duquant", "flatquant"],
                    help="online input transforms (offline/transforms.py)")
    ap.add_argument("--smooth", default=None, choices=["none", "smoothquant", "awq"],
                    help="per-channel scales (default: the library's, AWQ at 4-bit activations with GPTQ)")
    ap.add_argument("--tf", default="{}", help="JSON dict of transform options (options.TransformOptions fields)")
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA) for the whole pipeline")
    ap.add_argument("--probe", action="store_true", help="time one layer forward in fp32 and TF32 first")
    ap.add_argument("--out", default="runs/calibration", help="folder for the result files")
    ap.add_argument("--ckpt", default=None, help="where to write the checkpoint (default: a temp dir, deleted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None,
                    help="--preset with this many decoder layers (peak memory is per layer: a short model measures "
                         "it, and the per-layer phases scale with the count)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    name = args.name or (f"{args.preset}-{args.layers}l" if args.preset and args.layers else args.preset) \
        or Path(args.model).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    result: dict = {"name": name, "env": env, "args": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="bench_cal_"))
    ckpt = Path(args.ckpt) if args.ckpt else work / "ckpt"
    opts = QuantizeOptions(
        rotation=args.rotation, weights=args.weights, act_bits=args.act_bits,
        calib=args.calib if args.model else "random token ids",
        act_clip_ratio=args.act_clip if args.act_clip == "auto" else float(args.act_clip),
        calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len, seed=args.seed,
        device=args.device, batch_size=args.batch_size, dartquant=DartQuantOptions.from_dict(json.loads(args.dq)),
        method=args.method, smooth=args.smooth, transform=json.loads(args.tf), tp_sizes=tuple(args.tp_sizes) if args.tp_sizes else None)
    try:
        if args.preset:
            t = time.time()
            fill = args.device if args.device.startswith("cuda") else "cpu"
            model = build_random_llama(args.preset, fill, args.seed, args.layers)
            result["build_s"] = round(time.time() - t, 1)
            log.info("built %s in %.1f s", args.preset, result["build_s"])
            if args.probe:
                result["probe"] = probe_forward(model, args.device, args.batch_size, args.calib_seq_len)
                torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
                log.info("probe: %s", result["probe"])
            windows = random_windows(model.config.vocab_size, args.calib_tokens, args.calib_seq_len, args.seed)
            config = model.config.to_dict()
            t = time.time()
            tensors, spec, report = pipeline.quantize_model(model, None, opts, calib_windows=windows,
                                                            unquantized_dtype=torch.bfloat16)
            del model
            gc.collect()
            result["peak_cpu_rss_gib_before_write"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
            report = pipeline.save_checkpoint(ckpt, tensors, spec, report, config, overwrite=True)
            del tensors
        else:
            t = time.time()
            report = pipeline.quantize_checkpoint(args.model, ckpt, opts, overwrite=True)
        wall = time.time() - t
        summary = report.summary()
        result["summary"] = summary
        result["wall_s"] = round(wall, 1)
        if args.device.startswith("cuda"):
            result["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
        result["peak_cpu_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        if report.dartquant is not None:
            result["dartquant"] = report.dartquant.summary()
        result["ckpt_mb"] = summary.get("output_mb")
    finally:
        if not args.ckpt:
            shutil.rmtree(work, ignore_errors=True)

    (out / f"calibration_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    dq = result.get("dartquant", {})
    s = result["summary"]
    gpu = f"{result['peak_gpu_allocated_gib']:.2f}" if "peak_gpu_allocated_gib" in result else "-"
    row = (f"| {name} | {args.device} ({env['device_name']}) | {args.rotation}+{args.weights} | "
           f"{s['calib_tokens']} | {result['wall_s']:.0f} | {s.get('load_s', 0) + s.get('prepare_s', 0):.0f} | "
           f"{dq.get('capture_s', 0):.0f} | "
           f"{dq.get('r1_s', 0):.0f} / {dq.get('r2_s', 0):.0f} | {s.get('rotation_s', 0):.0f} | "
           f"{s.get('weights_s', 0):.0f} | {s.get('write_s', 0):.0f} | {s.get('act_clip_s', 0):.0f} ({s.get('act_clip_ratio')}) | {gpu} | {result['peak_cpu_rss_gib']:.1f} |")
    header = ("| model | device | method | calib tokens | total s | load+fold+tokenize s | capture s | R1 / R2 train s | "
              "rotation s (incl. DartQuant) | weights s | write s | act clip search s (clip) | peak GPU GiB | peak CPU RSS GiB |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    (out / f"calibration_{name}.md").write_text(header + "\n" + row + "\n")
    print(json.dumps(result, indent=2))
    print(header)
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
