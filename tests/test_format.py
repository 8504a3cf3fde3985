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
    assert "act_overrides" not in spec.to_dict()  # absent unless used: older readers see the same config


def test_act_overrides_round_trip_and_lookup():
    spec = RotQuantSpec(act_bits=4, act_clip_ratio=0.75, act_overrides=(("gate_up", 8, 1.0), ("o", 16, 1.0)))
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["act_overrides"] == {"gate_up": {"act_bits": 8, "act_clip_ratio": 1.0},
                                  "o": {"act_bits": 16, "act_clip_ratio": 1.0}}
    assert RotQuantSpec.from_dict(d) == spec
    # checkpoint names, vLLM's fused names and dotted paths all find their kind
    for module, want in [("gate_proj", (8, 1.0)), ("model.layers.3.mlp.gate_up_proj", (8, 1.0)),
                         ("mlp.up_proj", (8, 1.0)), ("self_attn.o_proj", (16, 1.0)),
                         ("model.layers.0.self_attn.qkv_proj", (4, 0.75)), ("down_proj", (4, 0.75))]:
        assert spec.act_for(module) == want, module
    assert spec.describe_acts() == "A4, gate_up A8, o A16"
    with pytest.raises(CheckpointError, match="'lm_head' is not a quantized projection"):
        spec.act_for("lm_head")


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
    ({"act_overrides": {"mlp": {"act_bits": 8, "act_clip_ratio": 1.0}}}, "act_overrides.mlp: unknown input kind"),
    ({"act_overrides": {"gate_up": {"act_bits": 6, "act_clip_ratio": 1.0}}}, r"act_overrides.gate_up.act_bits: unsupported 6"),
    ({"act_overrides": {"gate_up": {"act_bits": 8, "act_clip_ratio": 0}}}, "act_overrides.gate_up.act_clip_ratio"),
    ({"act_overrides": {"gate_up": {"act_bits": 8}}}, "act_overrides.gate_up: expected"),
    ({"act_overrides": {"gate_up": 8}}, "act_overrides.gate_up: expected"),
    ({"act_overrides": ["gate_up"]}, "act_overrides: expected dict"),
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
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 1,
       "vocab_size": 100}


def _tensors(spec):
    t = {"model.embed_tokens.weight": ((100, 64), torch.bfloat16), "lm_head.weight": ((100, 64), torch.bfloat16),
         "model.norm.weight": ((64,), torch.bfloat16),
         "model.layers.0.input_layernorm.weight": ((64,), torch.bfloat16),
         "model.layers.0.post_attention_layernorm.weight": ((64,), torch.bfloat16)}
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


