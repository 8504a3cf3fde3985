"""SmoothQuant-style smoothing and AWQ's scales absorbed into v/o and up/down (offline/smooth.py): exact on the float
model (with grouped-query attention and biases), flatter inputs for the quantizer, composes with the
rotations, recorded in the checkpoint, bad options named."""
from __future__ import annotations

import json

import pytest
import torch

from vllm_rotquant.offline import cli, pipeline, rotate, smooth
from vllm_rotquant.offline.options import QuantizeOptions
from vllm_rotquant.offline.rotate import Rotations, apply_rotations
from vllm_rotquant.testing.hf_factory import build_hf_model, build_hf_module


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _with_outliers(model):
    """Make some v and up channels large (what smoothing is for): scale rows, as trained models do."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.v_proj, layer.mlp.up_proj):
                rows = torch.randperm(lin.out_features, generator=g)[:3]
                lin.weight[rows] *= 20.0
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: v_proj has a bias; both with GQA (4 q / 2 kv heads)
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_keeps_the_logits_and_flattens_the_inputs(arch, alpha):
    model = _with_outliers(build_hf_module(arch))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    rotate.fold_norms(model)
    ref = _logits(model, ids)
    before = [(layer.self_attn.o_proj.weight.clone(), layer.mlp.down_proj.weight.clone()) for layer in model.model.layers]
    summary = smooth.smooth_model(model, windows, "smoothquant", alpha, "cpu")
    out = _logits(model, ids)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    for layer, (o, d) in zip(model.model.layers, before):  # something was actually scaled
        assert not torch.allclose(layer.self_attn.o_proj.weight, o) and not torch.allclose(layer.mlp.down_proj.weight, d)
    # the quantizer-visible spread of the channel maxima shrinks on both inputs
    for key in ("o_input_max_over_median", "down_input_max_over_median"):
        b, a = summary[key]
        assert a < b, (key, summary)
    # measured again on the smoothed model: its inputs' channel maxima are a / s
    again = smooth.input_maxima(model, windows, "cpu")
    spread = sum(smooth._spread(d) for _, d in again) / len(again)
    assert spread == pytest.approx(summary["down_input_max_over_median"][1], rel=1e-3)


def test_smoothing_then_rotations_keep_the_logits():
    model = _with_outliers(build_hf_module("llama"))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    rotate.fold_norms(model)
    ref = _logits(model, ids)
    smooth.smooth_model(model, torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3)),
                        "smoothquant", 0.5, "cpu")
    block = pipeline.plan_r4_block(model.config, (1,), None)
    handles = apply_rotations(model, Rotations.hadamard(model.config, 3, r4_block=block), online=True)
    out = _logits(model, ids)
    for h in handles:
        h.remove()
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()


def test_scales_are_one_for_dead_channels_and_nan_is_refused():
    s = smooth.smoothing_scales(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0]), 0.5)
    assert s[0] == 1 and s[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="non-finite scales"):
        smooth.smoothing_scales(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]), 0.5)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="--smooth 'gptq'"):
        QuantizeOptions(smooth="gptq")
    assert QuantizeOptions(smooth="awq").needs_calibration
    with pytest.raises(ValueError, match="--smooth-alpha 1.5"):
        QuantizeOptions(smooth="smoothquant", smooth_alpha=1.5)
    assert QuantizeOptions(weights="rtn", act_clip_ratio=0.9, smooth="smoothquant").needs_calibration


def test_cli_smooth_is_recorded(tmp_path, calib_file, capsys):
    src = build_hf_model(tmp_path / "src", "llama")
    out = tmp_path / "ckpt"
    assert cli.main(["quantize", str(src), str(out), "--weights", "rtn", "--act-clip", "0.9", "--smooth", "smoothquant",
                     "--smooth-alpha", "0.6", "--calib", calib_file, "--calib-tokens", "128", "--calib-seq-len", "64",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rec = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["smooth"]
    assert rec["alpha"] == 0.6 and len(rec["down_input_max_over_median"]) == 2 and rec["seconds"] >= 0
    assert summary["smooth"] == "smoothquant" and summary["smooth_s"] == rec["seconds"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_keeps_the_logits_and_lowers_the_int4_error(arch):
    """AWQ's scales: exact on the float model (GQA v channels, v bias); per layer the chosen alpha's
    INT4 output error is the grid's minimum, so never above alpha 0 (no scaling)."""
    model = _with_outliers(build_hf_module(arch))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    rotate.fold_norms(model)
    ref = _logits(model, ids)
    summary = smooth.smooth_model(model, windows, "awq", 0.5, "cpu")
    assert (_logits(model, ids) - ref).abs().max() < 1e-4 * ref.abs().max()
    assert summary["method"] == "awq" and len(summary["alphas"]) == len(model.model.layers)
    assert any(a > 0 for pair in summary["alphas"] for a in pair)  # the outlier channels were scaled


def test_awq_scale_search_minimises_the_rtn_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64)
    x[:, 5] *= 30.0  # a salient channel
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    mean_abs = x.abs().mean(dim=0)
    s, alpha = smooth.awq_scale(x, mean_abs, w)
    err = lambda sc: ((x @ w.T) - (x / sc) @ smooth._rtn(w * sc).T).pow(2).mean().item()  # noqa: E731
    assert alpha > 0 and err(s) < err(torch.ones(64, dtype=torch.float64))
    assert torch.prod(s.max() * s.min()).sqrt().item() == pytest.approx(1.0)
    for i in range(smooth.AWQ_GRID):  # no grid point does better
        sc = mean_abs.pow(i / smooth.AWQ_GRID)
        assert err(s) <= err(sc / (sc.max() * sc.min()).sqrt()) + 1e-12
