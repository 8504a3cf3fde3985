"""Shared test fixtures. Being here also puts tests/ on sys.path, so tests in sub-folders (tests/gpu)
import the model factories (hf_factory, ckpt_factory) like the top-level tests do."""
import pytest

from hf_factory import CALIB_TEXT
from vllm_server import remove_leaked_shm, shm_objects


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(CALIB_TEXT)
    return str(p)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Remove the /dev/shm objects (psm_*, vllm_dist_*, sem.mp-*) created during the session that no
    live process uses any more (vLLM engines killed by a test cannot unlink theirs); objects that
    existed before the session, or that a running process still maps, are left alone."""
    before = shm_objects()
    yield
    remove_leaked_shm(shm_objects() - before)