# ----------------------------------------------------------------------------- safetensors headers
def _raw_safetensors(path, entries: dict, data: bytes, pad_header: int = 0):
    """A safetensors file written byte by byte (to forge what the writer never produces)."""
    import struct

    header = json.dumps(entries).encode() + b" " * pad_header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_header_reader_matches_safetensors_and_records_offsets(tmp_path):
    from safetensors.torch import save_file

    from vllm_rotquant.format import read_safetensors_header

    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.bfloat16),
         "c": torch.zeros(0, 4, dtype=torch.uint8), "d": torch.tensor(3, dtype=torch.int64)}
    save_file(t, str(tmp_path / "x.safetensors"))
    info = read_safetensors_header(tmp_path / "x.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in info.items()} == {k: (tuple(v.shape), v.dtype) for k, v in t.items()}
    raw = (tmp_path / "x.safetensors").read_bytes()
    a = info["a"]
    assert torch.equal(torch.frombuffer(bytearray(raw[a.begin:a.end]), dtype=torch.float32).reshape(2, 3), t["a"])


@pytest.mark.parametrize("entries, data, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
     b"\0" * 16, r"bytes 8\.\.12 of the data before tensor 'b' belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     b"\0" * 12, "tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "the last 4 bytes of the file belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, r"shape \[3\] of F32 needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated: .*tensor 'a' is cut off"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", "tensor 'a': unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a list of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "are not \\[begin, end\\]"),
    ({"a": [1, 2]}, b"", "header entry is not an object"),
])
def test_header_reader_refuses_what_the_format_forbids(tmp_path, entries, data, match):
    from vllm_rotquant.format import read_safetensors_header

    f = _raw_safetensors(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: not a readable safetensors file .*{match}"):
        read_safetensors_header(f)


def test_header_length_is_bounded_before_reading(tmp_path, monkeypatch):
    import builtins
    import struct

    from vllm_rotquant.format import MAX_HEADER_BYTES, read_safetensors_header

    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    reads = []
    real_open = builtins.open

    def spy_open(*a, **k):
        fh = real_open(*a, **k)
        real_read = fh.read
        fh.read = lambda n=-1: reads.append(n) or real_read(n)
        return fh

    monkeypatch.setattr(builtins, "open", spy_open)
    with pytest.raises(CheckpointError, match="exceeds the format's limit"):
        read_safetensors_header(f)
    assert reads == [8]  # nothing but the length was read (or allocated)


def test_shards_index_and_duplicates(tmp_path):
    from safetensors.torch import save_file

    from vllm_rotquant.format import INDEX_FILE, read_safetensors_headers

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    assert set(read_safetensors_headers(tmp_path)) == {"a", "b"}
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map lists tensor 'c' that no"):
        read_safetensors_headers(tmp_path)
    index["weight_map"] = {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map puts tensor 'a' in 'model-00002-of-00002.safetensors'"):
        read_safetensors_headers(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-extra.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'a' is also in model-00001-of-00002.safetensors"):
        read_safetensors_headers(tmp_path)


def test_first_nonfinite_scans_in_chunks():
    from vllm_rotquant.format import first_nonfinite

    x = torch.zeros(1000, dtype=torch.bfloat16)
    assert first_nonfinite(x, chunk=64) is None
    x[700], x[900] = float("inf"), float("nan")
    assert first_nonfinite(x, chunk=64) == (2, 700)


# ----------------------------------------------------------------------------- model config rules
@pytest.mark.parametrize("spec_kw, cfg_over, match", [
    ({"group_size": 32, "tp_sizes": (1, 2, 4)}, {}, "group_size 32 does not divide the o_proj input per rank at tp 4 = 16"),
    ({"group_size": 128}, {}, r"group_size 128 does not divide the hidden_size \(q/k/v/gate/up input\) = 64"),
    ({"group_size": 16, "tp_sizes": (1, 8)}, {"num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16},
     "group_size 16 does not divide the down_proj input per rank at tp 8 = 24"),
    ({"tp_sizes": (1, 3)}, {}, "lists tp 3, but num_attention_heads 4 / num_key_value_heads 2 cannot be split over 3"),
    ({"down_proj_block": 64, "tp_sizes": (1, 2)}, {}, "block 64 does not divide intermediate_size/tp = 192/2"),
    ({"qk_block": 32}, {}, "qk.block 32 does not divide head_dim 16"),
    ({}, {"hidden_size": 0}, "hidden_size: expected a positive integer"),
    ({}, {"num_hidden_layers": "2"}, r"num_hidden_layers: expected a positive integer \(got '2'\)"),
    ({}, {"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide num_attention_heads 4"),
])
def test_check_model_config_enforces_every_tp_rule(spec_kw, cfg_over, match):
    spec = RotQuantSpec(**spec_kw)
    with pytest.raises(CheckpointError, match=match):
        spec.check_model_config({**CFG, **cfg_over})


def test_qwen2_biases_and_tied_lm_head():
    from vllm_rotquant.format import expected_tensors

    spec = RotQuantSpec()
    qwen = dict(CFG, architectures=["Qwen2ForCausalLM"])
    t = _tensors(spec)
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.q_proj.bias'"):
        validate_tensors(spec, qwen, t, "ckpt")
    for p in ("q_proj", "k_proj", "v_proj"):
        t[f"model.layers.0.self_attn.{p}.bias"] = ((expected_tensors(spec, qwen)[f"model.layers.0.self_attn.{p}.bias"][0]),
                                                   torch.bfloat16)
    validate_tensors(spec, qwen, t, "ckpt")
    t["model.layers.0.self_attn.o_proj.bias"] = ((64,), torch.bfloat16)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
        validate_tensors(spec, qwen, t, "ckpt")
    llama_bias = dict(CFG, attention_bias=True)
    assert "model.layers.0.self_attn.o_proj.bias" in expected_tensors(spec, llama_bias)
    t = _tensors(spec)
    del t["lm_head.weight"]
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        validate_tensors(spec, CFG, t, "ckpt")
    validate_tensors(spec, dict(CFG, tie_word_embeddings=True), t, "ckpt")


# ----------------------------------------------------------------------------- config updates
def test_update_config_is_atomic_and_validated(tmp_path, monkeypatch):
    from vllm_rotquant import format as fmt

    cfg = dict(CFG, quantization_config=_spec_dict())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    fmt.update_config(tmp_path, lambda c: c["quantization_config"].update(act_clip_ratio=0.75))
    assert fmt.read_config(tmp_path)["quantization_config"]["act_clip_ratio"] == 0.75
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"\(after the update\)\.act_clip_ratio: must be in \(0, 1\], got 1.5"):
        fmt.update_config(tmp_path, lambda c: c["quantization_config"].update(act_clip_ratio=1.5))
    assert (tmp_path / "config.json").read_text() == before

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fmt.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        fmt.update_config(tmp_path, lambda c: c["quantization_config"].update(act_clip_ratio=0.5))
    assert (tmp_path / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary left


def test_incomplete_marker_refused_except_for_its_writer(tmp_path):
    from vllm_rotquant import format as fmt

    fmt.mark_incomplete(tmp_path)
    fmt.check_complete(tmp_path)  # this process is writing it (the clip search reads it)
    info = fmt.read_incomplete_marker(tmp_path)
    (tmp_path / fmt.INCOMPLETE_MARKER).write_text(json.dumps({**info, "pid": info["pid"] + 1}))
    with pytest.raises(CheckpointError, match=f"an incomplete `rotquant quantize` output \\(pid {info['pid'] + 1} on"):
        fmt.check_complete(tmp_path)
    (tmp_path / fmt.INCOMPLETE_MARKER).write_text("garbage")
    with pytest.raises(CheckpointError, match="an incomplete `rotquant quantize` output: the run was interrupted"):
        fmt.check_complete(tmp_path)
