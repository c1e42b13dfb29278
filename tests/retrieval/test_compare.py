"""``funnelrec.retrieval.compare``: top-list metrics against the evaluator, the shared oracle lists, valid-only
tuning, user subsets and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.metrics.ranking import true_recall_at_k
from funnelrec.retrieval import Retriever, evaluate_retriever
from funnelrec.retrieval import compare as cmpmod
from funnelrec.retrieval.compare import (
    Plan,
    compare,
    flat_results,
    list_metrics,
    main,
    model_scores,
    recall_curve,
    subsample_users,
    top_items,
    true_recall_curve,
)
from funnelrec.retrieval.evaluate import oracle_scores

ML100K = f"movielens:{Path(__file__).resolve().parents[1] / 'fixtures' / 'ml-100k'}"


class RandomScores(Retriever):
    """A fixed random score per (user, item): no ties, so every way of ranking agrees."""

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items

    def score_all(self, batch):
        g = torch.Generator().manual_seed(7)
        table = torch.rand(int(batch.user_id.max()) + 1, self.num_items, generator=g)
        s = table[batch.user_id].clone()
        s[:, 0] = float("-inf")
        return s


def test_list_metrics_match_the_evaluator(small_data):
    model = RandomScores(small_data.num_items)
    want = evaluate_retriever(model, small_data, "test", ks=(10, 50), batch_size=128)
    top = top_items(model_scores(model), small_data, "test", 100, batch_size=128)
    got = list_metrics(top, small_data.targets("test"), (10, 50), small_data.num_items)
    for key in ("recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@10", "coverage@50"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    curve = recall_curve(top, small_data.targets("test"))
    assert curve.shape == (100,) and curve[9] == pytest.approx(got["recall@10"])
    assert curve[49] == pytest.approx(got["recall@50"]) and (curve[1:] >= curve[:-1]).all()


def test_top_lists_leave_out_history(small_data):
    model = RandomScores(small_data.num_items)
    top = top_items(model_scores(model), small_data, "test", 20, batch_size=64)
    batch = small_data.batch("test", torch.arange(top.shape[0]))
    assert not small_data.exclude_mask(batch).gather(1, top.clamp(min=0)).any()
    assert (top > 0).all()


def test_true_recall_curve_matches_true_recall_at_k(small_source, small_data):
    world, i = small_source.world, small_data.num_items
    q = 64
    batch = small_data.batch("test", torch.arange(q))
    truth = oracle_scores(world, batch.user_id, batch.request_time_ms, i).masked_fill(
        small_data.exclude_mask(batch), float("-inf"))
    model = RandomScores(i)
    top = model.score_all(batch).masked_fill(small_data.exclude_mask(batch), float("-inf")).topk(60, dim=1).indices
    oracle_top = truth.topk(60, dim=1).indices
    curve = true_recall_curve(top, oracle_top, chunk=16)
    for k in (1, 10, 50, 60):
        assert curve[k - 1] == pytest.approx(true_recall_at_k(top[:, :k], truth, k), abs=1e-12), k
    assert true_recall_curve(oracle_top, oracle_top) == pytest.approx([1.0] * 60)


def test_oracle_lists_give_the_oracle_its_own_ranking(small_source, small_data):
    """The shared oracle top lists give the oracle row the evaluator's figures of the oracle ranker."""

    class Oracle(Retriever):
        def score_all(self, batch):
            return oracle_scores(small_source.world, batch.user_id, batch.request_time_ms, small_data.num_items)

    plan = Plan(curve_k=50)
    row, top = cmpmod._oracle_row(small_source.world, small_data, plan)
    want = evaluate_retriever(Oracle(), small_data, "test", ks=(10, 50), oracle=small_source.world)
    got = row.runs[0].metrics
    for key in ("recall@10", "recall@50", "ndcg@10", "true_recall@50"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert top.shape == (small_data.num_examples("test"), 50)


def test_subsample_users_keeps_rows_aligned(small_source):
    sub = subsample_users(small_source, 100, seed=3)
    assert sub.log.get_column("user_id").n_unique() == 100
    assert sub.oracle.height == sub.log.height
    again = subsample_users(small_source, 100, seed=3)
    assert again.log.equals(sub.log)  # reproducible
    assert subsample_users(small_source, 10_000) is small_source and subsample_users(small_source, None) is small_source


def test_tuning_reads_valid_only_and_reuses_the_choice(monkeypatch):
    """The grid is tried with seed 0; later seeds use the rate with the best *valid* Recall@50; test is read
    only by the final top-list passes."""
    calls = []
    real_fit = cmpmod.fit_retriever

    def spy(model, data, **kw):
        calls.append((kw["seed"], kw["lr"]))
        assert kw["valid_metric"] == "recall@50"
        return real_fit(model, data, **kw)

    monkeypatch.setattr(cmpmod, "fit_retriever", spy)
    plan = Plan(lr_grid=(1e-3, 3e-3), epochs={"two_tower": 1}, patience=1)
    res = compare(ML100K, ["two_tower"], seeds=2, plan=plan)
    rows = res.rows["two_tower"]
    assert calls[:2] == [(0, 1e-3), (0, 3e-3)]
    assert calls[2:] == [(1, rows.chosen["lr"])]
    best = max(rows.tuning, key=lambda t: t["valid_recall@50"])
    assert rows.chosen["lr"] == best["lr"] and len(rows.runs) == 2 and "oracle" not in res.rows


def test_compare_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="seeds"):
        compare(ML100K, ["popularity"], seeds=0)
    with pytest.raises(ConfigError, match="no_such_model"):
        compare(ML100K, ["no_such_model"])
    with pytest.raises(ConfigError, match="lr_grid"):
        Plan(lr_grid=())


def test_flat_results_on_real_data_have_no_true_recall():
    res = compare(ML100K, ["popularity"], seeds=1)
    flat = flat_results(res)
    assert flat["popularity.true_recall@50"] is None and flat["popularity.runs"] == 1
    assert 0 <= flat["popularity.recall@10"] <= flat["popularity.recall@50"] <= 1
    assert flat["popularity.recall@10.std"] == 0.0 and not math.isnan(flat["popularity.seconds"])


def test_cli_prints_a_table_and_flat_json(capsys):
    flat = main(["--data", ML100K, "--models", "popularity,sasrec", "--seeds", "1", "--epochs", "1",
                 "--lr-grid", "0.003", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[0] == "model" and any(line.startswith("sasrec") for line in lines)
    assert json.loads(lines[-1]) == flat
    assert set(flat) >= {"popularity.recall@50", "sasrec.recall@50.std", "sasrec.lr", "sasrec.seconds"}
    assert "sasrec.true_recall@50" not in flat  # no oracle on real data: the column is left out
