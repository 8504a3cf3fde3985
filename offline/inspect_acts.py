"""`rotquant inspect`: why rotations work, in one picture.

For one layer's activations (the input of q_proj or up_proj: the normalized residual stream
that R1 rotates; or the input of o_proj: the per-head values that R2 rotates) it shows, before
rotation, after the random Hadamard and after DartQuant: the histogram of all values (log
scale), the per-channel max |x| over tokens, and two numbers: the kurtosis (E x^4 / (E x^2)^2
per token, averaged: 3 for a Gaussian, 1.8 for a uniform distribution, large with outliers) and
the relative MSE of per-token INT4 quantization (clip 0.9, the kernels' arithmetic), symmetric
and asymmetric (`--act-asymmetric` checkpoints).

PATH is either a plain HF model (then DartQuant is learned here on calibration text, with the
`--dq-*` budget) or a rotquant checkpoint together with `--source MODEL` (its unrotated model):
the checkpoint's R1 is then recovered exactly from its embeddings (orthogonal Procrustes of the
source embeddings onto E R1) and R2 approximately from its INT4 v_proj rows.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from vllm_rotquant.kernels.reference import dequant_weight_ref, fake_quant_act

log = logging.getLogger(__name__)

MODULES = ("q_proj", "up_proj", "o_proj")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model folder, or a rotquant checkpoint (then pass --source)")
    p.add_argument("--source", default=None, help="the unrotated HF model a checkpoint was made from")
    p.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle one)")
    p.add_argument("--module", choices=MODULES, default="q_proj",
                   help="whose input: q_proj / up_proj (R1, residual stream) or o_proj (R2, values)")
    p.add_argument("--plot", default=None, help="write the figure to this PNG")
    p.add_argument("--data", default="austen", help="text the plotted activations come from")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the layer to plot")
    p.add_argument("--calib", default="brown", help="calibration text for learning DartQuant")
    p.add_argument("--calib-tokens", type=int, default=8 * 2048)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--act-clip", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dq-epochs", type=int, default=None)
    p.add_argument("--dq-lr", type=float, default=None)
    p.add_argument("--dq-samples", type=int, default=None)
    p.add_argument("--dq-outliers", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")


# ----------------------------------------------------------------------------- statistics
def kurtosis(x: torch.Tensor) -> float:
    """Mean over tokens of E x^4 / (E x^2)^2 along the channels (3: Gaussian, 1.8: uniform)."""
    x = x.double().flatten(1)
    return float((x.pow(4).mean(-1) / x.pow(2).mean(-1).clamp_min(1e-30) ** 2).mean())


def int4_mse(x: torch.Tensor, clip: float = 0.9, bits: int = 4, symmetric: bool = True) -> float:
    """Relative MSE ||x - deq(q(x))||^2 / ||x||^2 of per-token quantization (symmetric, or with a
    zero point), token mean."""
    x = x.float().flatten(1)
    deq = fake_quant_act(x, clip, bits, symmetric)
    return float(((deq - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-30)).mean())


def stats(x: torch.Tensor, clip: float) -> dict:
    flat = x.flatten(1).float()
    rms = flat.pow(2).mean(-1).sqrt()
    return {"kurtosis": round(kurtosis(x), 3), "int4_mse": float(f"{int4_mse(x, clip):.4g}"),
            "int4_asym_mse": float(f"{int4_mse(x, clip, 4, symmetric=False):.4g}"),
            "int8_mse": float(f"{int4_mse(x, clip, 8):.4g}"),
            "max_over_rms": round(float((flat.abs().amax(-1) / rms.clamp_min(1e-30)).mean()), 2),
            "absmax": round(float(flat.abs().max()), 3)}


# ----------------------------------------------------------------------------- rotations
def procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin over orthogonal R of ||a R - b||_F (float64)."""
    u, _, vh = torch.linalg.svd(a.double().T @ b.double())
    return u @ vh


def _recover_from_checkpoint(ckpt: Path, src_model) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """R1 from embeddings (exact up to bf16), R2 per KV head from v_proj rows (INT4: approximate)."""
    from vllm_rotquant.format import read_spec, read_tensors, unpack_int4
    from vllm_rotquant.offline import rotate
    from vllm_rotquant.offline.arch import arch_of

    spec, _ = read_spec(ckpt)
    tensors = read_tensors(ckpt)
    arch = arch_of(src_model)
    e_src = arch.get(src_model, arch.embeddings).weight.detach()
    r1 = procrustes(e_src, tensors[f"{arch.embeddings}.weight"])
    nq, nkv, hd = rotate.head_geometry(src_model.config)
    r2 = []
    for i, layer in enumerate(arch.decoder_layers(src_model)):
        stem = f"{arch.layer_prefix(i)}.{arch.v_proj}"
        w_ck = dequant_weight_ref(unpack_int4(tensors[f"{stem}.weight_packed"]), tensors[f"{stem}.weight_scale"])
        a = (arch.get(layer, arch.v_proj).weight.detach().double() @ r1).reshape(nkv, hd, -1)
        b = w_ck.reshape(nkv, hd, -1)
        # b[h] ~ R2[h]^T a[h]  ->  b[h]^T ~ a[h]^T R2[h]
        r2.append(torch.stack([procrustes(a[h].T, b[h].T) for h in range(nkv)]))
    return r1, r2, {"rotation": spec.rotation, "seed": spec.seed}


