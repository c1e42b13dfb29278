import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """Benchmarks pin torch's intra-op thread count; give the test worker back its setting after every test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
