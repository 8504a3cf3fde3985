"""Typed calibrator options: one set of defaults shared by the library and `rotquant quantize`,
and every out-of-range value refused before any work, in one line that names the option
(issue 19: `--group-size 0` used to write `group_size: 0`, `--calib-seq-len 0` raised
ZeroDivisionError, `--device tpu` a torch traceback)."""
import argparse
import dataclasses

import pytest
import torch

from vllm_rotquant.testing.hf_factory import build_hf_model
from vllm_rotquant.offline import cli, pipeline
from vllm_rotquant.offline.options import DartQuantOptions, GPTQOptions, QuantizeOptions, check_device, defaults


def _quantize_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quantize"]


def test_cli_defaults_are_the_library_defaults():
    args = cli.build_parser().parse_args(["quantize", "model", "out"])
    assert cli.quantize_options(args) == QuantizeOptions()
    d = QuantizeOptions()
    assert (d.weights, d.rotation, d.weight_bits, d.act_bits, d.calib_tokens) == ("gptq", "hadamard", 4, 4, 262144)
    assert d.dartquant == DartQuantOptions() and d.gptq == GPTQOptions()
    assert defaults(QuantizeOptions)["calib_seq_len"] == 2048


def test_quantize_help_shows_every_default():
    q = _quantize_parser()
    text = " ".join(q.format_help().split())
    assert "(default: 262144)" in text and "(default: gptq)" in text and "(default: 0.001)" in text
    for action in q._actions:
        if not action.option_strings or action.dest == "help" or action.default is False:
            continue  # flags that are off unless given
        assert action.help and "default" in action.help, action.option_strings
        if action.default is not None and not isinstance(action.default, bool):
            assert f"(default: {action.default})" in text or f"here {action.default})" in text, action.option_strings


def test_format_names_and_the_old_flags():
    args = cli.build_parser().parse_args(["quantize", "m", "o", "--a-bits", "8", "--w-bits", "4"])
    assert (args.act_bits, args.weight_bits) == (8, 4)
    opts = cli.quantize_options(cli.build_parser().parse_args(["quantize", "m", "o", "--act-bits", "16"]))
    assert opts.act_bits == 16 and not opts.tune_clip


