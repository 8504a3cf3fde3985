"""The calibration pipeline: fold norms -> rotate (R1, R2, R4) -> quantize weights -> checkpoint.

`quantize_model(model, tokenizer, options)` works on an in-memory Hugging Face model and returns
what a checkpoint holds (its tensors and its `RotQuantSpec`) with a report of what was done;
`quantize_checkpoint(model_dir, out_dir, options)` is the command line's: it loads a folder,
calls `quantize_model`, and writes the result. The folder is written into a temporary sibling and
renamed into place at the end (the activation-clip search runs on the complete temporary folder
first), so an interrupted run never leaves a folder that looks like a checkpoint. Tensors depend
only on the inputs and the seed (provenance such as wall time goes to config.json, not to them).
"""
from __future__ import annotations

import dataclasses
import gc
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

from vllm_rotquant.format import PACKED_SUFFIX, QUANTIZED_PROJECTIONS, SCALE_SUFFIX, RotQuantSpec, pack_int4, write_config
from vllm_rotquant.kernels.hadamard import largest_block
from vllm_rotquant.kernels.reference import dequant_weight_ref
from vllm_rotquant.offline import act_clip, calibrate, data, quantize
from vllm_rotquant.offline.arch import ArchMapping, arch_of, head_geometry
from vllm_rotquant.offline.model_io import atomic_folder, load_hf_model, load_tokenizer
from vllm_rotquant.offline.options import QuantizeOptions
from vllm_rotquant.offline.rotate import Rotations, apply_rotations, fold_norms
from vllm_rotquant.offline.smooth import smooth_model

log = logging.getLogger(__name__)

SHARD_BYTES = 4 * 2 ** 30
WEIGHT_FILES = (".safetensors", ".bin", ".index.json", ".pt", ".gguf")  # not copied from the source folder


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """What a quantization did: its options, calibration, rotations' training, timings and sizes.
    `quantize_model` fills the calibration part; `quantize_checkpoint` adds the write, the
    activation-clip search and the paths."""

    options: QuantizeOptions
    architecture: str
    calib_data: str | None  # the calibration text (None: none was needed)
    calib_tokens: int
    act_clip_ratio: float  # the ratio written (searched by quantize_checkpoint when options say "auto")
    prepare_s: float  # fold + tokenize
    rotation_s: float | None  # rotations chosen (DartQuant: learned) and absorbed; None: no rotation
    weights_s: float
    peak_memory_mb: float
    seconds: float
    dartquant: Any = None  # dartquant.DartQuantRun with --rotation dartquant (or spinquant started from it)
    spinquant: Any = None  # spinquant.SpinRun with --rotation spinquant
    # the calibration token windows [n, T] (the clip search on the written checkpoint scores on them)
    calib_windows: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    act_clip: dict[str, Any] | None = None  # the clip search's record (act_clip.tune)
    load_s: float | None = None
    write_s: float | None = None
    act_clip_s: float | None = None
    model: str | None = None
    out: str | None = None
    output_mb: float | None = None
    transform_s: float | None = None  # --method: the input transforms calibrated, absorbed and hooked
    smooth_s: float | None = None  # --smooth (or the default's AWQ): the scales searched and absorbed (in prepare_s)

    def summary(self) -> dict[str, Any]:
        """Flat JSON-able summary (what `rotquant quantize` prints); unset timings are left out."""
        o = self.options
        out = {"model": self.model, "out": self.out, "architecture": self.architecture, "rotation": o.rotation,
               "weights": o.weights, "weight_bits": o.weight_bits, "act_bits": o.act_bits,
               "act_symmetric": o.act_symmetric, "group_size": o.group_size, "act_clip_ratio": self.act_clip_ratio,
               "calib_tokens": self.calib_tokens, "seconds": round(self.seconds, 1),
               "peak_memory_mb": round(self.peak_memory_mb, 1), "output_mb": self.output_mb}
        if o.method != "none":
            out["method"] = o.method
        if o.resolved_smooth != "none":
            out["smooth"] = o.resolved_smooth
        for key in ("load_s", "prepare_s", "smooth_s", "rotation_s", "transform_s", "weights_s", "write_s",
                    "act_clip_s"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 1)
        return {k: v for k, v in out.items() if v is not None or k in ("group_size",)}


