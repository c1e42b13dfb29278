"""MPFormer: shapes, causality, no user id, the detached q head, the logQ loss by hand, the multi-objective data
(simulator and MovieLens fixtures) and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval import RETRIEVERS, build_retriever, fit_retriever
from funnelrec.retrieval.mpformer import MPFormer, MPFormerConfig, gap_bucket, objective_losses, q_loss
from funnelrec.retrieval.mpformer_data import (MOVIELENS_OBJECTIVES, SIM_OBJECTIVES, MPFormerData,
                                               RetrievalObjective, evaluate_objectives, value_recall)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = dict(dim=16, heads=2, layers=2, num_sampled=64, q_hidden=16)


@pytest.fixture(scope="module")
def mp_data(small_source):
    return MPFormerData.from_source(small_source, max_len=20)


def _model(data: MPFormerData, **kw) -> MPFormer:
    torch.manual_seed(0)
    cfg = MPFormerConfig.from_spec(data.spec, objectives=data.objective_names, num_actions=len(data.objectives),
                                   max_len=data.max_len, **{**SMALL, **kw})
    return MPFormer(cfg, *data.item_features, data.item_popularity())


def _batch(data: MPFormerData, split: str = "test", n: int = 16) -> RequestBatch:
    return data.period_batch(split, np.arange(n))


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("kw", [{}, {"readout": "linear_heads"}, {"modulation": "film"}, {"modulation": "both"},
                                {"modulation": "none", "personal_gate": False}])
def test_shapes_and_scores(mp_data, kw):
    model = _model(mp_data, **kw).eval()
    b = _batch(mp_data)
    k, i = mp_data.num_objectives, mp_data.num_items
    u = model.user_vectors(b)
    assert u.shape == (16, k, 16)
    assert torch.allclose(u.norm(dim=-1), torch.ones(16, k), atol=1e-5)
    scores = model.score_objectives(b)
    assert scores.shape == (16, k, i) and (scores[:, :, 0] == float("-inf")).all()
    assert torch.allclose(scores[:, :, 1:], torch.einsum("bkd,id->bki", u, model.item_vectors())[:, :, 1:],
                          atol=1e-5)
    b.extras["objective"] = torch.arange(16) % k
    assert torch.allclose(model.score_all(b)[:, 1:], scores[torch.arange(16), torch.arange(16) % k, 1:], atol=1e-5)
    q = model.target_weights(b)
    assert q.shape == (16, k) and torch.allclose(q.sum(1), torch.ones(16), atol=1e-5) and (q > 0).all()
    loss = model.training_loss(_batch(mp_data, "train", 32))
    assert loss.shape == () and torch.isfinite(loss)


def test_causal_mask_and_objective_tokens(mp_data):
    model = _model(mp_data).eval()
    b = _batch(mp_data, n=32)
    row = int(torch.nonzero(b.hist_len >= 4)[0])
    b = b.select(torch.tensor([row]))
    n = b.hist_items.shape[1]
    x0, _ = model.states(b)
    changed = b.select(torch.tensor([0]))
    changed.hist_items = b.hist_items.clone()
    changed.hist_items[0, -1] = 1 + (int(b.hist_items[0, -1]) % (mp_data.num_items - 1))  # the latest event
    changed.hist_actions = b.hist_actions.clone()
    changed.hist_actions[0, -1] = 1 - changed.hist_actions[0, -1]
    x1, _ = model.states(changed)
    last = n  # token index of the latest history event (profile at 0)
    assert torch.allclose(x0[:, :last], x1[:, :last], atol=1e-6)  # earlier states do not see the later event
    assert not torch.allclose(x0[:, last:], x1[:, last:], atol=1e-4)  # it and the objective tokens do
    # objective token k does not attend to the other objective tokens
    u0 = model.user_vectors(b)
    with torch.no_grad():
        model.readout_tokens[1] += 1.0
    u1 = model.user_vectors(b)
    assert torch.allclose(u0[:, 0], u1[:, 0], atol=1e-6) and not torch.allclose(u0[:, 1], u1[:, 1], atol=1e-4)


def test_attention_bias_is_per_objective(mp_data):
    model = _model(mp_data).eval()
    b = _batch(mp_data, n=32)
    b = b.select(b.hist_len >= 2)
    u0 = model.user_vectors(b)
    with torch.no_grad():
        model.gap_bias[:, 2] += torch.randn_like(model.gap_bias[:, 2])
    u1 = model.user_vectors(b)
    for k in range(mp_data.num_objectives):
        assert torch.allclose(u0[:, k], u1[:, k], atol=1e-6) == (k != 2)


def test_no_user_id_feature(mp_data):
    model = _model(mp_data).eval()
    assert model.user_emb.vocab_sizes == mp_data.spec.vocab_sizes("user_sparse")[1:]  # field 0 (the id) dropped
    assert not any(p.shape[0] == mp_data.spec.vocab_sizes("user_sparse")[0] for p in model.parameters())
    b = _batch(mp_data)
    other = b.select(torch.arange(16))
    other.user_sparse = b.user_sparse.clone()
    other.user_sparse[:, 0] = (b.user_sparse[:, 0] + 7) % mp_data.spec.vocab_sizes("user_sparse")[0]
    other.user_id = b.user_id + 1_000_000
    assert torch.equal(model.user_vectors(b), model.user_vectors(other))
    assert torch.equal(model.target_weights(b), model.target_weights(other))
    demo = b.select(torch.arange(16))
    demo.user_sparse = b.user_sparse.clone()
    demo.user_sparse[:, 1] = (b.user_sparse[:, 1] + 1) % mp_data.spec.vocab_sizes("user_sparse")[1]
    assert not torch.allclose(model.user_vectors(b), model.user_vectors(demo))  # demographics are read


def _grad_norms(model: MPFormer) -> tuple[float, float]:
    enc = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
              if not n.startswith("q_net") and p.grad is not None)
    head = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
               if n.startswith("q_net") and p.grad is not None)
    return enc, head


def test_q_head_is_detached(mp_data):
    model = _model(mp_data).train()
    b = _batch(mp_data, "train", 64)
    out = model.losses(b)
    out["q"].backward(retain_graph=True)
    enc, head = _grad_norms(model)
    assert enc == 0.0 and head > 0.0  # the q loss trains the q head only
    model.zero_grad(set_to_none=True)
    out["retrieval"].backward()
    enc, head = _grad_norms(model)
    assert enc > 0.0 and head == 0.0  # the retrieval loss never reaches the q head
    # the training loss is their weighted sum
    torch.manual_seed(1)
    a = model.losses(b)
    torch.manual_seed(1)
    assert torch.allclose(model.training_loss(b), a["retrieval"] + model.config.q_loss_weight * a["q"])


def test_q_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0], [2.0, 0.0]])
    counts = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    # row 0: q = (1/4, 3/4), p = (1/4, 3/4); row 1 skipped; row 2: p = (1/2, 1/2)
    q2 = torch.softmax(logits[2], 0)
    expect = (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) - 0.5 * (q2.log().sum())) / 2
    assert math.isclose(float(q_loss(logits, counts)), float(expect), rel_tol=1e-6)
    # value-weighted shares: row 0 p = (1·2, 3·1)/5
    got = float(q_loss(logits[:1], counts[:1], torch.tensor([2.0, 1.0])))
    assert math.isclose(got, -(0.4 * math.log(0.25) + 0.6 * math.log(0.75)), rel_tol=1e-6)
    assert float(q_loss(logits, torch.zeros(3, 2))) == 0.0


def test_logq_loss_matches_hand_computation():
    """Two requests, two objectives, five items; the loss by hand from the logits and log q."""
    user = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]]])  # [B=2, K=2, D=2]
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])  # [I=5, D]
    targets = torch.tensor([[[1, 3], [2, 0]], [[3, 0], [0, 0]]])  # obj 0: (0,1) (0,3) (1,3); obj 1: (0,2)
    neg = torch.tensor([2, 4, 3])
    log_q = torch.log(torch.tensor([1e-9, 0.4, 0.3, 0.2, 0.1]))
    tau = 0.5
    losses, pairs = objective_losses(user, items, targets, neg, log_q, tau)
    assert pairs.tolist() == [3, 1]

    def one(u, pos):
        logit = lambda j: float(u @ items[j]) / tau - float(log_q[j])  # noqa: E731
        cands = [logit(pos)] + [logit(int(j)) for j in neg if int(j) != pos]  # same-id negatives are masked
        return -(cands[0] - math.log(sum(math.exp(c) for c in cands)))

    expect0 = (one(user[0, 0], 1) + one(user[0, 0], 3) + one(user[1, 0], 3)) / 3
    expect1 = one(user[0, 1], 2)
    assert math.isclose(float(losses[0]), expect0, rel_tol=1e-5)
    assert math.isclose(float(losses[1]), expect1, rel_tol=1e-5)
    # without the correction the logits are the scaled dot products only
    plain, _ = objective_losses(user, items, targets, neg, None, tau)
    logits = torch.tensor([float(user[0, 1] @ items[j]) / tau for j in (2, 4, 3)])
    assert math.isclose(float(plain[1]), float(-F.log_softmax(logits, 0)[0]), rel_tol=1e-5)


def test_gap_buckets():
    assert gap_bucket(torch.tensor([0.0, 30.0, 60.0, 180.0, 1e12]), 8).tolist() == [0, 0, 1, 2, 7]


def test_fixed_loss_weights(mp_data):
    b = _batch(mp_data, "train", 64)
    base = _model(mp_data, loss_weights=(1.0, 0.0, 0.0, 0.0))
    torch.manual_seed(3)
    out = base.losses(b)
    assert torch.allclose(out["retrieval"], out["per_objective"][0])
    assert (out["pairs"] > 0).sum() >= 2


def test_config_errors(mp_data):
    spec = mp_data.spec
    bad = [dict(readout="mean"), dict(modulation="gate"), dict(dim=30, heads=4), dict(objectives=[]),
           dict(objectives=["a", "a"]), dict(loss_weights=(1.0, 2.0)), dict(q_values=(0.0, 0.0, 0.0, 0.0)),
           dict(dropout=1.0), dict(temperature=0.0), dict(layers=0), dict(score_objective=4), dict(q_target="x"),
           dict(num_actions=-1)]
    for kw in bad:
        with pytest.raises(ConfigError):
            MPFormerConfig.from_spec(spec, **kw)
    with pytest.raises(ConfigError, match="item field 0"):
        MPFormerConfig(num_items=10, item_vocab=[9])
    with pytest.raises(ConfigError, match="item_sparse"):
        MPFormer(MPFormerConfig.from_spec(spec, **SMALL))  # side features without the item table
    model = _model(mp_data)
    b = _batch(mp_data)
    wrong = b.select(torch.arange(16))
    wrong.hist_actions = torch.zeros(16, b.hist_items.shape[1], 3)
    with pytest.raises(DataError, match="hist_actions"):
        model.user_vectors(wrong)
    wrong = b.select(torch.arange(16))
    wrong.extras = {"targets": torch.zeros(16, 2, 3, dtype=torch.int64)}
    with pytest.raises(DataError, match="targets"):
        model.training_loss(wrong)


def test_registered_and_runs_on_leave_last_out_data(small_data):
    assert "mpformer" in RETRIEVERS
    model = build_retriever("mpformer", small_data.spec, small_data.item_popularity(),
                            item_features=small_data.item_features, max_len=30, **SMALL)
    b = small_data.batch("train", torch.arange(32))
    loss = model.training_loss(b)
    loss.backward()
    assert torch.isfinite(loss) and model.item_emb.weight.grad.abs().sum() > 0
    test = small_data.batch("test", torch.arange(8))
    exclude = small_data.exclude_mask(test)
    items, _ = model.eval().retrieve(test, k=20, exclude=exclude)
    assert items.shape == (8, 20) and not exclude.gather(1, items).any() and (items > 0).all()
    with pytest.raises(ConfigError, match="item_features"):
        build_retriever("mpformer", small_data.spec, small_data.item_popularity())


def test_trains_with_the_retrieval_loop(mp_data):
    model = _model(mp_data)
    result = fit_retriever(model, mp_data, epochs=2, batch_size=64, lr=3e-3, seed=0)
    assert result.best_epoch >= 0 and result.history[-1]["loss"] < result.history[0]["loss"]
    assert 0 < result.best_valid["num_targets"] == mp_data.num_examples("valid")


# ------------------------------------------------------------------------------------------------- the data


def test_targets_are_next_period_new_items(mp_data, small_source):
    assert mp_data.objective_names == tuple(o.name for o in SIM_OBJECTIVES)
    log = small_source.log
    last, prev = log.get_column("date").max(), log.get_column("date").unique().sort()[-2]
    b = _batch(mp_data, "test", mp_data.num_rows("test"))
    targets = b.extras["targets"]
    assert targets.shape[:2] == (b.batch_size, 4)
    assert (targets.gt(0).sum(2).float() == b.extras["objective_counts"]).all()
    exclude = mp_data.exclude_mask(b)
    assert not exclude.gather(1, targets.flatten(1)).logical_and(targets.flatten(1) > 0).any()  # new items only
    # row 0 by hand: its user's rows on the last day with each flag, minus items positive before
    u = int(b.user_id[0])
    mine = log.filter(pl.col("user_id") == u)
    positive = pl.any_horizontal([pl.col(o.column) > 0 for o in SIM_OBJECTIVES])
    before = mine.filter((pl.col("date") < last) & positive)
    seen = set((before.get_column("video_id") + 1).to_list())
    for k, o in enumerate(SIM_OBJECTIVES):
        day = mine.filter((pl.col("date") == last) & (pl.col(o.column) > 0))
        expect = set((day.get_column("video_id") + 1).to_list()) - seen
        assert set(targets[0, k][targets[0, k] > 0].tolist()) == expect
    assert int(b.request_time_ms[0]) == int(mine.filter(pl.col("date") == last).filter(
        pl.any_horizontal([pl.col(o.column) > 0 for o in SIM_OBJECTIVES])).get_column("time_ms").min())
    assert mp_data.num_rows("valid") > 0 and prev < last
    # the valid "example" rows: one per (period, objective with a target), the first new item
    ex = next(mp_data.batches("valid", 10_000))
    assert ex.batch_size == mp_data.num_examples("valid") == int(mp_data.num_users("valid").sum())
    assert set(ex.extras["objective"].tolist()) <= set(range(4))


def test_select_view(mp_data):
    like = mp_data.select(["is_like"])
    assert like.objective_names == ("is_like",) and like.num_objectives == 1
    assert like.num_rows("train") == int(mp_data.num_users("train")[2])
    b = like.period_batch("train", np.arange(4))
    assert b.extras["targets"].shape[1] == 1 and (b.extras["targets"][:, 0, 0] > 0).all()
    assert b.hist_actions.shape[-1] == 4  # the same inputs as the joint model
    assert torch.equal(like.item_popularity(), mp_data.item_popularity())
    with pytest.raises(ConfigError, match="select"):
        mp_data.select(["is_watch"])


def test_evaluate_objectives_and_value_recall(mp_data):
    model = _model(mp_data).eval()
    res = evaluate_objectives({"m": model.score_objectives}, mp_data, "test", ks=(10, 50), ndcg_ks=(10,),
                              true_k=10)
    keys = {f"{o}.{m}" for o in mp_data.objective_names for m in ("recall@10", "recall@50", "ndcg@10", "users")}
    assert set(res["m"]) == keys
    assert res["m"]["is_click.users"] == float(mp_data.num_users("test")[0])
    assert 0.0 <= res["m"]["is_click.recall@10"] <= res["m"]["is_click.recall@50"] <= 1.0
    t = torch.tensor([[[1, 2, 0], [2, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    v, rows = value_recall(torch.tensor([[2, 9], [1, 2]]), t, torch.tensor([1.0, 4.0]))
    assert rows == 1 and math.isclose(v, 5.0 / 6.0)


def test_movielens_objectives_on_fixtures():
    from funnelrec.data.loaders.movielens import load_movielens
    from funnelrec.data.sources import load_source

    for name in ("ml-100k", "ml-1m"):
        src = load_source(f"movielens:{FIXTURES / name}", progress=False)
        data = MPFormerData.from_source(src, max_len=10)
        assert data.objective_names == ("rating_ge1", "rating_ge4", "rating_eq5")
        assert data.split_rule == "per_user" and data.num_rows("test") > 0
        ratings = load_movielens(FIXTURES / name).ratings
        for split in ("train", "valid", "test"):
            b = data.period_batch(split, np.arange(data.num_rows(split)))
            t = b.extras["targets"]
            for row in range(b.batch_size):
                sets = [set(t[row, k][t[row, k] > 0].tolist()) for k in range(3)]
                assert sets[2] <= sets[1] <= sets[0]  # = 5 ⊆ ≥ 4 ⊆ ≥ 1
                for item in sets[0]:
                    r = ratings.filter((pl.col("user_id") == int(b.user_id[row])) & (pl.col("item_id") == item - 1))
                    stars = int(r.get_column("rating").max())
                    assert (item in sets[1]) == (stars >= 4) and (item in sets[2]) == (stars == 5)
        # per-user split: each user's last active date is its test period
        log = src.log.with_columns((pl.col("time_ms") // 86_400_000).alias("d"))
        b = data.period_batch("test", np.arange(data.num_rows("test")))
        for row in range(b.batch_size):
            days = log.filter(pl.col("user_id") == int(b.user_id[row])).get_column("d")
            assert int(b.request_time_ms[row]) // 86_400_000 == int(days.max())


def test_data_bad_input(small_source):
    src = small_source
    spec = src.feature_spec()
    with pytest.raises(DataError, match="is_like"):
        MPFormerData.from_log(src.log.drop("is_like"), src.users, src.videos, spec)
    with pytest.raises(ConfigError, match="split"):
        MPFormerData.from_log(src.log, src.users, src.videos, spec, split="random")
    with pytest.raises(ConfigError, match="train_periods"):
        MPFormerData.from_log(src.log, src.users, src.videos, spec, train_periods=0)
    with pytest.raises(ConfigError, match="max_len"):
        MPFormerData.from_log(src.log, src.users, src.videos, spec, max_len=0)
    with pytest.raises(ConfigError, match="distinct"):
        MPFormerData.from_log(src.log, src.users, src.videos, spec, objectives=[SIM_OBJECTIVES[0]] * 2)
    with pytest.raises(ConfigError, match="value"):
        RetrievalObjective("x", "is_click", value=0.0)
    two_days = src.log.filter(pl.col("date") <= src.log.get_column("date").unique().sort()[1])
    with pytest.raises(DataError, match="at least 3 dates"):
        MPFormerData.from_log(two_days, src.users, src.videos, spec)
    with pytest.raises(DataError, match="no row with feedback"):
        MPFormerData.from_log(src.log.with_columns(pl.lit(0).alias(c) for c in ("is_click", "long_view", "is_like",
                                                                                  "is_follow")),
                              src.users, src.videos, spec)
    with pytest.raises(DataError, match="users table"):
        MPFormerData.from_log(src.log, src.users.filter(pl.col("user_id") != src.log.get_column("user_id")[0]),
                              src.videos, spec)
    data = MPFormerData.from_source(src, max_len=5)
    with pytest.raises(ConfigError, match="split"):
        data.num_rows("dev")
    with pytest.raises(ConfigError, match="mode"):
        next(data.batches("train", 4, mode="sequence"))
    with pytest.raises(DataError, match="out of range"):
        data.period_batch("test", [10 ** 6])
    assert MOVIELENS_OBJECTIVES[2].column == "rating_eq5"


@pytest.mark.parametrize("module", ["funnelrec.retrieval.mpformer", "funnelrec.retrieval.mpformer_data",
                                    "funnelrec.retrieval.quota_merge"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
