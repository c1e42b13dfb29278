"""``funnelrec bench simulator``: the quick run's figures and targets, and what a run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import funnelrec.bench.simulator as simbench
from funnelrec.bench import list_benchmarks, run_benchmark
from funnelrec.sim import World

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("impressions_per_s", "simulate_s", "oracle_auc_is_click", "pop_auc_is_click", "oracle_minus_pop_auc_click",
        "oracle_auc_long_view", "pop_auc_long_view", "rate_is_click", "rate_is_rand", "impressions", "users",
        "sessions", "mean_pages_per_session", "test_impressions", "questionnaire_answers")


def _results_snapshot() -> dict[str, int]:
    folder = ROOT / "docs" / "results"
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("simulator*") if p.is_file()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench") / "results"
    before = _results_snapshot()
    result = run_benchmark("simulator", quick=True, json_mode=False, write=True, out_dir=out_dir)
    return result, out_dir, before


def test_simulator_is_registered():
    assert "simulator" in list_benchmarks()


def test_quick_run_reports_every_figure(quick):
    result, _, _ = quick
    assert result.name == "simulator" and result.quick
    for key in KEYS:
        assert key in result.results, key
    r = result.results
    assert r["profile"] == "small" and r["days"] == 2
    assert r["users"] == 400 and r["impressions"] > 10_000
    assert r["impressions_per_s"] == pytest.approx(r["impressions"] / r["simulate_s"])
    assert r["oracle_minus_pop_auc_click"] == pytest.approx(r["oracle_auc_is_click"] - r["pop_auc_is_click"])
    assert 0.6 < r["oracle_auc_is_click"] < 0.95
    assert r["oracle_auc_long_view"] > r["pop_auc_long_view"]
    assert 0.02 < r["rate_is_rand"] < 0.1 and 0.1 < r["rate_is_click"] < 0.6
    assert 0 < r["test_impressions"] < r["impressions"]


def test_quick_run_meets_its_targets_and_skips_throughput(quick):
    result, _, _ = quick
    names = {t.name for t in result.targets}
    assert "impressions_per_s" not in names  # a small world on a busy CI core is not a throughput measurement
    assert names == {"oracle_auc_is_click", "oracle_minus_pop_auc_click"}
    for target in result.targets:
        assert target.check(result.results[target.name]), (target.name, result.results[target.name])


def test_quick_run_writes_nothing(quick):
    result, out_dir, before = quick
    assert not out_dir.exists()
    assert result.plots == []
    assert _results_snapshot() == before


def test_quick_json_mode_prints_one_flat_line_last(capsys):
    run_benchmark("simulator", quick=True, json_mode=True, write=False)
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict)
    assert all(not isinstance(v, (dict, list)) for v in figures.values())
    assert set(KEYS) <= set(figures)


class _TinyWorld:
    """Stands in for ``World`` in the benchmark module: every profile becomes a 60-user small world."""

    @staticmethod
    def from_profile(name, overrides=None):
        return World.from_profile("small", ["num_users=60"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fullbench")
    mp = pytest.MonkeyPatch()
    mp.setattr(simbench, "World", _TinyWorld)
    mp.chdir(tmp)  # a stray relative docs/results lands here, never in the repository
    try:
        result = run_benchmark("simulator", quick=False, json_mode=True, write=True, out_dir=tmp / "results", days=2)
    finally:
        mp.undo()
    return result, tmp


def test_full_run_writes_json_and_markdown(full_run):
    result, tmp = full_run
    doc = json.loads((tmp / "results" / "simulator.json").read_text())
    assert doc["name"] == "simulator" and doc["quick"] is False
    assert {t["name"] for t in doc["targets"]} == {"impressions_per_s", "oracle_auc_is_click",
                                                   "oracle_minus_pop_auc_click"}
    assert doc["results"]["days"] == 2
    md = (tmp / "results" / "simulator.md").read_text()
    assert md.startswith("# Benchmark: simulator")
    assert len(result.plots) == 4


def test_full_run_writes_its_plots_beside_the_report(full_run):
    result, tmp = full_run
    for name in result.plots:
        assert (tmp / "results" / name).is_file(), name
