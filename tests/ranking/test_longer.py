"""LONGER: the ranker contract, the mask rule in every layer of the real model, KV-cache parity with the training
forward for every switch, the per-request training path against the per-candidate one (outputs and parameter
gradients), gradients, a few training steps on the tiny world, config errors."""

from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.ranking.budget import count_params_flops
from funnelrec.ranking.longer import Longer, LongerConfig, gap_bucket
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch, loss_after_steps

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=N,
             dim=16, heads=2, num_layers=2, num_queries=3, merge_k=2)


def make_longer(seed: int = 0, watch=None, **kw) -> Longer:
    torch.manual_seed(seed)
    return Longer(LongerConfig(**{**SMALL, **kw}), watch=watch)


def layer_outputs(model: Longer, batch: RequestBatch) -> list[torch.Tensor]:
    """Per-candidate training-path outputs [B·M, G + k', D] of the cross layer and of every self layer (the model
    needs ``train_path="per_candidate"``: that path shows every token of every layer)."""
    assert model.config.train_path == "per_candidate"
    outs = []
    layers = [model.encoder.cross, *model.encoder.layers]
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone())) for layer in layers]
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_contract_shapes_and_predictions():
    model = make_longer().eval()
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"logits", "watch"} and out["logits"].shape == (B, M, T) and out["watch"].shape == (B, M)
    assert torch.isfinite(out["logits"]).all()
    p = model.predict(batch)
    torch.testing.assert_close(p, torch.sigmoid(out["logits"]))
    torch.testing.assert_close(model.predict_cached(batch), p, rtol=0, atol=1e-5)
    assert (model.predict_watch_time(batch) >= 0).all()
    assert model.num_global == 4  # candidate, CLS, user, one cross token
    assert model.config.train_path == "per_request"  # the default training path
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    assert model(empty)["logits"].shape == (2, 3, T)
    torch.testing.assert_close(model.predict_cached(empty), model.predict(empty), rtol=0, atol=1e-5)


def test_d2q_watch_head():
    g = torch.Generator().manual_seed(1)
    duration = torch.rand(2000, generator=g) * 60 + 5
    watch = WatchTimeDebiaser.fit(duration, duration * torch.rand(2000, generator=g), buckets=5, quantiles=10)
    model = make_longer(watch=watch).eval()
    assert model.watch_head == "d2q"
    assert model.predict_watch_time(make_batch()).shape == (B, M)


