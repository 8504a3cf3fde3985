"""The vLLM plugin in-process, without an engine: registration, config validation, the linear
method on vLLM's own linear layers (merged qkv / gate_up, row-parallel down with R4) against the
reference arithmetic, load-time errors, and the R3 pre-hook (also under torch.compile)."""
from __future__ import annotations

import importlib.metadata
import tempfile

import pytest
import torch

pytest.importorskip("vllm")

from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint, with_config  # noqa: E402
from vllm_rotquant.format import CheckpointError, RotQuantSpec  # noqa: E402
from vllm_rotquant.kernels.hadamard import hadamard_matrix  # noqa: E402
from vllm_rotquant.kernels.ops import rotquant_linear  # noqa: E402


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's current config and a world-size-1 gloo process group, as the model loader has them."""
    import vllm_rotquant
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    vllm_rotquant.register()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp(prefix='rq_dist_')}")
        initialize_model_parallel(1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def _config(**spec_kw):
    from vllm_rotquant.config import RotQuantConfig

    return RotQuantConfig(RotQuantSpec(**{"down_proj_block": 128, "qk_block": 32, **spec_kw}))


# ----------------------------------------------------------------------------- registration
def test_entry_point_registers_rotquant():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("rotquant") == "vllm_rotquant:register"
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    load_general_plugins()  # idempotent
    import vllm_rotquant

    vllm_rotquant.register()
    from vllm_rotquant.config import RotQuantConfig

    assert QUANTIZATION_METHODS.count("rotquant") == 1
    assert get_quantization_config("rotquant") is RotQuantConfig
    assert set(RotQuantConfig.get_supported_act_dtypes()) == {torch.bfloat16, torch.float16, torch.float32}


@pytest.mark.parametrize("edit, field", [
    (lambda q: q.update(version=2), "quantization_config.version"),
    (lambda q: q.update(act_bits=3), "quantization_config.act_bits"),
    (lambda q: q.pop("weight_bits"), "missing field 'weight_bits'"),
    (lambda q: q.update(rotation="spin"), "quantization_config.rotation"),
])
def test_config_rejects_bad_quantization_config(edit, field):
    from vllm_rotquant.config import RotQuantConfig

    qcfg = RotQuantSpec(down_proj_block=128, qk_block=32).to_dict()
    edit(qcfg)
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        RotQuantConfig.from_config(qcfg)


def _drop(name):
    return lambda t, c: t.pop(name)


def _reshape(name, rows):
    return lambda t, c: t.__setitem__(name, t[name][:rows])


def _retype(name, dtype):
    return lambda t, c: t.__setitem__(name, t[name].to(dtype))


@pytest.mark.parametrize("mutate, message", [
    (_drop("model.layers.1.mlp.up_proj.weight_scale"), "missing tensor 'model.layers.1.mlp.up_proj.weight_scale'"),
    (_reshape("model.layers.0.self_attn.k_proj.weight_packed", 32),
     "tensor 'model.layers.0.self_attn.k_proj.weight_packed' has shape (32, 64), expected (64, 64)"),
    (_retype("model.layers.0.mlp.down_proj.weight_packed", torch.int8),
     "tensor 'model.layers.0.mlp.down_proj.weight_packed' has dtype torch.int8"),
])
def test_startup_validation_names_the_tensor(tmp_path, mutate, message):
    """maybe_update_config (run by vLLM while it builds its config, before any engine starts)
    reads the safetensors headers and names the first bad tensor."""
    from vllm_rotquant.config import RotQuantConfig

    ckpt = build_tiny_checkpoint(tmp_path / "bad", mutate=mutate)
    import json

    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    with pytest.raises(CheckpointError) as err:
        RotQuantConfig.from_config(qcfg).maybe_update_config(str(ckpt))
    assert message in str(err.value)


def test_engine_config_fails_with_named_field(tmp_path, tiny_ckpt):
    """The same errors through vLLM's own config path (what `vllm serve` runs first)."""
    from vllm.engine.arg_utils import EngineArgs

    cases = {
        "version": (with_config(tiny_ckpt, tmp_path / "v2", lambda c: c["quantization_config"].update(version=2)),
                    "quantization_config.version: unknown rotquant format version 2"),
        "act_bits": (with_config(tiny_ckpt, tmp_path / "a3", lambda c: c["quantization_config"].update(act_bits=3)),
                     "quantization_config.act_bits: unsupported 3"),
        "shape": (build_tiny_checkpoint(tmp_path / "shape", mutate=_reshape("model.layers.1.mlp.gate_proj.weight_packed", 8)),
                  "tensor 'model.layers.1.mlp.gate_proj.weight_packed' has shape (8, 64)"),
    }
    for name, (ckpt, message) in cases.items():
        with pytest.raises(Exception) as err:
            EngineArgs(model=str(ckpt), dtype="bfloat16", max_model_len=256).create_engine_config()
        assert message in str(err.value), (name, str(err.value))


# ----------------------------------------------------------------------------- linear method
def _load(layer, tensors: dict, prefix: str, parts: dict):
    """What vLLM's weight loading does: each checkpoint tensor through its parameter's loader."""
    for shard, name in parts.items():
        for suffix in ("weight_packed", "weight_scale"):
            param = getattr(layer, suffix)
            t = tensors[f"{prefix}.{name}.{suffix}"]
            if shard is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, shard)


