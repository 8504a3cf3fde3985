"""The activation clip search (`--act-clip auto`, `rotquant tune-clip`)."""
import json

import pytest
import torch

from vllm_rotquant.offline import act_clip, cli, data, pipeline
from vllm_rotquant.offline.evaluate import perplexity
from vllm_rotquant.offline.model_io import load_tokenizer
from vllm_rotquant.format import CheckpointError
from vllm_rotquant.offline.options import QuantizeOptions
from vllm_rotquant.offline.simulate import load_simulated


@pytest.mark.parametrize("best", act_clip.GRID)
def test_descend_finds_the_minimum_of_a_unimodal_loss(best):
    calls = []

    def loss(c):
        calls.append(c)
        return (c - best) ** 2 + 0.01 * c  # unimodal on the grid, minimum at `best`

    found, scores = act_clip.descend(loss)
    assert found == best
    assert len(calls) == len(set(calls)) == len(scores)  # every clip scored once
    # a walk, not the whole grid: the path from 0.9 to the minimum plus `patience` probes past it
    # (and as many the wrong way first when the minimum lies above 0.9)
    assert len(calls) <= round(abs(best - act_clip.START) / 0.05) + 1 + 2 * act_clip.PATIENCE
    assert scores[found] == min(scores.values())


def test_descend_walks_over_a_bump_but_not_a_wall_and_rejects_nan():
    # SmolLM2 seed 0's calibration loss: a bump at 0.8 hides the minimum at 0.75
    table = {0.95: 4.3596, 0.9: 4.2655, 0.85: 4.2466, 0.8: 4.2487, 0.75: 4.2216, 0.7: 4.2559, 0.65: 4.3, 0.6: 0.0}
    found, scores = act_clip.descend(table.__getitem__)
    assert found == 0.75 and set(scores) == {0.9, 0.85, 0.8, 0.75, 0.7, 0.65}  # 0.6 is two misses away
    found, scores = act_clip.descend(table.__getitem__, patience=1)
    assert found == 0.85 and set(scores) == {0.9, 0.85, 0.8}
    # nothing better below 0.9: the walk turns up the grid
    found, scores = act_clip.descend(lambda c: abs(c - 1.0))
    assert found == 1.0 and set(scores) == {0.9, 0.85, 0.8, 0.95, 1.0}
    with pytest.raises(FloatingPointError, match="clip 0.85"):
        act_clip.descend(lambda c: float("nan") if c == 0.85 else 1.0)
    with pytest.raises(ValueError, match="grid"):
        act_clip.descend(lambda c: 0.0, start=0.42)


def test_score_windows_takes_enough_whole_windows():
    w = torch.zeros(10, 512, dtype=torch.long)
    assert act_clip.score_windows(w, 4096).shape == (8, 512)
    assert act_clip.score_windows(w, 100).shape == (1, 512)
    assert act_clip.score_windows(torch.zeros(3, 2048, dtype=torch.long), 10**6).shape == (3, 2048)


def _quantize(src, out, overwrite=False, **kw):
    opts = QuantizeOptions(**{"calib_tokens": 256, "calib_seq_len": 64, "batch_size": 2, "device": "cpu", **kw})
    return pipeline.quantize_checkpoint(src, out, opts, overwrite=overwrite)


def test_auto_clip_is_searched_written_and_served(hf_llama, tmp_path, calib_file):
    """The default searches the clip: the written ratio is the lowest-loss one of those scored, the
    record says so, and the served arithmetic at that ratio reproduces the recorded loss."""
    out = tmp_path / "auto"
    report = _quantize(hf_llama, out, weights="gptq", calib=calib_file)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    rec = qc["calibration"]["act_clip"]
    nll = {float(k): v for k, v in rec["nll"].items()}
    assert 0.9 in nll and len(nll) >= 2
    assert qc["act_clip_ratio"] == rec["chosen"] == report.act_clip_ratio == min(nll, key=nll.get)
    sim = load_simulated(out, torch.bfloat16)
    # the default recipe's gate_up inputs keep their own 8-bit clip (act_overrides); the rest take the searched one
    assert {m.clip for m in sim.modules() if getattr(m, "clip_searched", False)} == {rec["chosen"]}
    assert {(m.act_bits, m.clip) for m in sim.modules() if hasattr(m, "clip") and not m.clip_searched} == {(8, 1.0)}
    ids = data.tokenize(load_tokenizer(hf_llama), data.load_text(calib_file))
    win = act_clip.score_windows(data.calibration_windows(ids, 64, 256, 0))
    assert rec["tokens"] == win.numel()
    assert perplexity(sim, win, 1, progress=False)["nll"] == pytest.approx(nll[rec["chosen"]], abs=1e-4)