@pytest.mark.parametrize("train_path", ["per_request", "per_candidate"])
@pytest.mark.parametrize("merge", ["none", "concat", "innertrans"])
@pytest.mark.parametrize("sampling", ["recent", "uniform", "learnable"])
def test_kv_cache_matches_the_training_forward(merge, sampling, train_path):
    model = make_longer(merge=merge, query_sampling=sampling, train_path=train_path).eval()
    batch = make_batch()
    out = model(batch)
    cache = model.encode_user(batch)
    cached = model.score_with_cache(cache, batch)
    for key in ("logits", "watch"):
        diff = (cached[key] - out[key])[batch.cand_mask].abs().max()
        assert diff <= 1e-5, (key, float(diff))
    # the same cache scores another candidate set of the same requests
    other = make_batch(seed=3)
    other = dataclasses.replace(batch, cand_sparse=other.cand_sparse, cand_items=other.cand_items,
                                cand_dense=other.cand_dense, duration_s=other.duration_s)
    torch.testing.assert_close(model.score_with_cache(cache, other)["logits"], model(other)["logits"], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("kw", [dict(num_layers=0), dict(cross_tokens=0), dict(num_queries=50),
                                dict(use_position=False, cross_tokens=3)])
def test_kv_cache_parity_for_other_shapes(kw):
    model = make_longer(**kw).eval()
    batch = make_batch()
    torch.testing.assert_close(model.score_with_cache(model.encode_user(batch), batch)["logits"],
                               model(batch)["logits"], rtol=0, atol=1e-5)


def test_cache_for_other_requests_is_refused():
    model = make_longer().eval()
    batch = make_batch()
    with pytest.raises(DataError, match="cache"):
        model.score_with_cache(model.encode_user(batch.select(torch.tensor([0, 1]))), batch)


def _change_candidates(batch: RequestBatch, seed: int) -> RequestBatch:
    other = make_batch(seed=seed)
    return dataclasses.replace(batch, cand_sparse=other.cand_sparse, cand_items=other.cand_items,
                               cand_dense=other.cand_dense, duration_s=other.duration_s,
                               position=batch.position.flip(1))


@pytest.mark.parametrize("merge", ["none", "innertrans"])
def test_sequence_states_never_depend_on_the_candidate(merge):
    model = make_longer(merge=merge, num_queries=8, train_path="per_candidate").eval()
    batch = make_batch()
    g = model.num_global
    before, after = layer_outputs(model, batch), layer_outputs(model, _change_candidates(batch, 7))
    assert len(before) == 3
    for a, b in zip(before, after):
        torch.testing.assert_close(a[:, g:], b[:, g:], rtol=0, atol=1e-6)  # every sequence token, every layer
        assert not torch.allclose(a[:, :g], b[:, :g])  # the global tokens do read the candidate


@pytest.mark.parametrize("merge,k", [("none", 1), ("concat", 2)])
def test_sequence_states_never_depend_on_later_events(merge, k):
    """All S tokens are queries, so every token shows in every layer; change request 3's event 5 (of 8)."""
    model = make_longer(merge=merge, merge_k=k, num_queries=8, train_path="per_candidate").eval()
    batch = make_batch()
    g = model.num_global
    changed_items = batch.hist_items.clone()
    changed_items[3, 5] = (changed_items[3, 5] % (ITEM_VOCAB[0] - 1)) + 1
    later = dataclasses.replace(batch, hist_items=changed_items)
    rows = slice(3 * M, 4 * M)  # request 3's candidates
    first_changed = 5 // k  # the token holding event 5
    for a, b in zip(layer_outputs(model, batch), layer_outputs(model, later)):
        torch.testing.assert_close(a[rows, g:g + first_changed], b[rows, g:g + first_changed], rtol=0, atol=1e-6)
        assert not torch.allclose(a[rows, g + first_changed:], b[rows, g + first_changed:])
        torch.testing.assert_close(a[:3 * M], b[:3 * M], rtol=0, atol=0)  # other requests untouched


def _path_pair(dtype=torch.float32, **kw) -> tuple[Longer, Longer]:
    """The same weights, ``train_path="per_candidate"`` and ``"per_request"``."""
    naive = make_longer(train_path="per_candidate", **kw).to(dtype)
    shared = Longer(dataclasses.replace(naive.config, train_path="per_request")).to(dtype)
    shared.load_state_dict(naive.state_dict())
    return naive, shared


def _loss_outputs_grads(model: Longer, batch: RequestBatch):
    """The training loss plus a random weighting of every output (padded candidates included), the outputs and
    every parameter's gradient."""
    out = model(batch)
    w = torch.randn(out["logits"].shape, generator=torch.Generator().manual_seed(5), dtype=out["logits"].dtype)
    loss = model.loss(out, batch) + (out["logits"] * w).sum() + 0.1 * out["watch"].sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    return float(loss.detach()), {k: v.detach() for k, v in out.items()}, grads


def _assert_same_path_results(naive, shared, batch, out_tol, grad_rtol, nonzero=True):
    """Outputs within ``out_tol``; every parameter gradient within ``grad_rtol`` relative (L2 over the tensor; with
    ``nonzero`` every gradient must be nonzero). The attention layers' key biases get an exactly-zero gradient (a key
    bias adds one constant to all of a query's scores, which the softmax ignores): there, and at gradients that are
    zero, both paths must be round-off against the whole gradient."""
    loss_n, out_n, grad_n = _loss_outputs_grads(naive, batch)
    loss_s, out_s, grad_s = _loss_outputs_grads(shared, batch)
    for key in ("logits", "watch"):
        diff = float((out_s[key] - out_n[key]).abs().max())
        assert diff <= out_tol, (key, diff)
    assert abs(loss_s - loss_n) <= out_tol * max(1.0, abs(loss_n))
    assert grad_n.keys() == grad_s.keys()
    total = torch.cat([g.flatten() for g in grad_n.values()]).norm()
    for name, g in grad_n.items():
        err = (grad_s[name] - g).norm()
        if name.endswith("k_proj.bias") or (not nonzero and g.norm() == 0):
            assert err <= grad_rtol * total, (name, float(err), float(total))
        else:
            assert g.norm() > 0, name
            assert err <= grad_rtol * g.norm(), (name, float(err / g.norm()))


@pytest.mark.parametrize("merge", ["none", "concat", "innertrans"])
@pytest.mark.parametrize("sampling", ["recent", "uniform", "learnable"])
def test_per_request_path_equals_per_candidate_path(merge, sampling):
    """float32, 4 requests × 5 candidate slots (padded candidates, one request without history, left-padded
    histories): outputs within 1e-5, parameter gradients within 1e-5 relative."""
    naive, shared = _path_pair(merge=merge, query_sampling=sampling, merge_k=3)
    _assert_same_path_results(naive.train(), shared.train(), make_batch(), out_tol=1e-5, grad_rtol=1e-5)


@pytest.mark.parametrize("merge,sampling", [("concat", "recent"), ("innertrans", "uniform"), ("none", "learnable")])
def test_per_request_path_is_exact_in_float64(merge, sampling):
    """The same in float64 down to round-off: the two paths are one function with one gradient."""
    from funnelrec.bench.longer_kv_cache import to_dtype

    naive, shared = _path_pair(torch.float64, merge=merge, query_sampling=sampling)
    _assert_same_path_results(naive, shared, to_dtype(make_batch(), torch.float64), out_tol=1e-12,
                              grad_rtol=1e-10)


@pytest.mark.parametrize("kw", [dict(num_layers=0), dict(cross_tokens=0), dict(num_queries=50),
                                dict(use_position=False, cross_tokens=3, heads=4)])
def test_per_request_path_for_other_shapes(kw):
    naive, shared = _path_pair(**kw)
    _assert_same_path_results(naive, shared, make_batch(), out_tol=1e-5, grad_rtol=1e-5)


def test_per_request_path_without_history_and_without_grad():
    naive, shared = _path_pair()
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    _assert_same_path_results(naive, shared, empty, out_tol=1e-5, grad_rtol=1e-5, nonzero=False)
    batch = make_batch()
    with torch.no_grad():  # no autograd: the serving kernel
        torch.testing.assert_close(shared(batch)["logits"], naive(batch)["logits"], rtol=0, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(shared(batch)["logits"], naive(batch)["logits"], rtol=0, atol=1e-5)


def test_per_request_path_with_dropout():
    """Dropout in training mode: finite outputs and gradients everywhere; in eval mode the paths agree again."""
    naive, shared = _path_pair(dropout=0.3)
    batch = make_batch()
    torch.manual_seed(1)
    shared.train().training_loss(batch).backward()
    for name, p in shared.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    a, b = shared(batch)["logits"], shared(batch)["logits"]
    assert not torch.allclose(a, b)  # dropout is on
    torch.testing.assert_close(shared.eval()(batch)["logits"], naive.eval()(batch)["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("merge", ["none", "concat", "innertrans"])
def test_padding_changes_nothing(merge):
    model = make_longer(merge=merge, merge_k=3).eval()
    batch = make_batch()
    base = model(batch)
    pad = ~batch.history_mask()
    noisy = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items),
                                hist_actions=torch.where(pad.unsqueeze(-1), 1.0, batch.hist_actions),
                                hist_gap_s=torch.where(pad, 1e6, batch.hist_gap_s))
    for key in ("logits", "watch"):
        torch.testing.assert_close(model(noisy)[key], base[key], rtol=0, atol=1e-6)
    # nor does the width of the padding (positions count back from the most recent event)
    wider = dataclasses.replace(batch, hist_items=F.pad(batch.hist_items, (5, 0)),
                                hist_actions=F.pad(batch.hist_actions, (0, 0, 5, 0)),
                                hist_gap_s=F.pad(batch.hist_gap_s, (5, 0)))
    torch.testing.assert_close(model(wider)["logits"], base["logits"], rtol=0, atol=1e-5)


def test_candidates_are_scored_independently():
    model = make_longer().eval()
    batch = make_batch()
    base = model(batch)["logits"]
    changed = batch.cand_dense.clone()
    changed[:, 0] += 3.0
    out = model(dataclasses.replace(batch, cand_dense=changed))["logits"]
    torch.testing.assert_close(out[:, 1:], base[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0, 0], base[0, 0])


@pytest.mark.parametrize("merge", ["concat", "innertrans"])
@pytest.mark.parametrize("sampling", ["recent", "learnable"])
def test_gradients_reach_every_parameter(merge, sampling):
    model = make_longer(merge=merge, query_sampling=sampling).train()
    batch = make_batch()
    model.training_loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("seq_tokens.proj.weight", "merge.proj.weight", "encoder.cross.k_proj.weight",
                 "encoder.layers.1.ffn.0.weight", "global_tokens.cls", "inputs.item_emb.table.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_budget_counts_attention():
    cost = count_params_flops(make_longer(), make_batch())
    assert cost["params_dense"] > 0 and cost["flops_per_sample"] > 0
    assert cost["flops_total"] > 2 * cost["flops_forward"]


def test_gap_buckets_are_logarithmic():
    assert gap_bucket(torch.tensor([0.0, 0.9, 1.0, 3.0, 7.0, 1e12, -5.0]), 32).tolist() == [0, 0, 1, 2, 3, 31, 0]


@pytest.mark.parametrize("kw,field", [
    (dict(merge="sum"), "LongerConfig.merge"),
    (dict(query_sampling="random"), "LongerConfig.query_sampling"),
    (dict(merge_k=0), "LongerConfig.merge_k"),
    (dict(num_queries=0), "LongerConfig.num_queries"),
    (dict(num_layers=-1), "LongerConfig.num_layers"),
    (dict(cross_tokens=-1), "LongerConfig.cross_tokens"),
    (dict(dim=30, heads=4), "LongerConfig.dim"),
    (dict(heads=0), "LongerConfig.heads"),
    (dict(history_pool=0), "LongerConfig.history_pool"),
    (dict(history_mode="target"), "LongerConfig.history_mode"),
    (dict(num_actions=-1), "LongerConfig.num_actions"),
    (dict(gap_buckets=0), "LongerConfig.gap_buckets"),
    (dict(train_path="batched"), "LongerConfig.train_path"),
    (dict(dropout=1.5), "LongerConfig.dropout"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        LongerConfig(**{**SMALL, **kw})


def test_bad_input_names_the_column():
    model = make_longer()
    batch = make_batch()
    with pytest.raises(DataError, match="hist_actions"):
        model(dataclasses.replace(batch, hist_actions=batch.hist_actions[..., :3]))
    with pytest.raises(DataError, match="hist_items"):
        model(dataclasses.replace(batch, hist_items=batch.hist_items + 100))


@pytest.mark.parametrize("train_path", ["per_request", "per_candidate"])
def test_a_few_training_steps_lower_the_loss(tiny_world, train_path):
    spec = tiny_world["spec"]
    torch.manual_seed(0)
    config = LongerConfig(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                          user_dense=spec.num_user_dense, item_dense=spec.num_item_dense, history_pool=20,
                          num_queries=4, merge_k=2, dim=16, train_path=train_path)
    model = Longer(config)
    before, after = loss_after_steps(model, tiny_world["train"])
    assert after < 0.9 * before, (before, after)


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("funnelrec.ranking.longer"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
