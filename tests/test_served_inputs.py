"""GPTQ on served inputs (`--gptq-served-inputs`): the Hessian of the per-token quantized inputs, the
least-squares refit to the full-precision outputs, the quantized calibration stream, and the clip
searched before the weights."""
import pytest
import torch

from vllm_rotquant.testing.hf_factory import build_hf_model
from vllm_rotquant.kernels.reference import fake_quant_act
from vllm_rotquant.offline import pipeline, quantize
from vllm_rotquant.offline.options import GPTQOptions, QuantizeOptions
from vllm_rotquant.offline.simulate import load_simulated


def _tokens(n=512, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.linspace(0.2, 3.0, k)  # uneven channels
    x[::17, 3] *= 20  # some spiky tokens
    return x


def test_accumulator_sums_quantized_hessian_and_cross_term():
    x = _tokens()
    acc = quantize.ServedInputAccumulator(x.shape[1], "cpu", clip=0.8, bits=4)
    for part in x.split(100):
        acc.add(part)
    xq = fake_quant_act(x, 0.8, 4).double()
    assert acc.tokens == x.shape[0]
    torch.testing.assert_close(acc.h, xq.T @ xq, rtol=1e-4, atol=1e-3)  # float32 products, float64 sums
    torch.testing.assert_close(acc.c, xq.T @ x.double(), rtol=1e-4, atol=1e-3)
    assert not torch.allclose(acc.h, x.double().T @ x.double(), rtol=1e-2)  # it is not the raw Hessian


def test_refit_is_the_least_squares_map_from_quantized_inputs_to_fp_outputs():
    x = _tokens()
    w = torch.randn(24, x.shape[1], generator=torch.Generator().manual_seed(1))
    acc = quantize.ServedInputAccumulator(x.shape[1], "cpu", clip=0.8, bits=4)
    acc.add(x)
    w_star = acc.refit(w, ridge=0.0)
    xq = fake_quant_act(x, 0.8, 4).double()
    lstsq = torch.linalg.lstsq(xq, x.double() @ w.double().T).solution.T
    torch.testing.assert_close(w_star.double(), lstsq, rtol=1e-4, atol=1e-4)
    err = lambda m: (xq @ m.double().T - x.double() @ w.double().T).pow(2).sum()  # noqa: E731
    assert err(w_star) < 0.9 * err(w)  # 4-bit noise: the refit removes a real share of the output error
    # the default ridge changes it only slightly, and it pulls toward W where no token excites
    assert (acc.refit(w) - w_star).abs().max() < 2e-2 * w_star.abs().max()
    dead = quantize.ServedInputAccumulator(x.shape[1], "cpu", clip=0.8, bits=4)
    dead.add(torch.cat([x[:, :40], torch.zeros(x.shape[0], 8)], 1))  # channels 40.. never excited
    torch.testing.assert_close(dead.refit(w)[:, 40:], w[:, 40:], rtol=1e-5, atol=1e-5)


def test_served_activations_hook_quantizes_unless_disabled():
    hook = quantize.ServedActivations(0.9, 4)
    lin = torch.nn.Linear(48, 8, bias=False)
    lin.register_forward_pre_hook(hook)
    x = _tokens(16)
    torch.testing.assert_close(lin(x), fake_quant_act(x, 0.9, 4) @ lin.weight.T)
    hook.enabled = False
    torch.testing.assert_close(lin(x), x @ lin.weight.T)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("llama"), "llama")


def _opts(calib_file, **kw):
    return QuantizeOptions(**{"calib": calib_file, "calib_tokens": 512, "calib_seq_len": 64, "batch_size": 4,
                              "device": "cpu", "act_clip_ratio": 0.8, **kw})


def test_first_group_is_fit_to_quantized_inputs(src, calib_file, monkeypatch):
    """The Hessian GPTQ gets for layer 0's q/k/v is that of the quantized (rotated, normalized)
    embeddings, and the weight it rounds is the refit one."""
    from vllm_rotquant.offline.model_io import load_hf_model, load_tokenizer

    seen = []
    real = quantize.gptq
    monkeypatch.setattr(quantize, "gptq", lambda w, h, *a, **k: (seen.append((w.clone(), h.clone())), real(w, h, *a, **k))[1])
    opts = _opts(calib_file, gptq=GPTQOptions(served_inputs=True))
    model = load_hf_model(src)
    _, spec, _ = pipeline.quantize_model(model, load_tokenizer(src), opts)
    assert spec.calibration["served_inputs_clip"] is None  # a fixed clip is used as it is
    windows = pipeline.calibration_windows(load_tokenizer(src), opts)
    # reference: the rotated fp model's layer-0 attention input, quantized
    ref_model = load_hf_model(src)
    from vllm_rotquant.offline.rotate import Rotations, apply_rotations, fold_norms

    fold_norms(ref_model)
    rot = Rotations.hadamard(ref_model.config, opts.seed, pipeline.plan_r4_block(ref_model.config, (1,), None), 16)
    apply_rotations(ref_model, rot, online=True)
    captured = []
    layer0 = ref_model.model.layers[0]
    hk = layer0.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        ref_model(input_ids=windows, use_cache=False)
    hk.remove()
    x = torch.cat(captured)
    xq = fake_quant_act(x, 0.8, 4).double()
    w_q, h_q = seen[0]
    torch.testing.assert_close(h_q, xq.T @ xq, rtol=1e-4, atol=1e-3)
    w_fp = layer0.self_attn.q_proj.weight.detach().double()
    h = xq.T @ xq
    lam = 1e-3 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w_star = torch.linalg.solve(h + lam, (xq.T @ x.double() + lam) @ w_fp.T).T
    # compared where it matters, on the inputs (the tiny text excites few directions: H is ill-conditioned)
    out = lambda w: xq @ w.T  # noqa: E731
    assert (out(w_q.double()) - out(w_star)).norm() < 1e-3 * out(w_star).norm()
    assert (out(w_fp) - out(w_star)).norm() > 1e-2 * out(w_star).norm()


