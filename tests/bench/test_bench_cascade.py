"""``funnelrec bench cascade --quick``: the closed-loop benchmark runs end to end and reports every figure."""

from __future__ import annotations

import math

import pytest
import torch

from funnelrec.bench.cascade import POLICIES, bench_cascade
from funnelrec.errors import ConfigError
from funnelrec.serving.cascade import STAGES
from funnelrec.serving.closed_loop import SURVIVAL_STAGES


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_run_reports_every_policy_and_stage():
    res = bench_cascade(quick=True, progress=False)
    r = res.results
    for name in POLICIES:
        for key in ("watch_s", "pages", "coverage"):
            assert math.isfinite(r[f"{name}.{key}"]) and r[f"{name}.{key}"] >= 0, (name, key)
        assert 0 < r[f"{name}.coverage"] <= 1
        assert r[f"{name}.pages"] >= 1
    survival = [r[f"cascade.survival_{s}"] for s in SURVIVAL_STAGES]
    assert all(0 <= v <= 1 for v in survival)
    assert survival == sorted(survival, reverse=True)  # a stage keeps a subset of the stage before it
    for s in STAGES:
        assert r[f"cascade.ms_per_request_{s}"] >= 0
    assert r["cascade.requests"] >= r["eval_users"]
    assert math.isclose(r["cascade_gain_over_popularity"], r["cascade.watch_s"] / r["popularity.watch_s"] - 1,
                        rel_tol=1e-9)
    assert "cascade_gain_over_popularity" in {t.name for t in res.targets}
    assert "oracle" in res.summary and "survive" in res.summary


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="--data"):
        bench_cascade(quick=True, data="movielens:/nowhere")
    with pytest.raises(ConfigError, match="seeds"):
        bench_cascade(quick=True, seeds=0)
