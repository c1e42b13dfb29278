"""``funnelrec bench retrieval-mpformer``: quick runs through the CLI (simulated world and MovieLens fixture) report
every figure (keys and ranges only, never timings), and bad input fails with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

import funnelrec.bench.retrieval_mpformer as rm
from funnelrec.bench import get_benchmark
from funnelrec.errors import ConfigError
from bench_testkit import ML100K, bench_cli, isolate_benchmark, last_json

SIM_OBJECTIVES = ("is_click", "long_view", "is_like", "is_follow")
ML_OBJECTIVES = ("rating_ge1", "rating_ge4", "rating_eq5")
PER_OBJECTIVE = ("recall@50", "recall@100", "recall@200", "ndcg@50")


@pytest.fixture(scope="module", autouse=True)
def _private_cache_one_thread(tmp_path_factory):
    with isolate_benchmark(rm, tmp_path_factory):
        yield


def _cli(*args: str):
    return bench_cli("retrieval-mpformer", *args)


@pytest.fixture(scope="module")
def quick_sim():
    return last_json(_cli("--quick", "--json"))


@pytest.fixture(scope="module")
def quick_ml():
    return last_json(_cli("--quick", "--json", "--data", ML100K))


def _check_common(f: dict, objectives: tuple[str, ...], oracle: bool) -> None:
    assert f["objectives"] == ",".join(objectives) and f["K"] == len(objectives) and f["seeds"] == 1
    for key in ("users", "items", "train_rows", "valid_rows", "test_rows"):
        assert isinstance(f[key], int) and f[key] > 0, key
    for row in rm.ROWS:
        for name in objectives:
            for metric in PER_OBJECTIVE:
                value = f[f"{row}.{name}.{metric}"]
                assert value is None or 0.0 <= value <= 1.0, (row, name, metric)
            true = f[f"{row}.{name}.true_recall@100"]
            assert (true is not None and 0.0 <= true <= 1.0) if oracle else true is None
    for name in objectives:
        for row in ("mpformer", "linear_heads"):
            assert f"{row}.{name}.recall@100_ratio_vs_dedicated" in f
    for m in rm.QUICK_PLAN.merge_sizes:
        for row in ("mpformer", "linear_heads"):
            assert 0.0 <= f[f"{row}.value_recall@{m}"] <= 1.0
        for row in ("mpformer", "linear_heads", "dedicated"):
            assert 0.0 <= f[f"{row}.value_recall_uniform@{m}"] <= 1.0
        diff = f[f"mpformer.value_recall@{m}"] - f[f"mpformer.value_recall_uniform@{m}"]
        assert f[f"value_recall@{m}_personal_minus_uniform"] == pytest.approx(diff)
        assert isinstance(f[f"personal_beats_uniform@{m}"], bool)
    for row in ("mpformer", "linear_heads", "dedicated"):
        for key in ("user_flops", "user_latency_ms", "user_latency_p99_ms", "ann_ms", "params", "train_seconds",
                    "best_epoch"):
            assert f[f"{row}.{key}"] > 0, (row, key)
    k = len(objectives)
    assert f["user_flops_ratio_vs_dedicated"] == pytest.approx(f["mpformer.user_flops"] / f["dedicated.user_flops"])
    assert f["user_flops_target"] == pytest.approx(1.5 / k)
    # K dedicated forwards cost more than one joint forward
    assert f["dedicated.user_flops"] > f["mpformer.user_flops"]
    for key in ("min_recall@100_ratio_vs_dedicated", "user_latency_ratio_vs_dedicated", "ann_ratio_vs_dedicated",
                "train_time_ratio_vs_dedicated", "wall_s"):
        assert key in f, key


def test_is_registered():
    assert get_benchmark("retrieval-mpformer") is rm.bench_retrieval_mpformer


def test_quick_sim(quick_sim):
    f = quick_sim
    assert f["data"] == rm.QUICK_DATA and f["data_kind"] == "sim"
    _check_common(f, SIM_OBJECTIVES, oracle=True)
    for name in SIM_OBJECTIVES:
        assert f[f"test_users.{name}"] >= 1


def test_quick_movielens(quick_ml):
    f = quick_ml
    assert f["data_kind"] == "movielens" and f["data"] == ML100K and f["items"] == 25
    _check_common(f, ML_OBJECTIVES, oracle=False)
    assert f["test_users.rating_ge1"] == f["test_rows"] == 15  # every fixture user has >= 3 active dates


@pytest.mark.parametrize("spec, names", [("nosuch:thing", "nosuch"),
                                         ("movielens:tests/fixtures/no-such-folder", "no-such-folder")])
def test_bad_data_exits_2_with_one_line(spec, names):
    res = _cli("--quick", "--json", "--data", spec)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], lines


def test_bad_settings():
    with pytest.raises(ConfigError, match="seeds"):
        rm.bench_retrieval_mpformer(quick=True, seeds=0, threads=1)
    with pytest.raises(ConfigError, match="merge_sizes"):
        rm.Plan(merge_sizes=())
    with pytest.raises(ConfigError, match="epochs"):
        rm.Plan(epochs=0)


def test_frozen_config_matches_the_benchmark():
    """configs/train/retrieval-mpformer-bench-v1.yaml holds the benchmark's model and trainer settings."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "configs" / "train" / "retrieval-mpformer-bench-v1.yaml"
    cfg = yaml.safe_load(path.read_text())
    args, plan = cfg["model_args"], rm.FULL_PLAN
    for key, value in rm.MODEL_DEFAULTS.items():
        if key != "q_target":  # the generic leave-last-out path never trains the q head
            assert args[key] == value, key
    assert args["max_len"] == plan.max_len == cfg["train"]["history_len"]
    assert (cfg["train"]["lr"], cfg["train"]["batch_size"], cfg["train"]["epochs"]) == (plan.lr, plan.batch_size,
                                                                                      plan.epochs)
    assert cfg["train"]["patience"] == plan.patience and cfg["data"] == rm.FULL_DATA
