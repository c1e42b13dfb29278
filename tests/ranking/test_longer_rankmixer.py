"""LONGER + RankMixer (the two-stage baseline): the ranker contract, KV-cache parity with the training forward for
LONGER's switches, the two training paths, candidate independence of the cached sequence side, empty histories,
gradients, training on a fixed batch, config errors."""

from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.ranking.budget import count_params_flops
from funnelrec.ranking.longer_rankmixer import LongerRankMixer, LongerRankMixerConfig
from funnelrec.ranking.rankmixer import RankMixerBlock
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=N,
             dim=16, heads=2, num_layers=2, num_queries=3, merge_k=2, mixer_mult=1)
VARIANTS = {
    "default": {},
    "per_candidate": {"train_path": "per_candidate"},
    "merge_none": {"merge": "none"},
    "innertrans_uniform": {"merge": "innertrans", "query_sampling": "uniform"},
    "learnable": {"query_sampling": "learnable"},
    "no_self_layers": {"num_layers": 0, "cross_tokens": 0},
    "one_mixer_block": {"mixer_layers": 1, "mixer_mult": 2},
}


def make_model(seed: int = 0, **kw) -> LongerRankMixer:
    torch.manual_seed(seed)
    return LongerRankMixer(LongerRankMixerConfig(**{**SMALL, **kw}))


