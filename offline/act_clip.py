"""Choose the served activation clip ratio by the quantized model's loss on calibration text.

The per-token activation quantizer uses scale = clip * max|x| / 7 (symmetric INT4; the asymmetric
one clips max and min alike). A lower clip saturates the largest values of each token and rounds
all the others more finely; where the optimum lies depends on how the rotated activations are
distributed (it moves with the hidden size, the rotation and the bit width), so one fixed value
(QuaRot's 0.9) is rarely the best (bench/RESULTS.md: W4A4 perplexity 4-7 % lower with the search).

The search runs the written checkpoint through the served arithmetic (`simulate.load_simulated`:
the same custom ops as vLLM's linear method, R3/R4 online), scores each candidate by the mean
next-token loss on a few calibration windows, and walks down a grid from 0.9 while the loss falls
(up the grid if going down finds nothing better). It goes on for two steps past the best so far
because the loss is unimodal in the clip only up to small bumps, which stopping at the first rise
would take for the minimum; that is 4-7 forwards instead of the whole grid. The weights do not
depend on the clip: only `quantization_config.act_clip_ratio` changes. The CPU reference
arithmetic is float64, so on the CPU a large model is better quantized with a fixed `--act-clip`.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from vllm_rotquant.format import CheckpointError, update_config

log = logging.getLogger(__name__)

GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5
START = 0.9
PATIENCE = 2  # steps past the best before a direction is given up (the loss has small bumps)
SCORE_TOKENS = 4096  # calibration tokens per candidate (at least one window)


def check_ratio(value: float | str) -> float | str:
    """`value` if it is "auto" or a clip ratio in (0, 1]; ValueError naming the option otherwise."""
    if value == "auto" or (not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        return value
    raise ValueError(f"act_clip_ratio (--act-clip): expected 'auto' or a number in (0, 1], got {value!r}")


def descend(score: Callable[[float], float], grid: tuple[float, ...] = GRID, start: float = START,
            patience: int = PATIENCE) -> tuple[float, dict[float, float]]:
    """Walk the grid from `start` toward lower `score`: first toward the next grid value (more
    clipping for the descending GRID), then the other way if that direction found nothing better.
    A direction is given up after `patience` steps in a row without a new best (the loss is
    unimodal only up to small bumps). Returns (best value, every score computed)."""
    if start not in grid:
        raise ValueError(f"start {start} is not on the grid {grid}")
    scores: dict[float, float] = {}

    def at(i: int) -> float:
        if grid[i] not in scores:
            value = float(score(grid[i]))
            if math.isnan(value):
                raise FloatingPointError(f"activation clip {grid[i]}: the calibration loss is NaN")
            scores[grid[i]] = value
        return scores[grid[i]]

    first = best = grid.index(start)
    at(first)
    for step in (1, -1):
        j, misses = best + step, 0
        while 0 <= j < len(grid) and misses < patience:
            if at(j) < at(best):
                best, misses = j, 0
            else:
                misses += 1
            j += step
        if best != first:
            break
    return grid[best], scores


def score_windows(windows: torch.Tensor, tokens: int = SCORE_TOKENS) -> torch.Tensor:
    """The first calibration windows holding at least `tokens` tokens (at least one window)."""
    n = max(1, min(windows.shape[0], math.ceil(tokens / windows.shape[1])))
    return windows[:n]


@torch.no_grad()
def search(checkpoint: str | Path, windows: torch.Tensor, device: str = "cpu",
           dtype: torch.dtype = torch.bfloat16, batch_size: int = 1) -> tuple[float, dict[float, float]]:
    """Best clip for the rotquant checkpoint folder `checkpoint` by its served-arithmetic loss on
    `windows` [n, T]. Returns (clip, {clip: mean NLL})."""
    from vllm_rotquant.offline.evaluate import perplexity
    from vllm_rotquant.offline.simulate import SimQuantLinear, load_simulated

    model = load_simulated(checkpoint, dtype).to(device)
    # the linears at the checkpoint's act_bits / act_clip_ratio (act_overrides keep their own clip)
    linears = [m for m in model.modules() if isinstance(m, SimQuantLinear) and m.clip_searched]
    if not linears:
        raise CheckpointError(f"{checkpoint}: no quantized linears to tune the activation clip of")

    def loss(clip: float) -> float:
        for lin in linears:
            lin.clip = clip
        t = time.time()
        nll = perplexity(model, windows, batch_size, device, progress=False)["nll"]
        log.info("activation clip %.2f: calibration NLL %.4f (%.1f s)", clip, nll, time.time() - t)
        return nll

    best, scores = descend(loss)
    model = linears = None  # free it before emptying the CUDA cache
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return best, scores


def set_clip(checkpoint: str | Path, clip: float, record: dict | None = None) -> None:
    """Write `clip` into the checkpoint's quantization_config (and `record` under
    calibration.act_clip): `format.update_config` validates the result and replaces config.json
    in one rename."""
    path = Path(checkpoint) / "config.json"

    def edit(config: dict) -> None:
        qc = config.get("quantization_config")
        if not isinstance(qc, dict):
            raise CheckpointError(f"{path}: no quantization_config to set the activation clip in")
        qc["act_clip_ratio"] = clip
        if record is not None:
            qc.setdefault("calibration", {})["act_clip"] = record

    update_config(checkpoint, edit)


def tune(checkpoint: str | Path, windows: torch.Tensor, device: str = "cpu") -> dict:
    """Search the clip on the first SCORE_TOKENS tokens of `windows` and write it into the
    checkpoint. Returns the record stored under calibration.act_clip."""
    t0 = time.time()
    win = score_windows(windows)
    best, scores = search(checkpoint, win, device)
    record = {"chosen": best, "nll": {f"{c:.2f}": round(v, 5) for c, v in sorted(scores.items(), reverse=True)},
              "tokens": int(win.numel()), "seconds": round(time.time() - t0, 1)}
    set_clip(checkpoint, best, record)
    log.info("activation clip: %.2f (calibration NLL %s; %.1f s)", best,
             ", ".join(f"{c}: {v:.4f}" for c, v in record["nll"].items()), record["seconds"])
    return record


def search_unquantized_weights(model, windows: torch.Tensor, rotations, options) -> dict:
    """The clip for GPTQ on served inputs (`--gptq-served-inputs`), which must know the activation
    quantizer before it rounds the weights: `descend` on the calibration loss of the model with
    full-precision weights and served activations (select_rotation.quantized_nll: `model` folded
    and unrotated, `rotations` applied to a copy layer by layer). Returns the record stored under
    calibration.served_inputs_clip."""
    from vllm_rotquant.offline.select_rotation import quantized_nll

    t0 = time.time()
    win = score_windows(windows)

    def loss(clip: float) -> float:
        nll = quantized_nll(model, win, rotations, weight_bits=None, act_bits=options.act_bits, clip=clip,
                            act_symmetric=options.act_symmetric, device=options.device,
                            batch_size=options.batch_size, act_overrides=options.resolved_act_overrides)
        log.info("activation clip %.2f, unquantized weights: calibration NLL %.4f", clip, nll)
        return nll

    best, scores = descend(loss)
    record = {"chosen": best, "nll": {f"{c:.2f}": round(v, 5) for c, v in sorted(scores.items(), reverse=True)},
              "tokens": int(win.numel()), "seconds": round(time.time() - t0, 1)}
    log.info("activation clip for GPTQ's served inputs: %.2f (%.1f s)", best, record["seconds"])
    return record
