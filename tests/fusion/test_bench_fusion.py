"""``funnelrec bench fusion --quick``: through the CLI, keys and value ranges (never timings); bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import funnelrec.bench.fusion as bf
from funnelrec.bench import list_benchmarks
from funnelrec.cli import app
from funnelrec.errors import ConfigError
from funnelrec.sim import World


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick():
    res = CliRunner().invoke(app, ["bench", "fusion", "--quick", "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in figures.values())
    return figures


def test_is_registered():
    assert "fusion" in list_benchmarks()


def test_quick_run_reports_every_method_and_the_switch_test(quick):
    f = quick
    assert f["world"] == "sim:bench-v1" and f["seeds"] == 1 and f["eval_users"] == bf.QUICK_PLAN.eval_users
    for name in bf.METHODS:
        assert f[f"{name}.watch_s"] > 0, name
        assert 1 <= f[f"{name}.pages"] <= 16, name
        assert f[f"{name}.watch_s.std"] == 0.0  # one seed
    for name in bf.SWITCH_ROWS:
        assert f[f"switch_off.{name}.watch_s"] > 0, name
    for name in bf.CELLS:
        assert 0.0 <= f[f"{name}.violation_rate"] <= 1.0, name
    assert f["xmtf_no_inner.violation_rate"] == 0.0  # q = o through a monotone outer map
    assert f["best_formula_rl"] in bf.FORMULA_RL
    best = f[f"{f['best_formula_rl']}.watch_s"]
    assert f["xmtf_gain_over_best_formula_rl"] == pytest.approx(f["xmtf.watch_s"] / best - 1, rel=1e-6)
    assert isinstance(f["xmtf_beats_best_formula_rl"], bool)
    assert isinstance(f["switch_off.rl_beating_oracle_greedy_watch"], int)
    assert isinstance(f["switch_off.max_rl_gain_over_oracle_greedy_watch"], float)
    for task in ("is_click", "long_view", "is_like"):
        assert 0.5 < f[f"pred_auc_{task}"] < f[f"oracle_auc_{task}"] <= 1.0, task
    assert f["wall_s"] > 0 and f["threads"] == 1


def test_bad_input_is_rejected_with_one_line():
    res = CliRunner().invoke(app, ["bench", "fusion", "--quick", "--data", "movielens:/nowhere"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sim:NAME" in lines[0]
    with pytest.raises(ConfigError, match="seeds"):
        bf.bench_fusion(quick=True, seeds=0)


def test_fusion_ranker_quick_run_trains_a_cascade_and_reports_every_row(tmp_path, monkeypatch):
    """``bench fusion-ranker --quick``: a cascade trained on the quick world predicts in every env; the same rows
    and targets as the noisy-oracle benchmark, plus the ranker's training figures."""
    monkeypatch.setenv("FUNNELREC_CACHE_DIR", str(tmp_path / "cache"))
    assert "fusion-ranker" in list_benchmarks()
    res = CliRunner().invoke(app, ["bench", "fusion-ranker", "--quick", "--json"])
    assert res.exit_code == 0, res.output
    f = json.loads(res.stdout.strip().splitlines()[-1])
    assert f["world"] == f"sim:{bf.QUICK_RANKER_WORLD}"
    assert 0.5 < f["ranker.ranker_valid_auc_mean"] < 1.0
    for row in bf.METHODS:
        assert f[f"{row}.watch_s"] > 0, row
    for key in ("xmtf_gain_over_best_formula_rl", "xmtf.violation_rate", "switch_off.rl_beating_oracle_greedy_watch"):
        assert key in f, key
    # the ranker is not the oracle: its candidate AUC sits below the truth's
    assert f["pred_auc_is_click"] < f["oracle_auc_is_click"]
    # the selection averages two trainings per trial, and keeps each one's score
    seed = bf.FusionPlan().selection_seed
    for setting in bf.QUICK_PLAN.xmtf_grid:
        name = "selection.xmtf[" + ",".join(f"{k}={v}" for k, v in setting.items()) + "]"
        runs = [f[f"{name}#{seed + i}.valid_watch_s"] for i in range(2)]
        assert f[f"{name}.valid_watch_s"] == pytest.approx(sum(runs) / 2), name


def test_selection_refuses_a_bad_seed_count():
    plan = dataclasses.replace(bf.QUICK_PLAN, selection_seeds=0)
    world = World.from_profile("small")
    with pytest.raises(ConfigError, match="selection_seeds must be a positive integer, got 0"):
        bf.select_settings(world, plan)


def test_xmtf_training_without_a_teacher_or_fitted_cells_is_refused_by_name():
    with pytest.raises(ConfigError, match="'xmtf' needs a teacher or inner_init"):
        bf._train_xmtf(None, bf.QUICK_PLAN, None, 0, "xmtf", None)
