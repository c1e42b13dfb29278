"""``funnelrec demo`` end to end on a tiny world (simulate → KuaiRand round trip → train → report)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

from funnelrec.data.objectives import task_names
from funnelrec.demo import run_demo


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_run_demo_reports_every_task():
    buf = io.StringIO()
    report = run_demo(users=300, days=3, epochs=1, history_len=10, console=Console(file=buf, width=120))
    tasks = task_names()
    assert set(report) == {f"{kind}_{t}" for t in tasks for kind in ("auc", "pop_auc", "oracle_auc", "gap_closed")}
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
