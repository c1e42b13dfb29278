"""``funnelrec bench retrieval-baselines``: quick runs through the CLI (simulated world and MovieLens), bad input,
and what a full run writes."""

from __future__ import annotations

import json
import math

import pytest

import funnelrec.bench.retrieval_baselines as rb
from funnelrec.bench import list_benchmarks, run_benchmark
from funnelrec.errors import ConfigError
from funnelrec.retrieval.compare import Plan
from bench_testkit import ML100K, bench_cli, isolate_benchmark, last_json

TINY_SIM = "sim:small?num_users=120&days=4"
ROWS = ("popularity", "two_tower", "sasrec")
METRICS = ("recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@50", "true_recall@50")
SIZES = ("users", "users_total", "items", "train_positives", "valid_targets", "test_targets")


@pytest.fixture(scope="module", autouse=True)
def _private_cache_one_thread(tmp_path_factory):
    with isolate_benchmark(rb, tmp_path_factory):
        yield


def _cli(*args: str):
    return bench_cli("retrieval-baselines", *args)


@pytest.fixture(scope="module")
def quick_sim():
    """The canonical quick run (its default small world), through the CLI."""
    return last_json(_cli("--quick", "--json"))


@pytest.fixture(scope="module")
def quick_ml():
    return last_json(_cli("--quick", "--json", "--data", ML100K))


def test_is_registered():
    assert "retrieval-baselines" in list_benchmarks()


def test_quick_sim_reports_every_model_and_the_oracle(quick_sim):
    f = quick_sim
    assert f["data"] == rb.QUICK_DATA and f["data_kind"] == "sim" and f["seeds"] == 1
    for key in SIZES:
        assert isinstance(f[key], int) and f[key] > 0, key
    assert f["users"] == f["users_total"] == 200 and f["valid_targets"] == f["test_targets"]
    for row in (*ROWS, "oracle"):
        for metric in METRICS:
            assert 0.0 <= f[f"{row}.{metric}"] <= 1.0, (row, metric)
            assert f[f"{row}.{metric}.std"] == 0.0  # one run each
        assert f[f"{row}.runs"] == 1
        assert f[f"{row}.recall@10"] <= f[f"{row}.recall@50"]
    assert f["oracle.true_recall@50"] == pytest.approx(1.0)
    for model in ("two_tower", "sasrec"):
        assert f[f"{model}.lr"] in rb.QUICK_PLAN.lr_grid
        assert 0.0 <= f[f"{model}.valid_recall@50"] <= 1.0
        assert f[f"{model}.seconds"] > 0 and f[f"{model}.tuning_seconds"] >= f[f"{model}.seconds"]
        margin = f[f"{model}.recall@50"] - f["popularity.recall@50"]
        assert f[f"{model}.margin_over_popularity_recall@50"] == pytest.approx(margin)
        assert isinstance(f[f"{model}.beats_popularity_recall@50"], bool)
        gap = f[f"{model}.gap_closed_true_recall@50"]
        pop_true = f["popularity.true_recall@50"]
        assert gap == pytest.approx((f[f"{model}.true_recall@50"] - pop_true) / (1 - pop_true))
    assert f["min_margin_over_popularity_recall@50"] == pytest.approx(
        min(f["two_tower.margin_over_popularity_recall@50"], f["sasrec.margin_over_popularity_recall@50"]))
    oracle_gap = f["oracle.recall@50"] - f["popularity.recall@50"]
    assert f["oracle_margin_over_popularity_recall@50"] == pytest.approx(oracle_gap)
    if oracle_gap <= 0:  # no gap to close: gap_closed is undefined, not a made-up number
        assert f["two_tower.gap_closed_recall@50"] is None and f["min_gap_closed_recall@50"] is None
    assert f["wall_s"] > 0 and f["threads"] == 1


def test_quick_movielens_has_no_oracle_figures(quick_ml):
    f = quick_ml
    assert f["data_kind"] == "movielens" and f["data"] == ML100K
    assert f["items"] == 25 and f["test_targets"] == f["users"] == 15
    for row in ROWS:
        for metric in METRICS[:-1]:
            assert 0.0 <= f[f"{row}.{metric}"] <= 1.0, (row, metric)
        assert f[f"{row}.true_recall@50"] is None
    for key in ("oracle.recall@50", "oracle.true_recall@50", "two_tower.gap_closed_recall@50",
                "min_true_recall@50_margin_over_popularity", "oracle_margin_over_popularity_recall@50"):
        assert f[key] is None, key
    assert "two_tower.gap_closed_true_recall@50" not in f
    assert isinstance(f["min_margin_over_popularity_recall@50"], float)


@pytest.mark.parametrize("spec, names", [
    ("nosuch:thing", "nosuch"),
    ("movielens:tests/fixtures/no-such-folder", "no-such-folder"),
    ("sim:small?no_such_key=3", "no_such_key"),
])
def test_bad_data_exits_2_with_one_line(spec, names):
    res = _cli("--quick", "--json", "--data", spec)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], lines
    assert "Traceback" not in res.output


def test_zero_seeds_is_rejected():
    res = _cli("--quick", "--seeds", "0")
    assert res.exit_code == 2 and "--seeds" in res.stderr
    with pytest.raises(ConfigError, match="seeds"):
        rb.bench_retrieval_baselines(quick=True, seeds=0, threads=1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A 'full' run shrunk to a tiny world and plan: 2 seeds, a user subset, files written to a temp folder."""
    tmp = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    mp.setattr(rb, "FULL_PLAN", Plan(epochs={"two_tower": 1, "sasrec": 1}, patience=1, max_users=100))
    mp.chdir(tmp)  # a stray relative docs/results lands here, never in the repository
    try:
        result = run_benchmark("retrieval-baselines", quick=False, json_mode=True, write=True,
                               out_dir=tmp / "results", data=TINY_SIM, seeds=2, threads=1)
    finally:
        mp.undo()
    return result, tmp / "results"


def test_full_run_reports_seeds_and_subset(full_run):
    result, _ = full_run
    r = result.results
    assert r["seeds"] == 2 and r["users"] == 100 and r["users_total"] == 120
    assert r["two_tower.runs"] == r["sasrec.runs"] == 2 and r["popularity.runs"] == r["oracle.runs"] == 1
    assert not math.isnan(r["sasrec.recall@50.std"])
    tuning = result.config["tuning"]["sasrec"]
    assert [t["lr"] for t in tuning] == list(Plan().lr_grid)
    assert result.config["chosen"]["sasrec"]["lr"] == r["sasrec.lr"]
    assert {t.name for t in result.targets} == {"min_margin_over_popularity_recall@50",
                                                "min_true_recall@50_margin_over_popularity"}


def test_full_run_writes_report_summary_and_plot(full_run):
    result, out = full_run
    doc = json.loads((out / "retrieval-baselines.json").read_text())
    assert doc["quick"] is False and doc["results"]["seeds"] == 2
    md = (out / "retrieval-baselines.md").read_text()
    assert "| model | Recall@10 | Recall@50 |" in md and "| SASRec |" in md and "| Oracle |" in md
    assert "**Protocol.**" in md and "subset of 120" in md and "valid" in md
    assert result.plots == ["retrieval-baselines_recall_at_k.png"]
    assert (out / result.plots[0]).stat().st_size > 1000
    assert "retrieval-baselines_recall_at_k.png" in md
