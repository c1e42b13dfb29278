"""T2Diff: shapes and the two-tower contract, the session/history split by time gap, the causal conditioner, no label
leakage (bit-identical user vectors), the stop-gradient both ways, deterministic serving, the ablation switches,
training on the small world and the MovieLens fixtures, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval import RETRIEVERS, RetrievalData, build_retriever, evaluate_retriever, fit_retriever
from funnelrec.retrieval.t2diff import (TARGET_KEY, NextIntentGenerator, T2Diff, T2DiffConfig, right_align,
                                        split_session)
from funnelrec.retrieval.two_tower import TwoTowerRetriever

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = dict(out_dim=16, embed_dim=8, hidden=(32,), heads=2, num_sampled=64, steps=10, denoiser_hidden=32,
             attention_hidden=(16,), max_len=30)


def _model(data: RetrievalData, **kw) -> T2Diff:
    torch.manual_seed(0)
    model = build_retriever("t2diff", data.spec, data.item_popularity(), item_features=data.item_features,
                            **{**SMALL, **kw})
    assert isinstance(model, T2Diff)
    return model


def _batch(data: RetrievalData, split: str = "test", n: int = 32) -> RequestBatch:
    return data.batch(split, np.arange(n))


def _generator_params(model: T2Diff) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("generator.")}


def _tower_params(model: T2Diff) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("generator.")}


def _grad_sum(params: dict[str, torch.nn.Parameter]) -> float:
    return sum(float(p.grad.abs().sum()) for p in params.values() if p.grad is not None)


# ------------------------------------------------------------------------------------------------ the model


def test_registered_and_shapes(small_data):
    assert "t2diff" in RETRIEVERS and RETRIEVERS["t2diff"].model is T2Diff
    assert "user_vocab" not in RETRIEVERS["t2diff"].keys() and "steps" in RETRIEVERS["t2diff"].keys()
    model = _model(small_data).eval()
    b = _batch(small_data)
    u = model.user_vectors(b)
    assert u.shape == (32, 16) and torch.allclose(u.norm(dim=-1), torch.ones(32), atol=1e-5)
    scores = model.score_all(b)
    items = model.all_item_vectors()
    assert scores.shape == (32, small_data.num_items) and (scores[:, 0] == float("-inf")).all()
    assert torch.allclose(scores[:, 1:], (u @ items.t())[:, 1:], atol=1e-5)
    top, _ = model.retrieve(b, 10, exclude=small_data.exclude_mask(b))
    assert top.shape == (32, 10)
    assert model.generated_target(b).shape == (32, 16)
    out = model.losses(_batch(small_data, "train", 64).to("cpu"))
    assert out["retrieval"].shape == () and out["generator"].shape == () and out["target"].shape == (64, 16)
    assert torch.isfinite(out["retrieval"]) and torch.isfinite(out["generator"])


def test_item_tower_is_the_two_towers(small_data):
    """The item tower is TwoTowerRetriever's: with the same weights, the same item vectors (ANN-indexable)."""
    model = _model(small_data)
    tt = TwoTowerRetriever(model.config.tower_config(), *small_data.item_features, small_data.item_popularity())
    shared = {k: v for k, v in model.state_dict().items() if k.startswith(("item_emb.", "item_mlp."))}
    tt.load_state_dict(shared, strict=False)
    assert torch.equal(tt.all_item_vectors(), model.all_item_vectors())
    # and the retrieval loss is the two-tower's softmax on the T2Diff user vectors
    b = _batch(small_data, "train", 64)
    torch.manual_seed(1)
    tgt = model.generated_target(b)
    tb = b.select(torch.arange(64))
    tb.extras[TARGET_KEY] = tgt
    torch.manual_seed(2)
    mine = TwoTowerRetriever.training_loss(model, tb)
    tt.user_vectors = lambda batch: model.user_vectors(tb)  # type: ignore[method-assign]
    torch.manual_seed(2)
    assert torch.allclose(mine, tt.training_loss(tb))