def test_fixed_clip_and_a16_are_not_searched(hf_llama, tmp_path, calib_file, monkeypatch):
    monkeypatch.setattr(act_clip, "search", lambda *a, **k: pytest.fail("searched a fixed clip"))
    for kw in ({"act_clip_ratio": 0.8}, {"act_bits": 16}):
        out = tmp_path / "fixed"
        _quantize(hf_llama, out, weights="rtn", calib=calib_file, overwrite=True, **kw)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["act_clip_ratio"] == kw.get("act_clip_ratio", act_clip.START)
        assert "act_clip" not in qc["calibration"] and qc["calibration"]["data"] is None  # no text was read
    with pytest.raises(ValueError, match="act_clip_ratio"):
        _quantize(hf_llama, tmp_path / "bad", act_clip_ratio=1.5)
    assert not (tmp_path / "bad").exists()


def test_failed_search_leaves_no_checkpoint(hf_llama, tmp_path, calib_file, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(act_clip, "search", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        _quantize(hf_llama, tmp_path / "ckpt", weights="rtn", calib=calib_file)
    assert list(tmp_path.iterdir()) == []


def test_cli_act_clip_values_and_tune_clip(hf_llama, tmp_path, calib_file, capsys, caplog):
    out = tmp_path / "ckpt"
    assert cli.main(["quantize", str(hf_llama), str(out), "--weights", "rtn", "--act-clip", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["act_clip_ratio"] == 0.5
    with pytest.raises(SystemExit):
        cli.main(["quantize", str(hf_llama), str(out), "--act-clip", "1.5"])
    assert "expected 'auto' or a number in (0, 1]" in capsys.readouterr().err
    # tune an existing checkpoint in place
    assert cli.main(["tune-clip", str(out), "--calib", calib_file, "--calib-seq-len", "64", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["act_clip_ratio"] == rec["chosen"] and qc["calibration"]["act_clip"] == rec
    assert rec["chosen"] in act_clip.GRID and "0.90" in rec["nll"]
    assert cli.main(["tune-clip", str(hf_llama), "--calib", calib_file]) == 2  # not a rotquant checkpoint
    assert "not a rotquant checkpoint" in caplog.text


def test_set_clip_goes_through_update_config(tmp_path, monkeypatch):
    """The clip is written through the format module (validated, one rename), not by hand."""
    from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint
    from vllm_rotquant import format as fmt

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt")
    calls = []
    real = fmt.update_config
    monkeypatch.setattr(act_clip, "update_config", lambda *a: calls.append(a) or real(*a))
    act_clip.set_clip(ckpt, 0.8, {"chosen": 0.8})
    qc = fmt.read_config(ckpt)["quantization_config"]
    assert calls and qc["act_clip_ratio"] == 0.8 and qc["calibration"]["act_clip"] == {"chosen": 0.8}
    fmt.validate_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"act_clip_ratio: must be in \(0, 1\], got 0.0"):
        act_clip.set_clip(ckpt, 0.0)
    assert fmt.read_config(ckpt)["quantization_config"]["act_clip_ratio"] == 0.8  # unchanged
    fmt.update_config(ckpt, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="no quantization_config to set the activation clip in"):
        act_clip.set_clip(ckpt, 0.8)


def test_simulated_model_holds_the_packed_codes(hf_llama, tmp_path):
    """The clip search's model keeps each linear's codes packed as the checkpoint stores them (a
    7B model's int8 codes would be 6 GiB more on the host): the buffers are the file's uint8
    tensors, and the codes the CPU reference multiplies are exactly their unpacking."""
    from safetensors.torch import load_file

    from vllm_rotquant.format import unpack_int4
    from vllm_rotquant.offline.simulate import SimQuantLinear

    out = tmp_path / "rtn"
    _quantize(hf_llama, out, weights="rtn", act_clip_ratio=0.9)
    stored = load_file(out / "model.safetensors")
    sim = load_simulated(out, torch.float32)
    lins = {n: m for n, m in sim.named_modules() if isinstance(m, SimQuantLinear)}
    assert lins
    for name, lin in lins.items():
        assert "w_int" not in dict(lin.named_buffers())
        assert lin.w_packed.dtype == torch.uint8 and torch.equal(lin.w_packed, stored[f"{name}.weight_packed"])
        assert torch.equal(lin.w_int, unpack_int4(stored[f"{name}.weight_packed"]))
        assert (lin.out_features, lin.in_features) == lin.w_int.shape
