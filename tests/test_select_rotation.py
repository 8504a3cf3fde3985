"""Picking a DartQuant rotation by its quantized calibration loss (RTN weights)."""
import pytest
import torch

from vllm_rotquant.testing.hf_factory import build_hf_model
from vllm_rotquant.offline import pipeline, rotate, select_rotation
from vllm_rotquant.offline.model_io import load_hf_model
from vllm_rotquant.offline.options import DartQuantOptions, QuantizeOptions
from vllm_rotquant.offline.rotate import Rotations

DQ = {"epochs": 2, "samples": 256, "batch": 128, "r2_batch": 64, "score_windows": 2}


def _opts(**kw):
    dq = DartQuantOptions(**{**DQ, **kw.pop("dartquant", {})})
    return QuantizeOptions(rotation="dartquant", device="cpu", dartquant=dq, **kw)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("llama"), "llama", intermediate_size=256)


def _fp_nll(model, windows):
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


def test_quantized_nll_is_the_fp_loss_without_quantization_and_grows_with_it(src):
    model = load_hf_model(src)
    prompts = torch.randint(3, 300, (3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the model's own greedy text: low fp loss, which quantization noise raises
        windows = model.generate(prompts, max_new_tokens=44, do_sample=False, min_new_tokens=44)
    ref = _fp_nll(model, windows)
    rotate.fold_norms(model)
    folded = _fp_nll(model, windows)
    rot = Rotations.hadamard(model.config, 1, r4_block=64)
    fp = select_rotation.quantized_nll(model, windows, rot, weight_bits=None, act_bits=16, batch_size=2)
    assert abs(fp - ref) < 1e-4  # rotation + R4 twin are exact: the scoring path is the model
    w4 = select_rotation.quantized_nll(model, windows, rot, weight_bits=4, act_bits=16)
    w4a4 = select_rotation.quantized_nll(model, windows, rot, weight_bits=4, act_bits=4)
    assert fp < w4 < w4a4
    # scored with the activations as they will be served: asymmetric ones are a different (finite) loss
    w4a4_asym = select_rotation.quantized_nll(model, windows, rot, weight_bits=4, act_bits=4, act_symmetric=False)
    assert w4 < w4a4_asym and w4a4_asym != w4a4
    # the model itself is left untouched
    assert _fp_nll(model, windows) == folded


def test_rtn_keeps_the_start_with_the_lowest_quantized_loss(src, calib_file, tmp_path):
    opts = _opts(weights="rtn", calib=calib_file, calib_tokens=1024, calib_seq_len=128, dartquant={"starts": 3})
    run = pipeline.quantize_checkpoint(src, tmp_path / "ck", opts).dartquant
    scores = run.start_scores
    assert len(scores) == 3 and len(set(scores)) == 3
    assert run.chosen_start == min(range(3), key=scores.__getitem__)
    assert len(run.starts) == 3


def test_several_starts_with_gptq_are_refused(src, calib_file, tmp_path):
    with pytest.raises(ValueError, match="with --weights gptq use one start"):
        _opts(weights="gptq", calib=calib_file, calib_tokens=1024, calib_seq_len=128, dartquant={"starts": 2})


def test_dartquant_at_8_bit_activations_warns_that_the_hadamard_is_as_good(src, calib_file, tmp_path, caplog):
    opts = _opts(weights="rtn", act_bits=8, calib=calib_file, calib_tokens=512, calib_seq_len=128,
                 dartquant={"starts": 1})
    with caplog.at_level("WARNING", logger="vllm_rotquant.offline.pipeline"):
        pipeline.quantize_checkpoint(src, tmp_path / "ck", opts)
    assert "8-bit activations" in caplog.text and "--rotation hadamard" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm_rotquant.offline.pipeline"):
        pipeline.quantize_checkpoint(src, tmp_path / "ck4", _opts(
            weights="rtn", act_bits=4, calib=calib_file, calib_tokens=512, calib_seq_len=128, dartquant={"starts": 1}))
    assert "8-bit" not in caplog.text