def test_session_split_by_time_gap():
    valid = torch.tensor([[False, True, True, True, True, True],
                          [False, False, False, False, False, False],
                          [True, True, True, True, True, True],
                          [False, False, False, False, False, True]])
    # seconds before the request; adjacent gaps: row 0: 1000, 5000 (break), 100, 100, (last at 50 s)
    gap = torch.tensor([[0.0, 6300.0, 5300.0, 300.0, 200.0, 100.0],
                        [0.0] * 6,
                        [600.0, 500.0, 400.0, 300.0, 200.0, 100.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 7.0]])
    s, h = split_session(gap, valid, session_gap_s=1800.0, session_max=10)
    assert s.int().tolist() == [[0, 0, 0, 1, 1, 1], [0] * 6, [1] * 6, [0, 0, 0, 0, 0, 1]]
    assert h.int().tolist() == [[0, 1, 1, 0, 0, 0], [0] * 6, [0] * 6, [0] * 6]
    # the cap keeps the last session_max behaviours; the rest is history
    s, h = split_session(gap, valid, 1800.0, session_max=2)
    assert s.int().tolist()[2] == [0, 0, 0, 0, 1, 1] and h.int().tolist()[2] == [1, 1, 1, 1, 0, 0]
    # a tiny threshold: every behaviour is its own session, the last one is always kept
    s, h = split_session(gap, valid, 1e-3, 10)
    assert s.sum(1).tolist() == [1, 0, 1, 1]
    assert torch.equal(s | h, valid) and not (s & h).any()
    with pytest.raises(DataError, match="gap_s"):
        split_session(gap[:, :3], valid, 1800.0, 10)
    with pytest.raises(ConfigError, match="session_max"):
        split_session(gap, valid, 1800.0, 0)


def test_session_split_on_real_batches(small_data):
    b = _batch(small_data, n=64)
    valid = b.history_mask()
    s, h = split_session(b.hist_gap_s, valid, 1800.0, 10)
    assert torch.equal(s | h, valid) and not (s & h).any()
    has = b.hist_len > 0
    assert (s[has, -1]).all() and (s.sum(1) <= 10).all()
    # inside a session adjacent behaviours are at most 30 min apart; the behaviour before it is further away
    for row in range(64):
        idx = torch.nonzero(s[row]).squeeze(1)
        if len(idx) > 1:
            assert ((b.hist_gap_s[row, idx[:-1]] - b.hist_gap_s[row, idx[1:]]) <= 1800.0).all()
        first = int(idx[0]) if len(idx) else None
        if first is not None and len(idx) < 10 and first > 0 and valid[row, first - 1]:
            assert float(b.hist_gap_s[row, first - 1] - b.hist_gap_s[row, first]) > 1800.0


def test_right_align():
    x = torch.arange(12.0).view(2, 3, 2)
    out = right_align(x, torch.tensor([1, 0]))
    assert out.tolist() == [[[4.0, 5.0], [0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0]] * 3]


def test_conditioner_is_causal():
    cfg = T2DiffConfig(user_vocab=[3], item_vocab=[9], num_items=9, out_dim=8, heads=2, steps=4, denoiser_hidden=8,
                       max_len=5)
    torch.manual_seed(0)
    gen = NextIntentGenerator(cfg)
    x = torch.randn(1, 5, 8)
    gap = torch.tensor([[500.0, 400.0, 300.0, 200.0, 100.0]])
    length = torch.tensor([5])
    c0, seq = gen.conditions(x, gap, length)
    assert c0.shape == (1, 6, 8) and torch.equal(seq[0, 1:], x[0]) and (seq[0, 0] == 0).all()
    x2 = x.clone()
    x2[0, -1] += torch.randn(8)  # the latest behaviour (not a constant shift: LayerNorm would hide it)
    c1, _ = gen.conditions(x2, gap, length)
    assert torch.allclose(c0[:, :5], c1[:, :5], atol=1e-6)  # states before it do not read it
    assert not torch.allclose(c0[:, 5], c1[:, 5], atol=1e-4)  # the state after it does
    # left padding does not change a row's conditions
    xp = torch.cat([torch.zeros(1, 2, 8), x[:, 2:]], 1)
    gp = torch.cat([torch.zeros(1, 2), gap[:, 2:]], 1)
    a, _ = gen.conditions(x[:, 2:], gap[:, 2:], torch.tensor([3]))
    b, _ = gen.conditions(xp, gp, torch.tensor([3]))
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)


# ------------------------------------------------------------------------------------------------ leakage, gradients


def _change_item(model: T2Diff, items: torch.Tensor) -> None:
    """Move the id embedding rows (item sparse field 0) of ``items``: their item-tower vectors change."""
    with torch.no_grad():
        model.item_emb.table.weight[items] += 0.5


def _leak_rows(b: RequestBatch) -> torch.Tensor:
    """Rows whose label appears in no history of the batch."""
    labels = b.cand_items[:, 0]
    in_hist = (b.hist_items.unsqueeze(0) == labels.view(-1, 1, 1)).flatten(1).any(1)
    return ~in_hist