def _tiny_tensors(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("m", [1, 7])  # the CPU kernel's native GEMM (few tokens) and oneDNN's
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_method_on_vllm_layers_matches_reference(vllm_env, tiny_ckpt, dtype, symmetric, m):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    from vllm_rotquant.format import unpack_int4
    from vllm_rotquant.kernels import ops
    from vllm_rotquant.linear_method import RotQuantLinearMethod

    qc = _config(act_symmetric=symmetric)
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    t = _tiny_tensors(tiny_ckpt)
    p = "model.layers.0"
    qkv = QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=qc, prefix=f"{p}.self_attn.qkv_proj", params_dtype=dtype)
    gu = MergedColumnParallelLinear(128, [256, 256], bias=False, quant_config=qc, prefix=f"{p}.mlp.gate_up_proj", params_dtype=dtype)
    down = RowParallelLinear(256, 128, bias=False, quant_config=qc, prefix=f"{p}.mlp.down_proj", params_dtype=dtype)
    for layer in (qkv, gu, down):
        assert isinstance(layer.quant_method, RotQuantLinearMethod)
    _load(qkv, t, f"{p}.self_attn", {"q": "q_proj", "k": "k_proj", "v": "v_proj"})
    _load(gu, t, f"{p}.mlp", {0: "gate_proj", 1: "up_proj"})
    _load(down, t, f"{p}.mlp", {None: "down_proj"})
    for layer in (qkv, gu, down):
        layer.quant_method.process_weights_after_loading(layer)
    assert down.quant_method.hadamard_block == 128 and qkv.quant_method.hadamard_block is None

    torch.manual_seed(0)
    x = torch.randn(m, 128, dtype=dtype)
    h = torch.randn(m, 256, dtype=dtype)

    def weights(names):
        w = torch.cat([unpack_int4(t[f"{n}.weight_packed"]) for n in names])
        return w, torch.cat([t[f"{n}.weight_scale"].float() for n in names])

    def ref(x, names, block=None):
        return rotquant_linear(x, *weights(names), None, 4, 0.9, block, symmetric)

    assert torch.equal(qkv(x)[0], ref(x, [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]))
    assert torch.equal(gu(x)[0], ref(x, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]))
    # R4: bit-exact given the kernel's own Hadamard output (the native transform differs from the
    # reference's float32 matmul in summation order only), and close to the whole reference
    w, s = weights([f"{p}.mlp.down_proj"])
    qa, sa, za = ops.quantize_activations(torch.ops.rotquant.cpu_hadamard(h, 128), 4, 0.9, None, symmetric)
    out = down(h)[0]
    assert torch.equal(out, ops.w4a4_gemm(qa, sa, w, s, dtype, za))
    assert torch.allclose(out.float(), ref(h, [f"{p}.mlp.down_proj"], 128).float(), rtol=0.05, atol=0.05)
    # the CPU kernel, chosen once at load, owns its runtime weights: INT4 in its native layout,
    # float32 scales, and (asymmetric activations) the weight sums of the zero-point correction
    for layer in (qkv, gu, down):
        assert layer.quant_method.kernel.name == "CpuInt8"
        assert not hasattr(layer, "weight_packed") and layer.rq_w_scale.dtype == torch.float32
    assert qkv.rq_w_nib.dtype == torch.uint8 and qkv.rq_w_nib.numel() == 256 * 128 // 2
    assert hasattr(qkv, "rq_w_sum") != symmetric
    if not symmetric:
        wq, _ = weights([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(qkv.rq_w_sum, wq.int().sum(1, keepdim=True))


def test_act_overrides_reach_the_served_layers(vllm_env, tiny_ckpt):
    """`act_overrides` by input kind: the fused gate_up linear quantizes its input at 8 bits and
    clip 1.0, qkv keeps the checkpoint's A4 at 0.9 -- each bit-exact with the reference at its own width."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    from vllm_rotquant.format import unpack_int4

    qc = _config(act_overrides=(("gate_up", 8, 1.0),))
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    t = _tiny_tensors(tiny_ckpt)
    p = "model.layers.0"
    qkv = QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=qc, prefix=f"{p}.self_attn.qkv_proj",
                            params_dtype=torch.float32)
    gu = MergedColumnParallelLinear(128, [256, 256], bias=False, quant_config=qc, prefix=f"{p}.mlp.gate_up_proj",
                                    params_dtype=torch.float32)
    _load(qkv, t, f"{p}.self_attn", {"q": "q_proj", "k": "k_proj", "v": "v_proj"})
    _load(gu, t, f"{p}.mlp", {0: "gate_proj", 1: "up_proj"})
    for layer in (qkv, gu):
        layer.quant_method.process_weights_after_loading(layer)
    assert (gu.quant_method.kernel.spec.act_bits, gu.quant_method.kernel.spec.clip) == (8, 1.0)
    assert (qkv.quant_method.kernel.spec.act_bits, qkv.quant_method.kernel.spec.clip) == (4, 0.9)

    def ref(x, names, bits, clip):
        w = torch.cat([unpack_int4(t[f"{n}.weight_packed"]) for n in names])
        return rotquant_linear(x, w, torch.cat([t[f"{n}.weight_scale"].float() for n in names]), None, bits, clip, None)

    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    mlp = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
    assert torch.equal(gu(x)[0], ref(x, mlp, 8, 1.0))
    assert not torch.equal(gu(x)[0], ref(x, mlp, 4, 0.9))
    assert torch.equal(qkv(x)[0], ref(x, [f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], 4, 0.9))


def _down_layer(qc, t, dtype=torch.bfloat16):
    from vllm.model_executor.layers.linear import RowParallelLinear

    down = RowParallelLinear(256, 128, bias=False, quant_config=qc, prefix="model.layers.0.mlp.down_proj", params_dtype=dtype)
    _load(down, t, "model.layers.0.mlp", {None: "down_proj"})
    return down


def test_reference_kernel_on_request(vllm_env, tiny_ckpt, monkeypatch):
    """ROTQUANT_KERNEL=reference: the layer runs the reference kernel (a warning says so) and
    computes ops.rotquant_linear exactly."""
    from vllm_rotquant.format import unpack_int4
    from vllm_rotquant.kernels import linear_kernel

    monkeypatch.setenv("ROTQUANT_KERNEL", "reference")
    linear_kernel._choose.cache_clear()
    t = _tiny_tensors(tiny_ckpt)
    down = _down_layer(_config(), t)
    down.quant_method.process_weights_after_loading(down)
    linear_kernel._choose.cache_clear()
    assert down.quant_method.kernel.name == "Reference"
    h = torch.randn(5, 256, dtype=torch.bfloat16)
    w = unpack_int4(t["model.layers.0.mlp.down_proj.weight_packed"])
    s = t["model.layers.0.mlp.down_proj.weight_scale"].float()
    assert torch.equal(down(h)[0], rotquant_linear(h, w, s, None, 4, 0.9, 128))


def test_layer_no_kernel_serves_is_refused_at_load(vllm_env, tiny_ckpt, monkeypatch):
    """A layer that no kernel of its device can serve stops the load with every kernel's reason
    (here: a device whose only kernel is Triton, as on CUDA)."""
    from vllm_rotquant.kernels import linear_kernel
    from vllm_rotquant.kernels.linear_kernel import NoKernelError

    monkeypatch.setitem(linear_kernel.KERNEL_ORDER, "cpu", ("Triton",))
    linear_kernel._choose.cache_clear()
    down = _down_layer(_config(), _tiny_tensors(tiny_ckpt))
    with pytest.raises(NoKernelError, match=r"no kernel can serve a layer \(256 -> 128, W4A4.*R4 block 128\) on cpu: "
                                            r"Triton: runs on CUDA only; set ROTQUANT_KERNEL=reference"):
        down.quant_method.process_weights_after_loading(down)
    linear_kernel._choose.cache_clear()


def test_loader_names_bad_and_missing_tensors(vllm_env, tiny_ckpt):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    qc = _config()
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    t = _tiny_tensors(tiny_ckpt)
    p = "model.layers.1.self_attn"
    qkv = QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=qc, prefix=f"{p}.qkv_proj")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight_packed' has shape \(64, 32\)"):
        qkv.weight_packed.weight_loader(qkv.weight_packed, t[f"{p}.k_proj.weight_packed"][:, :32], "k")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight_scale' has dtype torch\.int32"):
        qkv.weight_scale.weight_loader(qkv.weight_scale, torch.ones(64, 1, dtype=torch.int32), "v")
    _load(qkv, t, p, {"q": "q_proj", "k": "k_proj"})  # v never arrives
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.v_proj\.weight_packed'"):
        qkv.quant_method.process_weights_after_loading(qkv)


def test_r4_block_must_divide_the_rank_partition(vllm_env):
    from vllm.model_executor.layers.linear import RowParallelLinear

    with pytest.raises(CheckpointError, match="online_hadamard.down_proj.block 12 does not divide"):
        RowParallelLinear(256, 128, bias=False, quant_config=_config(down_proj_block=12), prefix="model.layers.0.mlp.down_proj")


def test_unquantized_and_ignored_layers(vllm_env):
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    qc = _config()
    other = ReplicatedLinear(64, 64, bias=False, quant_config=qc, prefix="model.layers.0.mlp.router")
    assert isinstance(other.quant_method, UnquantizedLinearMethod)
    qc2 = _config(ignore=("lm_head", "model.layers.0.self_attn.o_proj"))
    from vllm.model_executor.layers.linear import RowParallelLinear

    o = RowParallelLinear(128, 128, bias=False, quant_config=qc2, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(o.quant_method, UnquantizedLinearMethod)
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    assert qc.get_quant_method(ParallelLMHead(256, 64), "lm_head") is None


# ----------------------------------------------------------------------------- R3
class _AttnStub(torch.nn.Module):
    def forward(self, query, key, value):
        return query, key, value


@pytest.mark.parametrize("as_kwargs", [False, True])
def test_r3_pre_hook_rotates_query_and_key_per_head(as_kwargs):
    from vllm_rotquant.r3 import make_r3_pre_hook

    attn = _AttnStub()
    attn.register_forward_pre_hook(make_r3_pre_hook(32), with_kwargs=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, n * 32) for n in (4, 2, 2))
    out = attn(query=q, key=k, value=v) if as_kwargs else attn(q, k, v)
    h = hadamard_matrix(32, torch.float32)
    assert torch.allclose(out[0], (q.view(5, 4, 32) @ h).view(5, 128), atol=1e-6)
    assert torch.allclose(out[1], (k.view(5, 2, 32) @ h).view(5, 64), atol=1e-6)
    assert out[2] is v
    # per-head dot products (what attention sees) are unchanged
    s0 = torch.einsum("thd,shd->hts", q.view(5, 4, 32)[:, :2], k.view(5, 2, 32))
    s1 = torch.einsum("thd,shd->hts", out[0].view(5, 4, 32)[:, :2], out[1].view(5, 2, 32))
    assert torch.allclose(s0, s1, atol=1e-4)


def test_r3_pre_hook_traces_under_torch_compile_fullgraph():
    from vllm_rotquant.r3 import make_r3_pre_hook

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _AttnStub()

        def forward(self, x):
            q, k, v = self.attn(x, x[:, :64] * 2, x[:, :64] * 3)
            return q.sum(-1) + k.sum(-1) + v.sum(-1)

    m = Outer()
    m.attn.register_forward_pre_hook(make_r3_pre_hook(32), with_kwargs=True)
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert torch.equal(eager, compiled)
    unhooked = Outer()(x)
    assert not torch.equal(eager, unhooked)  # the hook ran in both


@pytest.mark.parametrize("kv, env, installed", [
    ("auto", None, False), ("bfloat16", None, False), ("float16", "auto", False),
    ("fp8", None, True), ("fp8_e4m3", None, True), ("fp8_e5m2", "auto", True),
    ("auto", "on", True), ("bfloat16", "ON", True)])
def test_r3_runs_only_for_a_quantized_kv_cache(monkeypatch, kv, env, installed):
    """R3 is the identity for attention with an unquantized KV cache: installed only where the
    cache is quantized, or when ROTQUANT_R3=on asks for it."""
    from vllm_rotquant.r3 import RotQuantR3Method

    if env is None:
        monkeypatch.delenv("ROTQUANT_R3", raising=False)
    else:
        monkeypatch.setenv("ROTQUANT_R3", env)
    layer = _AttnStub()
    layer.head_size, layer.kv_cache_dtype, layer.layer_name = 64, kv, "model.layers.0.self_attn.attn"
    RotQuantR3Method(_config()).create_weights(layer)
    assert hasattr(layer, "_rotquant_r3_hook") == installed
    q, k, v = (torch.randn(3, 128) for _ in range(3))
    out = layer(q, k, v)
    assert torch.equal(out[0], q) != installed  # the hook rotates the query iff it is installed


def test_r3_bad_mode_and_bad_head_size_are_refused(monkeypatch):
    from vllm_rotquant.format import CheckpointError
    from vllm_rotquant.r3 import RotQuantR3Method

    layer = _AttnStub()
    layer.head_size, layer.kv_cache_dtype, layer.layer_name = 64, "auto", "model.layers.0.self_attn.attn"
    monkeypatch.setenv("ROTQUANT_R3", "sometimes")
    with pytest.raises(ValueError, match="ROTQUANT_R3='sometimes'"):
        RotQuantR3Method(_config()).create_weights(layer)
    monkeypatch.delenv("ROTQUANT_R3")
    layer.head_size = 48  # the checkpoint's qk block 32 does not divide it: refused even when R3 is skipped
    with pytest.raises(CheckpointError, match="does not divide the head size 48"):
        RotQuantR3Method(_config()).create_weights(layer)
