"""Fixtures of the retrieval tests: one torch thread per worker and a small simulated world."""

from __future__ import annotations

import pytest
import torch
from retrieval_testkit import SMALL_WORLD


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread per test worker (``pytest -n 2`` on 2 cores); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_source(tmp_path_factory):
    """The ``SMALL_WORLD`` source, simulated once per test process into a temporary cache."""
    from funnelrec.data.sources import load_source

    return load_source(SMALL_WORLD, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="session")
def small_data(small_source):
    """Leave-last-out retrieval data of the small world (history length 30)."""
    from funnelrec.retrieval import RetrievalData

    return RetrievalData.from_source(small_source, max_len=30)
