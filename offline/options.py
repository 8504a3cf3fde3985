"""Options of the offline calibrator: one typed, validated home for every knob and its default.

The library (`pipeline.quantize_model` / `quantize_checkpoint`), the command line (`rotquant
quantize` builds its arguments from these classes, so `--help` shows these defaults) and the
benchmarks all construct these classes, so their defaults cannot drift apart. Field names
follow the checkpoint format (`weight_bits`, `act_bits`, `act_clip_ratio`, ... as in
`vllm_rotquant.format.RotQuantSpec`).

Every value is checked when an options object is made (`__post_init__`), and the error names
the command-line option, so a bad value fails before any model is loaded; what depends on the
model (sequence length, group size and TP sizes against its shapes) is checked by
`QuantizeOptions.check_model` as soon as the model's config is known.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch

from vllm_rotquant.format import INPUT_KINDS, ROTATIONS, SUPPORTED_ACT_BITS, SUPPORTED_WEIGHT_BITS, act_override
from vllm_rotquant.kernels.hadamard import hadamard_supported
from vllm_rotquant.kernels.layout import gemm_group_supported
from vllm_rotquant.offline.act_clip import START as CLIP_START
from vllm_rotquant.offline.act_clip import check_ratio
from vllm_rotquant.offline.arch import head_geometry

log = logging.getLogger(__name__)

WEIGHT_QUANTIZERS = ("rtn", "gptq")
DEVICE_SYNTAX = "cpu, cuda or cuda:N"
RTN_STARTS = 4  # DartQuant starts scored when the weights are RTN (see offline/select_rotation.py)
STORES = ("auto", "cpu", "device")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _need_int(flag: str, value: Any, minimum: int, why: str = "") -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{flag} {value!r}: expected an integer >= {minimum}{why}")


def _need_range(flag: str, value: Any, lo: float, hi: float, hi_open: bool = True) -> None:
    if not _is_number(value) or not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise ValueError(f"{flag} {value!r}: expected a number in [{lo}, {hi}{')' if hi_open else ']'}")


def _need_positive(flag: str, value: Any) -> None:
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{flag} {value!r}: expected a positive number")


def default_device() -> str:
    """The accelerator when there is one: calibration is 10-100x faster there."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Any, flag: str = "--device") -> str:
    """`device` if it names a usable torch device (cpu, cuda, cuda:N), else ValueError naming `flag`."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if m is None:
        raise ValueError(f"{flag} {device!r}: expected {DEVICE_SYNTAX}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{flag} {device}: CUDA is not available ({why}); use {flag or '--device'} cpu")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def defaults(cls) -> dict[str, Any]:
    """{field: default} of an options class (for the command line's defaults and help)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _opt(default: Any, help: str, **metadata) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


class _FromDict:
    """`from_dict` that refuses unknown keys (a typo must not silently fall back to a default)."""

    PREFIX = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.LABEL} option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def flag(cls, name: str) -> str:
        return f"--{cls.PREFIX}{name.replace('_', '-')}"


