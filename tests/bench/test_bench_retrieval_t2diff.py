"""``funnelrec bench retrieval-t2diff``: quick runs through the CLI (simulated world and MovieLens fixture) report
every figure (keys and ranges only, never timings), and bad input fails with one line."""

from __future__ import annotations

import pytest

import funnelrec.bench.retrieval_t2diff as rt
from funnelrec.bench import list_benchmarks
from funnelrec.errors import ConfigError
from bench_testkit import ML100K, bench_cli, isolate_benchmark, last_json

FIGURES = [f"{m}@{k}" for m in ("recall", "mrr") for k in rt.KS]


@pytest.fixture(scope="module", autouse=True)
def _private_cache_one_thread(tmp_path_factory):
    with isolate_benchmark(rt, tmp_path_factory):
        yield


def _cli(*args: str):
    return bench_cli("retrieval-t2diff", *args)


@pytest.fixture(scope="module")
def quick_sim():
    return last_json(_cli("--quick", "--json"))


@pytest.fixture(scope="module")
def quick_ml():
    return last_json(_cli("--quick", "--json", "--data", ML100K))


def _check(f: dict, oracle: bool) -> None:
    assert f["seeds"] == 1
    for key in ("users", "items", "train_positives", "test_targets"):
        assert isinstance(f[key], int) and f[key] > 0, key
    for row in rt.ROWS:
        for fig in FIGURES:
            assert 0.0 <= f[f"{row}.{fig}"] <= 1.0, (row, fig)
            assert f[f"{row}.{fig}.std"] == 0.0  # one seed
        for k in rt.KS[:-1]:
            assert f[f"{row}.recall@{k}"] <= f[f"{row}.recall@{rt.KS[-1]}"]
        true = f[f"{row}.true_recall@100"] if oracle else f.get(f"{row}.true_recall@100")
        assert (true is not None and 0.0 <= true <= 1.0) if oracle else true is None
    for ab in rt.QUICK_PLAN.ablations:
        for fig in FIGURES:
            assert 0.0 <= f[f"ablation.{ab}.{fig}"] <= 1.0, (ab, fig)
        assert -1.0 <= f[f"ablation.{ab}.cosine"] <= 1.0
    for row in ("ma_only", "t2diff", "t2diff_ddim10"):
        assert -1.0 <= f[f"{row}.cosine"] <= 1.0
    for key in ("t2diff.regressor_cosine", "t2diff.last_item_cosine"):
        assert -1.0 <= f[key] <= 1.0
    assert f["t2diff_cosine_minus_regressor"] == pytest.approx(f["t2diff.cosine"] - f["t2diff.regressor_cosine"])
    for name in ("t2diff_minus_ma_only", "ma_only_minus_two_tower", "t2diff_minus_two_tower"):
        a, b = name.split("_minus_")
        for fig in FIGURES:
            assert f[f"{name}.{fig}"] == pytest.approx(f[f"{a}.{fig}"] - f[f"{b}.{fig}"])
            assert f[f"{name}.{fig}.margin_2std"] == pytest.approx(f[f"{name}.{fig}"])  # std 0 with one seed
            assert isinstance(f[f"{name}.{fig}.beats"], bool)
    for row in rt.ROWS:
        for key in ("user_flops", "user_ms", "user_ms.p99", f"user_ms_per_request@{f['latency_batch']}"):
            assert f[f"{row}.{key}"] > 0, (row, key)
        assert f[f"user_latency_ratio.{row}"] > 0
        for n in rt.QUICK_PLAN.corpus_sizes:
            assert f[f"{row}.e2e_ms@{n}"] > 0 and f[f"e2e_latency_ratio.{row}@{n}"] > 0
    for n in rt.QUICK_PLAN.corpus_sizes:
        assert f[f"ann_ms@{n}"] > 0 and f[f"ann_build_s@{n}"] > 0
    # the diffusion chain costs FLOPs: T2Diff's user tower does more work than MA-only's, MA-only than two-tower
    assert f["t2diff.user_flops"] > f["ma_only.user_flops"] > f["two_tower.user_flops"]
    for row in rt.TRAINED:
        assert f[f"{row}.params"] > 0 and f[f"{row}.train_seconds"] > 0 and f[f"{row}.best_epoch"] >= 1
    assert f["steps"] == rt.QUICK_PLAN.t2diff["steps"] and f["dim"] == rt.QUICK_PLAN.model["out_dim"]
    assert f["wall_s"] > 0


def test_is_registered():
    assert "retrieval-t2diff" in list_benchmarks()


def test_quick_sim(quick_sim):
    f = quick_sim
    assert f["data"] == rt.QUICK_DATA and f["data_kind"] == "sim"
    _check(f, oracle=True)


def test_quick_movielens(quick_ml):
    f = quick_ml
    assert f["data_kind"] == "movielens" and f["data"] == ML100K and f["items"] == 25
    _check(f, oracle=False)
    assert f["test_targets"] == 15


@pytest.mark.parametrize("spec, names", [("nosuch:thing", "nosuch"),
                                         ("movielens:tests/fixtures/no-such-folder", "no-such-folder")])
def test_bad_data_exits_2_with_one_line(spec, names):
    res = _cli("--quick", "--json", "--data", spec)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], lines


def test_bad_settings():
    with pytest.raises(ConfigError, match="seeds"):
        rt.bench_retrieval_t2diff(quick=True, seeds=0, threads=1)
    with pytest.raises(ConfigError, match="ablations"):
        rt.Plan(ablations=("no_such",))
    with pytest.raises(ConfigError, match="epochs"):
        rt.Plan(epochs=0)
    with pytest.raises(ConfigError, match="corpus_sizes"):
        rt.Plan(corpus_sizes=())
    with pytest.raises(ConfigError, match="unknown row"):
        rt.row_overrides("nope", rt.QUICK_PLAN)