def plan_r4_block(config, tp_sizes: tuple[int, ...], requested: int | None) -> int:
    """The R4 block: `requested`, or the largest Hadamard order dividing intermediate/max(tp)."""
    width = config.intermediate_size // max(tp_sizes)
    block = requested or largest_block(width)
    if width % block:
        raise ValueError(f"--r4-block {block} does not divide intermediate_size/tp = "
                         f"{config.intermediate_size}/{max(tp_sizes)}")
    return block


def calibration_windows(tokenizer, options: QuantizeOptions) -> torch.Tensor:
    """The seeded calibration windows [n, calib_seq_len] from the text `options.calib`."""
    ids = data.tokenize(tokenizer, data.load_text(options.calib, option="--calib"))
    windows = data.calibration_windows(ids, options.calib_seq_len, options.calib_tokens, options.seed)
    log.info("calibration: %d x %d tokens from %s", *windows.shape, options.calib)
    return windows


def dartquant_rotations(model, windows: torch.Tensor, r4_block: int, r3_block: int, opts: QuantizeOptions):
    """DartQuant R1/R2 -> (Rotations, DartQuantRun). With GPTQ weights: learned from the seed's
    Hadamard. With RTN weights: learned from `opts.dartquant_starts` Hadamard seeds, and the one
    whose RTN-quantized model has the lowest loss on `score_windows` calibration windows is kept."""
    from vllm_rotquant.offline import dartquant, select_rotation

    if opts.act_bits >= 8:
        log.warning("--rotation dartquant with %d-bit activations: DartQuant shapes the rotations for the "
                    "activation quantizer, which loses almost nothing at 8 bits; on SmolLM2 (W4A8, 5 seeds) it "
                    "did not beat --rotation hadamard, which costs no calibration (bench/RESULTS.md)", opts.act_bits)
    inits = [Rotations.hadamard(model.config, opts.seed + 100_003 * k, r4_block, r3_block)
             for k in range(opts.dartquant_starts)]
    cands, run = dartquant.learn_candidates(model, windows, inits, opts.dartquant, device=opts.device, seed=opts.seed)
    if len(cands) == 1:
        return cands[0], run
    t0 = time.time()
    scores = [select_rotation.quantized_nll(model, windows[: opts.dartquant.score_windows], cand,
                                            weight_bits=opts.weight_bits, group_size=opts.group_size,
                                            act_bits=opts.act_bits, clip=opts.initial_clip,
                                            act_symmetric=opts.act_symmetric, device=opts.device,
                                            batch_size=opts.batch_size, act_overrides=opts.resolved_act_overrides)
              for cand in tqdm(cands, desc="score rotations", unit="start")]
    best = min(range(len(scores)), key=scores.__getitem__)
    seconds = time.time() - t0
    log.info("DartQuant: %d starts, W%dA%d RTN calibration NLL %s -> start %d (%.1f s)", len(cands),
             opts.weight_bits, opts.act_bits, " ".join(f"{v:.4f}" for v in scores), best, seconds)
    return cands[best], dataclasses.replace(run, start_scores=tuple(scores), chosen_start=best, score_s=seconds)


def spinquant_rotations(model, windows: torch.Tensor, start: Rotations, opts: QuantizeOptions):
    """R1/R2 learned end to end from `start` (offline/spinquant.py) -> (Rotations, SpinRun, clip
    record or None). The clip they are learned for: --sq-clip, else --act-clip, else (auto) the one
    searched on `start` with unquantized weights (its record is returned: GPTQ on served inputs
    reuses it, the rotations having been learned for it)."""
    from vllm_rotquant.offline import spinquant

    sq = opts.spinquant
    record = None
    if sq.clip is not None:
        clip = sq.clip
    elif opts.act_clip_ratio != "auto":
        clip = float(opts.act_clip_ratio)
    else:
        record = act_clip.search_unquantized_weights(model, windows, start, opts)
        clip = record["chosen"]
    train = windows[:, : sq.seq_len] if sq.seq_len else windows
    learned, run = spinquant.learn_rotations(
        model, train, start, steps=sq.steps, lr=sq.lr, batch=sq.batch, act_bits=opts.act_bits, clip=clip,
        symmetric=opts.act_symmetric, topk=sq.topk, learn_r2=sq.r2, seed=opts.seed, device=opts.device)
    return learned, dataclasses.replace(run, clip=clip), record


