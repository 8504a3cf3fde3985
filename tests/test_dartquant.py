"""DartQuant (issue 4): whip loss, QR-Orth, training on synthetic data, capture shapes/GQA,
determinism, and that the learned rotations are absorbed exactly (fp model unchanged)."""
from __future__ import annotations

import copy

import pytest
import torch

from vllm_rotquant.kernels.hadamard import random_hadamard
from vllm_rotquant.kernels.reference import quant_act_ref
from vllm_rotquant.offline import dartquant, rotate
from vllm_rotquant.offline.options import DartQuantOptions
from vllm_rotquant.offline.rotate import Rotations, apply_rotations


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double()
    return float((x.pow(4).mean(-1) / x.pow(2).mean(-1) ** 2).mean())


def _int4_mse(x: torch.Tensor) -> float:
    q, s = quant_act_ref(x, 0.9, 4)
    return float(((q.float() * s - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())


def _laplace_like(n: int, d: int, seed: int) -> torch.Tensor:
    """Heavy-tailed ("Laplace-like": pooled kurtosis ~7) activations -- per-token scales spread
    over an order of magnitude -- that are flat (uniform) in a hidden orthonormal basis Q: the
    rotation the whip loss should find, and that a random Hadamard misses."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(123), dtype=torch.float64))[0]
    u = (torch.rand(n, d, generator=g) * 2 - 1) * 3 ** 0.5  # uniform, unit variance
    return torch.exp(0.5 * torch.randn(n, 1, generator=g)) * (u @ q.float().T)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: extra threads only add overhead (and LAPACK QR on a busy 2-core
    machine can be 50x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- whip loss
def test_whip_loss_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_()
    loss = dartquant.whip_loss(o)
    ref = sum(sum(torch.exp(-abs(v)) for v in row) for row in o.detach()) / 37
    assert torch.allclose(loss.detach(), ref)
    loss.backward()
    expected = -torch.sign(o.detach()) * torch.exp(-o.detach().abs()) / 37
    assert torch.allclose(o.grad, expected)
    # near zero the gradient magnitude is largest (pushes small values out)
    assert expected.abs().max() <= 1 / 37 + 1e-12


def test_whip_loss_heads_layout_sums_all_channels():
    o = torch.randn(5, 3, 8, dtype=torch.float64)
    assert torch.allclose(dartquant.whip_loss(o), dartquant.whip_loss(o.reshape(5, 24)))


# ----------------------------------------------------------------------------- QR-Orth
def test_qr_orth_orthogonal_and_fixed_point():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 32, 32, generator=g, dtype=torch.float64)
    r = dartquant.qr_orth(z)
    eye = torch.eye(32, dtype=torch.float64)
    assert (r @ r.transpose(-1, -2) - eye).abs().max() < 1e-12
    # the triangular factor Q^T Z has a positive diagonal (unique QR)
    tri = r.transpose(-1, -2) @ z
    assert (torch.diagonal(tri, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(torch.tril(tri, -1), torch.zeros_like(tri), atol=1e-10)
    # an orthogonal init (the random Hadamard) is returned unchanged: training starts from it
    h = random_hadamard(64, 3)
    assert torch.allclose(dartquant.qr_orth(h), h, atol=1e-12)


def test_qr_orth_sign_fix_is_continuous():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        z = torch.randn(16, 16, generator=g, dtype=torch.float64)
        z[0, 0] = 1e-9  # where Householder QR's sign choice flips
        e = torch.randn(16, 16, generator=g, dtype=torch.float64)
        for eps in (1e-6, -1e-6):
            d = dartquant.qr_orth(z + eps * e) - dartquant.qr_orth(z)
            assert d.abs().max() < 1e-3


def test_qr_orth_gradient_flows_and_stays_orthogonal_under_sgd():
    torch.manual_seed(0)
    x = _laplace_like(512, 32, 0)
    z = torch.nn.Parameter(random_hadamard(32, 0).float())
    opt = torch.optim.SGD([z], lr=0.05, momentum=0.9)
    for _ in range(30):
        loss = dartquant.whip_loss(x @ dartquant.qr_orth(z))
        opt.zero_grad()
        loss.backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
        opt.step()
    r = dartquant.qr_orth(z.detach().double())
    assert (r @ r.T - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-12


# ----------------------------------------------------------------------------- training
def test_train_r1_lowers_loss_kurtosis_and_int4_error_on_laplace_like_data():
    x, held = _laplace_like(4096, 16, 0), _laplace_like(2048, 16, 1)
    assert (x.pow(4).mean() / x.pow(2).mean() ** 2) > 5  # heavy tails when pooled
    h = random_hadamard(16, 0)
    r, hist = dartquant.train_r1(x, h, epochs=10, lr=0.05, momentum=0.9, batch=256, seed=0)
    assert all(b < a for a, b in zip(hist, hist[1:]))  # the loss decreases every epoch
    before, after = held @ h.float(), held @ r.float()
    assert dartquant.whip_loss(after) < dartquant.whip_loss(before)
    assert _kurtosis(before) > 2.5 and _kurtosis(after) < 2.0  # toward uniform (1.8)
    assert _int4_mse(after) < 0.8 * _int4_mse(before)
    assert (r @ r.T - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12


def test_train_r2_per_layer_and_head_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((2, 1024, 4, 16)) * 0.3  # [L, N, nq, hd]
    x[..., 0] *= 5
    init = torch.stack([torch.stack([random_hadamard(16, 10 * layer + h) for h in range(2)]) for layer in range(2)])
    r, hist = dartquant.train_r2(x, init, epochs=4, lr=0.05, momentum=0.9, batch=128, seed=0)
    assert r.shape == (2, 2, 16, 16) and r.dtype == torch.float64
    assert hist[-1] < hist[0]
    eye = torch.eye(16, dtype=torch.float64)
    assert (r @ r.transpose(-1, -2) - eye).abs().max() < 1e-12
    del g


def test_rotate_heads_gqa_convention():
    x = torch.randn(7, 6, 4)  # 6 query heads, 2 KV heads -> group 3
    r2 = torch.stack([random_hadamard(4, 0), random_hadamard(4, 1)]).float()
    y = dartquant.rotate_heads(x, r2)
    for i in range(6):
        assert torch.allclose(y[:, i], x[:, i] @ r2[i // 3], atol=1e-6)
    yl = dartquant.rotate_heads_layers(x[None].expand(2, -1, -1, -1), r2[None].expand(2, -1, -1, -1))
    assert torch.allclose(yl[1], y, atol=1e-6)


# ----------------------------------------------------------------------------- on a tiny Llama
def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm gains, so folding matters
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def _inits(model, seed=0):
    nq, nkv, hd = rotate.head_geometry(model.config)
    r1 = random_hadamard(model.config.hidden_size, seed)
    r2 = [torch.stack([random_hadamard(hd, seed + 10 * i + h) for h in range(nkv)])
          for i in range(model.config.num_hidden_layers)]
    return r1, r2


def _absorbed(model, r1, r2):
    """A copy of `model` with R1 and R2 absorbed."""
    rotated = copy.deepcopy(model)
    apply_rotations(rotated, Rotations(r1=r1, r2=r2))
    return rotated


def test_learn_rotations_shapes_orthogonality_determinism_and_exact_absorption():
    model = _tiny_llama()
    rotate.fold_norms(model)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 97, (4, 32), generator=g)
    r1_init, r2_init = _inits(model)
    state = copy.deepcopy(model.state_dict())
    opts = DartQuantOptions(epochs=3, lr=0.05, samples=64, batch=32, r2_epochs=3, r2_lr=0.05, r2_batch=16,
                            capture_batch=2)
    init = Rotations(r1=r1_init, r2=r2_init)
    learned, run = dartquant.learn_rotations(model, windows, init, opts, device="cpu", seed=0)
    r1, r2 = learned.r1, learned.r2
    # the model is left as it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert r1.shape == (64, 64) and r1.dtype == torch.float64
    assert len(r2) == 2 and all(r.shape == (2, 16, 16) and r.dtype == torch.float64 for r in r2)
    assert (r1 @ r1.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-12
    for r in r2:
        assert (r @ r.transpose(-1, -2) - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12
    assert not torch.allclose(r1, r1_init)  # it learned something
    assert len(run.r1_loss) == 3 and len(run.r2_loss) == 3
    assert run.options == opts and run.layers == 2 and len(run.starts) == 1 and run.start_scores is None

    # seeded and deterministic (bitwise on the CPU)
    again, _ = dartquant.learn_rotations(model, windows, init, opts, device="cpu", seed=0)
    r1b, r2b = again.r1, again.r2
    assert torch.equal(r1, r1b) and all(torch.equal(a, b) for a, b in zip(r2, r2b))
    other, _ = dartquant.learn_rotations(model, windows, init, opts, device="cpu", seed=1)
    assert not torch.equal(r1, other.r1)

    # absorbing the learned rotations leaves the fp model's logits unchanged
    with torch.no_grad():
        ref = model(input_ids=windows).logits
        out = _absorbed(model, r1, r2)(input_ids=windows).logits
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_capture_matches_what_the_rotated_model_sees():
    """The loss rotates captured activations as x @ R1 (q_proj/up_proj inputs) and per head by
    R2 (o_proj inputs); after absorption the model's own inputs must be exactly those."""
    model = _tiny_llama(1)
    rotate.fold_norms(model)
    windows = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    r1, r2 = _inits(model, 5)
    cap = dartquant.capture(model, windows, "cpu", samples=10**6, seed=0, batch_size=2)
    assert cap.r1.shape == (2, 2, 32, 64) and cap.r2.shape == (2, 32, 4, 16)
    rotated = _absorbed(model, r1, r2)
    cap_rot = dartquant.capture(rotated, windows, "cpu", samples=10**6, seed=0, batch_size=2)
    assert torch.allclose(cap_rot.r1, cap.r1 @ r1.float(), atol=1e-4)
    for i in range(2):
        assert torch.allclose(cap_rot.r2[i], dartquant.rotate_heads(cap.r2[i], r2[i].float()), atol=1e-4)


def test_capture_subsamples_seeded_tokens():
    model = _tiny_llama(2)
    rotate.fold_norms(model)
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(4))
    a = dartquant.capture(model, windows, "cpu", samples=20, seed=0, batch_size=2)
    b = dartquant.capture(model, windows, "cpu", samples=20, seed=0, batch_size=1)
    full = dartquant.capture(model, windows, "cpu", samples=10**6, seed=0, batch_size=3)
    assert a.r1.shape == (2, 2, 20, 64)
    assert torch.allclose(a.r1, b.r1, atol=1e-5)  # independent of the forward batch size
    mask = dartquant._layer_mask(48, 20, 0, 1)
    assert torch.allclose(a.r1[1], full.r1[1][:, mask], atol=1e-5)


def test_capture_keeps_the_spikiest_tokens():
    model = _tiny_llama(3)
    rotate.fold_norms(model)
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(5))
    full = dartquant.capture(model, windows, "cpu", samples=10**6, seed=0, batch_size=2)
    cap = dartquant.capture(model, windows, "cpu", samples=8, seed=0, batch_size=1, outliers=5)
    assert cap.r1_spiky.shape == (2, 2, 5, 64) and cap.r2_spiky.shape == (2, 5, 4, 16)
    for layer in range(2):
        for j in range(2):
            x = full.r1[layer, j]
            ratio = x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()
            top = x[ratio.topk(5).indices.sort().values]
            assert torch.allclose(cap.r1_spiky[layer, j], top, atol=1e-5)


