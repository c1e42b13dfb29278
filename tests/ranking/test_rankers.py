"""Every ranker (Shared-Bottom, MMoE, PLE, DIN, DCNv2) against the common contract: shapes, padding, independence of
candidates, gradients, the loss, the watch head and determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.ranking import RANKERS, WatchTimeDebiaser, multitask_loss
from funnelrec.utils.probes import AccumulatingIndexPutProbe
from ranking_testkit import ITEM_VOCAB, RANKER_NAMES, B, M, N, T, make_batch, make_config, make_model


@pytest.fixture(scope="module")
def debiaser():
    g = torch.Generator().manual_seed(1)
    duration = torch.rand(4000, generator=g) * 60 + 5
    return WatchTimeDebiaser.fit(duration, duration * torch.rand(4000, generator=g), buckets=5, quantiles=10)


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_output_shapes_and_the_prediction_methods(name, debiaser):
    batch = make_batch()
    for watch in (None, debiaser):
        model = make_model(name, watch=watch).eval()
        out = model(batch)
        assert set(out) == {"logits", "watch"}
        assert out["logits"].shape == (B, M, T) and out["watch"].shape == (B, M)
        p = model.predict(batch)
        assert p.shape == (B, M, T) and ((p > 0) & (p < 1)).all()
        torch.testing.assert_close(p, torch.sigmoid(out["logits"]))
        seconds = model.predict_watch_time(batch)
        assert seconds.shape == (B, M) and (seconds >= 0).all()
        if watch is None:
            assert model.watch_head == "log1p"
            torch.testing.assert_close(seconds, torch.expm1(out["watch"].clamp(min=0)))
        else:
            assert model.watch_head == "d2q" and model.watch is debiaser
            torch.testing.assert_close(seconds, debiaser.to_seconds(torch.sigmoid(out["watch"]), batch.duration_s))
            assert (seconds <= debiaser.table.max()).all()
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    assert model(empty)["logits"].shape == (2, 3, T)
    one = RequestBatch.empty(batch_size=1, history=N, candidates=1, user_fields=2, user_dense=2, item_fields=3,
                             item_dense=3)
    assert model(one)["watch"].shape == (1, 1)


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_padded_and_old_history_do_not_change_the_output(name):
    model = make_model(name).eval()
    batch = make_batch()
    base = model(batch)["logits"]
    pad = ~batch.history_mask()
    changed = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items),
                                  hist_actions=torch.where(pad.unsqueeze(-1), 1.0, batch.hist_actions))
    torch.testing.assert_close(model(changed)["logits"], base, rtol=0, atol=0)
    old = torch.zeros(B, N, dtype=torch.bool)
    old[:, : N - model.config.history_pool] = True
    changed = dataclasses.replace(batch, hist_items=torch.where(old, 5, batch.hist_items))
    torch.testing.assert_close(model(changed)["logits"], base, rtol=0, atol=0)
    # a valid recent event, and its feedback, do matter
    recent = dataclasses.replace(batch, hist_items=batch.hist_items.clone())
    recent.hist_items[3, -1] = (batch.hist_items[3, -1] % (ITEM_VOCAB[0] - 1)) + 1
    assert not torch.allclose(model(recent)["logits"][3], base[3])
    liked = dataclasses.replace(batch, hist_actions=batch.hist_actions.clone())
    liked.hist_actions[3, -1, :3] = 1.0 - liked.hist_actions[3, -1, :3]
    assert not torch.allclose(model(liked)["logits"][3], base[3])


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_candidates_are_scored_independently(name):
    model = make_model(name).eval()
    batch = make_batch()
    base = model(batch)
    changed = dataclasses.replace(batch, cand_sparse=batch.cand_sparse.clone(), cand_dense=batch.cand_dense.clone(),
                                  duration_s=batch.duration_s.clone())
    changed.cand_sparse[1, 4] = torch.tensor([3, 2, 1])  # a padded slot of request 1
    changed.cand_dense[1, 4] = 9.0
    changed.duration_s[1, 4] = 100.0
    out = model(changed)
    for key in ("logits", "watch"):
        torch.testing.assert_close(out[key][:, :4], base[key][:, :4], rtol=0, atol=0)
        torch.testing.assert_close(out[key][[0, 2, 3]], base[key][[0, 2, 3]], rtol=0, atol=0)
    assert not torch.allclose(out["logits"][1, 4], base["logits"][1, 4])
    # a request's score does not depend on the other requests of the batch
    alone = model(batch.select(torch.tensor([2])))["logits"]
    torch.testing.assert_close(alone[0], base["logits"][2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", RANKER_NAMES)
@pytest.mark.parametrize("watched", [False, True])
def test_gradients_reach_exactly_the_embedding_rows_used(name, watched, debiaser):
    model = make_model(name, watch=debiaser if watched else None)
    batch = make_batch()
    model.training_loss(batch).backward()
    inputs = model.inputs
    touched = set(torch.nonzero(inputs.item_emb.table.weight.grad.abs().sum(1)).squeeze(1).tolist())
    expected = set((batch.cand_sparse[batch.cand_mask] + inputs.item_emb.offsets).flatten().tolist())
    pooled = batch.truncate_history(model.config.history_pool)
    expected |= set(pooled.hist_items[pooled.history_mask()].tolist())  # history shares the item-id rows
    assert touched == expected and 0 not in touched
    user_touched = set(torch.nonzero(inputs.user_emb.table.weight.grad.abs().sum(1)).squeeze(1).tolist())
    assert user_touched == set((batch.user_sparse + inputs.user_emb.offsets).flatten().tolist())
    pos_touched = set(torch.nonzero(inputs.pos_emb.weight.grad.abs().sum(1)).squeeze(1).tolist())
    assert pos_touched == set(batch.position[batch.cand_mask].tolist())
    # LoRA adapters start as B = 0 (the scenarios start on the shared heads), so A learns from the second step
    lora_a = {"heads.hidden_lora.a", "heads.out_lora.a"}
    for pname, p in model.named_parameters():  # every layer, gate, expert and head learns
        if pname not in lora_a:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
    # the watch head learns from the watch loss alone
    model.zero_grad()
    out = model(batch)
    (model.loss(out, batch) - multitask_loss(out, batch, watch_weight=0.0)).backward()
    assert model.heads.out.weight.grad[-1].abs().sum() > 0
    assert model.heads.out.weight.grad[:-1].abs().sum() == 0


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_loss_ignores_masked_candidates_and_matches_the_formula(name, debiaser):
    model = make_model(name, watch=debiaser).eval()
    batch = make_batch()
    out = model(batch)
    loss = model.loss(out, batch)
    pad = ~batch.cand_mask
    noisy = dataclasses.replace(batch, labels=torch.where(pad.unsqueeze(-1), 1.0 - batch.labels, batch.labels),
                                watch_time_s=torch.where(pad, 1e4, batch.watch_time_s))
    torch.testing.assert_close(model.loss(out, noisy), loss)
    m = batch.cand_mask
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"][m], batch.labels[m])
    q = debiaser.to_quantile(batch.watch_time_s[m], batch.duration_s[m])
    d2q = torch.nn.functional.binary_cross_entropy_with_logits(out["watch"][m], q)
    torch.testing.assert_close(loss, bce + model.config.watch_weight * d2q)
    torch.testing.assert_close(model.training_loss(batch), loss)


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_construction_is_deterministic_for_a_seed(name):
    a, b, c = make_model(name, seed=3), make_model(name, seed=3), make_model(name, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    batch = make_batch()
    torch.testing.assert_close(a.eval()(batch)["logits"], b.eval()(batch)["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_the_backward_sums_in_a_fixed_order(name):
    """No ``x[ids]`` gather in the training graph: its backward (an accumulating ``index_put``) sums repeated ids in
    a thread-dependent order, so two trainings from one seed would drift apart on a multi-core CPU."""
    model = make_model(name)
    batch = make_batch()
    batch = dataclasses.replace(batch, hist_items=torch.where(batch.history_mask(), 3, 0))  # one item, repeated
    loss = model.loss(model(batch), batch)
    with AccumulatingIndexPutProbe() as probe:
        loss.backward()
    assert probe.calls == []


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "dcnv2"])
def test_target_attention_history_is_a_switch_of_every_model(name):
    model = make_model(name, history_mode="target").eval()
    assert model.inputs.attention is not None
    batch = make_batch()
    assert model(batch)["logits"].shape == (B, M, T)
    assert make_model(name).inputs.attention is None  # mean pooling by default


def test_din_is_target_attention():
    assert make_model("din").inputs.attention is not None
    with pytest.raises(ConfigError, match="history_mode must be 'target'"):
        make_config("din", history_mode="pool")


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_bad_configs_are_named(name):
    with pytest.raises(ConfigError, match="embed_dim"):
        make_config(name, embed_dim=0)
    with pytest.raises(ConfigError, match="watch_head"):
        make_config(name, watch_head="mse")
    with pytest.raises(ConfigError, match="d2q"):
        RANKERS[name][1](make_config(name, watch_head="d2q"))  # a D2Q head needs a fitted debiaser
    with pytest.raises(ConfigError, match="RankerConfig"):
        RANKERS[name][1]({"embed_dim": 16})


@pytest.mark.parametrize("name,bad", [("mmoe", {"num_experts": 0}), ("ple", {"num_levels": 0}),
                                      ("ple", {"task_experts": 0, "shared_experts": 0}),
                                      ("dcnv2", {"structure": "diagonal"}), ("dcnv2", {"low_rank": 0}),
                                      ("shared_bottom", {"bottom": []}), ("din", {"tower": [0]})])
def test_model_specific_bad_configs(name, bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        make_config(name, **bad)


def test_dcnv2_parallel_structure_and_full_rank():
    batch = make_batch()
    for kw in ({"structure": "parallel"}, {"low_rank": None}):
        model = make_model("dcnv2", **kw).eval()
        assert model(batch)["logits"].shape == (B, M, T)
    assert make_model("dcnv2", low_rank=None).cross.low_rank is None


def test_watch_tables_travel_in_the_state_dict(debiaser):
    model = make_model("mmoe", watch=debiaser)
    state = model.state_dict()
    assert torch.equal(state["watch.table"], debiaser.table) and torch.equal(state["watch.edges"], debiaser.edges)
    restored = WatchTimeDebiaser.from_state_dict({k[len("watch."):]: v for k, v in state.items()
                                                  if k.startswith("watch.")})
    again = make_model("mmoe", seed=9, watch=restored)
    again.load_state_dict(state)
    batch = make_batch()
    torch.testing.assert_close(again.eval().predict_watch_time(batch), model.eval().predict_watch_time(batch))
