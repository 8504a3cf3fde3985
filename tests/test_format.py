import json

import pytest
import torch

from vllm_rotquant.format import (CheckpointError, RotQuantSpec, linear_shapes, pack_int4, read_spec,
                                  unpack_int4, validate_tensors)


@pytest.mark.parametrize("shape", [(1, 2), (7, 10), (64, 576), (3, 1536)])
def test_pack_unpack_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    q[0, 0], q[-1, -1] = -8, 7
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_layout_is_low_nibble_first_twos_complement():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0x78]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 2))


def _spec_dict(**over):
    d = RotQuantSpec(down_proj_block=32, qk_block=16, tp_sizes=(1, 2)).to_dict()
    d.update(over)
    return d


def test_spec_round_trip():
    spec = RotQuantSpec(group_size=32, act_bits=8, act_symmetric=False, down_proj_block=192, qk_block=64,
                        tp_sizes=(1, 2, 4), calibration={"method": "gptq"})
    assert RotQuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("over, match", [
    ({"version": 2}, "version: unknown rotquant format version 2"),
    ({"act_bits": 3}, "act_bits: unsupported 3"),
    ({"weight_bits": 8}, "weight_bits: unsupported 8"),
    ({"act_clip_ratio": 1.5}, "act_clip_ratio"),
    ({"act_bits": True}, "act_bits: expected int"),
    ({"rotation": "spin"}, "rotation: unknown 'spin'"),
    ({"group_size": 3}, "group_size"),
    ({"online_hadamard": {"down_proj": {"block": 172}}}, "no Hadamard matrix of order 172"),
    ({"act_symmetric": "no"}, "act_symmetric: expected bool"),
])
def test_spec_errors_name_the_field(over, match):
    with pytest.raises(CheckpointError, match=match):
        RotQuantSpec.from_dict(_spec_dict(**over))


def test_spec_missing_field():
    d = _spec_dict()
    del d["act_bits"]
    with pytest.raises(CheckpointError, match="missing field 'act_bits'"):
        RotQuantSpec.from_dict(d)


CFG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 192,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 1}


def _tensors(spec):
    t = {}
    for name, (o, i) in linear_shapes(CFG).items():
        g = 1 if not spec.group_size else i // spec.group_size
        t[f"model.layers.0.{name}.weight_packed"] = ((o, i // 2), torch.uint8)
        t[f"model.layers.0.{name}.weight_scale"] = ((o, g), torch.float16)
    return t


def test_validate_tensors():
    spec = RotQuantSpec()
    validate_tensors(spec, CFG, _tensors(spec), "ckpt")
    bad = _tensors(spec)
    del bad["model.layers.0.mlp.down_proj.weight_scale"]
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.mlp.down_proj.weight_scale'"):
        validate_tensors(spec, CFG, bad, "ckpt")
    bad = _tensors(spec)
    bad["model.layers.0.self_attn.k_proj.weight_packed"] = ((32, 31), torch.uint8)
    with pytest.raises(CheckpointError, match=r"k_proj.weight_packed' has shape \(32, 31\), expected \(32, 32\)"):
        validate_tensors(spec, CFG, bad, "ckpt")
    bad = _tensors(spec)
    bad["model.layers.0.self_attn.q_proj.weight_packed"] = ((64, 32), torch.int8)
    with pytest.raises(CheckpointError, match="dtype torch.int8, expected torch.uint8"):
        validate_tensors(spec, CFG, bad, "ckpt")
    bad = _tensors(spec)
    bad["model.layers.0.self_attn.q_proj.weight"] = ((64, 64), torch.bfloat16)
    with pytest.raises(CheckpointError, match="unexpected unquantized tensor"):
        validate_tensors(spec, CFG, bad, "ckpt")


def test_read_spec_checks_model(tmp_path):
    cfg = dict(CFG, quantization_config=_spec_dict())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec, _ = read_spec(tmp_path)
    assert spec.down_proj_block == 32
    cfg["quantization_config"]["online_hadamard"]["down_proj"]["tp_sizes"] = [1, 4]  # 192/4 = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not divide intermediate_size/tp = 192/4"):
        read_spec(tmp_path)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_spec(tmp_path)
