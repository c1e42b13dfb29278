"""``funnelrec bench serving --quick``: a real service subprocess under open-loop load reports every figure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from funnelrec.bench.serving import bench_serving, poisson_schedule
from funnelrec.errors import ConfigError


def test_poisson_schedule_rate_and_order():
    t = poisson_schedule(200.0, 20.0, seed=0)
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < 20.0
    assert abs(len(t) / 20.0 - 200.0) < 200.0 * 0.1  # ~4,000 arrivals: the count is within 10 % of rate × time
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # exponential gaps: coefficient of variation 1
    with pytest.raises(ConfigError):
        poisson_schedule(0.0, 1.0, seed=0)


def test_quick_run_reports_the_serving_figures():
    res = bench_serving(quick=True, progress=False).results
    assert res["cascade.run"] is True
    for key in ("requests_per_s", "p50_ms", "p99_ms", "errors", "compute_share"):
        assert key in res and f"cascade.{key}" in res
    assert res["errors"] == 0  # a handful of requests per second over loopback never fail
    assert math.isfinite(res["p50_ms"]) and 0 < res["p50_ms"] <= res["p99_ms"]
    assert 0 < res["compute_share"] <= 1
    assert res["requests_per_s"] in (0.0, 10.0, 20.0)