@dataclasses.dataclass(frozen=True)
class DartQuantOptions(_FromDict):
    """DartQuant's budget and hyper-parameters (offline/dartquant.py explains each step).
    The reference (CAS-CLab/DartQuant) uses epochs 10, lr 1e-3, momentum 0.9."""

    LABEL = "DartQuant"
    PREFIX = "dq-"

    epochs: int = _opt(10, "passes over R1's token pool")
    lr: float = _opt(1e-3, "SGD learning rate of R1's latent matrix")
    momentum: float = _opt(0.9, "SGD momentum (R1 and R2)")
    samples: int = _opt(2048, "tokens kept per layer from each captured input (R1 pool = 2 x layers x samples)")
    batch: int = _opt(4096, "tokens per SGD step of R1")
    r2_epochs: int = _opt(10, "epochs of the per-head R2 (0 keeps the random Hadamard R2)")
    r2_lr: float = _opt(1e-3, "SGD learning rate of R2")
    r2_batch: int = _opt(256, "tokens per layer per SGD step of R2")
    outliers: int = _opt(32, "spikiest tokens (max|x|/rms) kept per layer and input and mixed into every step "
                             "(0: the reference's uniform sampling)")
    outlier_weight: float = _opt(0.3, "their share of each step's loss")
    weight_rows: float = _opt(0.0, "share of R1's loss given to the readers' weight rows (0: activations only)")
    starts: int | None = _opt(None, "Hadamard starts to learn from; with RTN weights the one whose quantized model "
                                    "has the lowest calibration loss is kept "
                                    f"(default: {RTN_STARTS} with RTN, 1 with GPTQ)")
    score_windows: int = _opt(4, "calibration windows the starts are scored on")
    cosine: bool = _opt(False, "cosine learning-rate decay over the steps")
    windows: int | None = _opt(None, "capture only the first N calibration windows (default: all)")
    capture_batch: int = _opt(8, "windows per forward during the capture")
    store: str = _opt("auto", "where the hidden states live between layers during the capture", choices=STORES)

    def __post_init__(self):
        f = self.flag
        for name in ("epochs", "r2_epochs", "outliers"):
            _need_int(f(name), getattr(self, name), 0)
        for name in ("samples", "batch", "r2_batch", "score_windows", "capture_batch"):
            _need_int(f(name), getattr(self, name), 1)
        for name in ("starts", "windows"):
            if getattr(self, name) is not None:
                _need_int(f(name), getattr(self, name), 1)
        for name in ("lr", "r2_lr"):
            _need_positive(f(name), getattr(self, name))
        _need_range(f("momentum"), self.momentum, 0.0, 1.0)
        _need_range(f("outlier_weight"), self.outlier_weight, 0.0, 1.0)
        _need_range(f("weight_rows"), self.weight_rows, 0.0, 1.0)
        if not isinstance(self.cosine, bool):
            raise ValueError(f"{f('cosine')} {self.cosine!r}: expected true or false")
        if (self.outlier_weight if self.outliers else 0.0) + self.weight_rows >= 1:
            raise ValueError(f"{f('outlier_weight')} {self.outlier_weight} + {f('weight_rows')} {self.weight_rows}: "
                             f"must be < 1 (the token sample needs a share of the loss)")
        if self.store not in STORES:
            raise ValueError(f"{f('store')} {self.store!r}: expected one of {', '.join(STORES)}")


@dataclasses.dataclass(frozen=True)
class GPTQOptions(_FromDict):
    """GPTQ (Frantar et al. 2022) as offline/quantize.py runs it."""

    LABEL = "GPTQ"
    PREFIX = "gptq-"

    damp: float = _opt(0.01, "dampening added to the Hessian's diagonal, as a share of its mean")
    block: int = _opt(128, "columns per lazy block update")
    act_order: bool = _opt(True, "quantize columns in decreasing Hessian-diagonal order")
    # on by default since issue 17: SmolLM2 W4A4 seed 0, austen 53.49 -> 50.08, brown-heldout 63.50 -> 55.80
    served_inputs: bool = _opt(True, "fit the weights to their inputs quantized as served (Hessian of the per-token "
                                     "quantized inputs, least-squares refit to the fp outputs before rounding; "
                                     "with --act-clip auto the clip is first searched on the unquantized weights)")

    def __post_init__(self):
        if not _is_number(self.damp) or not 0 <= self.damp < 1:
            raise ValueError(f"{self.flag('damp')} {self.damp!r}: expected a number in [0, 1)")
        _need_int(self.flag("block"), self.block, 1)
        for name in ("act_order", "served_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{self.flag(name)} {getattr(self, name)!r}: expected true or false")


SPIN_STARTS = ("hadamard", "dartquant")


@dataclasses.dataclass(frozen=True)
class SpinQuantOptions(_FromDict):
    """Rotations learned end to end through the quantized model (offline/spinquant.py explains why
    and how): Adam on QR-Orth latents, KL to the fp model's top-k next-token distribution."""

    LABEL = "SpinQuant"
    PREFIX = "sq-"

    start: str = _opt("hadamard", "rotation the learning starts from", choices=SPIN_STARTS)
    steps: int = _opt(64, "Adam steps")
    lr: float = _opt(1e-4, "Adam learning rate of the latent matrices (cosine decay to 0)")
    batch: int = _opt(1, "calibration windows per step")
    seq_len: int | None = _opt(None, "tokens per training window (the first N of each calibration window; "
                                     "default: the whole window)")
    topk: int = _opt(256, "fp model's most likely tokens the KL keeps (the rest is one bucket)")
    r2: bool = _opt(True, "learn R2 as well as R1")
    clip: float | None = _opt(None, "activation clip while learning (default: --act-clip, or with --act-clip auto "
                                    "the ratio searched on the start rotation with unquantized weights)")

    def __post_init__(self):
        f = self.flag
        if self.start not in SPIN_STARTS:
            raise ValueError(f"{f('start')} {self.start!r}: expected one of {', '.join(SPIN_STARTS)}")
        _need_int(f("steps"), self.steps, 0)
        _need_int(f("batch"), self.batch, 1)
        _need_int(f("topk"), self.topk, 1)
        if self.seq_len is not None:
            _need_int(f("seq_len"), self.seq_len, 2, " (a window needs a token to predict)")
        _need_positive(f("lr"), self.lr)
        if not isinstance(self.r2, bool):
            raise ValueError(f"{f('r2')} {self.r2!r}: expected true or false")
        if self.clip is not None:
            _need_range(f("clip"), self.clip, 0.0, 1.0, hi_open=False)
            if self.clip == 0:
                raise ValueError(f"{f('clip')} 0: expected a number in (0, 1]")