@pytest.mark.parametrize("kw", [{}, {"generator": "mlp"}, {"drift": False}])
def test_label_embedding_does_not_reach_the_user_vector(small_data, kw):
    model = _model(small_data, **kw)
    b = _batch(small_data, "train", 128)
    keep = _leak_rows(b)
    b = b.select(keep)
    labels = b.cand_items[:, 0]
    # serving (eval) and training paths, before and after the label items' embeddings change
    model.eval()
    u0 = model.user_vectors(b)
    model.train()
    torch.manual_seed(5)
    out0 = model.losses(b)
    torch.manual_seed(5)
    tb = b.select(torch.arange(b.batch_size))
    tb.extras[TARGET_KEY] = out0["target"]
    tu0 = model.user_vectors(tb)
    item0 = model.item_vectors(b.cand_sparse[:, 0], b.cand_dense[:, 0])
    _change_item(model, labels)
    assert not torch.equal(item0, model.item_vectors(b.cand_sparse[:, 0], b.cand_dense[:, 0]))  # the label moved
    model.eval()
    assert torch.equal(model.user_vectors(b), u0)  # bit-identical
    model.train()
    torch.manual_seed(5)
    out1 = model.losses(b)
    assert torch.equal(out1["target"], out0["target"])  # the training-time target: bit-identical
    tb.extras[TARGET_KEY] = out1["target"]
    assert torch.equal(model.user_vectors(tb), tu0)
    assert not torch.equal(out1["generator"], out0["generator"])  # the label is the diffusion loss's target only
    # control: a history item's embedding does reach the user vector
    model.eval()
    hist = b.hist_items[b.hist_len > 0, -1]
    _change_item(model, hist)
    assert not torch.allclose(model.user_vectors(b), u0, atol=1e-5)


def test_stop_gradient_both_ways(small_data):
    model = _model(small_data).train()
    b = _batch(small_data, "train", 64)
    gen, tower = _generator_params(model), _tower_params(model)
    assert gen and tower
    out = model.losses(b)
    out["retrieval"].backward(retain_graph=True)
    assert _grad_sum(gen) == 0.0 and _grad_sum(tower) > 0.0  # the retrieval loss never reaches the diffusion module
    assert all(p.grad is None for p in gen.values())
    model.zero_grad(set_to_none=True)
    out["generator"].backward()
    assert _grad_sum(tower) == 0.0 and _grad_sum(gen) > 0.0  # the diffusion loss never reaches the towers
    assert all(p.grad is None for p in tower.values())
    assert not out["target"].requires_grad
    # training_loss = retrieval + λ generator
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    a = model.losses(b)
    torch.manual_seed(3)
    assert torch.allclose(model.training_loss(b), a["retrieval"] + model.config.generator_weight * a["generator"])


def test_serving_is_deterministic_and_batch_independent(small_data):
    model = _model(small_data).eval()
    b = _batch(small_data, n=40)
    u = model.user_vectors(b)
    assert torch.equal(u, model.user_vectors(b))
    part = b.select(torch.arange(10, 25))
    assert torch.allclose(model.user_vectors(part), u[10:25], atol=1e-6)
    # training mode draws fresh noise: two calls differ
    model.train()
    torch.manual_seed(0)
    t1 = model.generated_target(b)
    t2 = model.generated_target(b)
    assert not torch.equal(t1, t2)


def test_samplers_and_ablations(small_data):
    b = _batch(small_data)
    ddpm = _model(small_data).eval()
    ddim = _model(small_data, sampler="ddim", sample_steps=4, eta=0.0).eval()
    assert torch.equal(ddpm.state_dict()["generator.net.out.weight"], ddim.state_dict()["generator.net.out.weight"])
    t_full, t_ddim = ddpm.generated_target(b), ddim.generated_target(b)
    assert not torch.allclose(t_full, t_ddim, atol=1e-4)
    assert torch.allclose(ddpm.generated_target(b, sampler="ddim", steps=4, eta=0.0), t_ddim, atol=1e-6)
    for kw in ({"generator": "mlp"}, {"drift": False}, {"schedule": "linear"}, {"steps": 5},
               {"predict": "x0"}, {"drift_positions": "last"}, {"train_sampler": "ddim", "train_sample_steps": 2}):
        model = _model(small_data, **kw)
        loss = model.training_loss(_batch(small_data, "train", 64))
        loss.backward()
        assert torch.isfinite(loss), kw
        assert model.eval().user_vectors(b).shape == (32, 16)
    mlp = _model(small_data, generator="mlp")
    assert mlp.generator.diffusion is None and torch.equal(mlp.generated_target(b), mlp.generated_target(b))


