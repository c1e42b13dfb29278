"""``funnelrec bench ranking``: a quick run over a few rows with the switch test, the claims' figures, the report,
and bad options."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from funnelrec.bench import list_benchmarks, render_markdown, result_to_json, run_benchmark
from funnelrec.bench.ranking import ENTRIES, SWITCH_ROWS
from funnelrec.cli import app
from funnelrec.ranking import RANKERS

ROWS = ("mmoe", "dcnv2", "din", "rankmixer", "longer", "transformer", "longer-no_merge", "rankmixer-single_scenario",
        "longer_rankmixer", "hyformer", "mtmixatt", "ple", "onerank", "solar", "target_attention-last512",
        "sim-lifelong", "solar-svd_exact")
TASKS = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward")
SMALL = "sim:small?num_users=150&days=4"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    old_cache, threads = os.environ.get("FUNNELREC_CACHE_DIR"), torch.get_num_threads()
    os.environ["FUNNELREC_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "ranking-bench-cache")
    try:
        return run_benchmark("ranking", quick=True, json_mode=False, write=False, rows=ROWS, threads=1)
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("FUNNELREC_CACHE_DIR", None)
        else:
            os.environ["FUNNELREC_CACHE_DIR"] = old_cache


def test_registered_and_every_row_is_a_registered_model():
    assert "ranking" in list_benchmarks()
    keys = [e.key for e in ENTRIES]
    assert len(keys) == len(set(keys))
    for e in ENTRIES:
        assert e.model in RANKERS and (e.parent is None or e.parent in keys)
    assert set(SWITCH_ROWS) <= set(keys)


def test_quick_run_rows_and_claims(quick):
    r = quick.results
    for key in ROWS:
        assert 0.0 <= r[f"{key}.auc_mean"] <= 1.0
        assert r[f"{key}.flops_per_sample"] > 0 and r[f"{key}.params_dense"] > 0 and r[f"{key}.samples_per_s"] > 0
        assert r[f"{key}.auc_mean"] == pytest.approx(np.mean([r[f"{key}.auc.{t}"] for t in
                                                               ("is_click", "long_view", "is_like", "is_follow",
                                                                "is_comment", "is_forward")]))
    assert r["longer-no_merge.lr"] == r["longer.lr"]  # an ablation reuses its parent's learning rate
    assert r["longer_minus_transformer_auc_mean"] == pytest.approx(r["longer.auc_mean"] - r["transformer.auc_mean"])
    assert r["longer_flops_vs_transformer"] == pytest.approx(r["longer.flops_per_sample"]
                                                             / r["transformer.flops_per_sample"])
    best = max(r["dcnv2.auc_mean"], r["mmoe.auc_mean"])
    assert r["rankmixer_minus_best_of_dcnv2_mmoe_auc_mean"] == pytest.approx(r["rankmixer.auc_mean"] - best)
    # the switch test trained DIN and LONGER again on the world without long-term interests
    assert "switch.din.auc_mean" in r and "switch.longer.auc_mean" in r and "switch.mmoe.auc_mean" not in r
    assert r["longer_edge_shrink_switch_off"] == pytest.approx(
        (r["longer.auc_mean"] - r["din.auc_mean"]) - (r["switch.longer.auc_mean"] - r["switch.din.auc_mean"]))
    assert {t.name for t in quick.targets} >= {"longer_minus_transformer_auc_mean", "longer_edge_shrink_switch_off"}


def test_ranking_ii_claims(quick):
    r = quick.results
    assert r["hyformer_minus_longer_rankmixer_auc_mean"] == pytest.approx(
        r["hyformer.auc_mean"] - r["longer_rankmixer.auc_mean"])
    tabs = [t for t in range(16) if f"mtmixatt.tab{t}.auc_mean" in r]
    edges = [r[f"mtmixatt.tab{t}.auc_mean"] - r[f"rankmixer.tab{t}.auc_mean"] for t in tabs]
    assert r["mtmixatt_minus_rankmixer_tab_auc_min"] == pytest.approx(min(edges))
    assert r["mtmixatt_tabs_won_vs_rankmixer"] == pytest.approx(np.mean(np.array(edges) > 0))
    nonmain = [r[f"mtmixatt.tab{t}.auc_mean"] - r[f"rankmixer-single_scenario.tab{t}.auc_mean"] for t in tabs if t != 1]
    if nonmain:
        assert r["mtmixatt_minus_single_scenario_nonmain_tab_auc_mean"] == pytest.approx(np.mean(nonmain))
    # the tab switch trained MTmixAtt and RankMixer again on the world without the tab effect
    assert "switch_tab.mtmixatt.auc_mean" in r and "switch_tab.rankmixer.auc_mean" in r
    off = [r[f"switch_tab.mtmixatt.tab{t}.auc_mean"] - r[f"switch_tab.rankmixer.tab{t}.auc_mean"] for t in tabs]
    assert r["mtmixatt_tab_edge_shrink_switch_off"] == pytest.approx(np.mean(edges) - np.mean(off))
    assert {t.name for t in quick.targets} >= {"hyformer_minus_longer_rankmixer_auc_mean",
                                               "mtmixatt_tab_edge_shrink_switch_off"}


def test_ranking_iii_seesaw_figures(quick):
    r = quick.results
    assert r["onerank_tasks_improved_vs_ple"] + r["onerank_tasks_degraded_vs_ple"] <= len(TASKS)
    assert r["onerank_click_minus_ple"] == pytest.approx(r["onerank.auc.is_click"] - r["ple.auc.is_click"])
    assert r["onerank_flops_vs_ple"] == pytest.approx(r["onerank.flops_per_sample"] / r["ple.flops_per_sample"])


def test_ranking_iv_solar_rows_spectrum_and_switch(quick):
    r = quick.results
    for base in ("target_attention-last512", "din", "sim-lifelong"):
        ident = base.replace("-", "_")
        assert r[f"solar_minus_{ident}_auc_mean"] == pytest.approx(r["solar.auc_mean"] - r[f"{base}.auc_mean"])
    assert r["solar.spectrum.events_median"] > 16  # the lifelong rows read beyond the run's 16-event histories
    for prefix in ("solar.spectrum", "solar.init_spectrum", "solar.spectrum_centered"):
        ranks = [r[f"{prefix}.r{p}.median"] for p in (90, 95, 99)]
        assert 1 <= ranks[0] <= ranks[1] <= ranks[2] <= r[f"{prefix}.dim"] == 8
    # the lifelong switch trained SOLAR and truncated attention again on the world without long-term interests
    assert r["solar_edge_shrink_switch_off"] == pytest.approx(
        (r["solar.auc_mean"] - r["target_attention-last512.auc_mean"])
        - (r["switch.solar.auc_mean"] - r["switch.target_attention-last512.auc_mean"]))
    # SOLAR's exact mode gets the same bars and its own switch test (the baseline's switched row is shared)
    assert r["solar_svd_exact_minus_target_attention_last512_auc_mean"] == pytest.approx(
        r["solar-svd_exact.auc_mean"] - r["target_attention-last512.auc_mean"])
    assert r["solar_svd_exact_edge_shrink_switch_off"] == pytest.approx(
        (r["solar-svd_exact.auc_mean"] - r["target_attention-last512.auc_mean"])
        - (r["switch.solar-svd_exact.auc_mean"] - r["switch.target_attention-last512.auc_mean"]))
    # the bars are on the mode with the better valid AUC (a hyperparameter, chosen on valid only)
    pick = max(("solar", "solar-svd_exact"), key=lambda k: r[f"{k}.valid_auc_mean"])
    assert r["solar_selected_is_svd_exact"] == float(pick == "solar-svd_exact")
    ident = pick.replace("-", "_")
    assert r["solar_selected_minus_sim_lifelong_auc_mean"] == r[f"{ident}_minus_sim_lifelong_auc_mean"]
    assert r["solar_selected_edge_shrink_switch_off"] == r[f"{ident}_edge_shrink_switch_off"]
    bars = {t.name for t in quick.targets}
    assert {"solar_selected_minus_din_auc_mean", "solar_selected_edge_shrink_switch_off"} <= bars
    assert not {"solar_minus_din_auc_mean", "solar_svd_exact_edge_shrink_switch_off"} & bars


def test_report_tables(quick):
    md = render_markdown(result_to_json(quick))
    assert "### Test AUC" in md and "### The papers' claims" in md and "| longer-no_merge |" in md
    assert "### Test AUC per tab" in md


def test_per_tab_figures_and_the_single_scenario_row(quick):
    r = quick.results
    tabs = sorted(int(k.split(".")[1][3:]) for k in r if k.startswith("rankmixer.tab") and k.endswith(".auc_mean"))
    assert tabs, "no tab has enough test impressions for per-tab figures"
    for t in tabs:
        per_task = [r[f"rankmixer.tab{t}.auc.{task}"] for task in TASKS]
        finite = [a for a in per_task if a is not None and np.isfinite(a)]
        assert r[f"rankmixer.tab{t}.auc_mean"] == pytest.approx(np.mean(finite))
        assert f"popularity.tab{t}.auc_mean" in r and f"oracle.tab{t}.auc_mean" in r
    single = "rankmixer-single_scenario"
    assert r[f"{single}.lr"] == r["rankmixer.lr"] and 0.0 <= r[f"{single}.auc_mean"] <= 1.0
    assert r[f"{single}.flops_per_sample"] == r["rankmixer.flops_per_sample"]  # the same architecture per tab
    assert r[f"{single}.auc.is_click"] != r["rankmixer.auc.is_click"]  # ... trained on other data


def test_seesaw_counts_against_the_baseline():
    from funnelrec.bench.ranking import seesaw

    res = {}
    for t, (m, b, s) in zip(TASKS, [(0.70, 0.70, 0.001), (0.75, 0.74, 0.001), (0.70, 0.72, 0.004),
                                   (0.80, 0.78, 0.002), (0.71, 0.70, 0.001), (0.69, 0.70, 0.01)]):
        res.update({f"m.auc.{t}": m, f"m.auc.{t}.std": s, f"b.auc.{t}": b, f"b.auc.{t}.std": s})
    seesaw(res, "m", "b", TASKS)
    assert res["m_tasks_improved_vs_b"] == 3 and res["m_tasks_degraded_vs_b"] == 2  # click ties
    # like: -0.02 against 2 * sqrt(2) * 0.004 = 0.0113 -> worse; forward: -0.01 against 0.028 -> within noise
    assert res["m_tasks_worse_than_b_by_2std"] == 1
    assert res["m_sparse_gain_min_vs_b"] == pytest.approx(-0.01)  # follow +0.02, comment +0.01, forward -0.01
    assert res["m_click_minus_b"] == 0.0 and res["m_click_minus_b_in_std"] == 0.0


def test_tab_scores_and_tab_views():
    from funnelrec.bench.ranking import report_tabs, tab_scores, tab_view, trainable_tabs
    from funnelrec.bench.ranking_baselines import load_ranking_data

    rd = load_ranking_data(SMALL, history_len=8)
    test = rd.parts["test"]
    y = np.stack([test[t].to_numpy() for t in rd.tasks], axis=1).astype(float)
    tabs = report_tabs(rd)
    counts = dict(zip(*np.unique(test["tab"].to_numpy(), return_counts=True)))
    assert tabs == sorted(int(t) for t, n in counts.items() if n >= 1_000)
    perfect = tab_scores(y, rd, tabs)
    for t in tabs:
        assert perfect[f"tab{t}.auc.is_click"] == pytest.approx(1.0)
    noisy = y.copy()
    rows = test["tab"].to_numpy() == tabs[0]
    noisy[rows] = 1.0 - noisy[rows]  # wrong on one tab only
    flipped = tab_scores(noisy, rd, tabs)
    assert flipped[f"tab{tabs[0]}.auc.is_click"] == pytest.approx(0.0)
    assert all(flipped[f"tab{t}.auc_mean"] == perfect[f"tab{t}.auc_mean"] for t in tabs[1:])
    tab = trainable_tabs(rd)[0]
    view = tab_view(rd, tab)
    for k, df in view.parts.items():
        assert (df["tab"] == tab).all() and df.height == (rd.parts[k]["tab"] == tab).sum()
    assert view.spec is rd.spec and len(view.datasets["train"]) > 0
    # a tab's view scores its test rows exactly as the full test set does (same histories, same row order)
    from funnelrec.bench.ranking_baselines import build_model, predict_split

    model = build_model("mmoe", rd, {"embed_dim": 4})
    full, _ = predict_split(model, rd.datasets["test"], test.height, with_watch=False)
    rows = np.flatnonzero(test["tab"].to_numpy() == tab)
    part, _ = predict_split(model, view.datasets["test"], len(rows), with_watch=False)
    np.testing.assert_allclose(part, full[rows], atol=1e-6)


def test_extend_merges_rows_into_the_previous_run(tmp_path, monkeypatch):
    import json

    from funnelrec.errors import ConfigError

    monkeypatch.setenv("FUNNELREC_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        kw = dict(json_mode=False, write=True, out_dir=tmp_path, data=SMALL, seeds=1, threads=1)
        first = run_benchmark("ranking", quick=False, rows=("mmoe",), **kw).results
        with pytest.raises(ConfigError, match="seeds"):
            run_benchmark("ranking", quick=False, rows=("dcnv2",), extend=True, **{**kw, "seeds": 2})
        merged = run_benchmark("ranking", quick=False, rows=("dcnv2",), extend=True, **kw)
    finally:
        torch.set_num_threads(threads)
    r = merged.results
    assert r["mmoe.auc_mean"] == first["mmoe.auc_mean"] and r["mmoe.lr"] == first["mmoe.lr"]
    assert "dcnv2.auc_mean" in r and "rankmixer_minus_best_of_dcnv2_mmoe_auc_mean" not in r  # no rankmixer row
    doc = json.loads((tmp_path / "ranking.json").read_text())
    assert doc["config"]["rows"] == ["mmoe", "dcnv2"] and doc["config"]["extended"]["rows"] == ["dcnv2"]
    assert "| dcnv2 |" in (tmp_path / "ranking.md").read_text() and "| mmoe |" in (tmp_path / "ranking.md").read_text()
    with pytest.raises(ConfigError, match="--extend"):
        run_benchmark("ranking", quick=True, json_mode=False, write=False, rows=("mmoe",), extend=True)


@pytest.mark.parametrize("args, needle", [
    (["ranking", "--quick", "--rows", "nosuch"], "nosuch"),
    (["ranking", "--quick", "--rows", " , "], "--rows"),
    (["ranking", "--quick", "--rows", "mmoe", "--extend"], "--extend"),
    (["simulator", "--quick", "--rows", "mmoe"], "does not take --rows"),
    (["simulator", "--quick", "--extend"], "does not take --extend"),
    (["ranking-scenarios", "--quick", "--rows", "nosuch"], "nosuch"),
    (["ranking-scenarios", "--quick", "--rows", "mtmixatt", "--extend"], "does not take --extend"),
    (["fusion", "--quick", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["serving", "--quick", "--threads", "2"], "does not take --threads"),
])
def test_bad_row_options_are_one_line_and_exit_2(args, needle):
    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output


def test_bad_rows_and_seeds():
    from funnelrec.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown ranking rows"):
        run_benchmark("ranking", quick=True, json_mode=False, write=False, rows=("nosuch",))
    res = CliRunner().invoke(app, ["bench", "ranking", "--quick", "--seeds", "0"])
    assert res.exit_code == 2 and "--seeds" in res.output


def test_scenario_run_writes_its_own_report_with_the_tab_claims(tmp_path, monkeypatch):
    """``bench ranking-scenarios`` trains only its rows, runs the tab switch test, and writes ``ranking-scenarios.*``
    (never the main run's ``ranking.*``)."""
    import json

    from funnelrec.bench.ranking import SCENARIO_ROWS, scenario_sizes

    full = scenario_sizes(False, None)
    assert full.data == "sim:bench-v1" and full.train_rows is None and full.epochs == 2 and full.eval_users is None
    monkeypatch.setenv("FUNNELREC_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        r = run_benchmark("ranking-scenarios", quick=False, json_mode=False, write=True, out_dir=tmp_path,
                          data=SMALL, seeds=1, rows=("rankmixer", "mtmixatt"), threads=1).results
    finally:
        torch.set_num_threads(threads)
    assert "mmoe.auc_mean" not in r and "rankmixer-single_scenario.auc_mean" not in r
    assert {"rankmixer.auc_mean", "mtmixatt.auc_mean", "switch_tab.rankmixer.auc_mean",
            "switch_tab.mtmixatt.auc_mean"} <= set(r)
    assert r["mtmixatt_tab_edge_shrink_switch_off"] == pytest.approx(
        r["mtmixatt_tab_edge_over_rankmixer"] - r["mtmixatt_tab_edge_over_rankmixer_switch_off"])
    assert "mtmixatt_minus_rankmixer_tab_auc_min" in r
    doc = json.loads((tmp_path / "ranking-scenarios.json").read_text())
    assert doc["config"]["rows"] == ["rankmixer", "mtmixatt"] and doc["config"]["switches"] == {
        "tab": "responses.tab_effect=false"}
    assert (tmp_path / "ranking-scenarios.md").is_file() and (tmp_path / "ranking_scenarios_auc_vs_flops.png").is_file()
    assert not (tmp_path / "ranking.json").exists()
    assert set(SCENARIO_ROWS) >= {"rankmixer", "mtmixatt"}