def test_outlier_oversampling_protects_a_rare_spike_token():
    """A rare 1-sparse token (an attention sink): plain whip training trades its flatness away,
    mixing in the outlier pool keeps it close to the Hadamard's perfectly flat image."""
    x = _laplace_like(4096, 16, 0)
    spike = torch.zeros(4, 16)
    spike[:, 3] = 4.0
    h = random_hadamard(16, 0)
    kw = dict(epochs=10, lr=0.05, momentum=0.9, batch=256, seed=0)
    r_plain, _ = dartquant.train_r1(torch.cat([x, spike]), h, **kw)
    r_prot, _ = dartquant.train_r1(torch.cat([x, spike]), h, spiky=spike, spiky_weight=0.3, **kw)
    assert _int4_mse(spike @ h.float()) < 0.006  # flat (only the 0.9 clip costs)
    assert _int4_mse(spike @ r_prot.float()) < 0.5 * _int4_mse(spike @ r_plain.float())
    assert _int4_mse(x @ r_prot.float()) < 0.9 * _int4_mse(x @ h.float())  # the bulk still gains


def test_weight_rows_term_flattens_the_weight_rows_too():
    """`weight_rows`: reader weight rows (rotated like tokens) share the loss; the learned R then
    flattens them more than the activation-only R does, and a share >= 1 in total is refused."""
    x = _laplace_like(4096, 16, 0)
    w = _laplace_like(512, 16, 7) @ torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))[0]
    h = random_hadamard(16, 0)
    kw = dict(epochs=10, lr=0.05, momentum=0.9, batch=256, seed=0)
    r_act, _ = dartquant.train_r1(x, h, **kw)
    r_both, _ = dartquant.train_r1(x, h, rows=w, rows_weight=0.5, **kw)
    assert dartquant.whip_loss(w @ r_both.float()) < dartquant.whip_loss(w @ r_act.float())
    assert _int4_mse(w @ r_both.float()) < _int4_mse(w @ r_act.float())
    with pytest.raises(ValueError, match="must be < 1"):
        dartquant.train_r1(x, h, rows=w, rows_weight=0.8, spiky=x[:4], spiky_weight=0.3, **kw)