# the command-line option of each QuantizeOptions field, where it is not --field-name
FLAGS = {"act_clip_ratio": "--act-clip", "act_symmetric": "--act-asymmetric", "dartquant": "--dq-*",
         "gptq": "--gptq-*", "spinquant": "--sq-*"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


# The default recipe's per-kind activations at --act-bits 4: gate_proj/up_proj read 8-bit inputs
# (clip 1.0). Their input is the most sensitive of the four (bench/probe_act_quant.py kind-bits),
# and on Hopper and on the CPU an 8-bit activation costs what a 4-bit one does (int8 MMA / VNNI).
SMOOTH_METHODS = ("none", "smoothquant", "awq")  # --smooth (offline/smooth.py)
METHODS = ("none", "duquant", "flatquant")  # --method: online input transforms (offline/transforms.py)


@dataclasses.dataclass(frozen=True)
class TransformOptions(_FromDict):
    """The online input transforms of --method duquant | flatquant (offline/transforms.py explains
    each step). DuQuant's reference (Hsu-hsu/DuQuant) uses block 128, smoothing alpha 0.6 and a
    few greedy steps; FlatQuant's (ruikangliu/FlatQuant) trains 15 epochs of 128 x 2048 tokens
    per layer with AdamW at lr 5e-3."""

    LABEL = "transform"
    PREFIX = "tf-"

    kinds: tuple[str, ...] = _opt(("qkv", "o", "gate_up", "down"),
                                  "input kinds that get a transform (the down one replaces R4)")
    block: int | None = _opt(None, "DuQuant block size (default: the largest divisor <= 128 of each input, per rank)")
    alpha: float = _opt(0.6, "DuQuant smoothing strength s = max|x|^alpha / max|w|^(1-alpha) (0: no smoothing)")
    steps: int = _opt(8, "DuQuant greedy rotation steps per block and rotation")
    tokens: int = _opt(2048, "calibration tokens per layer DuQuant's rotations are fitted on")
    epochs: int = _opt(2, "FlatQuant passes over the calibration windows per layer")
    lr: float = _opt(5e-3, "FlatQuant AdamW learning rate of the transforms")
    batch: int = _opt(4, "FlatQuant windows per training step")

    def __post_init__(self):
        kinds = tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        bad = [k for k in kinds if k not in INPUT_KINDS]
        if bad or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"--tf-kinds {' '.join(map(str, kinds))}: expected distinct input kinds among "
                             f"{', '.join(INPUT_KINDS)}")
        if self.block is not None:
            _need_int("--tf-block", self.block, 2)
        _need_range("--tf-alpha", self.alpha, 0.0, 1.0, hi_open=False)
        _need_int("--tf-steps", self.steps, 0)
        _need_int("--tf-tokens", self.tokens, 16)
        _need_int("--tf-epochs", self.epochs, 0)
        _need_positive("--tf-lr", self.lr)
        _need_int("--tf-batch", self.batch, 1)