def served_clip_needed(opts: QuantizeOptions) -> bool:
    """GPTQ fits the weights to quantized inputs, so it needs the activation clip first."""
    return opts.weights == "gptq" and opts.gptq.served_inputs and opts.act_bits < 16


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _unquantized_dtype(config: dict[str, Any]) -> torch.dtype:
    """Embeddings, norms, lm_head and biases are stored in float16 for a float16 source, else bfloat16."""
    return torch.float16 if (config.get("torch_dtype") or config.get("dtype")) in ("float16", torch.float16) \
        else torch.bfloat16


def quantize_model(model, tokenizer, options: QuantizeOptions = QuantizeOptions(), *,
                   calib_windows: torch.Tensor | None = None, unquantized_dtype: torch.dtype | None = None,
                   ) -> tuple[dict[str, torch.Tensor], RotQuantSpec, QuantizeReport]:
    """Quantize an in-memory HF causal LM (float32 on the CPU for exact absorption; it is
    modified in place: folded, rotated, and with GPTQ each linear's weight replaced by its
    dequantized INT4 values).

    `tokenizer` turns `options.calib` into calibration windows when the options need them
    (GPTQ, DartQuant, the clip search); `calib_windows` [n, T] token ids are used instead when
    given (then `options.calib` is only recorded). `unquantized_dtype`: dtype of the tensors
    stored as they are (default: float16 if the model's config says so, else bfloat16).
    An "auto" clip is not searched here: it needs the written checkpoint (quantize_checkpoint
    runs it); the spec then holds act_clip.START.

    Returns (tensors: name -> tensor as the checkpoint holds them, spec, report)."""
    t0 = time.time()
    opts = options
    arch = arch_of(model)
    arch.check(model)
    config = model.config
    opts.check_model(config)
    tp_sizes = opts.tp_sizes_for(config)
    if opts.method == "flatquant" and not opts.tp_sizes and tp_sizes == (1,):
        log.warning("--method flatquant: the checkpoint serves tp 1 only (a Kronecker transform on the o/down inputs "
                    "is not rank-local); --tf-kinds qkv gate_up keeps every TP size")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        log.warning("quantize_model: the model is %s; the rotated weights are stored back in it, so pass a "
                    "float32 model to keep the absorption exact (the products run in float64)", dtype)
    if opts.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(opts.seed)
    fold_norms(model)
    windows = calib_windows
    if opts.needs_calibration and windows is None:
        if tokenizer is None:
            raise ValueError("these options need calibration text (GPTQ, DartQuant or --act-clip auto): "
                             "pass a tokenizer or calib_windows")
        windows = calibration_windows(tokenizer, opts)
    prepare_s = time.time() - t0
    smooth_record = None
    if opts.resolved_smooth != "none":  # on the folded float model, before any rotation (offline/smooth.py)
        t = time.time()
        smooth_record = smooth_model(model, windows, opts.resolved_smooth, opts.smooth_alpha, opts.device,
                                     opts.batch_size,
                                     seed=opts.seed)
        smooth_record["seconds"] = round(time.time() - t, 1)
        prepare_s += time.time() - t

    rotations, dq_run, sq_run, spin_clip, rotation_s, hooks = Rotations(), None, None, None, None, []
    if opts.rotation != "none":
        t = time.time()
        # a transform on the down input replaces R4 there
        r4_block = None if "down" in opts.transform_kinds else plan_r4_block(config, tp_sizes, opts.r4_block)
        r3_block = head_geometry(config)[2]
        if "dartquant" in (opts.rotation, opts.spin_start):
            rotations, dq_run = dartquant_rotations(model, windows, r4_block, r3_block, opts)
        else:
            rotations = Rotations.hadamard(config, opts.seed, r4_block, r3_block)
        if opts.rotation == "spinquant":
            rotations, sq_run, spin_clip = spinquant_rotations(model, windows, rotations, opts)
        rotation_s = time.time() - t
    # GPTQ on served inputs needs the activation clip before the weights: searched on the
    # unquantized weights (the clip the checkpoint keeps is searched again on the written one)
    def served_inputs_clip(rotations_to_apply: Rotations) -> tuple[float | None, dict | None]:
        """(clip, search record) for GPTQ on served inputs: the SpinQuant rotations' own, the given
        one, or searched on the unquantized weights of the model with `rotations_to_apply`."""
        if not served_clip_needed(opts):
            return None, None
        if spin_clip is not None:  # the clip the rotations were learned for, searched on their start
            return spin_clip["chosen"], spin_clip
        if opts.act_clip_ratio == "auto":
            record = act_clip.search_unquantized_weights(model, windows, rotations_to_apply, opts)
            return record["chosen"], record
        return float(opts.act_clip_ratio), None

    served_clip, clip_record = served_inputs_clip(rotations) if opts.method == "none" else (None, None)
    if opts.rotation != "none":
        t = time.time()
        # GPTQ's calibration forwards run the fp model: it needs the online twin of R4
        hooks = apply_rotations(model, rotations, opts.device, online=opts.weights == "gptq" or opts.method != "none")
        rotation_s += time.time() - t
    transforms, transform_record = {}, None
    if opts.method != "none":  # calibrated on the rotated float model, absorbed, hooked (offline/transforms.py)
        from vllm_rotquant.offline import transforms as tf

        more, transforms, transform_record = tf.calibrate_transforms(model, windows, opts, tp_sizes)
        hooks += more
        # searched through the transforms: the model is rotated and hooked already
        served_clip, clip_record = served_inputs_clip(Rotations())

    t = time.time()
    try:
        if opts.weights == "rtn":
            packed = _quantize_rtn(model, arch, opts)
        else:
            packed = _quantize_gptq(model, arch, windows, opts, served_clip)
    finally:
        for h in hooks:
            h.remove()
    weights_s = time.time() - t

    if unquantized_dtype is None:
        unquantized_dtype = _unquantized_dtype({"dtype": getattr(config, "dtype", None)})
    tensors = checkpoint_tensors(model, arch, packed, unquantized_dtype)
    input_transforms = ()
    if transforms:
        from vllm_rotquant.offline import transforms as tf

        tensors = dict(sorted({**tensors, **tf.checkpoint_tensors(transforms, arch)}.items()))
        input_transforms = tuple({t.spec.kind: t.spec for t in transforms.values()}.values())
    timings = {"prepare_s": prepare_s, "weights_s": weights_s}
    if rotation_s is not None:
        timings["rotation_s"] = rotation_s
    spec = RotQuantSpec(
        weight_bits=opts.weight_bits, group_size=opts.group_size, act_bits=opts.act_bits,
        act_clip_ratio=opts.initial_clip, act_symmetric=opts.act_symmetric, rotation=opts.rotation, seed=opts.seed,
        act_overrides=opts.resolved_act_overrides, down_proj_block=rotations.r4_block, qk_block=rotations.r3_block, tp_sizes=tp_sizes,
        input_transforms=input_transforms,
        calibration={
            "method": opts.weights, "data": opts.calib if opts.needs_calibration else None,
            "tokens": int(windows.numel()) if windows is not None else 0, "seq_len": opts.calib_seq_len,
            "gptq": opts.gptq.to_dict() if opts.weights == "gptq" else None,
            "dartquant": opts.dartquant.to_dict() if dq_run is not None else None,
            "spinquant": {**opts.spinquant.to_dict(), **sq_run.record()} if sq_run is not None else None,
            "served_inputs_clip": clip_record,
            "smooth": smooth_record,  # absorbed into the weights: provenance only, nothing to serve
            "transforms": transform_record,
            "device": opts.device, **{k: round(v, 2) for k, v in timings.items()},
        })
    report = QuantizeReport(
        options=opts, architecture=arch.name, calib_data=spec.calibration["data"],
        calib_tokens=spec.calibration["tokens"], act_clip_ratio=spec.act_clip_ratio, prepare_s=prepare_s,
        rotation_s=rotation_s, weights_s=weights_s, peak_memory_mb=peak_memory_mb(opts.device),
        seconds=time.time() - t0, dartquant=dq_run, spinquant=sq_run, calib_windows=windows,
        transform_s=transform_record["seconds"] if transform_record else None,
        smooth_s=smooth_record["seconds"] if smooth_record else None)
    return tensors, spec, report


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions = QuantizeOptions(),
                        *, overwrite: bool = False) -> QuantizeReport:
    """Load the HF folder `model_dir`, quantize it (`quantize_model`) and write the checkpoint to
    `out_dir` (`save_checkpoint`: atomically, the clip searched first when the options say "auto").
    Returns the report (its calibration part is also stored in config.json)."""
    t0 = time.time()
    model_dir, out = Path(model_dir), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    model = load_hf_model(model_dir, torch.float32)
    tokenizer = load_tokenizer(model_dir) if options.needs_calibration else None
    src_cfg = json.loads((model_dir / "config.json").read_text())
    load_s = time.time() - t0
    tensors, spec, report = quantize_model(model, tokenizer, options, unquantized_dtype=_unquantized_dtype(src_cfg))
    del model
    gc.collect()  # the float32 model (27 GB for 7B) is gone before the clip search loads the checkpoint
    spec = dataclasses.replace(spec, calibration={**spec.calibration, "load_s": round(load_s, 2)})
    report = dataclasses.replace(report, load_s=load_s, model=str(model_dir))
    return save_checkpoint(out, tensors, spec, report, src_cfg, copy_from=model_dir, overwrite=overwrite)


