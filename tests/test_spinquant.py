"""Rotations learned end to end through the quantized model (offline/spinquant.py): the hooked
model computes the served arithmetic, the learned rotations stay orthogonal, the fp model is left
as it was, the loss falls, and everything is seeded."""
import copy
import json

import pytest
import torch

from vllm_rotquant.testing.ckpt_factory import load_dequantized_weights
from vllm_rotquant.testing.hf_factory import build_hf_model, build_hf_module
from vllm_rotquant.kernels.reference import fake_quant_act
from vllm_rotquant.offline import cli, pipeline, quantize, spinquant
from vllm_rotquant.offline.model_io import load_hf_model
from vllm_rotquant.offline.options import QuantizeOptions, SpinQuantOptions
from vllm_rotquant.offline.pipeline import plan_r4_block
from vllm_rotquant.offline.simulate import load_simulated
from vllm_rotquant.offline.rotate import Rotations, apply_rotations, fold_norms


@pytest.fixture(scope="module")
def folded():
    model = build_hf_module("llama", num_hidden_layers=2)
    fold_norms(model)
    return model


def _init(model, seed=3):
    return Rotations.hadamard(model.config, seed, plan_r4_block(model.config, (1,), None), 16)


def _ids(n=3, t=48, seed=0):
    return torch.randint(3, 380, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def _hooked(model, rot, bits, clip=0.8):
    state = spinquant._State(bits, clip, True, spinquant.hadamard_matrix(rot.r4_block, torch.float32), 2)
    state.r1 = rot.r1.float()
    state.r2 = torch.stack([r.float() for r in rot.r2])
    return state, spinquant._install(model, state)


def test_fake_quant_ste_forward_is_the_reference_and_its_gradient_sees_the_scale():
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(0)) * 2
    for sym in (True, False):
        torch.testing.assert_close(spinquant.fake_quant_ste(x, 0.8, 4, sym), fake_quant_act(x, 0.8, 4, sym))
    xr = x.clone().requires_grad_(True)
    spinquant.fake_quant_ste(xr, 1.0, 4).sum().backward()
    g = xr.grad
    # straight through for the values inside the range; the token's max also carries the scale's gradient
    amax = x.abs().argmax(-1)
    inside = torch.ones_like(x, dtype=torch.bool)
    inside[torch.arange(7), amax] = False
    assert torch.allclose(g[inside], torch.ones_like(g[inside]))
    assert not torch.allclose(g[~inside], torch.ones_like(g[~inside]))


def test_hooks_are_invariant_unquantized_and_are_the_served_arithmetic_quantized(folded):
    ids = _ids()
    rot = _init(folded)
    ref = _logits(folded, ids)
    state, handles = _hooked(folded, rot, 16)
    try:
        assert (_logits(folded, ids) - ref).abs().max() < 1e-4 * ref.abs().max()  # Q = id: R R^T = I
        state.bits = 4
        hooked = _logits(folded, ids)
    finally:
        for h in handles:
            h.remove()
    # the served model: rotations absorbed into the weights, inputs fake-quantized after R4
    served = copy.deepcopy(folded)
    apply_rotations(served, rot, online=True)
    for name, m in served.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            m.register_forward_pre_hook(quantize.ServedActivations(0.8, 4))
    out = _logits(served, ids)
    assert (out - ref).abs().mean() > 1e-3 * ref.abs().mean()  # quantization is visible
    close = ((hooked - out).abs() <= 1e-3 * ref.abs().max()).double().mean()
    assert close > 0.95, close  # equal but for the rare rounding flips of float32 reassociation


def test_learned_rotations_orthogonal_seeded_lower_loss_and_model_unchanged(folded):
    windows = _ids(6, 48, seed=1)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    init = _init(folded)
    kw = dict(steps=12, lr=5e-3, batch=2, clip=0.8, topk=32, seed=5)
    rot, run = spinquant.learn_rotations(folded, windows, init, **kw)
    again, _ = spinquant.learn_rotations(folded, windows, init, **kw)
    assert torch.equal(rot.r1, again.r1) and all(torch.equal(a, b) for a, b in zip(rot.r2, again.r2))
    eye = torch.eye(rot.r1.shape[0], dtype=torch.float64)
    assert (rot.r1 @ rot.r1.T - eye).abs().max() < 1e-10
    for r in rot.r2:
        assert (r @ r.transpose(-1, -2) - torch.eye(r.shape[-1], dtype=torch.float64)).abs().max() < 1e-10
    assert not torch.allclose(rot.r1, init.r1.double(), atol=1e-4)
    assert rot.r4_block == init.r4_block and rot.r3_block == init.r3_block
    assert len(run.loss) == 12 and run.tokens_per_step == 2 * 48
    # the model: same parameters, no hooks left, gradients off again
    after = folded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters()) or all(p.requires_grad for p in folded.parameters())

    def kl(r):  # the training objective on all windows, no grad
        state, handles = _hooked(folded, r, 4)
        try:
            tot = 0.0
            for i in range(windows.shape[0]):
                state.enabled = False
                target = spinquant.topk_targets(folded(input_ids=windows[i: i + 1]).logits[:, :-1], 32)
                state.enabled = True
                tot += float(spinquant.kl_top(folded(input_ids=windows[i: i + 1]).logits[:, :-1], *target))
            return tot / windows.shape[0]
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad():
        assert kl(rot) < kl(init)


def test_kl_top_is_zero_for_the_target_and_positive_otherwise():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    idx, logp = spinquant.topk_targets(logits, 8)
    assert float(spinquant.kl_top(logits, idx, logp)) == pytest.approx(0.0, abs=1e-6)
    assert float(spinquant.kl_top(logits + torch.randn(5, 50), idx, logp)) > 1e-3
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(5))  # top-k + the rest's bucket


