import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread per test worker: with ``pytest -n 2`` on 2 cores, two workers that each spin 2 OpenMP
    threads run small tensor ops tens of times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
