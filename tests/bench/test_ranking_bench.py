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

ROWS = ("mmoe", "dcnv2", "din", "rankmixer", "longer", "transformer", "longer-no_merge")


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


def test_report_tables(quick):
    md = render_markdown(result_to_json(quick))
    assert "### Test AUC" in md and "### The papers' claims" in md and "| longer-no_merge |" in md


def test_bad_rows_and_seeds():
    from funnelrec.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown ranking rows"):
        run_benchmark("ranking", quick=True, json_mode=False, write=False, rows=("nosuch",))
    res = CliRunner().invoke(app, ["bench", "ranking", "--quick", "--seeds", "0"])
    assert res.exit_code == 2 and "--seeds" in res.output
