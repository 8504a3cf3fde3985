"""`rotquant quantize`: load -> fold norms -> rotate (R1, R2, R4) -> quantize weights -> write.

The output folder is written into a temporary sibling and renamed into place at the end, so an
interrupted run never leaves a folder that looks like a checkpoint. Tensors depend only on the
inputs and the seed (provenance such as wall time goes to config.json, not to the tensors).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vllm_rotquant.format import QUANTIZED_PROJECTIONS, RotQuantSpec, pack_int4
from vllm_rotquant.kernels.hadamard import largest_block, rotation_matrix
from vllm_rotquant.kernels.layout import gemm_group_supported
from vllm_rotquant.kernels.reference import dequant_weight_ref
from vllm_rotquant.offline import act_clip, calibrate, data, quantize, rotate
from vllm_rotquant.offline.model_io import atomic_folder, load_hf_model, load_tokenizer

log = logging.getLogger(__name__)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# GPTQ runs "true-sequential": each group is quantized after the groups before it, on inputs
# that already see their quantized weights.
SEQUENTIAL_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
                     ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
SHARD_BYTES = 4 * 2 ** 30


@dataclasses.dataclass
class QuantizeOptions:
    rotation: str = "hadamard"  # none | hadamard | dartquant
    weights: str = "rtn"  # rtn | gptq
    w_bits: int = 4
    a_bits: int = 4
    group_size: int | None = None
    act_clip_ratio: float | str = "auto"  # a ratio in (0, 1], or "auto": searched on calibration text (act_clip.py)
    act_symmetric: bool = True  # False: per-token asymmetric (zero point), as DartQuant's scripts
    calib: str = "brown"
    calib_tokens: int = 128 * 2048
    calib_seq_len: int = 2048
    seed: int = 0
    device: str = "cpu"
    tp_sizes: tuple[int, ...] | None = None  # None: every power of two up to 8 the shapes allow
    r4_block: int | None = None  # None: largest Hadamard order dividing intermediate/max(tp), <= 2048
    gptq_damp: float = 0.01
    batch_size: int = 8
    dartquant: dict[str, Any] = dataclasses.field(default_factory=dict)
    overwrite: bool = False


def default_tp_sizes(config) -> tuple[int, ...]:
    nq, nkv, _ = rotate.head_geometry(config)
    return tuple(tp for tp in (1, 2, 4, 8)
                 if nq % tp == 0 and (nkv % tp == 0 or tp % nkv == 0) and config.intermediate_size % tp == 0)


def check_group_size(config, group_size: int | None, tp_sizes: tuple[int, ...]) -> None:
    """Fail before any calibration when `group_size` does not split every linear's input on every
    rank (o_proj and down_proj are row-parallel: their inputs are split over TP); warn when the
    CUDA GEMM cannot serve it (`gemm_group_supported`), which the CPU path still can."""
    if not group_size:
        return
    if group_size < 2 or group_size % 2:
        raise ValueError(f"--group-size {group_size}: must be a positive even number")
    nq, _, hd = rotate.head_geometry(config)
    inputs = [("hidden_size (q/k/v/gate/up input)", config.hidden_size)]
    inputs += [(f"o_proj input per rank at tp {tp}", nq * hd // tp) for tp in tp_sizes]
    inputs += [(f"down_proj input per rank at tp {tp}", config.intermediate_size // tp) for tp in tp_sizes]
    for name, width in inputs:
        if width % group_size:
            raise ValueError(f"--group-size {group_size} does not divide the {name} = {width} (choose a divisor, "
                             f"or restrict --tp-sizes)")
    bad = [f"{name} = {width}" for name, width in inputs if not gemm_group_supported(width, group_size)]
    if bad:
        log.warning("--group-size %d: the CUDA INT4 GEMM cannot serve it (needs a power of two in [32, 512] "
                    "dividing half of each input: %s); the checkpoint runs on the CPU reference path only",
                    group_size, ", ".join(bad))


def plan_r4_block(config, tp_sizes: tuple[int, ...], requested: int | None) -> int:
    width = config.intermediate_size // max(tp_sizes)
    block = requested or largest_block(width)
    if width % block:
        raise ValueError(f"--r4-block {block} does not divide intermediate_size/tp = {config.intermediate_size}/{max(tp_sizes)}")
    return block


def hadamard_rotations(config, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """QuaRot-style R1 (hidden) and per-layer, per-KV-head R2, seeded and reproducible."""
    _, nkv, hd = rotate.head_geometry(config)
    r1 = rotation_matrix(config.hidden_size, seed)
    r2 = [torch.stack([rotation_matrix(hd, seed + 1 + 1000 * (i + 1) + h) for h in range(nkv)])
          for i in range(config.num_hidden_layers)]
    return r1, r2


RTN_STARTS = 4  # DartQuant starts scored when the weights are RTN (see offline/select_rotation.py)


def dartquant_rotations(model, windows: torch.Tensor, r4_block: int, opts: QuantizeOptions):
    """DartQuant R1/R2. With GPTQ weights: learned from the seed's Hadamard. With RTN weights:
    learned from `starts` Hadamard seeds (default RTN_STARTS) and the one whose RTN-quantized
    model has the lowest loss on `score_windows` calibration windows is kept."""
    from vllm_rotquant.offline import dartquant, select_rotation

    o = dartquant.resolve_options(**opts.dartquant)
    if opts.a_bits >= 8:
        log.warning("--rotation dartquant with %d-bit activations: DartQuant shapes the rotations for the "
                    "activation quantizer, which loses almost nothing at 8 bits; on SmolLM2 (W4A8, 5 seeds) it "
                    "did not beat --rotation hadamard, which costs no calibration (bench/RESULTS.md)", opts.a_bits)
    starts = o["starts"] or (RTN_STARTS if opts.weights == "rtn" else 1)
    if starts > 1 and opts.weights != "rtn":
        raise ValueError(f"DartQuant starts={starts} picks a rotation by its RTN-quantized loss; with "
                         f"--weights {opts.weights} use one start (GPTQ corrects the rounding itself)")
    inits = [hadamard_rotations(model.config, opts.seed + 100_003 * k) for k in range(starts)]
    cands = dartquant.learn_candidates(model, windows, inits, device=opts.device, seed=opts.seed, **opts.dartquant)
    if len(cands) == 1:
        return cands[0]
    t0 = time.time()
    scores = [select_rotation.quantized_nll(model, windows[: o["score_windows"]], r1, r2, r4_block, w_bits=opts.w_bits,
                                            group_size=opts.group_size, a_bits=opts.a_bits, clip=initial_clip(opts),
                                            act_symmetric=opts.act_symmetric, device=opts.device, batch_size=opts.batch_size)
              for r1, r2 in tqdm(cands, desc="score rotations", unit="start")]
    best = min(range(len(scores)), key=scores.__getitem__)
    seconds = time.time() - t0
    log.info("DartQuant: %d starts, W%dA%d RTN calibration NLL %s -> start %d (%.1f s)", starts, opts.w_bits,
             opts.a_bits, " ".join(f"{v:.4f}" for v in scores), best, seconds)
    dartquant.LAST_RUN.update(start_scores=scores, chosen_start=best, score_s=seconds)
    return cands[best]


def initial_clip(opts: QuantizeOptions) -> float:
    """The clip ratio written first (and used to score DartQuant starts): the given one, or
    act_clip.START when it is searched after the weights are quantized."""
    return act_clip.START if opts.act_clip_ratio == "auto" else float(opts.act_clip_ratio)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, opts: QuantizeOptions) -> dict[str, Any]:
    """Run the whole pipeline; return a summary dict (also stored under calibration in config.json)."""
    t0 = time.time()
    out = Path(out_dir)
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if opts.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    act_clip.check_ratio(opts.act_clip_ratio)
    tune_clip = opts.act_clip_ratio == "auto" and opts.a_bits < 16
    torch.manual_seed(opts.seed)
    model = load_hf_model(model_dir, torch.float32)
    config = model.config
    tp_sizes = tuple(opts.tp_sizes or default_tp_sizes(config))
    check_group_size(config, opts.group_size, tp_sizes)
    rotate.fold_norms(model)
    needs_calib = opts.weights == "gptq" or opts.rotation == "dartquant" or tune_clip
    calib_windows = None
    if needs_calib:
        tokenizer = load_tokenizer(model_dir)
        ids = data.tokenize(tokenizer, data.load_text(opts.calib))
        calib_windows = data.calibration_windows(ids, opts.calib_seq_len, opts.calib_tokens, opts.seed)
        log.info("calibration: %d x %d tokens from %s", *calib_windows.shape, opts.calib)

    r4_block = qk_block = None
    timings: dict[str, float] = {"prepare_s": time.time() - t0}  # load, fold, tokenize
    if opts.rotation != "none":
        t = time.time()
        r4_block = plan_r4_block(config, tp_sizes, opts.r4_block)
        if opts.rotation == "dartquant":
            r1, r2 = dartquant_rotations(model, calib_windows, r4_block, opts)
        else:
            r1, r2 = hadamard_rotations(config, opts.seed)
        rotate.rotate_residual(model, r1, opts.device)
        qk_block = rotate.head_geometry(config)[2]
        for layer, r2_layer in zip(rotate.layers_of(model), r2):
            rotate.rotate_values(layer, r2_layer, config, opts.device)
            rotate.absorb_down_hadamard(layer, r4_block, opts.device)
        timings["rotation_s"] = time.time() - t

    t = time.time()
    if opts.weights == "rtn":
        packed = _quantize_rtn(model, opts)
    elif opts.weights == "gptq":
        hooks = rotate.install_online_hadamard(model, r4_block) if r4_block else []
        try:
            packed = _quantize_gptq(model, calib_windows, opts)
        finally:
            for h in hooks:
                h.remove()
    else:
        raise ValueError(f"unknown weight quantizer {opts.weights!r} (rtn or gptq)")
    timings["weights_s"] = time.time() - t

    spec = RotQuantSpec(
        weight_bits=opts.w_bits, group_size=opts.group_size, act_bits=opts.a_bits,
        act_clip_ratio=initial_clip(opts), act_symmetric=opts.act_symmetric, rotation=opts.rotation, seed=opts.seed,
        down_proj_block=r4_block, qk_block=qk_block, tp_sizes=tp_sizes,
        calibration={
            "method": opts.weights, "data": opts.calib if needs_calib else None,
            "tokens": int(calib_windows.numel()) if calib_windows is not None else 0,
            "seq_len": opts.calib_seq_len, "damp": opts.gptq_damp if opts.weights == "gptq" else None,
            "dartquant": opts.dartquant if opts.rotation == "dartquant" else None,
            "device": opts.device, **{k: round(v, 2) for k, v in timings.items()},
        })
    t = time.time()
    clip_record: dict[str, Any] = {}

    def finalize(folder: Path) -> None:  # inside the atomic write: the searched clip lands with the rest
        timings["write_s"] = time.time() - t
        if tune_clip:
            clip_record.update(act_clip.tune(folder, calib_windows, opts.device))
            timings["act_clip_s"] = clip_record["seconds"]

    size = write_checkpoint(model, packed, spec, Path(model_dir), out, finalize=finalize)
    summary = {
        "model": str(model_dir), "out": str(out), "rotation": opts.rotation, "weights": opts.weights,
        "w_bits": opts.w_bits, "a_bits": opts.a_bits, "act_symmetric": opts.act_symmetric, "group_size": opts.group_size,
        "act_clip_ratio": clip_record.get("chosen", spec.act_clip_ratio),
        "calib_tokens": spec.calibration["tokens"], "seconds": round(time.time() - t0, 1),
        "peak_memory_mb": round(peak_memory_mb(opts.device), 1), "output_mb": round(size / 2 ** 20, 1),
        **{k: round(v, 1) for k, v in timings.items()},
    }
    log.info("quantized %s -> %s in %.1f s", model_dir, out, summary["seconds"])
    return summary


def _quantize_rtn(model, opts: QuantizeOptions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """RTN on `opts.device`, one weight at a time (the clip search is 21 passes over each weight:
    14 s per 7B layer on 16 host cores, well under a second on an H100)."""
    device = torch.device(opts.device)
    packed = {}
    layers = rotate.layers_of(model)
    for i, layer in enumerate(tqdm(layers, desc="RTN", unit="layer")):
        for name, lin in rotate.quantized_linears(layer):
            q, s = quantize.rtn(lin.weight.data.to(device), opts.w_bits, opts.group_size)
            packed[f"model.layers.{i}.{name}"] = (q.cpu(), s.cpu())
    return packed


def _quantize_gptq(model, windows: torch.Tensor, opts: QuantizeOptions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    device = torch.device(opts.device)
    # the hidden states stay on the accelerator when they fit: 5 passes per layer would otherwise
    # move them to and from the host 5 times (4.3 GB each way for 7B on 128 x 2048 tokens)
    store = calibrate.choose_store("auto", device, windows.numel() * model.config.hidden_size * 4)
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, opts.batch_size, store=store)
    packed = {}
    layers = rotate.layers_of(model)
    for i, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer")):
        layer.to(device)
        for parent, names in SEQUENTIAL_GROUPS:
            mods = {n: getattr(getattr(layer, parent), n) for n in names}
            first = mods[names[0]]  # the modules of a group read the same input: one Hessian
            acc = quantize.HessianAccumulator(first.in_features, device)
            handle = first.register_forward_hook(acc.hook)
            try:
                calibrate.run_layer(layer, inputs, keep_outputs=False, stop_at=first)
            finally:
                handle.remove()
            for n, m in mods.items():
                q, s = quantize.gptq(m.weight.data, acc.h, opts.w_bits, opts.group_size, damp=opts.gptq_damp)
                packed[f"model.layers.{i}.{parent}.{n}"] = (q.cpu(), s.cpu())
                m.weight.data = dequant_weight_ref(q, s, m.weight.dtype)
        inputs.hidden = calibrate.run_layer(layer, inputs)
        layer.to("cpu")
    return packed


def write_checkpoint(model, packed: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: RotQuantSpec,
                     source_dir: Path, out: Path, finalize: Callable[[Path], None] | None = None) -> int:
    """Write config.json (+ quantization_config), safetensors and the tokenizer files atomically;
    `finalize(folder)` runs on the complete folder before it is renamed into place."""
    src_cfg = json.loads((source_dir / "config.json").read_text())
    dtype = {"float16": torch.float16}.get(src_cfg.get("torch_dtype") or src_cfg.get("dtype"), torch.bfloat16)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(QUANTIZED_PROJECTIONS) and leaf == "weight":
            q, s = packed[stem]
            tensors[f"{stem}.weight_packed"] = pack_int4(q)
            tensors[f"{stem}.weight_scale"] = s.to(torch.float16)
        elif "rotary_emb" not in name:
            tensors[name] = p.detach().to(dtype)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    config = dict(src_cfg)
    config.update(quantization_config=spec.to_dict(), tie_word_embeddings=False, torch_dtype=str(dtype).split(".")[-1])
    config.pop("dtype", None)
    with atomic_folder(out) as tmp:
        _save_shards(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in source_dir.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".bin", ".index.json", ".pt", ".gguf")):
                shutil.copy2(f, tmp / f.name)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        if finalize is not None:
            finalize(tmp)
    return size


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