DEFAULT_ACT_OVERRIDES: tuple[tuple[str, int, float], ...] = (("gate_up", 8, 1.0),)
# The default recipe's scales at --act-bits 4 with GPTQ: AWQ's on the v/o and up/down pairs
# (bench/RESULTS.md, issue 21: SmolLM2 W4A4 41.03 / 45.58 against 42.44 / 46.72, seeds 0-2)
DEFAULT_SMOOTH = "awq"


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What `rotquant quantize` makes: rotation, weight quantizer, bit widths, calibration.
    (DESIGN.md section 3 describes the checkpoint these fields end up in.)"""

    rotation: str = "hadamard"  # none | hadamard | dartquant | spinquant
    weights: str = "gptq"  # rtn | gptq
    weight_bits: int = 4
    act_bits: int = 4
    group_size: int | None = None  # None: one scale per output channel
    act_clip_ratio: float | str = "auto"  # a ratio in (0, 1], or "auto": searched on calibration text (act_clip.py)
    act_symmetric: bool = True  # False: per-token asymmetric (zero point), as DartQuant's scripts
    # ((input kind, bits, clip), ...): those inputs quantized otherwise (RotQuantSpec.act_overrides);
    # None: the recipe's choice, DEFAULT_ACT_OVERRIDES at 4-bit activations (see resolved_act_overrides)
    act_overrides: tuple[tuple[str, int, float], ...] | None = None
    calib: str = "brown"  # calibration text: a file or a corpus name (offline/data.py)
    calib_tokens: int = 128 * 2048
    calib_seq_len: int = 2048
    seed: int = 0
    device: str = dataclasses.field(default_factory=default_device)
    tp_sizes: tuple[int, ...] | None = None  # None: every power of two up to 8 the shapes allow
    r4_block: int | None = None  # None: largest Hadamard order dividing intermediate/max(tp), <= 2048
    batch_size: int = 8  # calibration windows per forward
    gptq: GPTQOptions = dataclasses.field(default_factory=GPTQOptions)
    dartquant: DartQuantOptions = dataclasses.field(default_factory=DartQuantOptions)
    spinquant: SpinQuantOptions = dataclasses.field(default_factory=SpinQuantOptions)
    # none | smoothquant | awq: per-channel scales on the v/o and up/down pairs (offline/smooth.py);
    # None: the recipe's choice, DEFAULT_SMOOTH at 4-bit activations (see resolved_smooth)
    smooth: str | None = None
    smooth_alpha: float = 0.5  # SmoothQuant's migration strength: s = a^alpha / w^(1 - alpha)
    method: str = "none"  # none | duquant | flatquant: online input transforms (offline/transforms.py)
    transform: TransformOptions = dataclasses.field(default_factory=TransformOptions)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if isinstance(self.transform, dict):
            set_("transform", TransformOptions.from_dict(self.transform))
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if isinstance(self.dartquant, dict):
            set_("dartquant", DartQuantOptions.from_dict(self.dartquant))
        if isinstance(self.gptq, dict):
            set_("gptq", GPTQOptions.from_dict(self.gptq))
        if isinstance(self.spinquant, dict):
            set_("spinquant", SpinQuantOptions.from_dict(self.spinquant))
        if self.tp_sizes is not None and not isinstance(self.tp_sizes, tuple):
            set_("tp_sizes", tuple(self.tp_sizes))
        if not isinstance(self.calib, str):
            set_("calib", str(self.calib))
        if self.act_overrides is not None:
            set_("act_overrides", tuple(tuple(o) for o in self.act_overrides))
        kinds = [o[0] for o in self.resolved_act_overrides]
        for o in self.resolved_act_overrides:
            if len(o) != 3 or o[0] not in INPUT_KINDS or o[1] not in SUPPORTED_ACT_BITS or not _is_int(o[1]) \
                    or not _is_number(o[2]) or not 0 < o[2] <= 1:
                raise ValueError(f"--act-override {o!r}: expected KIND=BITS[:CLIP] with KIND one of "
                                 f"{', '.join(INPUT_KINDS)}, BITS one of {SUPPORTED_ACT_BITS}, CLIP in (0, 1]")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"--act-override: an input kind given twice ({', '.join(kinds)})")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"--rotation {self.rotation!r}: expected one of {', '.join(ROTATIONS)}")
        if self.weights not in WEIGHT_QUANTIZERS:
            raise ValueError(f"--weights {self.weights!r}: expected one of {', '.join(WEIGHT_QUANTIZERS)}")
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS or not _is_int(self.weight_bits):
            raise ValueError(f"--weight-bits {self.weight_bits!r}: expected one of {SUPPORTED_WEIGHT_BITS}")
        if self.act_bits not in SUPPORTED_ACT_BITS or not _is_int(self.act_bits):
            raise ValueError(f"--act-bits {self.act_bits!r}: expected one of {SUPPORTED_ACT_BITS}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"--group-size {self.group_size!r}: must be a positive even number "
                             f"(leave it out for one scale per output channel)")
        check_ratio(self.act_clip_ratio)
        if not isinstance(self.act_symmetric, bool):
            raise ValueError(f"act_symmetric {self.act_symmetric!r}: expected True or False")
        _need_int("--calib-tokens", self.calib_tokens, 1)
        _need_int("--calib-seq-len", self.calib_seq_len, 2, " (a window needs a token to predict)")
        _need_int("--batch-size", self.batch_size, 1)
        if not _is_int(self.seed):
            raise ValueError(f"--seed {self.seed!r}: expected an integer")
        check_device(self.device)
        if self.tp_sizes is not None:
            if not self.tp_sizes or not all(_is_int(t) and t > 0 and t & (t - 1) == 0 for t in self.tp_sizes):
                raise ValueError(f"--tp-sizes {' '.join(map(str, self.tp_sizes)) or '(none)'}: expected positive "
                                 f"powers of two (1 2 4 8 ...)")
        if self.r4_block is not None and (not _is_int(self.r4_block) or self.r4_block < 1
                                          or not hadamard_supported(self.r4_block)):
            raise ValueError(f"--r4-block {self.r4_block!r}: no Hadamard matrix of that order")
        if not isinstance(self.gptq, GPTQOptions) or not isinstance(self.dartquant, DartQuantOptions) \
                or not isinstance(self.spinquant, SpinQuantOptions):
            raise ValueError("QuantizeOptions.gptq / .dartquant / .spinquant: expected GPTQOptions / DartQuantOptions "
                             "/ SpinQuantOptions (or a dict)")
        if self.smooth is not None and self.smooth not in SMOOTH_METHODS:
            raise ValueError(f"--smooth {self.smooth!r}: expected one of {', '.join(SMOOTH_METHODS)}")
        if not _is_number(self.smooth_alpha) or not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"--smooth-alpha {self.smooth_alpha!r}: expected a number in [0, 1]")
        if self.rotation == "spinquant" and self.act_bits >= 16:
            raise ValueError("--rotation spinquant learns the rotations through the quantized activations: "
                             "it needs --act-bits 4 or 8")
        if "dartquant" in (self.rotation, self.spin_start) and self.weights != "rtn" and (self.dartquant.starts or 1) > 1:
            raise ValueError(f"--dq-starts {self.dartquant.starts} picks a rotation by its RTN-quantized loss; with "
                             f"--weights {self.weights} use one start (GPTQ corrects the rounding itself)")

    # ------------------------------------------------------------------ derived
    @property
    def resolved_act_overrides(self) -> tuple[tuple[str, int, float], ...]:
        """The overrides the checkpoint gets: the given ones, or by default at 4-bit activations
        DEFAULT_ACT_OVERRIDES (the MLP input at 8 bits; bench/RESULTS.md "Accuracy" says why)."""
        if self.act_overrides is not None:
            return self.act_overrides
        return DEFAULT_ACT_OVERRIDES if self.act_bits == 4 else ()

    def act_for(self, module: str, clip: float) -> tuple[int, float]:
        """(bits, clip) of the activation quantizer in front of `module`: its --act-override, else
        --act-bits at `clip` (the global clip of the moment: given, or being searched)."""
        return act_override(self.resolved_act_overrides, module) or (self.act_bits, clip)

    @property
    def tune_clip(self) -> bool:
        """The clip is searched on the written checkpoint (nothing to search at 16 bits)."""
        return self.act_clip_ratio == "auto" and self.act_bits < 16

    @property
    def initial_clip(self) -> float:
        """The clip written first (and used to score DartQuant starts): the given one, or
        act_clip.START when it is searched after the weights are quantized."""
        return CLIP_START if self.act_clip_ratio == "auto" else float(self.act_clip_ratio)

    @property
    def needs_calibration(self) -> bool:
        return self.weights == "gptq" or self.rotation in ("dartquant", "spinquant") or self.tune_clip \
            or self.resolved_smooth != "none" or self.method != "none"

    @property
    def resolved_smooth(self) -> str:
        """The scales the checkpoint gets: --smooth, or by default at 4-bit activations AWQ's
        (DEFAULT_SMOOTH: lower W4A4 perplexity on SmolLM2 at every seed, nothing to serve)."""
        if self.smooth is not None:
            return self.smooth
        return DEFAULT_SMOOTH if self.act_bits == 4 and self.weights == "gptq" else "none"

    @property
    def transform_kinds(self) -> tuple[str, ...]:
        """The input kinds that get an online transform (none without --method)."""
        return self.transform.kinds if self.method != "none" else ()

    @property
    def spin_start(self) -> str | None:
        """The rotation SpinQuant starts from (None unless --rotation spinquant)."""
        return self.spinquant.start if self.rotation == "spinquant" else None

    @property
    def dartquant_starts(self) -> int:
        return self.dartquant.starts or (RTN_STARTS if self.weights == "rtn" else 1)

    def replace(self, **changes) -> "QuantizeOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ against a model
    def tp_sizes_for(self, config) -> tuple[int, ...]:
        """The TP sizes the checkpoint supports: --tp-sizes, else every one the shapes allow (FlatQuant
        on o/down inputs: tp 1 only, its Kronecker transform mixing all of a row-parallel input)."""
        if self.tp_sizes:
            return self.tp_sizes
        if self.method == "flatquant" and set(self.transform_kinds) & {"o", "down"}:
            return (1,)
        return default_tp_sizes(config)

    def check_model(self, config) -> None:
        """The checks that need the model's shapes; ValueError naming the option."""
        max_pos = getattr(config, "max_position_embeddings", None)
        if self.needs_calibration and max_pos and self.calib_seq_len > max_pos:
            raise ValueError(f"--calib-seq-len {self.calib_seq_len} is longer than the model's "
                             f"max_position_embeddings {max_pos}")
        tp_sizes = self.tp_sizes_for(config)
        nq, nkv, _ = head_geometry(config)
        for tp in tp_sizes:
            if nq % tp or (nkv % tp and tp % nkv) or config.intermediate_size % tp:
                raise ValueError(f"--tp-sizes {tp}: the model's {nq} query / {nkv} KV heads and intermediate size "
                                 f"{config.intermediate_size} do not split over {tp} ranks")
        check_group_size(config, self.group_size, tp_sizes)
        if self.method == "flatquant" and max(tp_sizes) > 1 and set(self.transform_kinds) & {"o", "down"}:
            raise ValueError(f"--method flatquant with --tp-sizes {' '.join(map(str, tp_sizes))}: a Kronecker transform "
                             f"on the o/down inputs mixes all columns of a row-parallel input, so it serves tp 1 only; "
                             f"pass --tp-sizes 1 or --tf-kinds qkv gate_up")