def save_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], spec: RotQuantSpec, report: QuantizeReport,
                    config: dict[str, Any], *, copy_from: str | Path | None = None, tokenizer=None,
                    overwrite: bool = False) -> QuantizeReport:
    """Write `quantize_model`'s result as a checkpoint folder, atomically (`write_checkpoint`;
    `config`: the source model's config.json as a dict, `copy_from` / `tokenizer`: where the
    tokenizer files come from). When the options ask for an "auto" activation clip, it is searched
    on the complete temporary folder (act_clip.tune, on the report's calibration windows) before
    the rename. Returns the report completed with the write, the search and the sizes."""
    t0 = time.time()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    options = report.options
    config = dict(config)
    if not config.get("architectures"):
        config["architectures"] = [report.architecture]
    done: dict[str, Any] = {}

    def finalize(folder: Path) -> None:  # inside the atomic write: the searched clip lands with the rest
        done["write_s"] = time.time() - t0
        if options.tune_clip:
            done["act_clip"] = act_clip.tune(folder, report.calib_windows, options.device)

    size = write_checkpoint(out, tensors, spec, config, copy_from=copy_from, tokenizer=tokenizer, finalize=finalize)
    record = done.get("act_clip")
    report = dataclasses.replace(
        report, write_s=done["write_s"], act_clip=record, act_clip_s=record["seconds"] if record else None,
        act_clip_ratio=record["chosen"] if record else spec.act_clip_ratio, out=str(out),
        output_mb=round(size / 2 ** 20, 1), peak_memory_mb=peak_memory_mb(options.device),
        seconds=(report.load_s or 0.0) + report.seconds + time.time() - t0)
    log.info("quantized %s -> %s in %.1f s", report.model or "the model", out, report.seconds)
    return report


