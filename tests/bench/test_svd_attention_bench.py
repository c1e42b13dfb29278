"""``funnelrec bench svd-attention``: the quick run's figures (keys and exactness, never timings), its report, the
memory probe, the plots and bad arguments."""

from __future__ import annotations

import json
import time

import pytest
import torch

from funnelrec.bench import list_benchmarks, result_to_json, run_benchmark
from funnelrec.bench.svd_attention import (METHODS, alternating_times, bench_svd_attention, decaying_history,
                                           low_rank_history, peak_bytes, plot_errors, plot_scaling)
from funnelrec.errors import ConfigError

RANKS, ALPHAS = (16, 32, 64), ("0", "0p5", "1", "2")


@pytest.fixture(scope="module")
def quick():
    before = torch.get_num_threads()
    try:
        return run_benchmark("svd-attention", quick=True, json_mode=True, write=False, threads=1)
    finally:
        torch.set_num_threads(before)


def test_registered():
    assert "svd-attention" in list_benchmarks()


def test_quick_run_has_every_figure(quick):
    r = quick.results
    keys = ["speedup_vs_full", "speedup_cached", "speedup_exact", "speedup_exact_streamed", "flop_ratio",
            "flop_ratio_cached",
            "peak_memory_ratio", "peak_memory_ratio_cached", "exact_max_abs_diff", "exact_max_abs_diff_float32",
            "cached_max_abs_diff", "cache_bytes", "full_ms", "linear_ms", "sim_ms", "mn_matrix_bytes"]
    keys += [f"{k}_ms_r{rank}" for k in ("compact", "cached", "exact", "exact_streamed") for rank in RANKS]
    keys += [f"speedup_{k}_r{rank}" for k in ("vs_full", "cached") for rank in RANKS]
    keys += [f"{k}_{m}" for k in ("flops", "peak_bytes") for m in METHODS] + [f"slope_{m}" for m in METHODS]
    keys += [f"err_{k}_r{rank}_a{a}" for k in ("compact", "exact") for rank in RANKS for a in ALPHAS]
    keys += [f"err_{k}_a{a}" for k in ("linear", "sim", "compact_raw_r32") for a in ALPHAS]
    keys += [f"scale_{m}_ms_n{n}" for m in METHODS for n in (256, 512, 1024)]
    assert set(keys) <= set(r), sorted(set(keys) - set(r))
    assert r["history"] == 512 and r["candidates"] == 64 and r["dim"] == 64 and r["threads"] == 1
    assert r["exact_max_abs_diff"] <= 1e-8 and r["exact_max_abs_diff_float32"] <= 1e-5  # exactness, not speed
    assert r["cached_max_abs_diff"] <= 1e-6
    assert all(r[f"err_exact_r64_a{a}"] < 1e-5 for a in ALPHAS)  # R = D: no truncation
    assert r["err_exact_r16_a2"] < r["err_exact_r16_a0"]  # faster spectrum decay, smaller truncation error
    assert r["flops_full"] > r["flops_compact"] > r["flops_cached"] > 0 and r["flop_ratio"] > 1
    assert r["peak_bytes_full"] > 0 and r["peak_bytes_cached"] < r["peak_bytes_exact"]
    assert all(r[f"{k}_ms_r32"] > 0 for k in ("compact", "cached", "exact"))


def test_quick_json_line_and_report(quick):
    doc = result_to_json(quick)
    assert doc["quick"] is True and [t["name"] for t in doc["targets"]] == ["exact_max_abs_diff"]
    assert doc["targets"][0]["met"] is True and doc["plots"] == []
    assert doc["config"]["ranks"] == list(RANKS) and "reconstruction" in doc["summary"]
    line = json.dumps(doc["results"])
    assert all(not isinstance(v, (dict, list)) for v in json.loads(line).values())


def test_peak_bytes_sees_an_m_by_n_matrix():
    q, x = torch.randn(1, 30, 8), torch.randn(1, 70, 8)
    assert peak_bytes(lambda: torch.softmax(q @ x.transpose(-1, -2), -1)) >= 2 * 30 * 70 * 4  # scores + softmax
    assert peak_bytes(lambda: q.sum()) == 4


def test_alternating_times_and_histories():
    t = alternating_times({"a": lambda: sum(range(10)), "b": lambda: None}, repeats=3)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    x = low_rank_history(40, 8, 3)
    assert torch.linalg.matrix_rank(x[0]) == 3
    s = torch.linalg.svdvals(decaying_history(64, 8, 1.0)[0].double())
    assert torch.allclose(s / s[0], 1.0 / torch.arange(1, 9, dtype=torch.float64), atol=1e-6)
    assert abs(float(decaying_history(64, 8, 2.0).square().sum(-1).mean()) - 8) < 1e-3


def test_plots_are_written(tmp_path):
    a = plot_scaling([1, 2, 4], {m: [1.0, 2.0, 4.0] for m in METHODS}, tmp_path)
    b = plot_errors([16, 32], [0.0, 1.0], {(k, al, r): 0.5 for k in ("compact", "exact") for al in (0.0, 1.0)
                                           for r in (16, 32)}, tmp_path)
    assert (tmp_path / a).stat().st_size > 0 and (tmp_path / b).stat().st_size > 0


@pytest.mark.parametrize("kwargs,match", [({"ranks": (16, 64)}, "ranks"), ({"ranks": (32, 128)}, "ranks"),
                                          ({"history": 0}, "history"), ({"chunk": -1}, "chunk"),
                                          ({"candidates": 0}, "candidates"),
                                          ({"scaling": (512,)}, "scaling"), ({"alphas": (-1.0,)}, "alphas"),
                                          ({"threads": 0}, "threads")])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    before = torch.get_num_threads()
    try:
        with pytest.raises(ConfigError, match=match):
            bench_svd_attention(quick=True, **{"threads": 1, **kwargs})
    finally:
        torch.set_num_threads(before)


def test_alternating_times_blocks_fast_calls_and_counts_every_call():
    counts = {"a": 0, "b": 0}

    def call(k):
        def fn():
            counts[k] += 1
            if k == "b":
                time.sleep(0.002)  # longer than the block below: one call per sample
        return fn

    out = alternating_times({k: call(k) for k in counts}, repeats=4, warmup=1, min_block_s=0.001)
    assert set(out) == {"a", "b"} and out["b"] >= 0.002 and out["a"] > 0
    assert counts["b"] == 1 + 1 + 4  # warmup, the sizing call, one call per repeat
    assert counts["a"] > counts["b"]  # a no-op is timed in blocks of back-to-back calls