def _pipeline_opts(**kw):
    sq = {"steps": 6, "lr": 5e-3, "topk": 32, **kw.pop("spinquant", {})}
    return QuantizeOptions(**{"rotation": "spinquant", "weights": "rtn", "act_clip_ratio": 0.8, "calib_tokens": 192,
                              "calib_seq_len": 48, "batch_size": 2, "device": "cpu", "spinquant": sq, **kw})


def test_pipeline_absorbs_the_learned_rotations_and_the_simulation_serves_them(tmp_path):
    """--rotation spinquant: the checkpoint holds the rotations learn_rotations returns (not the
    Hadamard start), and the written checkpoint's simulation (the served kernels' arithmetic) equals
    the fp model rotated by them with the stored INT4 weights and the served activation quantizer."""
    src = build_hf_model(tmp_path / "src", "llama", num_hidden_layers=2)
    opts = _pipeline_opts(act_overrides=())  # every input at A4, as the twin below quantizes them
    windows = _ids(4, 48, seed=2)
    model = load_hf_model(src)
    tensors, spec, report = pipeline.quantize_model(model, None, opts, calib_windows=windows)
    assert spec.rotation == "spinquant"
    rec = spec.calibration["spinquant"]
    assert rec["steps"] == 6 and rec["trained_clip"] == 0.8 and rec["kl_init"] > 0
    assert report.spinquant is not None and len(report.spinquant.loss) == 6

    ref = load_hf_model(src)
    fold_norms(ref)
    start = Rotations.hadamard(ref.config, opts.seed, spec.down_proj_block, spec.qk_block)
    learned, _ = spinquant.learn_rotations(ref, windows, start, steps=6, lr=5e-3, batch=1, clip=0.8, topk=32, seed=0)
    emb = ref.model.embed_tokens.weight.detach().double()
    stored = tensors["model.embed_tokens.weight"].double()
    err = lambda r: float((stored - (emb @ r).to(torch.bfloat16).double()).abs().max())  # noqa: E731
    assert err(learned.r1) == 0.0
    assert err(start.r1) > 1e-3

    out = tmp_path / "ckpt"
    pipeline.write_checkpoint(out, tensors, spec, json.loads((src / "config.json").read_text()),
                              copy_from=src)
    sim = load_simulated(out, torch.float32)
    apply_rotations(ref, learned, online=True)
    for lin in load_dequantized_weights(ref, tensors):
        lin.register_forward_pre_hook(quantize.ServedActivations(0.8, 4))
    for n, p in ref.named_parameters():
        if n in tensors and not n.endswith("proj.weight"):
            p.data = tensors[n].float()
    ids = _ids(2, 32, seed=4)
    a, b = _logits(sim, ids), _logits(ref, ids)
    close = ((a - b).abs() <= 2e-3 * b.abs().max()).double().mean()
    assert close > 0.95, close  # equal but for the rare rounding flips of float32 reassociation


def test_pipeline_spinquant_from_dartquant_with_served_gptq_records_both(tmp_path):
    src = build_hf_model(tmp_path / "src", "llama", num_hidden_layers=2)
    opts = _pipeline_opts(weights="gptq", act_clip_ratio="auto", gptq={"served_inputs": True},
                          dartquant={"epochs": 1, "r2_epochs": 1, "samples": 64, "batch": 64, "outliers": 0},
                          spinquant={"start": "dartquant", "steps": 2})
    _, spec, report = pipeline.quantize_model(load_hf_model(src), None, opts, calib_windows=_ids(4, 48, 3))
    cal = spec.calibration
    assert report.dartquant is not None and cal["dartquant"]["epochs"] == 1
    assert cal["spinquant"]["start"] == "dartquant"
    # the rotations were learned for the searched clip, and GPTQ's served inputs use that same clip
    assert cal["served_inputs_clip"]["chosen"] == cal["spinquant"]["trained_clip"] == report.spinquant.clip


@pytest.mark.parametrize("kw,match", [
    ({"spinquant": {"steps": -1}}, "--sq-steps -1"),
    ({"spinquant": {"start": "random"}}, "--sq-start 'random'"),
    ({"spinquant": {"clip": 0}}, "--sq-clip 0"),
    ({"spinquant": {"clip": 1.2}}, "--sq-clip 1.2"),
    ({"spinquant": {"seq_len": 1}}, "--sq-seq-len 1"),
    ({"spinquant": {"lr": 0}}, "--sq-lr 0"),
    ({"spinquant": {"stepz": 3}}, "unknown SpinQuant option"),
    ({"act_bits": 16}, "--rotation spinquant learns the rotations through the quantized activations"),
])
def test_bad_spinquant_options_are_refused_naming_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        _pipeline_opts(**kw)


def test_cli_passes_the_spinquant_options():
    args = cli.build_parser().parse_args(
        ["quantize", "m", "o", "--rotation", "spinquant", "--sq-start", "dartquant", "--sq-steps", "7", "--sq-lr",
         "0.002", "--sq-seq-len", "256", "--no-sq-r2", "--sq-clip", "0.7", "--sq-topk", "64", "--sq-batch", "2"])
    opts = cli.quantize_options(args)
    assert opts.rotation == "spinquant" and opts.spin_start == "dartquant"
    assert opts.spinquant == SpinQuantOptions(start="dartquant", steps=7, lr=0.002, seq_len=256, r2=False, clip=0.7,
                                              topk=64, batch=2)
    assert cli.quantize_options(cli.build_parser().parse_args(["quantize", "m", "o"])).spin_start is None