BAD = [
    ({"group_size": 0}, "--group-size 0: must be a positive even number"),
    ({"group_size": -4}, "--group-size -4"),
    ({"group_size": 7}, "--group-size 7"),
    ({"calib_tokens": 0}, "--calib-tokens 0: expected an integer >= 1"),
    ({"calib_tokens": -5}, "--calib-tokens -5"),
    ({"calib_seq_len": 0}, "--calib-seq-len 0: expected an integer >= 2"),
    ({"calib_seq_len": 1}, "--calib-seq-len 1"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"device": "tpu"}, "--device 'tpu': expected cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, "--device 'cuda:x'"),
    ({"act_clip_ratio": 1.5}, "--act-clip"),
    ({"act_clip_ratio": 0.0}, "--act-clip"),
    ({"act_bits": 3}, "--act-bits 3"),
    ({"weight_bits": 8}, "--weight-bits 8"),
    ({"tp_sizes": (3,)}, "--tp-sizes 3: expected positive powers of two"),
    ({"tp_sizes": (1, 0)}, "--tp-sizes 1 0"),
    ({"tp_sizes": ()}, "--tp-sizes"),
    ({"rotation": "spin"}, "--rotation 'spin'"),
    ({"weights": "awq"}, "--weights 'awq'"),
    ({"r4_block": 7}, "--r4-block 7: no Hadamard matrix"),
    ({"seed": 1.5}, "--seed 1.5"),
    ({"dartquant": {"epoch": 3}}, "unknown DartQuant option"),
    ({"dartquant": {"epochs": -1}}, "--dq-epochs -1"),
    ({"dartquant": {"lr": 0}}, "--dq-lr 0"),
    ({"dartquant": {"starts": 0}}, "--dq-starts 0"),
    ({"dartquant": {"store": "gpu"}}, "--dq-store 'gpu'"),
    ({"dartquant": {"outlier_weight": 0.8, "weight_rows": 0.3}}, "must be < 1"),
    ({"rotation": "dartquant", "weights": "gptq", "dartquant": {"starts": 2}}, "with --weights gptq use one start"),
    ({"gptq": {"damp": -0.1}}, "--gptq-damp -0.1"),
    ({"gptq": {"block": 0}}, "--gptq-block 0"),
    ({"act_overrides": (("mlp", 8, 1.0),)}, "--act-override .'mlp', 8, 1.0.: expected KIND=BITS"),
    ({"act_overrides": (("gate_up", 6, 1.0),)}, "--act-override .'gate_up', 6, 1.0.: expected"),
    ({"act_overrides": (("gate_up", 8, 0.0),)}, "--act-override .'gate_up', 8, 0.0.: expected"),
    ({"act_overrides": (("down", 8, 1.0), ("down", 4, 0.9))}, "--act-override: an input kind given twice"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[str(kw) for kw, _ in BAD])
def test_bad_values_are_refused_naming_the_option(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("+", r"\+")):
        QuantizeOptions(**{"device": "cpu", **kw})


def test_good_values_are_kept_and_options_are_frozen():
    opts = QuantizeOptions(device="cpu", group_size=32, tp_sizes=[1, 2], dartquant={"epochs": 2}, calib=str("x.txt"))
    assert opts.tp_sizes == (1, 2) and opts.dartquant == DartQuantOptions(epochs=2) and opts.group_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.group_size = 0
    assert opts.replace(act_clip_ratio=0.8).initial_clip == 0.8 and opts.initial_clip == 0.9
    assert QuantizeOptions(device="cpu", weights="rtn", act_clip_ratio=0.9).needs_calibration is False
    assert QuantizeOptions(device="cpu", rotation="dartquant", weights="rtn").dartquant_starts == 4
    assert QuantizeOptions(device="cpu", rotation="dartquant").dartquant_starts == 1


def test_act_override_flag_is_parsed_and_looked_up():
    args = cli.build_parser().parse_args(["quantize", "m", "o", "--act-override", "gate_up=8",
                                          "--act-override", "down=8:0.95"])
    opts = cli.quantize_options(args).replace(device="cpu")
    assert opts.act_overrides == (("gate_up", 8, 1.0), ("down", 8, 0.95))
    assert opts.act_for("mlp.up_proj", 0.75) == (8, 1.0) and opts.act_for("mlp.down_proj", 0.75) == (8, 0.95)
    assert opts.act_for("self_attn.q_proj", 0.75) == (4, 0.75)


def test_default_recipe_puts_the_mlp_input_at_8_bits_at_a4_only():
    from vllm_rotquant.offline.options import DEFAULT_ACT_OVERRIDES

    assert DEFAULT_ACT_OVERRIDES == (("gate_up", 8, 1.0),)
    assert QuantizeOptions(device="cpu").resolved_act_overrides == DEFAULT_ACT_OVERRIDES
    assert QuantizeOptions(device="cpu", act_bits=8).resolved_act_overrides == ()
    assert QuantizeOptions(device="cpu", act_bits=16).resolved_act_overrides == ()
    assert QuantizeOptions(device="cpu", act_overrides=()).resolved_act_overrides == ()
    none = cli.build_parser().parse_args(["quantize", "m", "o", "--act-override", "none"])
    assert cli.quantize_options(none).replace(device="cpu").resolved_act_overrides == ()
    plain = cli.build_parser().parse_args(["quantize", "m", "o"])
    assert cli.quantize_options(plain).act_overrides is None


def test_cuda_is_checked_when_asked_for():
    assert check_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            QuantizeOptions(device="cuda")
        with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available"):
            check_device("cuda:0")
    else:
        n = torch.cuda.device_count()
        assert check_device("cuda:0") == "cuda:0"
        with pytest.raises(ValueError, match=f"only {n} CUDA device"):
            check_device(f"cuda:{n}")


@pytest.mark.parametrize("argv,match", [
    (["--group-size", "0"], "--group-size 0: must be a positive even number"),
    (["--calib-seq-len", "0"], "--calib-seq-len 0"),
    (["--calib-tokens", "0"], "--calib-tokens 0"),
    (["--batch-size", "-1"], "--batch-size -1"),
    (["--tp-sizes", "3"], "--tp-sizes 3"),
    (["--dq-epochs", "-1"], "--dq-epochs -1"),
    (["--rotation", "dartquant", "--dq-starts", "2"], "--dq-starts 2"),
])
def test_cli_refuses_bad_options_in_one_line_before_loading(tmp_path, caplog, capsys, argv, match):
    out = tmp_path / "out"
    assert cli.main(["quantize", str(tmp_path / "no-such-model"), str(out), *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and match in errors[0] and "\n" not in errors[0], errors
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["quantize", "m", "o", "--device", "tpu"], "argument --device: 'tpu': expected cpu, cuda or cuda:N"),
    (["quantize", "m", "o", "--act-clip", "2"], "argument --act-clip"),
    (["tune-clip", "m", "--calib-seq-len", "0"], "argument --calib-seq-len"),
    (["quantize", "m", "o", "--act-override", "gate_up"], "argument --act-override: expected KIND=BITS[:CLIP]"),
])
def test_argparse_refuses_bad_values(capsys, argv, match):
    # eval's --windows / --seq-len / --device are checked by evaluate() itself (tests/test_bad_input.py)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_model_dependent_checks_name_the_option(tmp_path, calib_file, caplog):
    """Checked once the model is known, before any calibration text is read: a window longer than
    the model's positions, TP sizes its heads do not split over."""
    src = build_hf_model(tmp_path / "m")  # max_position_embeddings 512, 4 query / 2 KV heads
    with pytest.raises(ValueError, match="--calib-seq-len 1024 is longer than the model's max_position_embeddings 512"):
        pipeline.quantize_checkpoint(src, tmp_path / "o", QuantizeOptions(device="cpu", calib="/nonexistent",
                                                                          calib_seq_len=1024))
    with pytest.raises(ValueError, match="--tp-sizes 8: the model's 4 query / 2 KV heads"):
        pipeline.quantize_checkpoint(src, tmp_path / "o", QuantizeOptions(device="cpu", weights="rtn",
                                                                          act_clip_ratio=0.9, tp_sizes=(1, 8)))
    assert not (tmp_path / "o").exists()
    assert cli.main(["quantize", str(src), str(tmp_path / "o"), "--calib", calib_file, "--calib-seq-len", "1024"]) == 2
    assert "max_position_embeddings 512" in caplog.text
    # a sequence length that is not used (RTN with a fixed clip reads no text) is not refused
    report = pipeline.quantize_checkpoint(src, tmp_path / "o", QuantizeOptions(device="cpu", weights="rtn",
                                                                               act_clip_ratio=0.9, calib_seq_len=1024))
    assert report.calib_tokens == 0 and report.calib_data is None
