"""End-to-end vLLM on the GPU: rotquant W4A4 / W4A8 against bf16, vLLM's FP8 and GPTQ W4A16, same run.

For each model shape (Llama-2-7B: 32 layers, hidden 4096, FFN 11008, MHA, vocab 32000;
Llama-3-8B: GQA 32/8, FFN 14336, vocab 128256) and each variant, one `vllm.LLM` in its own
process (a timeout around each; results written as they come):
- bf16                 dummy weights (`load_format="dummy"`), no checkpoint on disk;
- fp8                  the same, `quantization="fp8"` (vLLM's online dynamic W8A8);
- gptq                 a GPTQ-format config (4 bit, group 128, sym, no act-order), dummy weights:
                       vLLM converts it to gptq_marlin and picks its mixed-precision kernel
                       (Machete on Hopper; the log line is recorded);
- w4a4, w4a8, w4a4-asym  a random rotquant checkpoint (packed INT4 weights, per-channel scales,
                       R4 block as `rotquant quantize` would choose it, R3 on), written once;
- w4a4-duquant, w4a4-flatquant  the same with random declared input transforms on all four inputs
                       (DuQuant block rotations + permutation, FlatQuant Kronecker pairs; the down
                       one instead of R4), sized as `rotquant quantize --method ...` sizes them.
vLLM's default mode: torch.compile + CUDA graphs (capture sizes limited to the batch sizes
measured, to shorten start-up). Prompts are random token ids (`skip_tokenizer_init`).
Measured per variant:
- prefill tok/s: 64 prompts x 2048 tokens, max_tokens 1 (after a warm-up of 8 x 2048);
- decode tok/s at batch B in (1, 16, 64, 256): B prompts of 128 tokens, time(129 new tokens) -
  time(1 new token), i.e. 128*B tokens over the pure decode time;
- TTFT: one 2048-token prompt, median of 3; KV-cache capacity (tokens, from vLLM's log);
  start-up time (LLM() construction: load, compile, graph capture).

    python bench/bench_vllm_gpu.py --out bench/results/vllm_gpu_h200.json            # both shapes
    python bench/bench_vllm_gpu.py --shapes llama2-7b --variants bf16 fp8 w4a4 --tp 2
    python bench/bench_vllm_gpu.py --shapes tiny --variants bf16 w4a4 --device-check no   # dry run (CPU vLLM)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from vllm_rotquant.testing.ckpt_factory import (SHAPES, llama_config, model_transforms, shape_tp_sizes,
                                                write_random_rotquant)

from vllm_rotquant.testing.processes import finish, run_isolated

VARIANTS = ("bf16", "fp8", "gptq", "w4a4", "w4a8", "w4a4-asym", "w4a4-duquant", "w4a4-flatquant")
# declared input transforms on all four inputs (the down one instead of R4), random tensors
TRANSFORMED = {"w4a4-duquant": ("block_rotation", None), "w4a4-flatquant": ("kronecker", (1,))}
ROTQUANT = {"w4a4": dict(act_bits=4), "w4a8": dict(act_bits=8), "w4a4-asym": dict(act_bits=4, act_symmetric=False)}
DECODE_BATCHES = (1, 16, 64, 256)
PREFILL = (64, 2048)
DECODE_PROMPT, DECODE_NEW = 128, 128


# ----------------------------------------------------------------------------- model folders
def write_config_only(folder: Path, config: dict) -> Path:
    """A model folder holding only config.json: vLLM's dummy loader fills the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def gptq_config(shape: str) -> dict:
    cfg = llama_config(shape)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                  "sym": True, "damp_percent": 0.01, "static_groups": False,
                                  "true_sequential": True,
                                  # vLLM >= 0.24 (auto_gptq) otherwise reads the quantized layers from
                                  # the safetensors' dtypes, and the dummy loader has none: every
                                  # layer would stay bf16 (it did in the first run)
                                  "modules_in_block_to_quantize": [
                                      ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                      ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]}
    return cfg


