"""Shared fixtures of the re-ranking tests: one torch thread, a tiny simulated world and synthetic inputs."""

from __future__ import annotations

import os

import pytest
import torch

from funnelrec.rerank.data import RerankData, RerankDataConfig

SMALL = "sim:small?num_users=120&days=3"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread per test worker (the suite runs on 2 shared cores). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> RerankData:
    """Re-ranking data over a tiny simulated world (its own cache folder)."""
    from funnelrec.data.sources import load_source

    old = os.environ.get("FUNNELREC_CACHE_DIR")
    os.environ["FUNNELREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "rerank-cache")
    try:
        src = load_source(SMALL, progress=False)
    finally:
        if old is None:
            os.environ.pop("FUNNELREC_CACHE_DIR", None)
        else:
            os.environ["FUNNELREC_CACHE_DIR"] = old
    return RerankData.from_source(src, RerankDataConfig(pool_size=24, history_len=80))