def test_reader_weight_rows_are_unit_rms_rows_of_every_reader(tmp_path):
    from vllm_rotquant.testing.hf_factory import build_hf_model
    from vllm_rotquant.offline.model_io import load_hf_model

    model = load_hf_model(build_hf_model(tmp_path / "m", "llama"))
    rows = dartquant.reader_weight_rows(model)
    c = model.config
    per_layer = c.num_attention_heads * 16 + 2 * c.num_key_value_heads * 16 + 2 * c.intermediate_size
    assert rows.shape == (c.num_hidden_layers * per_layer, c.hidden_size)
    torch.testing.assert_close(rows.pow(2).mean(-1), torch.ones(rows.shape[0]))


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown DartQuant option"):
        DartQuantOptions.from_dict({"epoch": 3})


# ----------------------------------------------------------------------------- rotquant inspect
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. The quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9.\n")


def _tiny_model_folder(tmp_path):
    """A tiny Llama HF folder with a small byte-level BPE tokenizer, and a text file."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "tiny"
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, tie_word_embeddings=True,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    return folder, text


def test_inspect_quantization_errors_against_float64():
    from vllm_rotquant.offline.inspect_acts import int4_mse

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=g, dtype=torch.float64) + 0.7  # skewed: the zero point matters
    for bits in (4, 8):
        levels = 2 ** (bits - 1) - 1
        s = 0.9 * x.abs().amax(-1, keepdim=True) / levels
        sym = ((x / s).round().clamp(-levels - 1, levels) * s - x).pow(2).sum(-1) / x.pow(2).sum(-1)
        hi, lo = 0.9 * x.amax(-1, keepdim=True).clamp_min(0), 0.9 * x.amin(-1, keepdim=True).clamp_max(0)
        sa = (hi - lo) / (2 ** bits - 1)
        z = (-lo / sa).round()
        asym = (((x / sa).round() + z).clamp(0, 2 ** bits - 1) - z) * sa
        asym = (asym - x).pow(2).sum(-1) / x.pow(2).sum(-1)
        assert int4_mse(x, 0.9, bits) == pytest.approx(sym.mean().item(), rel=1e-3)
        assert int4_mse(x, 0.9, bits, symmetric=False) == pytest.approx(asym.mean().item(), rel=1e-3)
    # at 4 bits the zero point's finer step wins; at 8 bits clipping both ends costs more than it saves
    assert int4_mse(x, 0.9, 4, symmetric=False) < int4_mse(x, 0.9, 4)


def test_inspect_model_plot_and_checkpoint_recovery(tmp_path):
    pytest.importorskip("matplotlib")
    from vllm_rotquant.offline import inspect_acts, pipeline
    from vllm_rotquant.offline.options import QuantizeOptions

    folder, text = _tiny_model_folder(tmp_path)
    dq = dict(epochs=2, samples=64, batch=64, r2_epochs=2, r2_batch=32, capture_batch=2)
    for module in ("q_proj", "o_proj"):
        report, variants = inspect_acts.inspect(str(folder), layer=1, module=module, data_text=str(text),
                                                tokens=64, calib=str(text), calib_tokens=128, seq_len=32,
                                                dq_options=dq)
        assert list(report["variants"]) == ["no rotation", "random Hadamard", "DartQuant"]
        for st in report["variants"].values():
            assert st["kurtosis"] > 1 and 0 < st["int4_mse"] < 1
            # a zero point halves the step at most (range max-min instead of 2 max): never much worse
            assert 0 < st["int4_asym_mse"] < 1.05 * st["int4_mse"]
        png = tmp_path / f"{module}.png"
        inspect_acts.plot(report, variants, png)
        assert png.stat().st_size > 10_000

    # a dartquant checkpoint: its R1 is recovered from the embeddings
    ckpt = tmp_path / "ckpt"
    opts = QuantizeOptions(rotation="dartquant", weights="rtn", calib=str(text), calib_tokens=128,
                           calib_seq_len=32, dartquant=DartQuantOptions(**dq), tp_sizes=(1,), device="cpu")
    pipeline.quantize_checkpoint(folder, ckpt, opts)
    with pytest.raises(ValueError, match="--source"):
        inspect_acts.inspect(str(ckpt))
    report, _ = inspect_acts.inspect(str(ckpt), source=str(folder), layer=0, data_text=str(text), tokens=64,
                                     seq_len=32)
    assert report["checkpoint"]["rotation"] == "dartquant"
    assert "dartquant (from checkpoint)" in report["variants"]