def test_served_inputs_change_the_weights_and_record_the_clip(src, calib_file, tmp_path):
    """The checkpoint fit to served inputs differs from plain GPTQ's and simulates; with --act-clip
    auto the clip is searched before the weights (recorded) and again on the written checkpoint.
    (Whether it lowers perplexity is measured on SmolLM2 in bench/RESULTS.md: a tiny random model
    says nothing about that.)"""
    from safetensors.torch import load_file

    pipeline.quantize_checkpoint(src, tmp_path / "plain", _opts(calib_file, gptq=GPTQOptions(served_inputs=False)))
    pipeline.quantize_checkpoint(src, tmp_path / "served", _opts(calib_file, gptq=GPTQOptions(served_inputs=True)))
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("plain", "served"))
    for name in a:
        if name.endswith("weight_packed"):
            assert not torch.equal(a[name], b[name]), name
    auto = pipeline.quantize_checkpoint(src, tmp_path / "auto", _opts(calib_file, act_clip_ratio="auto",
                                                                      gptq=GPTQOptions(served_inputs=True)))
    spec = load_simulated(tmp_path / "auto").rotquant_spec
    record = spec.calibration["served_inputs_clip"]
    assert record["chosen"] in [float(c) for c in record["nll"]] and record["tokens"] > 0
    assert auto.act_clip is not None and spec.act_clip_ratio == auto.act_clip["chosen"]


def test_act_override_fits_those_weights_to_their_own_inputs(src, calib_file, tmp_path):
    """`--act-override gate_up=8`: GPTQ fits gate/up to 8-bit inputs (other weights than at 4 bits),
    the layers before them see the same stream (layer 0's q/k/v: the same INT4 values), the
    checkpoint records the override, and the clip search tunes the global clip only."""
    from safetensors.torch import load_file

    from vllm_rotquant.offline.simulate import SimQuantLinear

    over = (("gate_up", 8, 1.0),)
    pipeline.quantize_checkpoint(src, tmp_path / "a4", _opts(calib_file, act_overrides=()))
    pipeline.quantize_checkpoint(src, tmp_path / "mix", _opts(calib_file, act_overrides=over))
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a4", "mix"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight_packed"
        assert torch.equal(a[name], b[name]), name
    for proj in ("gate_proj", "up_proj"):
        name = f"model.layers.0.mlp.{proj}.weight_packed"
        assert not torch.equal(a[name], b[name]), name
    auto = pipeline.quantize_checkpoint(src, tmp_path / "auto", _opts(calib_file, act_clip_ratio="auto",
                                                                      act_overrides=over))
    model = load_simulated(tmp_path / "auto")
    assert model.rotquant_spec.act_overrides == over and model.rotquant_spec.act_clip_ratio == auto.act_clip["chosen"]
    got = {n.rsplit(".", 1)[-1]: (m.act_bits, m.clip) for n, m in model.named_modules() if isinstance(m, SimQuantLinear)}
    assert got["gate_proj"] == got["up_proj"] == (8, 1.0)
    assert got["q_proj"] == got["down_proj"] == (4, auto.act_clip["chosen"])


def test_served_inputs_are_the_default():
    assert GPTQOptions().served_inputs and pipeline.served_clip_needed(QuantizeOptions(device="cpu"))
    assert not pipeline.served_clip_needed(QuantizeOptions(device="cpu", gptq={"served_inputs": False}))


def test_option_is_validated():
    with pytest.raises(ValueError, match="--gptq-served-inputs 1: expected true or false"):
        GPTQOptions(served_inputs=1)
    assert not pipeline.served_clip_needed(QuantizeOptions(device="cpu", act_bits=16,
                                                           gptq=GPTQOptions(served_inputs=True)))
