"""Architecture mappings (offline/arch.py) and the model-level API (`quantize_model`).

Each mapping must name exactly the modules a transformers model of that architecture has, and its
quantized linears must be the checkpoint format's; the rotations applied through it must leave the
fp model's logits unchanged (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with per-head q/k
norms); `quantize_checkpoint` must be `quantize_model` plus the write."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_rotquant.testing.ckpt_factory import load_dequantized_weights
from vllm_rotquant.testing.hf_factory import ARCHS, build_hf_model, build_hf_module
from vllm_rotquant import format as fmt
from vllm_rotquant.offline import pipeline, rotate
from vllm_rotquant.offline.arch import LLAMA, MAPPINGS, arch_of
from vllm_rotquant.offline.options import QuantizeOptions, default_tp_sizes
from vllm_rotquant.offline.rotate import Rotations, apply_rotations

OFFLINE = Path(__file__).resolve().parents[1] / "offline"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("name", ARCHS)
def test_mapping_names_every_module_of_the_transformers_model(name):
    model = build_hf_module(name)
    arch = arch_of(model)  # built in memory: no config.architectures, the class name is used
    assert arch.name == type(model).__name__ and arch is MAPPINGS[type(model).__name__]
    arch.check(model)
    # the quantized linears are the checkpoint format's, under the same names
    assert sorted(arch.quantized) == sorted(fmt.linear_shapes(model.config.to_dict()))
    for layer in arch.decoder_layers(model):
        with_params = {n for n, m in layer.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
        assert with_params == {arch.attn_norm, arch.mlp_norm, *arch.quantized, *arch.untouched}
        assert {p for p, lin in arch.quantized_linears(layer) if lin.bias is not None} == set(arch.biases)
    for path in (arch.embeddings, arch.final_norm, arch.lm_head, arch.rotary):
        arch.get(model, path)


def test_unknown_architecture_and_wrong_mapping_are_named():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        arch_of(SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    model = build_hf_module("llama")
    with pytest.raises(ValueError, match="decoder layer 0 has no module 'self_attn.out_proj'"):
        dataclasses.replace(LLAMA, o_proj="self_attn.out_proj").check(model)


@pytest.mark.parametrize("name", ARCHS)
def test_rotations_through_the_mapping_keep_the_logits(name):
    """Fold + R1 + R2 + R4 (online twin) applied by `apply_rotations`: the fp model is unchanged.
    Qwen3's q/k norms act on q_proj / k_proj outputs, which R1 (absorbed on their input side)
    does not change: they are left as they are."""
    model = build_hf_module(name)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    q_norm = [layer.self_attn.q_norm.weight.clone() for layer in model.model.layers] if name == "qwen3" else []
    rotate.fold_norms(model)
    block = pipeline.plan_r4_block(model.config, default_tp_sizes(model.config), None)
    handles = apply_rotations(model, Rotations.hadamard(model.config, 3, r4_block=block), online=True)
    assert len(handles) == model.config.num_hidden_layers
    out = _logits(model, ids)
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    for layer, before in zip(model.model.layers, q_norm):
        assert torch.equal(layer.self_attn.q_norm.weight, before) and not torch.all(before == 1)
    for h in handles:
        h.remove()
    assert (_logits(model, ids) - ref).abs().max() > 1e-2 * ref.abs().max()  # R4 is absorbed: its twin matters


def test_quantize_checkpoint_is_quantize_model_plus_the_write(tmp_path, calib_file):
    """The same tensors from the folder and from the in-memory model (loaded and tokenized as the
    wrapper does); the in-memory call takes windows instead of a tokenizer too."""
    from vllm_rotquant.offline import data
    from vllm_rotquant.offline.model_io import load_hf_model, load_tokenizer

    src = build_hf_model(tmp_path / "src", "qwen2")
    opts = QuantizeOptions(weights="gptq", calib=calib_file, calib_tokens=256, calib_seq_len=64, batch_size=2,
                           act_clip_ratio=0.85, device="cpu")
    report = pipeline.quantize_checkpoint(src, tmp_path / "ckpt", opts)
    on_disk = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors, spec, mem_report = pipeline.quantize_model(load_hf_model(src), load_tokenizer(src), opts)
    assert on_disk.keys() == tensors.keys() and all(torch.equal(on_disk[k], tensors[k]) for k in tensors)
    assert spec.act_clip_ratio == 0.85 and spec.down_proj_block and spec.qk_block == 16
    assert mem_report.calib_tokens == report.calib_tokens == 256 and mem_report.out is None
    assert report.output_mb > 0 and report.write_s is not None and report.act_clip is None
    windows = data.calibration_windows(data.tokenize(load_tokenizer(src), data.load_text(calib_file)), 64, 256, 0)
    again, _, _ = pipeline.quantize_model(load_hf_model(src), None, opts, calib_windows=windows)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="need calibration text"):
        pipeline.quantize_model(load_hf_model(src), None, opts)


def test_qwen3_end_to_end_in_memory(tmp_path, monkeypatch):
    """A Qwen3 model quantized in memory, saved, and run in the served arithmetic (W4A16) equals
    the rotated fp model with the stored INT4 weights dequantized (q_norm/k_norm kept)."""
    from vllm_rotquant.offline.simulate import load_simulated

    model = build_hf_module("qwen3")
    reference = build_hf_module("qwen3")  # the same seed: the same weights
    windows = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = QuantizeOptions(weights="gptq", act_bits=16, calib_tokens=128, calib_seq_len=32, batch_size=2,
                           device="cpu")
    tensors, spec, report = pipeline.quantize_model(model, None, opts, calib_windows=windows)
    assert report.architecture == "Qwen3ForCausalLM" and spec.rotation == "hadamard"
    q_norm = tensors["model.layers.0.self_attn.q_norm.weight"]
    assert not torch.all(q_norm == 1)  # kept: no rotation acts on what it normalizes
    assert torch.all(tensors["model.layers.0.input_layernorm.weight"] == 1)  # folded
    report = pipeline.save_checkpoint(tmp_path / "ckpt", tensors, spec, report, reference.config.to_dict())
    sim = load_simulated(tmp_path / "ckpt", torch.float32)

    rotate.fold_norms(reference)
    apply_rotations(reference, Rotations.hadamard(reference.config, 0, r4_block=spec.down_proj_block), online=True)
    load_dequantized_weights(reference, tensors)
    for name, p in reference.named_parameters():
        if not name.endswith(("_proj.weight",)):
            p.data = tensors[name].float()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(sim, ids), _logits(reference, ids), atol=2e-3, rtol=1e-3)


def test_calibrator_modules_name_no_hf_attribute_paths():
    """Layer names live in offline/arch.py only (the calibrator's modules ask the mapping)."""
    pattern = re.compile(r"model\.model\b|\blayers?\.(self_attn|mlp|input_layernorm|post_attention_layernorm)\b"
                         r"|(?<!arch)\.((q|k|v|o|gate|up|down)_proj|embed_tokens|lm_head|rotary_emb)\b")
    for name in ("rotate", "calibrate", "pipeline", "dartquant", "select_rotation", "inspect_acts"):
        for i, line in enumerate((OFFLINE / f"{name}.py").read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not pattern.search(code), f"offline/{name}.py:{i}: {line.strip()}"
