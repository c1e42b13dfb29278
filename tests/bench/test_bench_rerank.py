"""``funnelrec bench rerank --quick``: through the CLI, the keys of every row, K and switch-test figure (never
timings against a threshold); bad options."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import funnelrec.bench.rerank as br
from funnelrec.bench import list_benchmarks
from funnelrec.cli import app
from funnelrec.errors import ConfigError


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import os

    old = os.environ.get("FUNNELREC_CACHE_DIR")
    os.environ["FUNNELREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "rerank-bench-cache")
    try:
        res = CliRunner().invoke(app, ["bench", "rerank", "--quick", "--json"])
    finally:
        if old is None:
            os.environ.pop("FUNNELREC_CACHE_DIR", None)
        else:
            os.environ["FUNNELREC_CACHE_DIR"] = old
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in figures.values())
    return figures


def test_is_registered():
    assert "rerank" in list_benchmarks()


def test_quick_run_reports_every_row_k_and_the_switch_test(quick):
    f = quick
    plan = br.QUICK_PLAN
    assert f["world"] == plan.data and f["seeds"] == 1 and f["threads"] == 1
    for row in br.ROWS:
        for k in plan.ks:
            for what in ("value", "hit1", "list_value_s"):
                assert f"{row}.k{k}.{what}" in f and f"{row}.k{k}.{what}.std" in f, (row, k, what)
            assert 0.0 <= f[f"{row}.k{k}.hit1"] <= 1.0
        assert f"{row}.value" in f
    for k in plan.ks:
        assert f[f"oracle.k{k}.value"] == pytest.approx(1.0) and f[f"oracle.k{k}.hit1"] == 1.0
        assert f[f"lists.k{k}.best_value_s"] >= f[f"lists.k{k}.mean_value_s"] > 0
    for row in br.SWITCH_ROWS:
        assert f"switch_off.{row}.k{plan.ks[0]}.value" in f, row
    for key in ("flash_minus_independent", "best_independent", "flash_minus_no_cross_list",
                "flash_edge_over_greedy", "switch_off.flash_edge_over_greedy", "flash_list_edge",
                "switch_off.flash_list_edge", "evaluators_beating_item_sum",
                "switch_off.evaluators_beating_item_sum", "switch_off.list_edge_share", "time_ratio_k20",
                "flash.time_growth_exponent", "independent_listwise.time_growth_exponent", "wall_s"):
        assert key in f, key
    assert f["best_independent"] in br.INDEPENDENT and f["selected_flash"] in br.FLASH
    for name in br.INDEPENDENT + br.FLASH:
        assert f"{name}.valid_value" in f, name
    for key in ("flash_listwise_minus_independent", "flash_pointwise_minus_independent"):
        assert key in f and f"{key}.std" in f, key
    for name in br.TIMED:
        for k in plan.ks:
            assert f[f"{name}.time_ms.k{k}"] > 0
    assert isinstance(f["switch_off.evaluators_beating_item_sum"], int)


def test_bad_input_is_rejected_with_one_line():
    res = CliRunner().invoke(app, ["bench", "rerank", "--quick", "--data", "movielens:/nowhere"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sim:NAME" in lines[0]
    with pytest.raises(ConfigError, match="seeds"):
        br.bench_rerank(quick=True, seeds=0)
    with pytest.raises(ConfigError, match="ks"):
        br.RerankPlan(ks=()).validate()
    with pytest.raises(ConfigError, match="test_requests"):
        br.RerankPlan(test_requests=10, test_users=5).validate()


def test_metrics():
    v = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0]])
    assert br.regret_normalised(v, v.max(1).values) == (1.0, 1.0)
    value, hit = br.regret_normalised(v, v.mean(1))
    assert value == pytest.approx(0.0) and hit == 0.0
    assert br.growth_exponent([5, 10, 20], [1.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert br.growth_exponent([5, 10, 20], [5.0, 10.0, 20.0]) == pytest.approx(1.0)


def _fake_run(test_values: dict, valid_values: dict, ks=(5, 50)) -> dict:
    return {"rows": {r: {k: (v, 0.5, 1.0) for k in ks} for r, v in test_values.items()},
            "valid_value": dict(valid_values), "list_value_mean": {k: 1.0 for k in ks},
            "list_value_best": {k: 2.0 for k in ks}, "train_s": {}}


def test_each_family_is_represented_by_its_best_validation_variant_never_by_test():
    """The flash variant that wins on test but loses on validation is not the one compared."""
    plan = dataclasses.replace(br.QUICK_PLAN, ks=(5, 50))
    test = {"greedy": 0.3, "item_sum": 0.5, "independent_pointwise": 0.70, "independent_listwise": 0.80,
            "flash": 0.90, "flash_pointwise": 0.60, "flash_no_cross_list": 0.5, "oracle": 1.0}
    valid = {"independent_pointwise": 0.75, "independent_listwise": 0.60, "flash": 0.50,
             "flash_pointwise": 0.70}
    f = br.derived_figures([_fake_run(test, valid), _fake_run(test, valid)], [], plan)
    assert f["selected_flash"] == "flash_pointwise" and f["best_independent"] == "independent_pointwise"
    assert f["flash_minus_independent"] == pytest.approx(0.60 - 0.70)
    assert f["flash_pointwise_minus_independent"] == pytest.approx(0.60 - 0.70)
    assert f["flash_listwise_minus_independent"] == pytest.approx(0.90 - 0.70)
    assert f["flash_minus_independent_k50"] == pytest.approx(-0.10)
    assert f["flash.valid_value"] == pytest.approx(0.50)
