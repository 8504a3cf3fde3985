"""Shared test fixtures. Being here also puts tests/ on sys.path, so tests in sub-folders (tests/gpu)
import the model factories (hf_factory, ckpt_factory) like the top-level tests do."""
import pytest

from hf_factory import CALIB_TEXT


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return str(p)
