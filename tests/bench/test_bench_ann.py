"""``funnelrec bench ann``: the quick run through the CLI (keys and sanity, never timings), its report, the plot,
the recall helper and bad arguments."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import funnelrec.bench.ann as ann_bench
from funnelrec.bench import fix_threads, list_benchmarks, render_markdown, result_to_json, run_benchmark
from funnelrec.cli import app
from funnelrec.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def _private_cache_one_thread(tmp_path_factory):
    """Simulated worlds go to a temporary cache, never the user's; torch and FAISS run on one thread (test workers
    share 2 cores); both thread counts are given back afterwards."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FUNNELREC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(ann_bench, "fix_threads", lambda n: fix_threads(1))
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    mp.undo()
    torch.set_num_threads(torch_before)
    faiss.omp_set_num_threads(faiss_before)


@pytest.fixture(scope="module")
def quick():
    """One quick run through the CLI: the JSON line and the run's figures."""
    res = CliRunner().invoke(app, ["bench", "ann", "--quick", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_registered():
    assert "ann" in list_benchmarks()


def test_quick_run_has_every_figure(quick):
    r = quick
    keys = ["items", "sampled_items", "corpus.distinct_vectors", "dim", "queries", "train_s", "train_positives",
            "exact.latency_ms", "exact.qps", "exact.build_s", "exact.index_bytes", "hnsw.build_s",
            "hnsw.index_bytes", "ivf.build_s", "ivf.nlist", "ivf.index_bytes", "best_recall_at_100", "best_speedup",
            "best_config", "best_latency_ms", "filtered.recall_at_100", "filtered.mean_seen", "index_save_s",
            "index_load_s", "saved_bytes", "load_roundtrip_equal", "wall_s"]
    keys += [f"hnsw.ef{ef}.{m}" for ef in ann_bench.EF_GRID for m in ("recall_at_100", "latency_ms", "qps", "speedup")]
    keys += [f"ivf.nprobe{p}.{m}" for p in ann_bench.NPROBE_GRID for m in ("recall_at_100", "latency_ms", "qps")]
    assert set(keys) <= set(r), sorted(set(keys) - set(r))
    assert r["items"] == 20_000 and r["sampled_items"] == 20_000 - 7_583 and r["k"] == 100 and r["threads"] == 1
    assert r["queries_held_out"] is True and r["queries"] >= 10 and r["train_users"] == 80
    assert r["corpus.distinct_vectors"] > 0.99 * r["items"]
    recalls = [r[f"hnsw.ef{ef}.recall_at_100"] for ef in ann_bench.EF_GRID]
    assert all(0 <= x <= 1 for x in recalls) and recalls[-1] >= recalls[0]
    assert r["ivf.nprobe256.recall_at_100"] >= r["ivf.nprobe1.recall_at_100"]
    assert r["best_recall_at_100"] >= 0.95  # IVF probing half of its lists is near exact on 20k items
    assert r["best_config"] != "none" and r["best_speedup"] > 0
    assert r["filtered.recall_at_100"] >= 0.9 and r["load_roundtrip_equal"] is True


def test_report_renders(quick, tmp_path):
    names = [f"hnsw.ef{ef}" for ef in ann_bench.EF_GRID] + [f"ivf.nprobe{p}" for p in ann_bench.NPROBE_GRID]
    rows = {name: {"recall": quick[f"{name}.recall_at_100"], "latency_ms": quick[f"{name}.latency_ms"],
                   "qps": quick[f"{name}.qps"], "speedup": quick[f"{name}.speedup"]} for name in names}
    md = ann_bench.summary_markdown(quick, rows)
    assert "| exact (IndexFlatIP) | 1 |" in md and f"`{quick['best_config']}`" in md and "held-out users" in md
    name = ann_bench.plot_recall_latency(rows, quick["exact.latency_ms"], tmp_path)
    assert name == "ann_recall_latency.png" and (tmp_path / name).stat().st_size > 1000
    result = ann_bench.BenchResult("ann", quick, summary=md, plots=[name],
                                   targets=[ann_bench.Target("best_speedup", ">=", 20)])
    doc = result_to_json(result, tmp_path)
    assert doc["targets"][0]["name"] == "best_speedup" and "## ANN search over 20,000" in render_markdown(doc)


def test_recall_at_k():
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    got = np.array([[4, 9, 1, -1], [6, 5, 7, 8]])
    assert ann_bench.recall_at_k(got, truth) == pytest.approx((2 / 4 + 2 / 2) / 2)
    assert ann_bench.recall_at_k(truth, truth) == 1.0


def test_bad_arguments():
    with pytest.raises(ConfigError, match="items must be a positive integer"):
        run_benchmark("ann", quick=True, json_mode=True, write=False, items=-5)
    res = CliRunner().invoke(app, ["bench", "ann", "--quick", "--seeds", "2"])
    assert res.exit_code != 0 and "does not take --seeds" in res.output
