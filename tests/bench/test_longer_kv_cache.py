"""``funnelrec bench longer-kv-cache``: the quick run's figures (keys and exactness, never timings), its JSON
line and report, and the helpers that build the naive path's pointwise rows."""

from __future__ import annotations

import json

import pytest
import torch

from funnelrec.bench import list_benchmarks, result_to_json, run_benchmark
from funnelrec.bench.longer_kv_cache import make_request, pointwise_rows, to_dtype

KEYS = ("candidates", "history", "seq_tokens", "num_queries", "num_global", "dim", "self_layers", "merge",
        "merge_k", "query_sampling", "threads", "max_abs_diff", "max_abs_diff_float32",
        "max_abs_diff_float32_vs_pointwise", "cached_ms", "encode_ms", "score_ms", "naive_ms",
        "request_forward_ms", "speedup", "speedup_vs_request_forward", "cached_candidates_per_s",
        "naive_candidates_per_s", "cached_flops", "naive_flops", "flop_ratio", "cache_bytes", "params_dense",
        "params_embedding")


@pytest.fixture(scope="module")
def quick():
    before = torch.get_num_threads()
    try:
        return run_benchmark("longer-kv-cache", quick=True, json_mode=True, write=False, threads=1)
    finally:
        torch.set_num_threads(before)


def test_registered():
    assert "longer-kv-cache" in list_benchmarks()


def test_quick_run_has_every_figure(quick):
    r = quick.results
    assert set(KEYS) <= set(r), set(KEYS) - set(r)
    assert r["candidates"] == 64 and r["history"] == 256 and r["seq_tokens"] == 64 and r["threads"] == 1
    assert r["max_abs_diff"] <= 1e-5 and r["max_abs_diff_float32"] <= 1e-4  # exactness, not speed
    assert r["cached_flops"] > 0 and r["naive_flops"] > r["cached_flops"] and r["flop_ratio"] > 1
    assert r["cached_ms"] > 0 and r["naive_ms"] > 0 and r["speedup"] > 0 and r["cache_bytes"] > 0


def test_quick_json_line_and_report(quick):
    doc = result_to_json(quick)
    assert doc["quick"] is True and [t["name"] for t in doc["targets"]] == ["max_abs_diff"]
    assert doc["targets"][0]["met"] is True
    assert doc["config"]["model"]["merge"] == "concat"
    line = json.dumps(doc["results"])
    assert all(not isinstance(v, (dict, list)) for v in json.loads(line).values())


def test_pointwise_rows_repeat_the_request():
    req = make_request(history=12, candidates=5, seed=1)
    rows = pointwise_rows(req, 1, 4).validate()
    assert rows.batch_size == 3 and rows.num_candidates == 1
    assert torch.equal(rows.hist_items[2], req.hist_items[0]) and torch.equal(rows.cand_sparse[:, 0],
                                                                              req.cand_sparse[0, 1:4])
    assert to_dtype(req, torch.float64).hist_gap_s.dtype == torch.float64
    assert (req.hist_gap_s[0, :-1] >= req.hist_gap_s[0, 1:]).all()  # older events, larger gaps