def same_weights(base: Path, folder: Path, spec_edit: dict) -> Path:
    """A checkpoint sharing `base`'s tensors (symlinks) with other activation settings
    (W4A8 / asymmetric: "same weights", as the table compares them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"].update(spec_edit)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def prepare(variant: str, shape: str, work: Path, tp: int) -> tuple[Path, dict]:
    """(model folder, extra LLM keyword arguments) of one variant."""
    if variant == "bf16":
        return write_config_only(work / f"{shape}-dense", llama_config(shape)), {"load_format": "dummy"}
    if variant == "fp8":
        return write_config_only(work / f"{shape}-dense", llama_config(shape)), {"load_format": "dummy",
                                                                               "quantization": "fp8"}
    if variant == "gptq":
        return write_config_only(work / f"{shape}-gptq", gptq_config(shape)), {"load_format": "dummy"}
    if variant in TRANSFORMED:
        kind_type, tp_sizes = TRANSFORMED[variant]
        tp_sizes = tp_sizes or shape_tp_sizes(shape)
        return write_random_rotquant(work / f"{shape}-{variant}", shape, tp_sizes=tp_sizes, down_proj_block=None,
                                     input_transforms=model_transforms(shape, kind_type, tp_sizes)), \
            {"quantization": "rotquant"}
    if variant in ROTQUANT:
        base = write_random_rotquant(work / f"{shape}-w4a4", shape)
        if variant == "w4a4":
            return base, {"quantization": "rotquant"}
        return same_weights(base, work / f"{shape}-{variant}", ROTQUANT[variant]), {"quantization": "rotquant"}
    raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


# ----------------------------------------------------------------------------- one engine (worker)
def run_worker(args) -> None:
    """Build one vllm.LLM and measure it; print one JSON line 'RESULT {...}'."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(args.worker)
    vocab = SHAPES[job["shape"]]["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list:
        ids = torch.randint(3, vocab, (n, length), generator=gen).tolist()
        return [TokensPrompt(prompt_token_ids=p) for p in ids]

    def timed(ps: list, new: int) -> float:
        sp = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0.0, detokenize=False)
        if job.get("cuda", True):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        assert got == new * len(ps), (got, new, len(ps))
        return dt

    capture = sorted(set(job["batches"]))
    extra = dict(job["llm_kwargs"])
    if job.get("profile_dir"):
        extra["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": job["profile_dir"],
                                    "torch_profiler_with_stack": False, "ignore_frontend": True}
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], tensor_parallel_size=job["tp"], dtype="bfloat16", skip_tokenizer_init=True,
              max_model_len=job["max_model_len"], gpu_memory_utilization=job["gpu_mem"], enable_prefix_caching=False,
              max_num_seqs=max(capture), compilation_config={"cudagraph_capture_sizes": capture},
              seed=0, **extra)
    startup = time.perf_counter() - t0
    res = {"startup_s": round(startup, 1)}
    n, length = job["prefill"]
    timed(prompts(max(1, n // 8), length), 1)  # warm-up: the prefill shapes
    res["prefill_tok_s"] = round(n * length / timed(prompts(n, length), 1), 1)
    ttft = sorted(timed(prompts(1, length), 1) for _ in range(3))
    res["ttft_ms"] = round(1000 * ttft[1], 2)
    for b in job["batches"]:
        ps = prompts(b, DECODE_PROMPT)
        timed(ps, 8)  # warm-up of this batch's graphs
        t1 = timed(ps, 1)
        t2 = timed(ps, DECODE_NEW + 1)
        res[f"decode_b{b}_tok_s"] = round(b * DECODE_NEW / (t2 - t1), 1)
    if job.get("profile_dir"):  # kernel time per decode step (issue 16's breakdown)
        res["profile"] = {}
        seen: set[Path] = set()
        for b in PROFILE_BATCHES:
            ps = prompts(b, PROFILE_PROMPT)
            runs = []
            for new in (1, PROFILE_STEPS + 1):  # prefill alone, then prefill + PROFILE_STEPS decode steps
                llm.start_profile(profile_prefix="rq")
                wall = timed(ps, new)
                llm.stop_profile()
                runs.append((kernel_times(new_trace(Path(job["profile_dir"]), seen)), wall))
            res["profile"][f"b{b}"] = decode_breakdown(runs[0][0], runs[1][0], PROFILE_STEPS, b, runs[1][1] - runs[0][1])
        # one prefill of PROFILE_PREFILL prompts of the benchmark's prefill length (issue 16: prefill's breakdown)
        n_pre, length = PROFILE_PREFILL, job["prefill"][1]
        ps = prompts(n_pre, length)
        llm.start_profile(profile_prefix="rq")
        wall = timed(ps, 1)
        llm.stop_profile()
        res["profile"]["prefill"] = prefill_breakdown(kernel_times(new_trace(Path(job["profile_dir"]), seen)),
                                                      n_pre * length, wall)
    print("RESULT " + json.dumps(res), flush=True)
    finish(llm)


PROFILE_BATCHES, PROFILE_PROMPT, PROFILE_STEPS, PROFILE_PREFILL = (1, 64), 128, 32, 8
NORMS = "norm / rope / act (Inductor; FP8's with its quantizer)"
KERNEL_GROUPS = (  # (label, regex on the kernel name), first match wins
    ("rotquant GEMM", r"_w4a4_kernel"), ("rotquant Hadamard+quant", r"_hadamard_quant_kernel"),
    ("rotquant quant", r"_quant_act_kernel"), ("rotquant transform (+quant)", r"_kron_quant_kernel|_block_transform"),
    ("TP communication (NCCL / custom all-reduce)", r"nccl|all_?reduce|all_?gather|cross_device"),
    # Inductor's kernels (FP8's carry its activation quantizer: "..._cutlass_scaled_mm_div_..._rms_norm")
    (NORMS, r"^triton_"),
    ("attention (+ KV-cache write)", r"flash|fmha|attn|attention"),
    ("fp8/int8 GEMM", r"cutlass|sm90_xmma|gemm.*(e4m3|fp8|s8)|machete|marlin"),
    ("bf16 GEMM (cuBLAS)", r"gemm|gemv|nvjet|cublas|splitK|xmma"), (NORMS, r"rms|rotary|silu"),
)


def new_trace(folder: Path, seen: set, wait_s: float = 60.0) -> Path:
    """The trace file the engine wrote after the last stop_profile (one per stop, time-stamped)."""
    t0 = time.time()
    while time.time() - t0 < wait_s:
        fresh = sorted((f for f in folder.rglob("*.pt.trace.json*") if f not in seen), key=lambda f: f.stat().st_mtime)
        if fresh:
            time.sleep(1.0)  # let the writer finish
            seen.update(fresh)
            return fresh[-1]
        time.sleep(0.5)
    raise TimeoutError(f"no new profiler trace under {folder}")


def kernel_times(path: Path) -> dict[str, float]:
    """{kernel name: total microseconds} of one torch-profiler trace."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        events = json.load(fh).get("traceEvents", [])
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            totals[e["name"]] = totals.get(e["name"], 0.0) + float(e["dur"])
    return totals


def grouped(times: dict[str, float]) -> dict:
    """Kernel times (us) by KERNEL_GROUPS label, largest first, and the top kernels."""
    groups: dict[str, float] = {}
    for name, us in times.items():
        label = next((g for g, rx in KERNEL_GROUPS if re.search(rx, name, re.I)), "other")
        groups[label] = groups.get(label, 0.0) + us
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {"gpu_busy_us": round(sum(times.values()), 1),
            "groups_us": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_us": [(k[:90], round(v, 2)) for k, v in top]}


def decode_breakdown(prefill: dict, both: dict, steps: int, batch: int, wall_s: float) -> dict:
    """Per decode step: kernel time by group and the top kernels (prefill-only run subtracted)."""
    g = grouped({k: (both.get(k, 0.0) - prefill.get(k, 0.0)) / steps for k in both})
    return {"batch": batch, "wall_us_per_step": round(1e6 * wall_s / steps, 1),
            "gpu_busy_us_per_step": g["gpu_busy_us"], "groups_us": g["groups_us"], "top_kernels_us": g["top_kernels_us"]}


def prefill_breakdown(times: dict, tokens: int, wall_s: float) -> dict:
    """One batched prefill: kernel time by group (us per 1,000 tokens, so shapes and runs compare)."""
    g = grouped({k: 1000.0 * v / tokens for k, v in times.items()})
    return {"tokens": tokens, "wall_us_per_1k_tokens": round(1e9 * wall_s / tokens, 1),
            "gpu_busy_us_per_1k_tokens": g["gpu_busy_us"], "groups_us": g["groups_us"],
            "top_kernels_us": g["top_kernels_us"]}


def run_one(variant: str, shape: str, args, work: Path) -> dict:
    """One variant in a fresh process (GPU memory given back), with a timeout; parse its log."""
    model, kw = prepare(variant, shape, work, args.tp)
    job = dict(model=str(model), shape=shape, tp=args.tp, llm_kwargs=kw, batches=list(args.batches),
               prefill=list(args.prefill), max_model_len=args.max_model_len, gpu_mem=args.gpu_mem,
               cuda=args.device_check != "no",
               profile_dir=str(work / "profiles" / f"{shape}-{variant}") if variant in args.profile else None)
    log_path = Path(args.out).parent / f"vllm_gpu_{shape}_{variant}_tp{args.tp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER=os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"),
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    t0 = time.perf_counter()
    code = run_isolated([sys.executable, __file__, "--worker", json.dumps(job)], log_path, args.timeout, env)
    text = log_path.read_text(errors="replace")
    out: dict = {"variant": variant, "shape": shape, "tp": args.tp, "wall_s": round(time.perf_counter() - t0, 1)}
    m = re.search(r"^RESULT (\{.*\})$", text, re.M)
    if m:
        out.update(json.loads(m.group(1)))
    else:
        out["error"] = f"exit {code}: " + " | ".join(text.strip().splitlines()[-6:])[-800:]
    kv = re.findall(r"KV cache size: ([\d,]+) tokens", text)
    if kv:
        out["kv_cache_tokens"] = int(kv[-1].replace(",", ""))
    loaded = re.findall(r"Model loading took ([\d.]+) GiB", text)
    if loaded:  # a variant that silently stayed bf16 shows here
        out["weights_gib"] = float(loaded[-1])
    kernels = sorted(set(re.findall(r"(?:Using|Selected) (\w+Kernel) for (\w+)", text)))
    if kernels:
        out["kernels"] = [f"{k} ({m_})" for k, m_ in kernels]
    rq = re.findall(r"rotquant: kernel[^\n]*", text)
    if rq:
        out["rotquant_kernels"] = sorted(set(rq))
    return out


# ----------------------------------------------------------------------------- table
COLUMNS = ("prefill_tok_s", "ttft_ms", "kv_cache_tokens", "weights_gib", "startup_s")


def table(rows: list[dict]) -> str:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        ref = {name: next((r for r in group if r["variant"] == name and "error" not in r), None) for name in ("bf16", "fp8")}
        decode = sorted({c for r in group for c in r if c.startswith("decode_b")}, key=lambda c: int(c[8:-6]))
        cols = [c for c in ["prefill_tok_s", *decode, *COLUMNS[1:]] if any(c in r for r in group)]
        lines.append(f"\n{shape} (tp {group[0]['tp']}), tokens/s unless marked; ratios x bf16 / x fp8")
        lines.append("| variant | " + " | ".join(c.replace("_tok_s", "") for c in cols) + " |")
        lines.append("| --- |" + " ---: |" * len(cols))
        for r in group:
            if "error" in r or "invalid" in r:  # invalid: set by hand after a run (see the JSON)
                lines.append(f"| {r['variant']} | {'error' if 'error' in r else 'invalid'}: "
                             f"{r.get('error', r.get('invalid'))[:200]} |")
                continue
            cells = []
            for c in cols:
                v = r.get(c)
                if v is None:
                    cells.append("")
                    continue
                cell = f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
                if c.endswith("tok_s") and r["variant"] not in ("bf16",):
                    ratios = [f"{v / ref[b][c]:.2f}x" for b in ("bf16", "fp8") if ref[b] and ref[b].get(c)
                              and not (b == "fp8" and r["variant"] == "fp8")]
                    cell += f" ({' / '.join(ratios)})" if ratios else ""
                cells.append(cell)
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Per-decode-step kernel time by group for the profiled variants."""
    lines = []
    for r in rows:
        for key, prof in (r.get("profile") or {}).items():
            if key == "prefill":
                lines.append(f"\n{r['shape']} {r['variant']} prefill of {prof['tokens']} tokens: wall "
                             f"{prof['wall_us_per_1k_tokens']} us per 1,000 tokens, GPU busy {prof['gpu_busy_us_per_1k_tokens']} us")
                lines.append("| kernels | us per 1,000 tokens | share of busy |")
                busy = max(prof["gpu_busy_us_per_1k_tokens"], 1e-9)
            else:
                lines.append(f"\n{r['shape']} {r['variant']} decode batch {prof['batch']}: wall {prof['wall_us_per_step']} us "
                             f"per step, GPU busy {prof['gpu_busy_us_per_step']} us")
                lines.append("| kernels | us per step | share of busy |")
                busy = max(prof["gpu_busy_us_per_step"], 1e-9)
            lines.append("| --- | ---: | ---: |")
            for g, us in prof["groups_us"].items():
                lines.append(f"| {g} | {us:.1f} | {100 * us / busy:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of every engine")
    ap.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    ap.add_argument("--prefill", type=int, nargs=2, default=list(PREFILL), metavar=("PROMPTS", "TOKENS"))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-mem", type=float, default=0.85, help="gpu_memory_utilization of each engine")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per engine (start-up + measurements)")
    ap.add_argument("--work", default="/tmp/rotquant_bench", help="where model folders are written")
    ap.add_argument("--out", default="bench/results/vllm_gpu.json")
    ap.add_argument("--device-check", choices=["yes", "no"], default="yes", help="'no': CPU dry run")
    ap.add_argument("--profile", nargs="*", default=[], choices=list(VARIANTS),
                    help="variants to profile after measuring (torch profiler in the engine: kernel time per "
                         f"decode step at batch {PROFILE_BATCHES}, {PROFILE_PROMPT}-token prompts; one prefill of "
                         f"{PROFILE_PREFILL} prompts)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    work = Path(args.work)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", "bench/bench_vllm_gpu.py", *sys.argv[1:]]), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import torch
        import vllm

        meta.update(vllm=vllm.__version__, torch=torch.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    rows: list[dict] = []
    for shape in args.shapes:
        for variant in args.variants:
            row = run_one(variant, shape, args, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
            out_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")  # as they come
    print(table(rows) + "\n" + profile_table(rows))
    out_path.with_suffix(".md").write_text(f"{meta}\n{table(rows)}\n{profile_table(rows)}\n")


if __name__ == "__main__":
    main()