def default_tp_sizes(config) -> tuple[int, ...]:
    """Every power of two up to 8 over which vLLM can split the heads and the MLP."""
    nq, nkv, _ = head_geometry(config)
    return tuple(tp for tp in (1, 2, 4, 8)
                 if nq % tp == 0 and (nkv % tp == 0 or tp % nkv == 0) and config.intermediate_size % tp == 0)


def check_group_size(config, group_size: int | None, tp_sizes: tuple[int, ...]) -> None:
    """Fail before any calibration when `group_size` does not split every linear's input on every
    rank (o_proj and down_proj are row-parallel: their inputs are split over TP); warn when the
    CUDA GEMM cannot serve it (`gemm_group_supported`), which the CPU path still can."""
    if group_size is None:
        return
    if not _is_int(group_size) or group_size < 2 or group_size % 2:
        raise ValueError(f"--group-size {group_size}: must be a positive even number")
    nq, _, hd = head_geometry(config)
    inputs = [("hidden_size (q/k/v/gate/up input)", config.hidden_size)]
    inputs += [(f"o_proj input per rank at tp {tp}", nq * hd // tp) for tp in tp_sizes]
    inputs += [(f"down_proj input per rank at tp {tp}", config.intermediate_size // tp) for tp in tp_sizes]
    for name, width in inputs:
        if width % group_size:
            raise ValueError(f"--group-size {group_size} does not divide the {name} = {width} (choose a divisor, "
                             f"or restrict --tp-sizes)")
    bad = [f"{name} = {width}" for name, width in inputs if not gemm_group_supported(width, group_size)]
    if bad:
        log.warning("--group-size %d: the CUDA INT4 GEMM cannot serve it (needs a power of two in [32, 512] "
                    "dividing half of each input: %s); the checkpoint runs on the CPU reference path only",
                    group_size, ", ".join(bad))
