"""The calibrator on the real model, SmolLM2-135M (fewer tokens than the README table)."""
import pytest
import torch

from vllm_rotquant.testing.real_model import smollm2_dir, smollm2_rotquant_dir
from vllm_rotquant.offline import calibrate, data, evaluate, pipeline, quantize, rotate
from vllm_rotquant.kernels.reference import dequant_weight_ref
from vllm_rotquant.offline.model_io import load_hf_model, load_tokenizer
from vllm_rotquant.offline.options import default_tp_sizes
from vllm_rotquant.offline.rotate import Rotations, apply_rotations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def src():
    return smollm2_dir()


@pytest.fixture(scope="module")
def windows(src):
    ids = data.tokenize(load_tokenizer(src), data.load_text("austen"))
    return data.eval_windows(ids, 256, 4)


def test_rotated_unquantized_smollm2_gives_same_logits(src, windows):
    model = load_hf_model(src)
    ids = windows[:2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
        rotate.fold_norms(model)
        block = pipeline.plan_r4_block(model.config, default_tp_sizes(model.config), None)
        apply_rotations(model, Rotations.hadamard(model.config, 0, r4_block=block), online=True)
        out = model(input_ids=ids).logits.double()
    assert (out - ref).abs().max().item() < 2e-3 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_gptq_beats_rtn_on_real_activations(src):
    """Layer-output error ||X W^T - X Q^T|| on held-out real activations of a rotated layer."""
    model = load_hf_model(src)
    rotate.fold_norms(model)
    apply_rotations(model, Rotations(r1=Rotations.hadamard(model.config, 0).r1))  # R1 only
    ids = data.tokenize(load_tokenizer(src), data.load_text("brown"))
    wins = data.calibration_windows(ids, 256, 256 * 12, seed=0)
    inputs = calibrate.capture_first_layer_inputs(model, wins, "cpu", batch_size=4)
    layer = model.model.layers[0]
    seen = []
    hook = layer.mlp.up_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    calibrate.run_layer(layer, inputs, keep_outputs=False)
    hook.remove()
    x = torch.cat(seen)
    calib, held_out = x[: len(x) * 2 // 3], x[len(x) * 2 // 3:]
    h = calib.double().T @ calib.double()
    for lin in (layer.mlp.up_proj, layer.mlp.gate_proj):
        w = lin.weight.data
        errs = {}
        for name, (q, s) in {"rtn": quantize.rtn(w), "gptq": quantize.gptq(w, h)}.items():
            errs[name] = (held_out @ (dequant_weight_ref(q, s).float() - w).T).pow(2).mean().item()
        assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_w4a4_hadamard_gptq_perplexity(src):
    ckpt = smollm2_rotquant_dir()
    bf16 = evaluate.evaluate(src, "austen", seq_len=256, windows=4, progress=False)
    w4a4 = evaluate.evaluate(ckpt, "austen", seq_len=256, windows=4, progress=False)
    assert 20 < bf16["ppl"] < 60
    # rotated RTN measured ~1,100 on this model in DESIGN.md's probe; hadamard + GPTQ must do far better
    assert bf16["ppl"] < w4a4["ppl"] < 4 * bf16["ppl"], (bf16, w4a4)
