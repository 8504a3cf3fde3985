"""The offline calibrator end to end on tiny random models (Llama, Qwen2 with biases, Mistral)."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_rotquant.testing.ckpt_factory import dequantized_float_twin
from vllm_rotquant.testing.hf_factory import build_hf_model
from vllm_rotquant.format import CheckpointError, RotQuantSpec
from vllm_rotquant.offline import cli, pipeline, rotate
from vllm_rotquant.offline.arch import arch_of
from vllm_rotquant.offline.model_io import load_hf_model
from vllm_rotquant.offline.options import DartQuantOptions, QuantizeOptions
from vllm_rotquant.offline.rotate import Rotations, apply_rotations
from vllm_rotquant.kernels.reference import dequant_weight_ref as dequantize
from vllm_rotquant.offline.simulate import load_simulated


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def src(request, tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp(request.param), request.param)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def test_rotation_invariance(src):
    """Folded and rotated (R1, R2, R4 with its online twin), unquantized: same logits in fp32."""
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    model = load_hf_model(src)
    ref = _logits(model, ids)
    rotate.fold_norms(model)
    assert torch.allclose(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    block = pipeline.plan_r4_block(model.config, (1, 2), None)
    apply_rotations(model, Rotations.hadamard(model.config, seed=1, r4_block=block), online=True)
    out = _logits(model, ids)
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    assert not torch.allclose(model.model.embed_tokens.weight, load_hf_model(src).model.embed_tokens.weight)


def _quantize(src, out, overwrite=False, **kw):
    opts = QuantizeOptions(**{"calib_tokens": 256, "calib_seq_len": 64, "batch_size": 2, "device": "cpu", **kw})
    return pipeline.quantize_checkpoint(src, out, opts, overwrite=overwrite)


@pytest.mark.parametrize("weights,group_size", [("rtn", None), ("gptq", None), ("rtn", 16), ("gptq", 16)])
def test_simulation_reproduces_dequantized_model(src, tmp_path, calib_file, weights, group_size):
    """W4A16 simulation of the written checkpoint == the fp rotated model with the stored
    INT4 weights dequantized: writing, loading and simulating lose nothing (also group-wise)."""
    out = tmp_path / "ckpt"
    _quantize(src, out, weights=weights, act_bits=16, calib=calib_file, group_size=group_size)
    sim = load_simulated(out, torch.float32)
    spec = sim.rotquant_spec
    assert spec.act_bits == 16 and spec.rotation == "hadamard" and spec.calibration["method"] == weights
    assert spec.group_size == group_size
    tensors = load_file(out / "model.safetensors")
    in_f = tensors["model.layers.0.mlp.down_proj.weight_packed"].shape[1] * 2
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape[1] == (in_f // group_size if group_size else 1)
    model = dequantized_float_twin(src, tensors, spec.down_proj_block)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(sim, ids), _logits(model, ids), atol=2e-3, rtol=1e-3)


def test_w4a4_is_worse_than_w4a8_and_deterministic(src, tmp_path, calib_file):
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    ref = _logits(load_hf_model(src), ids)
    errs = {}
    for bits in (4, 8):
        out = tmp_path / f"a{bits}"
        _quantize(src, out, weights="gptq", act_bits=bits, calib=calib_file)
        errs[bits] = (_logits(load_simulated(out, torch.float32), ids) - ref).pow(2).mean().item()
    assert errs[8] < errs[4]
    again = tmp_path / "again"
    _quantize(src, again, weights="gptq", act_bits=8, calib=calib_file)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(tmp_path / "a8")


def test_written_checkpoint_format(src, tmp_path):
    out = tmp_path / "ckpt"
    report = _quantize(src, out, weights="rtn")
    cfg = json.loads((out / "config.json").read_text())
    spec = RotQuantSpec.from_dict(cfg["quantization_config"])
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["quant_method"] == "rotquant"
    assert spec.qk_block == 16 and 192 % spec.down_proj_block == 0 and spec.tp_sizes == (1, 2, 4)
    t = load_file(out / "model.safetensors")
    assert t["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.uint8
    assert t["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float16
    assert "model.layers.0.mlp.down_proj.weight" not in t
    assert torch.equal(t["model.norm.weight"], torch.ones_like(t["model.norm.weight"]))
    assert (out / "tokenizer.json").is_file() and report.output_mb > 0
    if "qwen2" in str(src):
        assert "model.layers.0.self_attn.v_proj.bias" in t


def test_interrupted_write_leaves_nothing(src, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "_save_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _quantize(src, tmp_path / "ckpt", weights="rtn")
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output_and_bad_arch(src, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _quantize(src, tmp_path / "exists", weights="rtn")
    cfg = json.loads((src / "config.json").read_text())
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        _quantize(bad, tmp_path / "o", weights="rtn")


def test_simulation_rejects_bad_checkpoints(src, tmp_path):
    out = tmp_path / "ckpt"
    _quantize(src, out, weights="rtn")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["version"] = 7
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version"):
        load_simulated(out)
    cfg["quantization_config"]["version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_simulated(out)


def test_cli_quantize_and_eval(src, tmp_path, calib_file, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["quantize", str(src), str(out), "--weights", "gptq", "--calib", calib_file,
                     "--calib-tokens", "128", "--calib-seq-len", "64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == "gptq" and summary["calib_tokens"] == 128
    assert cli.main(["eval", str(out), "--data", calib_file, "--seq-len", "64", "--windows", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 3 * 63 and res["ppl"] > 1 and {"ppl", "tokens", "seconds"} <= set(res)
    assert cli.main(["eval", str(tmp_path / "missing"), "--data", calib_file]) == 2


def test_asymmetric_activations_end_to_end(src, tmp_path, calib_file, capsys):
    """`--act-asymmetric` writes act_symmetric: false, and the simulation quantizes every linear's
    input with a zero point: a layer's output is the asymmetric reference composition, and the
    logits differ from the symmetric checkpoint made from the same weights."""
    out = tmp_path / "asym"
    assert cli.main(["quantize", str(src), str(out), "--weights", "rtn", "--act-asymmetric", "--calib-seq-len", "64",
                     "--calib-tokens", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["act_symmetric"] is False
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["act_symmetric"] is False
    sym = tmp_path / "sym"
    _quantize(src, sym, weights="rtn")
    assert load_file(sym / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()
    sim = load_simulated(out, torch.float32)
    lin = sim.model.layers[0].mlp.down_proj
    assert lin.act_symmetric is False and lin.w_sum is not None
    x = torch.randn(5, lin.in_features) + 0.5
    from vllm_rotquant.kernels import ops
    q, s, z = ops.hadamard_quant_asym(x, lin.hadamard_block, lin.clip, 4)
    want = ((q.float() - z.float()) * s) @ dequantize(lin.w_int, lin.scale).float().T
    assert torch.allclose(lin(x), want, rtol=1e-4, atol=1e-4)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    a, b = _logits(sim, ids), _logits(load_simulated(sym, torch.float32), ids)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_layer_runner_store_choice_and_outputs(src):
    """Hidden states stay on the host without an accelerator; a bad store name is named; the
    preallocated layer outputs equal the layer's own forward."""
    from vllm_rotquant.offline import calibrate

    assert calibrate.choose_store("auto", "cpu", 1 << 40) == torch.device("cpu")
    with pytest.raises(ValueError, match="store must be auto, cpu or device, not 'gpu'"):
        calibrate.choose_store("gpu", "cpu", 1)
    model = load_hf_model(src)
    ids = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(1))
    inputs = calibrate.capture_first_layer_inputs(model, ids, "cpu", batch_size=2)
    layer = arch_of(model).decoder_layers(model)[0]
    out = calibrate.run_layer(layer, inputs)
    with torch.no_grad():
        ref = model.model.layers[0](inputs.hidden, **inputs.kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_block_hadamard_rows_chunked_equals_whole_and_names_bad_block():
    from vllm_rotquant.kernels.hadamard import hadamard_matrix

    x = torch.randn(3, 7, 192, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    h = torch.block_diag(*[hadamard_matrix(64)] * 3)
    ref = x.double() @ h
    torch.testing.assert_close(rotate.block_hadamard_rows(x, 64, chunk_rows=4), ref, rtol=0, atol=1e-12)
    out = rotate.block_hadamard_rows(x, 64, torch.float32, chunk_rows=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="block 128 does not divide the last dimension 192"):
        rotate.block_hadamard_rows(x, 128)


def test_group_size_checked_before_calibration(caplog):
    """A group size that cannot split a linear's input fails up front (naming the input), one the
    CUDA GEMM cannot serve warns; SmolLM2's shapes: hidden 576, 9 heads of 64, intermediate 1536."""
    from types import SimpleNamespace

    from vllm_rotquant.offline.options import check_group_size

    cfg = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          intermediate_size=1536)
    with pytest.raises(ValueError, match=r"--group-size 128 does not divide the hidden_size .* 576"):
        check_group_size(cfg, 128, (1,))
    with pytest.raises(ValueError, match="down_proj input per rank at tp 8 = 192"):
        check_group_size(cfg.__class__(**{**vars(cfg), "hidden_size": 1024, "num_attention_heads": 16}), 128, (1, 8))
    with pytest.raises(ValueError, match="even"):
        check_group_size(cfg, 3, (1,))
    with caplog.at_level("WARNING", logger="vllm_rotquant.offline.options"):
        check_group_size(cfg, 32, (1, 3))  # 288 = 9 x 32: the GPU can serve it
        assert not caplog.records
        check_group_size(cfg, 64, (1,))  # divides 576, but not 576 / 2
    assert "CUDA INT4 GEMM cannot serve it" in caplog.text and "576" in caplog.text
    check_group_size(cfg, None, (1,))


def test_quantize_rejects_group_size_before_calibrating(tmp_path):
    from vllm_rotquant.offline.pipeline import quantize_checkpoint

    folder = build_hf_model(tmp_path / "m")
    with pytest.raises(ValueError, match="--group-size 48 does not divide"):
        quantize_checkpoint(folder, tmp_path / "out", QuantizeOptions(weights="gptq", group_size=48,
                                                                    calib="/nonexistent", calib_seq_len=64))
    assert not (tmp_path / "out").exists()


def test_cli_passes_the_dartquant_options(monkeypatch, tmp_path):
    seen = {}

    class FakeReport:
        def summary(self):
            return {"out": "o"}

    def fake_quantize(model, out, opts, overwrite=False):
        seen["opts"] = opts
        return FakeReport()

    monkeypatch.setattr(pipeline, "quantize_checkpoint", fake_quantize)
    args = cli.build_parser().parse_args(
        ["quantize", "m", str(tmp_path / "o"), "--rotation", "dartquant", "--weights", "rtn", "--dq-epochs", "3",
         "--dq-r2-epochs", "0", "--dq-lr", "0.002", "--dq-samples", "512", "--dq-outliers", "0", "--dq-starts", "2",
         "--dq-weight-rows", "0.1"])
    args.func(args)
    assert seen["opts"].dartquant == DartQuantOptions(epochs=3, r2_epochs=0, lr=0.002, samples=512, outliers=0,
                                                      starts=2, weight_rows=0.1)
