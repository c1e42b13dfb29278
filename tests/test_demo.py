"""``funnelrec demo`` end to end on a tiny world (simulate → KuaiRand round trip → train → report → the cascade
trained, exported as a bundle, served over HTTP and queried)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

from funnelrec.data.objectives import task_names
from funnelrec.demo import run_demo
from funnelrec.serving.build import BuildConfig
from funnelrec.serving.cascade import FunnelSizes

FAST_BUILD = BuildConfig(ranker_epochs=1, retriever_epochs=1, preranker_epochs=1, cem_iterations=1,
                         distill_requests=150, closed_loop_iterations=1, closed_loop_users=24,
                         sizes=FunnelSizes(retrieve=300, popular=50, prerank=100, pool=30, serve=10))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_run_demo_reports_every_task(tmp_path):
    buf = io.StringIO()
    report = run_demo(users=300, days=3, epochs=1, history_len=10, console=Console(file=buf, width=120),
                      bundle_dir=tmp_path / "bundle", build=FAST_BUILD)
    tasks = task_names()
    cascade_keys = {f"served_{i}" for i in range(4)} | {"feedback_changed_list"}
    assert set(report) == {f"{kind}_{t}" for t in tasks for kind in ("auc", "pop_auc", "oracle_auc", "gap_closed")} \
        | cascade_keys
    # the cascade served 10 items to three known users and a cold-start user, and feedback changed the next list
    assert [report[f"served_{i}"] for i in range(4)] == [10.0] * 4
    assert report["feedback_changed_list"] == 1.0
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    for key in ("auc_is_click", "pop_auc_is_click", "oracle_auc_is_click", "auc_long_view", "oracle_auc_long_view"):
        assert math.isfinite(report[key]) and 0.0 <= report[key] <= 1.0, key
    assert report["oracle_auc_is_click"] > report["pop_auc_is_click"] > 0.5
    for t in tasks:
        closed = report[f"gap_closed_{t}"]
        oracle, pop, model = report[f"oracle_auc_{t}"], report[f"pop_auc_{t}"], report[f"auc_{t}"]
        if all(map(math.isfinite, (oracle, pop, model))) and oracle != pop:
            assert closed == pytest.approx((model - pop) / (oracle - pop)), t
    text = buf.getvalue()
    assert "test day" in text and "is_click" in text and "Shared-Bottom" in text
    assert "the funnel" in text and "cold start" in text and "a bad request gets 422" in text
