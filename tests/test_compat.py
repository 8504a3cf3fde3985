"""The vLLM compatibility layer: version range, feature check, the plugin's own ignore rule."""
import pytest

from vllm_rotquant import compat
from vllm_rotquant.format import CheckpointError

MAPPING = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.mark.parametrize("text, want", [("0.24.0", (0, 24)), ("0.32.0+cpu", (0, 32)), ("0.25.0rc1", (0, 25)),
                                        ("1.0", (1, 0))])
def test_parse_version(text, want):
    assert compat.parse_version(text) == want


@pytest.mark.parametrize("version", ["0.23.1", "0.33.0", "1.0.0"])
def test_versions_outside_the_range_are_refused_with_the_range(version, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    with pytest.raises(compat.UnsupportedVllmError, match=r"supports vLLM >= 0\.24, < 0\.33.*found vLLM " + version):
        compat.check_vllm(version)


def test_override_lets_an_untested_version_through_the_range_check(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    compat.check_vllm("0.99.0")  # features are still checked: the installed vLLM has them


def test_missing_feature_is_named(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setattr(compat, "REQUIRED", compat.REQUIRED + (("vllm.model_executor.layers.linear", "NoSuchThing"),))
    with pytest.raises(compat.UnsupportedVllmError, match="lacks vllm.model_executor.layers.linear.NoSuchThing"):
        compat.check_vllm("0.32.0")


def test_installed_vllm_is_supported():
    pytest.importorskip("vllm")
    compat.check_vllm()
    assert compat.missing_features() == []


@pytest.mark.parametrize("prefix, ignore, want", [
    ("lm_head", ["lm_head"], True),
    ("model.layers.0.self_attn.o_proj", ["lm_head"], False),
    ("model.layers.0.self_attn.o_proj", ["layers.0.self_attn.o_proj"], True),
    ("model.layers.10.self_attn.o_proj", ["0.self_attn.o_proj"], False),  # dotted suffix, not substring
    ("model.layers.1.mlp.down_proj", ["down_proj"], True),
    ("model.layers.1.self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"], True),
    ("model.layers.1.self_attn.qkv_proj", ["qkv_proj"], True),
    ("model.layers.1.mlp.gate_up_proj", [], False),
])
def test_ignore_rule(prefix, ignore, want):
    assert compat.is_ignored(prefix, ignore, MAPPING) is want


def test_partly_ignored_merged_layer_is_an_error():
    with pytest.raises(CheckpointError, match="merged layer 'model.layers.0.self_attn.qkv_proj' would be partly"):
        compat.is_ignored("model.layers.0.self_attn.qkv_proj", ["k_proj"], MAPPING)