def test_drift_utilisation(small_data):
    """x̂ = x_n + ẑ / scale with drift, ẑ / scale without (checked with the MLP generator, whose ẑ is MLP(c_n))."""
    b = _batch(small_data, n=16)
    for drift in (True, False):
        model = _model(small_data, generator="mlp", drift=drift).eval()
        bb, valid, length = model._history(b)
        with torch.no_grad():
            x = model.behaviour_vectors(bb.hist_items, valid)
            cond, seq = model.generator.conditions(x, bb.hist_gap_s, length)
            rows = torch.arange(16)
            z = model.generator.net(cond[rows, length])
        expect = (x[:, -1] if drift else 0.0) + z / model.generator.scale
        assert torch.allclose(model.generated_target(b), expect, atol=1e-6)


def test_fit_on_small_world_and_loss_drops(small_data):
    model = _model(small_data)
    first = float(model.losses(_batch(small_data, "train", 256))["generator"].detach())
    fit = fit_retriever(model, small_data, epochs=2, batch_size=256, lr=3e-3, seed=0)
    assert fit.best_epoch >= 0 and 0.0 <= fit.best_valid["recall@50"] <= 1.0
    assert fit.history[-1]["loss"] < fit.history[0]["loss"] or fit.history[0]["loss"] < first
    metrics = evaluate_retriever(model, small_data, "test", ks=(2, 20))
    assert 0.0 <= metrics["recall@2"] <= metrics["recall@20"] <= 1.0


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_movielens_fixtures(name):
    from funnelrec.data.sources import load_source

    src = load_source(f"movielens:{FIXTURES / name}", progress=False)
    data = RetrievalData.from_source(src, max_len=10)
    model = _model(data, max_len=10, session_gap_s=86_400.0)
    fit = fit_retriever(model, data, epochs=1, batch_size=64, lr=3e-3, seed=0)
    assert fit.steps > 0
    metrics = evaluate_retriever(model, data, "test", ks=(2, 20))
    assert metrics["num_targets"] == data.num_examples("test") > 0
    b = data.batch("test", np.arange(data.num_examples("test")))
    s, h = split_session(b.hist_gap_s, b.history_mask(), 86_400.0, 10)
    assert (s.sum(1) >= 1).all()  # every test target has a history, so a session


def test_empty_history_rows(small_data):
    model = _model(small_data).eval()
    b = _batch(small_data, n=4)
    b.hist_items = torch.zeros_like(b.hist_items)
    b.hist_gap_s = torch.zeros_like(b.hist_gap_s)
    b.hist_len = torch.zeros_like(b.hist_len)
    u = model.user_vectors(b)
    assert torch.isfinite(u).all()
    model.train()
    out = model.losses(b)
    assert torch.isfinite(out["retrieval"]) and torch.isfinite(out["generator"])


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kw, match", [
    ({"heads": 3}, "divisible"), ({"generator": "vae"}, "generator"), ({"steps": 0}, "steps"),
    ({"sample_steps": 99}, "sample_steps"), ({"schedule": "cosine"}, "schedule"), ({"negatives": "all"}, "negatives"),
    ({"session_gap_s": 0}, "session_gap_s"), ({"session_max": 0}, "session_max"), ({"eta": -1.0}, "eta"),
    ({"generator_weight": -1.0}, "generator_weight"), ({"train_sampler": "euler"}, "train_sampler"),
    ({"beta_min": 2.0, "beta_max": 1.0}, "beta_min"), ({"dropout": 1.0}, "dropout"),
    ({"attention_hidden": ()}, "attention_hidden"), ({"temperature": 0.0}, "temperature"),
])
def test_bad_config(small_data, kw, match):
    with pytest.raises(ConfigError, match=match):
        build_retriever("t2diff", small_data.spec, small_data.item_popularity(), item_features=small_data.item_features,
                        **{**SMALL, **kw})


def test_bad_input(small_data):
    with pytest.raises(ConfigError, match="t2diff: item field 0"):
        T2DiffConfig(user_vocab=[3], item_vocab=[5], num_items=9)
    with pytest.raises(ConfigError, match="unknown config key"):
        build_retriever("t2diff", small_data.spec, item_features=small_data.item_features, user_vocab=[3])
    with pytest.raises(ConfigError, match="item_features"):
        build_retriever("t2diff", small_data.spec, small_data.item_popularity())
    model = _model(small_data)
    b = _batch(small_data, n=4)
    b.extras[TARGET_KEY] = torch.zeros(4, 3)
    with pytest.raises(DataError, match=TARGET_KEY):
        model.user_vectors(b)
    b = _batch(small_data, n=4)
    b.hist_gap_s = b.hist_gap_s[:, :5]
    with pytest.raises(DataError, match="hist_gap_s"):
        model.user_vectors(b)


def test_docstring_examples_run():
    import doctest

    import funnelrec.retrieval.t2diff as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
