"""Tiny rotquant checkpoints for tests (no download, no offline calibrator needed).

`build_tiny_checkpoint` writes a small random Llama as a Hugging Face folder in rotquant format v1
(packed INT4 `weight_packed` + `weight_scale` for q/k/v/o/gate/up/down, bf16 embeddings,
norms and lm_head, `quantization_config` from `RotQuantSpec.to_dict()`), with a small byte-level
BPE tokenizer trained on an embedded text. `mutate` lets a test corrupt tensors or the config to
produce bad checkpoints. `reference_logprobs` runs the checkpoint through the offline simulation
(`vllm_rotquant.offline.simulate`, the arithmetic `rotquant eval` uses), to check vLLM against it.
`write_random_rotquant` writes random checkpoints of real Llama shapes (`SHAPES`: 7B, 8B) without
a tokenizer, for the GPU benchmarks and tensor-parallel tests.

Everything is seeded: the same arguments give the same bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from vllm_rotquant.format import (PACKED_SUFFIX, ROW_PARALLEL_KINDS, SCALE_SUFFIX, TRANSFORM_OWNERS, TRANSFORM_PREFIX,
                                  InputTransform, RotQuantSpec, head_dim_of, linear_shapes, pack_int4)

TOKENIZER_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be on
his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ?
Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,
seemed to unite some of the best blessings of existence; and had lived nearly twenty-one years
in the world with very little to distress or vex her.
"""

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_hidden_layers=2)


def write_tokenizer(out: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE on TOKENIZER_TEXT and save it as a HF fast tokenizer; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def _random_int4(gen: torch.Generator, out_f: int, in_f: int) -> torch.Tensor:
    return torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)


