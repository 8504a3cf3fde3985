"""Declared online input transforms (issue 21): DuQuant's block rotations with a permutation and
FlatQuant's Kronecker pairs: their reference semantics, the absorption into the weights, DuQuant's
construction, the format's checks, and `rotquant quantize --method duquant | flatquant` end to
end on tiny models (the float model unchanged by the absorption, the written checkpoint simulated
as the float model with its INT4 weights and the online transforms)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_rotquant.format import (CheckpointError, InputTransform, RotQuantSpec, load_checkpoint,
                                  validate_checkpoint)
from vllm_rotquant.kernels import ops
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels.hadamard import hadamard_matrix
from vllm_rotquant.offline import pipeline, rotate, transforms as tf
from vllm_rotquant.offline.arch import arch_of
from vllm_rotquant.offline.model_io import load_hf_model
from vllm_rotquant.offline.options import QuantizeOptions, TransformOptions, default_tp_sizes
from vllm_rotquant.offline.simulate import load_simulated
from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint, dequantized_float_twin, random_transform
from vllm_rotquant.testing.hf_factory import build_hf_model

CASES = [(InputTransform("o", "block_rotation", block=32), 96), (InputTransform("down", "block_rotation", block=24), 72),
         (InputTransform("qkv", "block_rotation", block=1), 8), (InputTransform("qkv", "kronecker", factors=(6, 10)), 60),
         (InputTransform("gate_up", "kronecker", factors=(1, 7)), 7), (InputTransform("o", "kronecker", factors=(16, 16)), 256)]


def _dense(t: InputTransform, tensors: dict, k: int) -> torch.Tensor:
    """The transform as one explicit float64 matrix M (x -> x M), built from its definition."""
    d = torch.diag(tensors["diag"].double())
    if t.type == "block_rotation":
        b1 = torch.block_diag(*tensors["rot1"].double())
        p = torch.zeros(k, k, dtype=torch.float64)
        p[tensors["perm"].long(), torch.arange(k)] = 1.0  # (y P)[:, j] = y[:, perm[j]]
        return d @ b1 @ p @ torch.block_diag(*tensors["rot2"].double())
    return d @ torch.kron(tensors["left"].double(), tensors["right"].double())


@pytest.mark.parametrize("t,k", CASES, ids=lambda v: str(v))
def test_reference_transform_is_its_definition(t, k):
    g = torch.Generator().manual_seed(k)
    tensors = random_transform(t, k, 1, g)
    m = _dense(t, tensors, k)
    for shape in ((1, k), (5, k), (2, 3, k)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        got = ref.input_transform_ref(x, t.type, tensors)
        assert got.dtype == torch.float32 and got.shape == x.shape
        want = x.double() @ m
        assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()
        assert torch.equal(ops.input_transform(x, t.type, tensors), got)  # the custom op is the reference


@pytest.mark.parametrize("t,k", CASES, ids=lambda v: str(v))
def test_absorbed_weight_keeps_the_product(t, k):
    """x M (W M^-T)^T = x W^T: the float model is unchanged by the transform pair."""
    g = torch.Generator().manual_seed(k + 1)
    tr = tf.Transform(t, random_transform(t, k, 1, g))
    w = torch.randn(11, k, generator=g, dtype=torch.float64)
    x = torch.randn(4, k, generator=g, dtype=torch.float64)
    got = tr.apply(x).double() @ tr.absorb(w).T
    assert (got - x @ w.T).abs().max() < 1e-4 * (x @ w.T).abs().max()


def test_duquant_construction():
    g = torch.Generator().manual_seed(0)
    # Householder steps: e_c goes to the uniform direction, orthogonally
    h = tf._householder_to_uniform(torch.tensor([0, 5, 7]), 8)
    assert torch.allclose(h @ h.mT, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-12)
    assert torch.allclose(h[torch.arange(3), torch.tensor([0, 5, 7])], torch.full((3, 8), 8 ** -0.5, dtype=torch.float64))
    # the greedy rotation is orthogonal per block and lowers each block's maximum on spiky data
    s = torch.randn(64, 96, generator=g, dtype=torch.float64)
    s[:, 3] *= 30.0
    s[:, 50] *= 20.0
    rot = tf.greedy_block_rotation(s, 32, 8)
    assert torch.allclose(rot @ rot.mT, torch.eye(32, dtype=torch.float64).expand(3, 32, 32), atol=1e-10)
    after = torch.einsum("ngi,gij->ngj", s.reshape(64, 3, 32), rot).abs().amax(dim=(0, 2))
    before = s.reshape(64, 3, 32).abs().amax(dim=(0, 2))
    assert (after[:2] < 0.5 * before[:2]).all() and (after <= before).all()
    # zigzag: a permutation, each block gets one of the largest channels, rank-local with chunk
    m = torch.rand(96, generator=g)
    perm = tf.zigzag_permutation(m, 16, 48).long()
    assert torch.equal(torch.sort(perm).values, torch.arange(96))
    assert torch.equal(perm // 48, torch.arange(96) // 48)
    top = set(torch.argsort(m[:48], descending=True)[:3].tolist())
    assert all(len(top & set(perm[b * 16:(b + 1) * 16].tolist())) == 1 for b in range(3))
    # blocks and factors the calibrator picks, and their refusals
    assert tf.duquant_block("o", 576, (1,), None) == 96 and tf.duquant_block("down", 11008, (1, 2, 4, 8), None) == 86
    assert tf.kronecker_factors(576, "qkv") == (24, 24) and tf.kronecker_factors(14336, "down") == (112, 128)
    with pytest.raises(ValueError, match="no factorisation"):
        tf.kronecker_factors(2 * 131, "down")
    with pytest.raises(ValueError, match="--tf-block 100"):
        tf.duquant_block("qkv", 576, (1,), 100)


def test_options_and_tp_rules(src):
    with pytest.raises(ValueError, match="--method"):
        QuantizeOptions(method="quarot")
    with pytest.raises(ValueError, match="--tf-kinds"):
        QuantizeOptions(method="duquant", transform=TransformOptions(kinds=("qkv", "attn")))
    with pytest.raises(ValueError, match="--tf-alpha"):
        TransformOptions(alpha=1.5)
    cfg = load_hf_model(src).config
    assert QuantizeOptions(method="flatquant").tp_sizes_for(cfg) == (1,)  # Kronecker on o/down: tp 1 only
    assert QuantizeOptions(method="flatquant", transform={"kinds": ("qkv", "gate_up")}).tp_sizes_for(cfg) == \
        default_tp_sizes(cfg) != (1,)
    with pytest.raises(ValueError, match="serves tp 1 only"):
        QuantizeOptions(method="flatquant", tp_sizes=(1, 2), device="cpu", calib_seq_len=64).check_model(cfg)
    assert QuantizeOptions().transform_kinds == () and QuantizeOptions(method="duquant").transform_kinds[-1] == "down"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def src(request, tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp(request.param), request.param)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("method", ["duquant", "flatquant"])
def test_calibrated_transforms_leave_the_float_model_unchanged(src, method, calib_file, monkeypatch):
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    passes = []
    run_layer = tf.calibrate.run_layer
    monkeypatch.setattr(tf.calibrate, "run_layer", lambda *a, **kw: passes.append(1) or run_layer(*a, **kw))
    model = load_hf_model(src)
    rotate.fold_norms(model)
    before = _logits(model, ids)
    opts = QuantizeOptions(method=method, calib=calib_file, calib_tokens=256, calib_seq_len=64, batch_size=2,
                           device="cpu", tp_sizes=(1,), transform={"epochs": 2})
    windows = pipeline.calibration_windows(load_tokenizer_of(src), opts)
    handles, found, record = tf.calibrate_transforms(model, windows, opts, (1,))
    assert len(found) == 4 * model.config.num_hidden_layers and record["method"] == method
    assert len(handles) == 7 * model.config.num_hidden_layers  # every reader of every input is hooked
    if method == "duquant":  # the statistics pass gives the next layer's inputs: one pass a layer
        assert len(passes) == model.config.num_hidden_layers
    after = _logits(model, ids)
    assert (after - before).abs().max() < 1e-3 * before.abs().max()
    t = found[(0, "qkv")]
    assert t.spec.type == ("block_rotation" if method == "duquant" else "kronecker")
    if method == "flatquant":  # trained: moved away from its (Hadamard) start
        n1 = t.tensors["left"].shape[0]
        assert not torch.allclose(t.tensors["left"], tf._start(n1), atol=1e-4)
        assert torch.equal(tf._start(8), hadamard_matrix(8, torch.float32)) and torch.equal(tf._start(7), torch.eye(7))


def load_tokenizer_of(path):
    from vllm_rotquant.offline.model_io import load_tokenizer

    return load_tokenizer(path)


@pytest.mark.parametrize("method", ["duquant", "flatquant"])
def test_written_checkpoint_simulates_the_transformed_model(src, method, tmp_path, calib_file):
    """W4A16: the simulation of the written checkpoint == the fp rotated model with the stored INT4
    weights de-quantized and the stored transforms hooked before every reader (names, semantics
    and the absorbed weights all agree); W4A4 serves through the same transforms."""
    out = tmp_path / method
    opts = QuantizeOptions(method=method, act_bits=16, calib=calib_file, calib_tokens=256, calib_seq_len=64,
                           batch_size=2, device="cpu", tp_sizes=(1,), transform={"epochs": 1})
    pipeline.quantize_checkpoint(src, out, opts)
    sim = load_simulated(out, torch.float32)
    spec = sim.rotquant_spec
    assert {t.kind for t in spec.input_transforms} == {"qkv", "o", "gate_up", "down"}
    assert spec.down_proj_block is None and spec.calibration["transforms"]["method"] == method
    tensors = load_file(out / "model.safetensors")
    model = dequantized_float_twin(src, tensors, None)
    arch = arch_of(model)
    from vllm_rotquant.format import TRANSFORM_OWNERS, TRANSFORM_PREFIX
    for i, layer in enumerate(arch.decoder_layers(model)):
        for t in spec.input_transforms:
            stem = f"model.layers.{i}.{TRANSFORM_OWNERS[t.kind]}.{TRANSFORM_PREFIX}"
            tr = tf.Transform(t, {leaf: tensors[stem + leaf] for leaf in t.leaves})
            for path in tf.kind_readers(arch)[t.kind]:
                arch.get(layer, path).register_forward_pre_hook(tf.OnlineTransform(tr))
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(sim, ids), _logits(model, ids), atol=2e-3, rtol=1e-3)
    # the same checkpoint at W4A4 (the served transforms, then the 4-bit quantizer) runs and differs
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["act_bits"] = 4
    (out / "config.json").write_text(json.dumps(cfg))
    a4 = _logits(load_simulated(out, torch.float32), ids)
    assert torch.isfinite(a4).all() and not torch.allclose(a4, _logits(sim, ids), atol=1e-2)


# ----------------------------------------------------------------------------- format checks
def _transformed(tmp_path, name="ckpt", **kw):
    spec = RotQuantSpec(qk_block=32, tp_sizes=kw.pop("tp_sizes", (1, 2)), input_transforms=kw.pop("transforms", (
        InputTransform("o", "block_rotation", block=32), InputTransform("qkv", "kronecker", factors=(8, 16)))), **kw)
    return build_tiny_checkpoint(tmp_path / name, spec=spec, seed=2)


def _edit_tensor(folder, name, fn):
    f = folder / "model.safetensors"
    t = load_file(f)
    t[name] = fn(t[name])
    save_file(t, str(f), metadata={"format": "pt"})


def test_format_round_trip_and_value_checks(tmp_path):
    ckpt = _transformed(tmp_path)
    spec = validate_checkpoint(ckpt).spec
    assert spec.transform_for("self_attn.qkv_proj").factors == (8, 16)
    assert spec.transform_for("model.layers.1.self_attn.o_proj").block == 32
    assert spec.transform_for("mlp.down_proj") is None and spec.down_proj_block is None
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["tp_sizes"] == [1, 2]
    load_checkpoint(ckpt)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    _edit_tensor(bad, "model.layers.1.self_attn.o_proj.transform_perm", lambda p: torch.zeros_like(p))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.o_proj.transform_perm: not a permutation"):
        load_checkpoint(bad)
    shutil.rmtree(bad)
    shutil.copytree(ckpt, bad)  # a permutation across the two ranks of tp 2
    _edit_tensor(bad, "model.layers.0.self_attn.o_proj.transform_perm", lambda p: p.flip(0).contiguous())
    with pytest.raises(CheckpointError, match="moves columns between tensor-parallel ranks at tp 2"):
        load_checkpoint(bad)
    shutil.rmtree(bad)
    shutil.copytree(ckpt, bad)
    _edit_tensor(bad, "model.layers.0.self_attn.q_proj.transform_left", lambda p: p[:4].contiguous())
    with pytest.raises(CheckpointError, match="transform_left' has shape"):
        validate_checkpoint(bad)
    shutil.rmtree(bad)
    shutil.copytree(ckpt, bad)
    _edit_tensor(bad, "model.layers.0.self_attn.q_proj.transform_diag", lambda p: p.double())
    with pytest.raises(CheckpointError, match="transform_diag' has dtype"):
        validate_checkpoint(bad)


@pytest.mark.parametrize("edit,match", [
    (lambda q: q["input_transforms"].update(o={"type": "kronecker", "factors": [8, 16]}),
     "not rank-local on a row-parallel input; this checkpoint cannot list tp 2"),
    (lambda q: q["input_transforms"].update(down={"type": "block_rotation", "block": 64}) or
     q["online_hadamard"].update(down_proj={"block": 128}), "both transform the down_proj input"),
    (lambda q: q["input_transforms"].update(qkv={"type": "givens"}), r"input_transforms.qkv: expected \{'type'"),
    (lambda q: q["input_transforms"].update(qkv={"type": "kronecker", "factors": [8, 8]}),
     "multiply to 64, not the hidden_size"),
    (lambda q: q["input_transforms"].update(o={"type": "block_rotation", "block": 48}),
     "block 48 does not divide the o_proj input per rank"),
    (lambda q: q["input_transforms"].update(attn={"type": "block_rotation", "block": 8}), "unknown input kind"),
    (lambda q: q.update(tp_sizes=[0]), "tp_sizes: expected a list of positive integers"),
])
def test_bad_transform_declarations_are_refused(tmp_path, edit, match):
    ckpt = _transformed(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(ckpt)


def test_missing_transform_tensor_is_named(tmp_path):
    ckpt = _transformed(tmp_path)
    f = ckpt / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.self_attn.q_proj.transform_right"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.q_proj.transform_right'"):
        validate_checkpoint(ckpt)
