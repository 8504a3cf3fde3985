import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Fill freed allocator memory with 0xFF bytes (NaN / -1) so that an output element a kernel
    forgets to write shows up as a mismatch instead of a stale correct value."""
    def _poison(nbytes: int = 512 << 20):
        t = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda")
        del t
    return _poison