def _windows(model_dir, text: str, tokens: int, seq_len: int, seed: int, eval_like: bool) -> torch.Tensor:
    from vllm_rotquant.offline import data
    from vllm_rotquant.offline.model_io import load_tokenizer

    ids = data.tokenize(load_tokenizer(model_dir), data.load_text(text))
    seq_len = min(seq_len, max(16, tokens))
    n = max(1, -(-tokens // seq_len))
    return data.eval_windows(ids, seq_len, n) if eval_like else data.calibration_windows(ids, seq_len, n * seq_len, seed)


def inspect(model_path: str, source: str | None = None, layer: int | None = None, module: str = "q_proj",
            data_text: str = "austen", tokens: int = 2048, calib: str = "brown", calib_tokens: int = 16384,
            seq_len: int = 2048, act_clip: float = 0.9, seed: int = 0, device: str = "cpu",
            dq_options: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Returns (report, {variant: activations [tokens, channels...]})."""
    from vllm_rotquant.offline import dartquant, rotate
    from vllm_rotquant.offline.options import DartQuantOptions
    from vllm_rotquant.offline.model_io import load_hf_model
    from vllm_rotquant.offline.simulate import is_rotquant_checkpoint

    path = Path(model_path)
    is_ckpt = is_rotquant_checkpoint(path)
    if is_ckpt and not source:
        raise ValueError(f"{path} is a rotquant checkpoint: pass --source with the unrotated model it was made "
                         f"from (its activations before rotation are needed)")
    src_dir = Path(source) if is_ckpt else path
    model = load_hf_model(src_dir, torch.float32)
    rotate.fold_norms(model)
    n_layers = model.config.num_hidden_layers
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer}: the model has layers 0..{n_layers - 1}")
    report: dict = {"model": str(path), "layer": layer, "module": module, "data": data_text}
    if is_ckpt:
        r1_dq, r2_dq, info = _recover_from_checkpoint(path, model)
        seed = info["seed"]
        report["checkpoint"] = info
        label = f"{info['rotation']} (from checkpoint)"
    else:
        calib_windows = _windows(src_dir, calib, calib_tokens, seq_len, seed, eval_like=False)
        learned, run = dartquant.learn_rotations(model, calib_windows, rotate.Rotations.hadamard(model.config, seed),
                                                 DartQuantOptions.from_dict(dq_options or {}), device=device, seed=seed)
        r1_dq, r2_dq = learned.r1, learned.r2
        report["dartquant_loss"] = {"r1": list(run.r1_loss), "r2": list(run.r2_loss)}
        label = "DartQuant"
    hadamard = rotate.Rotations.hadamard(model.config, seed)
    r1_h, r2_h = hadamard.r1, hadamard.r2

    win = _windows(src_dir, data_text, tokens, seq_len, seed, eval_like=True)
    cap = dartquant.capture(model, win, device, samples=tokens, seed=seed, layers=[layer])
    if module == "o_proj":
        x = cap.r2[0]
        variants = {"no rotation": x, "random Hadamard": dartquant.rotate_heads(x, r2_h[layer].float()),
                    label: dartquant.rotate_heads(x, r2_dq[layer].float())}
    else:
        x = cap.r1[0, MODULES.index(module)]
        variants = {"no rotation": x, "random Hadamard": x @ r1_h.float(), label: x @ r1_dq.float()}
    report["tokens"] = int(x.shape[0])
    report["variants"] = {k: stats(v, act_clip) for k, v in variants.items()}
    return report, {k: v.flatten(1) for k, v in variants.items()}


def plot(report: dict, variants: dict[str, torch.Tensor], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(variants)
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names), 7.2))
    lim = max(float(v.abs().max()) for v in variants.values())
    for j, name in enumerate(names):
        v = variants[name].float()
        st = report["variants"][name]
        ax = axes[0, j]
        ax.hist(v.flatten().numpy(), bins=201, range=(-lim, lim), color=f"C{j}", log=True)
        ax.set_title(f"{name}\nkurtosis {st['kurtosis']:.2f}   INT4 MSE {st['int4_mse']:.3g}", fontsize=10)
        ax.set_xlabel("value")
        if j == 0:
            ax.set_ylabel("count (log)")
        ax = axes[1, j]
        cmax = v.abs().amax(0).numpy()
        ax.plot(cmax, lw=0.7, color=f"C{j}")
        ax.set_ylim(0, lim * 1.05)
        ax.set_xlabel("channel")
        ax.set_title(f"per-channel max |x| (token max/rms {st['max_over_rms']:.2f})", fontsize=10)
        if j == 0:
            ax.set_ylabel("max |x| over tokens")
    what = {"q_proj": "q_proj input (normed residual, R1)", "up_proj": "up_proj input (normed residual, R1)",
            "o_proj": "o_proj input (attention values, R2 per head)"}[report["module"]]
    fig.suptitle(f"{Path(report['model']).name}: layer {report['layer']} {what}, "
                 f"{report['tokens']} tokens of {report['data']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(args) -> int:
    dq = {k: v for k, v in (("epochs", args.dq_epochs), ("lr", args.dq_lr), ("samples", args.dq_samples),
                            ("outliers", args.dq_outliers)) if v is not None}
    report, variants = inspect(args.model, args.source, args.layer, args.module, args.data, args.tokens,
                               args.calib, args.calib_tokens, args.seq_len, args.act_clip, args.seed,
                               args.device, dq)
    if args.plot:
        plot(report, variants, args.plot)
        report["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"layer {report['layer']} {report['module']} input, {report['tokens']} tokens of {report['data']}:")
        for name, st in report["variants"].items():
            print(f"  {name:<28} kurtosis {st['kurtosis']:7.3f}   INT4 MSE {st['int4_mse']:.4g} "
                  f"(asym {st['int4_asym_mse']:.4g})   INT8 MSE {st['int8_mse']:.4g}   max/rms {st['max_over_rms']:.2f}")
        if args.plot:
            print(f"  figure: {args.plot}")
    return 0