def _change_candidates(batch: RequestBatch, seed: int) -> RequestBatch:
    other = make_batch(seed=seed)
    return dataclasses.replace(batch, cand_sparse=other.cand_sparse, cand_items=other.cand_items,
                               cand_dense=other.cand_dense, duration_s=other.duration_s,
                               position=batch.position.flip(1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_predictions_and_cache_parity(variant):
    model = make_model(**VARIANTS[variant]).eval()
    batch = make_batch()
    out = {key: v.detach() for key, v in model(batch).items()}
    assert out["logits"].shape == (B, M, T) and out["watch"].shape == (B, M)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["watch"]).all()
    torch.testing.assert_close(model.predict(batch), torch.sigmoid(out["logits"]))
    assert (model.predict_watch_time(batch) >= 0).all()
    cache = model.encode_user(batch)
    cached = model.score_with_cache(cache, batch)
    for key in ("logits", "watch"):
        assert float((cached[key] - out[key])[batch.cand_mask].abs().max()) <= 1e-5, key
    other = _change_candidates(batch, 3)
    torch.testing.assert_close(model.score_with_cache(cache, other)["logits"], model(other)["logits"], rtol=0,
                               atol=1e-5)
    assert len(model.blocks) == model.config.mixer_layers and model.config.tokens == 8


def test_cache_parity_is_exact_in_float64():
    from funnelrec.bench.longer_kv_cache import to_dtype

    model = make_model().double().eval()
    batch = to_dtype(make_batch(), torch.float64)
    out = {key: v.detach() for key, v in model(batch).items()}
    cached = model.score_with_cache(model.encode_user(batch), batch)
    for key in ("logits", "watch"):
        assert float((cached[key] - out[key])[batch.cand_mask].abs().max()) <= 1e-12, key


def test_the_two_training_paths_agree():
    naive = make_model(train_path="per_candidate")
    shared = LongerRankMixer(dataclasses.replace(naive.config, train_path="per_request"))
    shared.load_state_dict(naive.state_dict())
    batch = make_batch()
    a, b = naive(batch), shared(batch)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=1e-5)
    naive.training_loss(batch).backward()
    shared.training_loss(batch).backward()
    for (name, p), q in zip(naive.named_parameters(), shared.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sequence_side_never_depends_on_the_candidates():
    model = make_model().eval()
    batch = make_batch()
    a, b = model.encode_user(batch), model.encode_user(_change_candidates(batch, 7))
    for x, y in zip([*a.kv.keys, *a.kv.values, a.user], [*b.kv.keys, *b.kv.values, b.user]):
        assert torch.equal(x, y)
    base = model(batch)["logits"]
    changed = batch.cand_dense.clone()
    changed[:, 0] += 3.0
    out = model(dataclasses.replace(batch, cand_dense=changed))["logits"]
    torch.testing.assert_close(out[:, 1:], base[:, 1:], rtol=0, atol=1e-6)  # candidates scored independently
    assert not torch.allclose(out[0, 0], base[0, 0])


def test_the_sequence_reaches_the_mixer_only_through_longers_tokens():
    """The time gaps are read by LONGER's event tokens only (the NS tokens pool item ids and actions): they change
    the output, unless LONGER's output tokens (the fusion point) are zeroed."""
    model = make_model().eval()
    batch = make_batch()
    gaps = batch.hist_gap_s.clone()
    gaps[3, -1] = 1e6
    later = dataclasses.replace(batch, hist_gap_s=gaps)
    assert not torch.allclose(model(batch)["logits"][3], model(later)["logits"][3])
    torch.testing.assert_close(model(batch)["logits"][:3], model(later)["logits"][:3], rtol=0, atol=0)
    with torch.no_grad():
        model.out_norm.weight.zero_()
    torch.testing.assert_close(model(batch)["logits"], model(later)["logits"], rtol=0, atol=0)


def test_empty_histories_give_no_nan():
    model = make_model().train()
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    for b in (empty, make_batch()):
        out = model(b)
        assert torch.isfinite(out["logits"]).all()
        model.zero_grad(set_to_none=True)
        model.training_loss(b).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    model.eval()
    torch.testing.assert_close(model.predict_cached(empty), model.predict(empty), rtol=0, atol=1e-6)


def test_gradients_reach_both_stages():
    model = make_model().train()
    model.training_loss(make_batch()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("seq_tokens.proj.weight", "merge.proj.weight", "encoder.cross.k_proj.weight",
                 "encoder.layers.1.ffn.0.weight", "global_tokens.cls", "out_norm.weight", "tokenizer.proj.0.weight",
                 "blocks.0.ffn.first.weight", "blocks.1.ffn.second.weight", "inputs.item_emb.table.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert all(isinstance(b, RankMixerBlock) and b.mixing for b in model.blocks)


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    model = make_model().train()
    batch = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(model.training_loss(batch))
    for _ in range(40):
        loss = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model.training_loss(batch))
    assert after < 0.7 * before, (before, after)


def test_budget_counts_the_attention():
    cost = count_params_flops(make_model(), make_batch())
    assert cost["params_dense"] > 0 and cost["flops_total"] > 2 * cost["flops_forward"] > 0


def test_cache_for_other_requests_is_refused():
    model = make_model().eval()
    batch = make_batch()
    with pytest.raises(DataError, match="cache"):
        model.score_with_cache(model.encode_user(batch.select(torch.tensor([0, 1]))), batch)


@pytest.mark.parametrize("kw,field", [
    (dict(dim=20, heads=2), "LongerRankMixerConfig.dim"),
    (dict(mixer_layers=0), "LongerRankMixerConfig.mixer_layers"),
    (dict(mixer_mult=0), "LongerRankMixerConfig.mixer_mult"),
    (dict(token_groups={"all": ["user_sparse_0"]}), "LongerRankMixerConfig.token_groups"),
    (dict(merge="sum"), "LongerRankMixerConfig.merge"),
    (dict(query_sampling="random"), "LongerRankMixerConfig.query_sampling"),
    (dict(train_path="batched"), "LongerRankMixerConfig.train_path"),
    (dict(num_queries=0), "LongerRankMixerConfig.num_queries"),
    (dict(heads=0), "LongerRankMixerConfig.heads"),
    (dict(history_mode="target"), "LongerRankMixerConfig.history_mode"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        LongerRankMixerConfig(**{**SMALL, **kw})


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("funnelrec.ranking.longer_rankmixer"),
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