def random_transform(t: InputTransform, k: int, tp: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors of a declared input transform on K features: per-channel factors in
    [0.5, 2], orthogonal blocks and a permutation local to each of `tp` ranks (block_rotation), or
    well-conditioned Kronecker factors."""
    out = {"diag": 0.5 + 1.5 * torch.rand(k, generator=gen)}
    if t.type == "block_rotation":
        g = k // t.block
        for leaf in ("rot1", "rot2"):
            out[leaf] = torch.linalg.qr(torch.randn(g, t.block, t.block, generator=gen, dtype=torch.float64))[0].float()
        chunk = k // tp
        out["perm"] = torch.cat([torch.randperm(chunk, generator=gen) + r * chunk for r in range(tp)]).to(torch.int32)
    else:
        for leaf, n in zip(("left", "right"), t.factors):
            out[leaf] = torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / math.sqrt(n)
    return out


def model_transforms(shape: str, kind_type: str, tp_sizes: tuple[int, ...]) -> tuple[InputTransform, ...]:
    """Input transforms of `kind_type` ("block_rotation" or "kronecker") on all four inputs of a
    SHAPES model, sized as `rotquant quantize --method duquant | flatquant` sizes them."""
    from vllm_rotquant.offline.transforms import duquant_block, kronecker_factors

    shapes = linear_shapes(llama_config(shape))
    return tuple(InputTransform(kind, kind_type, block=duquant_block(kind, shapes[owner][1], tp_sizes, None))
                 if kind_type == "block_rotation" else
                 InputTransform(kind, kind_type, factors=kronecker_factors(shapes[owner][1], kind))
                 for kind, owner in TRANSFORM_OWNERS.items())


def shape_tp_sizes(shape: str) -> tuple[int, ...]:
    """The TP sizes `rotquant quantize` records for a SHAPES model (offline.options.default_tp_sizes)."""
    c = SHAPES[shape]
    nq, nkv, inter = c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    return tuple(t for t in (1, 2, 4, 8) if nq % t == 0 and (nkv % t == 0 or t % nkv == 0) and inter % t == 0)


def build_tiny_checkpoint(out_dir: str | Path, *, spec: RotQuantSpec | None = None, seed: int = 0,
                          scale_dtype: torch.dtype = torch.bfloat16,
                          mutate: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
                          **model_kw) -> Path:
    """Write a tiny random rotquant Llama to out_dir (created). Returns the path.

    model_kw overrides TINY (hidden_size, heads, ...). The default spec uses an R4 block of
    intermediate_size/2 (so TP 1 and 2 both work) and R3 on the head dim.
    `mutate(tensors, config)` may edit both in place before they are written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = {**TINY, **model_kw}
    vocab = write_tokenizer(out)
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, **dims).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "bfloat16"
    if spec is None:
        spec = RotQuantSpec(down_proj_block=dims["intermediate_size"] // 2, qk_block=head_dim_of(cfg),
                            tp_sizes=(1, 2))
    cfg["quantization_config"] = spec.to_dict()

    gen = torch.Generator().manual_seed(seed)
    hidden = dims["hidden_size"]
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.1).to(torch.bfloat16),
    }
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        for name, (out_f, in_f) in linear_shapes(cfg).items():
            q = _random_int4(gen, out_f, in_f)
            groups = 1 if not spec.group_size else in_f // spec.group_size
            # |q| has std ~4.6: this keeps each projection's output at unit scale, jittered per row
            s = (1.0 + 0.5 * torch.rand(out_f, groups, generator=gen)) / (4.6 * math.sqrt(in_f))
            t[f"{p}.{name}.{PACKED_SUFFIX}"] = pack_int4(q)
            t[f"{p}.{name}.{SCALE_SUFFIX}"] = s.to(scale_dtype)
        for tr in spec.input_transforms:
            owner = TRANSFORM_OWNERS[tr.kind]
            tp = max(spec.tp_sizes) if tr.kind in ROW_PARALLEL_KINDS else 1
            for leaf, v in random_transform(tr, linear_shapes(cfg)[owner][1], tp, gen).items():
                t[f"{p}.{owner}.{TRANSFORM_PREFIX}{leaf}"] = v
    if mutate is not None:
        mutate(t, cfg)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def with_config(src: str | Path, dst: str | Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of checkpoint src at dst that shares its tensors (symlinks) but has an edited config.json."""
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


# ----------------------------------------------------------------------------- model-shaped
# Llama shapes of the GPU benchmarks and TP tests (bench/bench_vllm_gpu.py, tests/gpu/test_vllm_tp.py)
SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rope_theta=10000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0),
}


def llama_config(shape: str) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                initializer_range=0.02, attention_bias=False, mlp_bias=False, **SHAPES[shape])


def write_random_rotquant(folder: Path, shape: str, tp_sizes: tuple[int, ...] | None = None, seed: int = 0,
                          **spec_kw) -> Path:
    """A random rotquant checkpoint of `shape`: uniform INT4 weights with scales that keep every
    projection's output at unit scale, N(0, 1) embeddings, unit norms, lm_head N(0, 0.02); the R4
    block `rotquant quantize` would pick for these shapes, R3 on the head dim. Built on the GPU
    when there is one (seconds for 7B), written as safetensors."""
    from safetensors.torch import save_file

    from vllm_rotquant.kernels.hadamard import largest_block

    if (folder / "config.json").is_file():
        return folder
    cfg = llama_config(shape)
    inter = cfg["intermediate_size"]
    if tp_sizes is None:
        tp_sizes = shape_tp_sizes(shape)
    spec = RotQuantSpec(**{"down_proj_block": largest_block(inter // max(tp_sizes)), "qk_block": head_dim_of(cfg),
                           "tp_sizes": tp_sizes, "calibration": {"method": "random (benchmark)"}, **spec_kw})
    cfg["quantization_config"] = spec.to_dict()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g, device=dev).to(torch.bfloat16),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16, device=dev),
         "lm_head.weight": (torch.randn(vocab, hidden, generator=g, device=dev) * 0.02).to(torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=dev)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16, device=dev)
        for name, (out_f, in_f) in linear_shapes(cfg).items():
            groups = 1 if not spec.group_size else in_f // spec.group_size
            t[f"{p}.{name}.weight_packed"] = torch.randint(0, 256, (out_f, in_f // 2), generator=g, device=dev,
                                                           dtype=torch.uint8)
            t[f"{p}.{name}.weight_scale"] = ((1.0 + 0.5 * torch.rand(out_f, groups, generator=g, device=dev))
                                             / (4.6 * math.sqrt(in_f))).to(torch.float16)
        for tr in spec.input_transforms:
            owner = TRANSFORM_OWNERS[tr.kind]
            tp = max(spec.tp_sizes) if tr.kind in ROW_PARALLEL_KINDS else 1
            cpu_gen = torch.Generator().manual_seed(seed * 1000 + i)
            for leaf, v in random_transform(tr, linear_shapes(cfg)[owner][1], tp, cpu_gen).items():
                t[f"{p}.{owner}.{TRANSFORM_PREFIX}{leaf}"] = v
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in t.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
@torch.no_grad()
def reference_logprobs(ckpt: str | Path, token_ids: list[int], dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu") -> list[float]:
    """log p(token_i | tokens_<i) for i >= 1 under the offline simulation of the checkpoint
    (`rotquant eval`'s model: every projection through `rotquant_linear`, R3 and R4 online); on
    the CPU the reference ops, on CUDA the Triton kernels vLLM serves with."""
    from vllm_rotquant.offline.simulate import load_simulated

    model = load_simulated(ckpt, dtype).to(device)
    ids = torch.tensor([token_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits.float()[0, :-1]
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, ids[0, 1:, None])[:, 0].tolist()


@torch.no_grad()
def dequantized_float_twin(src: str | Path, tensors: dict[str, torch.Tensor], r4_block: int | None, seed: int = 0):
    """The float model a written checkpoint of `src` should simulate to at W4A16: folded, rotated
    by the seed's Hadamards (R4 online), its linears holding the checkpoint's de-quantized INT4
    weights and its embeddings, lm_head and biases the checkpoint's."""
    from vllm_rotquant.offline import rotate
    from vllm_rotquant.offline.model_io import load_hf_model

    model = load_hf_model(src)
    rotate.fold_norms(model)
    rotate.apply_rotations(model, rotate.Rotations.hadamard(model.config, seed=seed, r4_block=r4_block), online=True)
    load_dequantized_weights(model, tensors)
    model.model.embed_tokens.weight.data = tensors["model.embed_tokens.weight"].float()
    model.lm_head.weight.data = tensors["lm_head.weight"].float()
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.data = tensors[n].float()
    return model


def load_dequantized_weights(model, tensors: dict[str, torch.Tensor]) -> list:
    """Put the checkpoint's INT4 weights, de-quantized, into the fp model's quantized linears (the
    rotated fp model with the stored weights: what the served arithmetic equals up to activation
    quantization). Returns those linears."""
    from vllm_rotquant.format import unpack_int4
    from vllm_rotquant.kernels.reference import dequant_weight_ref
    from vllm_rotquant.offline.arch import arch_of

    arch, linears = arch_of(model), []
    for i, layer in enumerate(arch.decoder_layers(model)):
        for name, lin in arch.quantized_linears(layer):
            stem = f"{arch.layer_prefix(i)}.{name}"
            lin.weight.data = dequant_weight_ref(unpack_int4(tensors[f"{stem}.{PACKED_SUFFIX}"]),
                                                 tensors[f"{stem}.{SCALE_SUFFIX}"]).float()
            linears.append(lin)
    return linears