def _quantize_rtn(model, arch: ArchMapping, opts: QuantizeOptions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """RTN on `opts.device`, one weight at a time (the clip search is 21 passes over each weight:
    14 s per 7B layer on 16 host cores, well under a second on an H100)."""
    device = torch.device(opts.device)
    packed = {}
    for i, layer in enumerate(tqdm(arch.decoder_layers(model), desc="RTN", unit="layer")):
        for name, lin in arch.quantized_linears(layer):
            q, s = quantize.rtn(lin.weight.data.to(device), opts.weight_bits, opts.group_size)
            packed[f"{arch.layer_prefix(i)}.{name}"] = _packed(q, s)
    return packed


def _quantize_gptq(model, arch: ArchMapping, windows: torch.Tensor, opts: QuantizeOptions,
                   served_clip: float | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ layer by layer, "true-sequential" (arch.sequential_groups): each group is quantized on
    inputs that already see the quantized groups before it.

    `served_clip` (with `--gptq-served-inputs`): the calibration stream runs with every linear's
    input fake-quantized as served at this clip, and each group's weights are refit to those
    quantized inputs before the rounding (quantize.ServedInputAccumulator says why)."""
    device = torch.device(opts.device)
    g = opts.gptq
    served = served_clip is not None
    # the hidden states stay on the accelerator when they fit: 5 passes per layer would otherwise
    # move them to and from the host 5 times (4.3 GB each way for 7B on 128 x 2048 tokens)
    store = calibrate.choose_store("auto", device, windows.numel() * model.config.hidden_size * 4)
    inputs = calibrate.capture_first_layer_inputs(model, windows, device, opts.batch_size, store=store)
    packed = {}
    for i, layer in enumerate(tqdm(arch.decoder_layers(model), desc="GPTQ", unit="layer")):
        layer.to(device)
        acts, handles = {}, []
        if served:  # registered after the online R4 hook: the served model rotates, then quantizes
            for path, lin in arch.quantized_linears(layer):
                bits, clip = opts.act_for(path, served_clip)
                acts[path] = quantize.ServedActivations(clip, bits, opts.act_symmetric)
                handles.append(lin.register_forward_pre_hook(acts[path]))
        try:
            for group in arch.sequential_groups:
                mods = {path: arch.get(layer, path) for path in group}
                first = mods[group[0]]  # the modules of a group read the same input: one Hessian
                if served:
                    bits, clip = opts.act_for(group[0], served_clip)
                    acc = quantize.ServedInputAccumulator(first.in_features, device, clip, bits, opts.act_symmetric)
                    acts[group[0]].enabled = False  # the accumulator sees the raw input and quantizes it
                else:
                    acc = quantize.HessianAccumulator(first.in_features, device)
                handle = first.register_forward_hook(acc.hook)
                try:
                    calibrate.run_layer(layer, inputs, keep_outputs=False, stop_at=first)
                finally:
                    handle.remove()
                    if served:
                        acts[group[0]].enabled = True
                for path, m in mods.items():
                    w = acc.refit(m.weight.data) if served else m.weight.data
                    q, s = quantize.gptq(w, acc.h, opts.weight_bits, opts.group_size, damp=g.damp,
                                         block=g.block, act_order=g.act_order)
                    packed[f"{arch.layer_prefix(i)}.{path}"] = _packed(q, s)
                    m.weight.data = dequant_weight_ref(q, s, m.weight.dtype)
            inputs.hidden = calibrate.run_layer(layer, inputs)
        finally:
            for h in handles:
                h.remove()
        layer.to("cpu")
    return packed


def _packed(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's INT4 codes packed two to a byte and its float16 scales, on the host: packed
    where they are made, so the host never holds a 7B model's codes as int8 (6 GiB more)."""
    return pack_int4(q).cpu(), s.to(torch.float16).cpu()


def checkpoint_tensors(model, arch: ArchMapping, packed: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: for every quantized linear its packed INT4 codes and float16
    scales (`packed`, from `_packed`), the rest of the state dict in `dtype` (sorted by name,
    contiguous)."""
    tensors: dict[str, torch.Tensor] = {}
    used = set()
    for name, p in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if leaf == "weight" and stem in packed:
            tensors[f"{stem}.{PACKED_SUFFIX}"], tensors[f"{stem}.{SCALE_SUFFIX}"] = packed[stem]
            used.add(stem)
        elif leaf == "weight" and stem.endswith(QUANTIZED_PROJECTIONS):
            raise ValueError(f"{name}: a projection the checkpoint quantizes was not quantized")
        elif not name.startswith(arch.rotary + "."):
            tensors[name] = p.detach().to(dtype)
    if used != set(packed):
        raise ValueError(f"quantized linears missing from the model's state dict: {sorted(set(packed) - used)[:3]}")
    return {k: v.contiguous() for k, v in sorted(tensors.items())}


def write_checkpoint(out: str | Path, tensors: dict[str, torch.Tensor], spec: RotQuantSpec, config: dict[str, Any], *,
                     copy_from: str | Path | None = None, tokenizer=None,
                     finalize: Callable[[Path], None] | None = None) -> int:
    """Write config.json (`config`, the source model's, + quantization_config), the tensors and the
    tokenizer (files of `copy_from` other than weights and config.json, or `tokenizer` saved)
    atomically; `finalize(folder)` runs on the complete folder before it is renamed into place.
    Returns the bytes written."""
    out = Path(out)
    dtype = next((t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(SCALE_SUFFIX)),
                 torch.bfloat16)
    config = dict(config)
    config.update(quantization_config=spec.to_dict(), tie_word_embeddings=False, torch_dtype=str(dtype).split(".")[-1])
    config.pop("dtype", None)
    with atomic_folder(out) as tmp:
        _save_shards(tensors, tmp)
        write_config(tmp, config)
        if copy_from is not None:
            for f in Path(copy_from).iterdir():
                if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_FILES):
                    shutil.copy2(f, tmp / f.name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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
