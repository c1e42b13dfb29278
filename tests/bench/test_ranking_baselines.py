"""``funnelrec bench ranking-baselines``: quick runs on a small world and on MovieLens fixtures, the figures and
the report they produce, and the errors of bad options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from funnelrec.bench import list_benchmarks, render_markdown, result_to_json, run_benchmark
from funnelrec.bench.ranking_baselines import MODELS, load_ranking_data, loader_throughput, score_split
from funnelrec.cli import app
from funnelrec.errors import ConfigError

TASKS = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward")
SMALL = "sim:small?num_users=150&days=4"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Simulated worlds go to a cache of this test module; the benchmark's thread setting is undone."""
    monkeypatch.setenv("FUNNELREC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ranking-bench-cache"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_sim(tmp_path_factory):
    import os

    old = os.environ.get("FUNNELREC_CACHE_DIR")
    os.environ["FUNNELREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "ranking-bench-cache")
    try:
        return run_benchmark("ranking-baselines", quick=True, json_mode=False, write=False, data=SMALL,
                             threads=1)
    finally:
        if old is None:
            os.environ.pop("FUNNELREC_CACHE_DIR", None)
        else:
            os.environ["FUNNELREC_CACHE_DIR"] = old


def test_registered():
    assert "ranking-baselines" in list_benchmarks()


def test_quick_run_reports_every_model_task_and_reference(quick_sim):
    r = quick_sim.results
    for m in (*MODELS, "popularity", "oracle"):
        for t in TASKS:
            for metric in ("auc", "gauc"):
                assert 0.0 <= r[f"{m}.{metric}.{t}"] <= 1.0, (m, metric, t)
        assert 0.0 <= r[f"{m}.xauc.watch"] <= 1.0
    for m in MODELS:
        assert r[f"{m}.params_dense"] > 0 and r[f"{m}.params_embedding"] > 0 and r[f"{m}.flops_per_sample"] > 0
        assert r[f"{m}.pipeline_samples_per_s"] > 0 and r[f"{m}.memory_samples_per_s"] > 0
        assert r[f"{m}.loader_ratio"] == pytest.approx(r[f"{m}.pipeline_samples_per_s"]
                                                       / r[f"{m}.memory_samples_per_s"])
        assert r[f"{m}.lr"] in (1e-3, 3e-3)
        for t in TASKS:
            want = (r[f"{m}.auc.{t}"] - r[f"popularity.auc.{t}"]) / (r[f"oracle.auc.{t}"] - r[f"popularity.auc.{t}"])
            assert r[f"{m}.gap_closed.{t}"] == pytest.approx(want)
    # the world's own probabilities beat the popularity floor on the frequent tasks
    assert r["oracle.auc.is_click"] > r["popularity.auc.is_click"]
    assert r["oracle.auc.long_view"] > r["popularity.auc.long_view"]
    assert r["min_loader_ratio"] == min(r[f"{m}.loader_ratio"] for m in MODELS)
    margins = [r[f"{m}.auc.{t}"] - r[f"popularity.auc.{t}"] for m in MODELS for t in TASKS]
    assert r["min_auc_margin_over_popularity"] == pytest.approx(min(margins))


def test_report_has_the_models_by_tasks_tables(quick_sim):
    doc = result_to_json(quick_sim)
    md = render_markdown(doc)
    assert "### Test AUC" in md and "### Gap closed" in md and "| popularity |" in md and "| oracle |" in md
    for m in MODELS:
        assert f"| {m} |" in md
    assert doc["summary"] and doc["summary"] in md
    json.dumps(doc, allow_nan=False)


def test_score_split_aligns_rows_and_slices():
    rd = load_ranking_data(SMALL, history_len=10)
    test = rd.parts["test"]
    y = np.stack([test[t].to_numpy() for t in rd.tasks], axis=1).astype(float)
    perfect = score_split(y, test["play_time_ms"].to_numpy() / 1000.0, rd)
    for t in rd.tasks:
        if 0 < test[t].sum() < test.height:
            assert perfect[f"auc.{t}"] == pytest.approx(1.0)
    assert perfect["xauc.watch"] == pytest.approx(1.0)
    flipped = score_split(1.0 - y, None, rd)
    assert flipped["auc.is_click"] == pytest.approx(0.0) and math.isnan(flipped["xauc.watch"])


def test_eval_users_keeps_the_same_users_in_valid_and_test():
    full = load_ranking_data(SMALL, history_len=10)
    sub = load_ranking_data(SMALL, history_len=10, eval_users=20)
    again = load_ranking_data(SMALL, history_len=10, eval_users=20)
    kept = set(sub.parts["valid"]["user_id"].to_list()) | set(sub.parts["test"]["user_id"].to_list())
    assert len(kept) == 20
    assert sub.parts["train"].equals(full.parts["train"])  # train untouched
    for k in ("valid", "test"):
        assert sub.parts[k].equals(again.parts[k])  # drawn once, deterministic
        expected = full.parts[k].filter(full.parts[k]["user_id"].is_in(list(kept)))
        assert sub.parts[k].equals(expected)  # every impression of a kept user, in order
        assert len(sub.datasets[k]) > 0
    with pytest.raises(ConfigError, match="eval_users"):
        load_ranking_data(SMALL, history_len=10, eval_users=0)


def test_loader_throughput_compares_the_same_batches():
    rd = load_ranking_data(SMALL, history_len=10)
    out = loader_throughput("shared_bottom", rd, batch_size=32, steps=3, rounds=1, model_args={"embed_dim": 4})
    assert set(out) == {"pipeline_samples_per_s", "memory_samples_per_s", "loader_ratio"}
    assert out["loader_ratio"] > 0


@pytest.mark.parametrize("fixture", ["ml-100k", "ml-1m"])
def test_movielens_quick_run_through_the_cli(fixture):
    res = CliRunner().invoke(app, ["bench", "ranking-baselines", "--quick", "--json", "--data",
                                   f"movielens:tests/fixtures/{fixture}"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["data"] == f"movielens:tests/fixtures/{fixture}"
    for m in (*MODELS, "popularity"):
        assert f"{m}.auc.is_click" in r
        assert r[f"{m}.xauc.watch"] is None  # MovieLens has no watch time
    assert "oracle.auc.is_click" not in r and "long_view" not in json.dumps(r)


@pytest.mark.parametrize("args, needle", [
    (["--data", "nosuch:thing"], "nosuch"),
    (["--data", "movielens:/does/not/exist"], "/does/not/exist"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_options_are_one_line_and_exit_2(args, needle):
    res = CliRunner().invoke(app, ["bench", "ranking-baselines", "--quick", *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output


def test_benchmarks_without_data_reject_it():
    res = CliRunner().invoke(app, ["bench", "simulator", "--quick", "--data", SMALL])
    assert res.exit_code == 2 and "does not take --data" in res.output


def test_ranking_loader_quick():
    r = run_benchmark("ranking-loader", quick=True, json_mode=False, write=False, data=SMALL, threads=1).results
    for m in MODELS:
        assert r[f"{m}.loader_ratio"] > 0
    assert r["min_loader_ratio"] == min(r[f"{m}.loader_ratio"] for m in MODELS)
