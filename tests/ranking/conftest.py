"""Fixtures of the ranking tests: one torch thread per worker, and a tiny simulated world."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def tiny_world():
    """A tiny simulated world (200 users, 3 days: 2 train days, 1 valid day) as request datasets."""
    from funnelrec.data.dataset import RequestDataset
    from funnelrec.data.features import FeatureSpec
    from funnelrec.data.splits import split_by_day
    from funnelrec.data.timeline import Timelines
    from funnelrec.ranking.popularity import with_position
    from funnelrec.sim import World

    sim = World.from_profile("small", ["num_users=200", "days=3"]).simulate(progress=False)
    log = with_position(sim.log)
    splits = split_by_day(log, valid_days=1, test_days=0)
    spec = FeatureSpec.kuairand().fit(sim.users, sim.videos, splits["train"])
    timelines = Timelines.from_log(log, spec)

    def make(df):
        return RequestDataset(df, sim.users, sim.videos, spec, timelines, history_len=20)

    return {"spec": spec, "train": make(splits["train"]), "valid": make(splits["valid"]), "splits": splits}
