"""HyFormer: the ranker contract for every switch, the behaviour-sequence extraction against a plain-Python
reference, the sequence side computed once per request and independent of the candidates, KV-cache parity, empty
histories, gradients, training on a fixed batch, config errors."""

from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.token_mixing import token_mixing
from funnelrec.ranking.budget import count_params_flops
from funnelrec.ranking.hyformer import (HyFormer, HyFormerCache, HyFormerConfig, behaviour_index, mixing_heads,
                                        shuffle_tokens)
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=N,
             dim=16, heads=2, seq_len=4, num_queries=2, query_hidden=8, short_len=3, mixer_mult=1)
VARIANTS = {
    "default": {},
    "full": {"seq_encoder": "full"},
    "swiglu": {"seq_encoder": "swiglu"},
    "merged": {"sequences": "merged"},
    "no_pooled_query": {"pooled_query": False},
    "no_global_tokens": {"global_tokens": False},
    "one_behaviour": {"behaviours": ["like"]},
    "one_layer": {"num_layers": 1},
    "deep_long": {"num_layers": 3, "seq_len": 20, "short_len": 2},
}


def make_hyformer(seed: int = 0, watch=None, **kw) -> HyFormer:
    torch.manual_seed(seed)
    return HyFormer(HyFormerConfig(**{**SMALL, **kw}), watch=watch)


def _change_candidates(batch: RequestBatch, seed: int) -> RequestBatch:
    other = make_batch(seed=seed)
    return dataclasses.replace(batch, cand_sparse=other.cand_sparse, cand_items=other.cand_items,
                               cand_dense=other.cand_dense, duration_s=other.duration_s,
                               position=batch.position.flip(1))


def _cache_tensors(cache: HyFormerCache) -> list[torch.Tensor]:
    return [t for group in (cache.keys, cache.values, cache.valid) for layer in group for t in layer] + \
        [cache.pooled, *cache.global_tokens]


def _one_candidate(batch: RequestBatch, j: int) -> RequestBatch:
    """The same requests with only candidate slot j."""
    cut = {name: getattr(batch, name)[:, j:j + 1] for name in
           ("cand_items", "cand_mask", "cand_sparse", "cand_dense", "position", "duration_s", "labels",
            "watch_time_s", "is_rand")}
    return dataclasses.replace(batch, **cut)


# ------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_predictions_and_cache_parity_for_every_switch(variant):
    model = make_hyformer(**VARIANTS[variant]).eval()
    batch = make_batch()
    out = {key: v.detach() for key, v in model(batch).items()}  # the training path, autograd on
    assert set(out) == {"logits", "watch"} and out["logits"].shape == (B, M, T) and out["watch"].shape == (B, M)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["watch"]).all()
    torch.testing.assert_close(model.predict(batch), torch.sigmoid(out["logits"]))
    assert (model.predict_watch_time(batch) >= 0).all()
    cache = model.encode_user(batch)
    cached = model.score_with_cache(cache, batch)
    for key in ("logits", "watch"):
        assert float((cached[key] - out[key]).abs().max()) <= 1e-5, key
    # the same cache scores another candidate set of the same requests
    other = _change_candidates(batch, 3)
    torch.testing.assert_close(model.score_with_cache(cache, other)["logits"], model(other)["logits"], rtol=0,
                               atol=1e-5)
    k = len(model.config.sequence_names)
    assert model.num_sequences == k and len(cache.keys) == model.config.num_layers and len(cache.keys[0]) == k
    assert model.num_tokens == k * 2 + 6 + k * int(model.config.global_tokens)


def test_token_count_and_sequence_names():
    assert make_hyformer().num_tokens == 15 and make_hyformer().config.sequence_names == ["click", "long_view", "like"]
    merged = make_hyformer(sequences="merged", global_tokens=False)
    assert merged.num_tokens == 8 and merged.config.sequence_names == ["all"] and merged.boosts[0].mix_heads == 8


def test_d2q_watch_head():
    g = torch.Generator().manual_seed(1)
    duration = torch.rand(2000, generator=g) * 60 + 5
    watch = WatchTimeDebiaser.fit(duration, duration * torch.rand(2000, generator=g), buckets=5, quantiles=10)
    model = make_hyformer(watch=watch).eval()
    assert model.watch_head == "d2q" and model.predict_watch_time(make_batch()).shape == (B, M)


@pytest.mark.parametrize("variant", ["default", "full", "swiglu", "merged"])
def test_cache_parity_is_exact_in_float64(variant):
    from funnelrec.bench.longer_kv_cache import to_dtype

    model = make_hyformer(**VARIANTS[variant]).double().eval()
    batch = to_dtype(make_batch(), torch.float64)
    out = {key: v.detach() for key, v in model(batch).items()}
    cached = model.score_with_cache(model.encode_user(batch), batch)
    for key in ("logits", "watch"):
        assert float((cached[key] - out[key]).abs().max()) <= 1e-12, key


def test_cache_for_other_requests_is_refused():
    model = make_hyformer().eval()
    batch = make_batch()
    with pytest.raises(DataError, match="cache"):
        model.score_with_cache(model.encode_user(batch.select(torch.tensor([0, 1]))), batch)


# ------------------------------------------------------------------------------------ empty and padding


@pytest.mark.parametrize("variant", ["default", "full", "swiglu", "merged"])
def test_empty_histories_give_no_nan(variant):
    model = make_hyformer(**VARIANTS[variant]).train()
    no_column = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2,
                                   item_fields=3, item_dense=3)
    batch = make_batch()  # request 0 has no history
    no_flags = dataclasses.replace(batch, hist_actions=torch.zeros_like(batch.hist_actions))  # no behaviour event
    for b in (no_column, batch, no_flags):
        out = model(b)
        assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["watch"]).all()
        model.zero_grad(set_to_none=True)
        model.training_loss(b).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    model.eval()
    torch.testing.assert_close(model.predict_cached(no_column), model.predict(no_column), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["default", "full", "merged"])
def test_padding_changes_nothing(variant):
    model = make_hyformer(**VARIANTS[variant]).eval()
    batch = make_batch()
    base = model(batch)
    pad = ~batch.history_mask()
    noisy = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items),
                                hist_actions=torch.where(pad.unsqueeze(-1), 1.0, batch.hist_actions),
                                hist_gap_s=torch.where(pad, 1e6, batch.hist_gap_s))
    for key in ("logits", "watch"):
        torch.testing.assert_close(model(noisy)[key], base[key], rtol=0, atol=1e-6)
    wider = dataclasses.replace(batch, hist_items=F.pad(batch.hist_items, (5, 0)),
                                hist_actions=F.pad(batch.hist_actions, (0, 0, 5, 0)),
                                hist_gap_s=F.pad(batch.hist_gap_s, (5, 0)))
    torch.testing.assert_close(model(wider)["logits"], base["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["default", "full", "swiglu"])
def test_padding_slots_of_the_sequences_change_nothing(variant):
    """With at most 3 flagged events per behaviour, 4 or 12 slots per sequence give the same outputs (the extra
    slots are padding: never attended, never pooled)."""
    small = make_hyformer(seq_len=4, **VARIANTS[variant]).eval()
    large = HyFormer(dataclasses.replace(small.config, seq_len=12)).eval()
    large.load_state_dict(small.state_dict())
    batch = make_batch()
    acts = batch.hist_actions.clone()
    acts[:, :5] = 0.0  # only the last 3 of the 8 positions may be flagged
    batch = dataclasses.replace(batch, hist_actions=acts)
    assert large.sequences(batch)[0][0].shape[1] == 8 and small.sequences(batch)[0][0].shape[1] == 4
    for key in ("logits", "watch"):
        torch.testing.assert_close(large(batch)[key], small(batch)[key], rtol=0, atol=1e-5)


def test_full_encoder_is_causal():
    """Changing the most recent click of request 3 moves only the last slot of the click sequence's states."""
    model = make_hyformer(seq_encoder="full", seq_len=8).eval()
    batch = make_batch()
    acts = batch.hist_actions.clone()
    acts[3, -1, 0] = 1.0
    batch = dataclasses.replace(batch, hist_actions=acts)
    items = batch.hist_items.clone()
    items[3, -1] = items[3, -1] % (ITEM_VOCAB[0] - 1) + 1
    a, b = model.encode_user(batch), model.encode_user(dataclasses.replace(batch, hist_items=items))
    for layer in range(model.config.num_layers):
        ka, kb = a.keys[layer][0][3], b.keys[layer][0][3]  # [h, L, dh]
        torch.testing.assert_close(ka[:, :-1], kb[:, :-1], rtol=0, atol=1e-6)
        assert not torch.allclose(ka[:, -1], kb[:, -1])


# ---------------------------------------------------------------------------------- sequence extraction


def _reference_index(actions, valid, columns, length):
    """Plain Python: per row and channel, the last ``length`` valid flagged positions, left-padded."""
    b, n = valid.shape
    index = torch.zeros(b, len(columns), length, dtype=torch.long)
    ok = torch.zeros(b, len(columns), length, dtype=torch.bool)
    for r in range(b):
        for i, c in enumerate(columns):
            pos = [p for p in range(n) if bool(valid[r, p]) and float(actions[r, p, c]) > 0][-length:]
            for s, p in enumerate(pos):
                index[r, i, length - len(pos) + s] = p
                ok[r, i, length - len(pos) + s] = True
    return index, ok


@pytest.mark.parametrize("length", [1, 3, 9, 14])
def test_behaviour_index_matches_a_plain_python_reference(length):
    g = torch.Generator().manual_seed(length)
    b, n = 6, 9
    actions = (torch.rand(b, n, 7, generator=g) < torch.tensor([0.6, 0.3, 0.1, 0, 0, 0, 0.9])).float()
    valid = torch.arange(n) >= torch.tensor([[0], [2], [9], [5], [1], [8]])  # left-padded, one empty row
    columns = [0, 1, 2, 3, 6]  # channel 3 is never set
    index, ok = behaviour_index(actions, valid, columns, length)
    ref_index, ref_ok = _reference_index(actions, valid, columns, length)
    assert index.shape == (b, len(columns), length)
    assert torch.equal(ok, ref_ok) and torch.equal(index, ref_index)
    assert ok.any() and not ok[:, 3].any() and not ok[2].any()


def test_each_sequence_reads_only_its_behaviour():
    """Change an event that was clicked but neither long-viewed nor liked: only the click sequence's cache moves."""
    model = make_hyformer(seq_len=8).eval()
    batch = make_batch()
    acts = batch.hist_actions.clone()
    acts[3, 5, :3] = torch.tensor([1.0, 0.0, 0.0])
    batch = dataclasses.replace(batch, hist_actions=acts)
    items = batch.hist_items.clone()
    items[3, 5] = items[3, 5] % (ITEM_VOCAB[0] - 1) + 1
    a, b = model.encode_user(batch), model.encode_user(dataclasses.replace(batch, hist_items=items))
    for layer in range(model.config.num_layers):
        assert not torch.allclose(a.keys[layer][0][3], b.keys[layer][0][3])  # click
        for k in (1, 2):  # long view, like
            torch.testing.assert_close(a.keys[layer][k], b.keys[layer][k], rtol=0, atol=0)
            torch.testing.assert_close(a.values[layer][k], b.values[layer][k], rtol=0, atol=0)
        torch.testing.assert_close(a.keys[layer][0][:3], b.keys[layer][0][:3], rtol=0, atol=0)  # other requests


def test_sequences_hold_the_flagged_events_in_order():
    """The tokens of the like sequence equal the tokenizer run on the reference events of that behaviour."""
    model = make_hyformer(seq_len=5).eval()
    batch = make_batch()
    tokens, valids = model.sequences(batch)
    assert [t.shape for t in tokens] == [(B, 5, 16)] * 3
    index, ok = _reference_index(batch.hist_actions, batch.history_mask(), [0, 1, 2], 5)
    table = model.inputs.item_emb.field_table(0)
    for k in range(3):
        ref = model.seq_tokens[k](table[batch.hist_items.gather(1, index[:, k]) * ok[:, k]],
                                  batch.hist_actions.gather(1, index[:, k, :, None].expand(-1, -1, 7)),
                                  batch.hist_gap_s.gather(1, index[:, k]), ok[:, k])
        assert torch.equal(valids[k], ok[:, k])
        torch.testing.assert_close(tokens[k], ref, rtol=0, atol=1e-6)


def test_each_query_generator_reads_the_ns_tokens_and_its_own_sequence_pool():
    model = make_hyformer().eval()
    batch = make_batch()
    seen = {}
    hooks = [gen.register_forward_hook(lambda mod, args, out, k=k: seen.__setitem__(k, args[0]))
             for k, gen in enumerate(model.generators)]
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    cache = model.encode_user(batch)
    ns = model.tokenizer(model.features(batch).flat).flatten(-2)
    for k in range(3):
        assert seen[k].shape == (B, M, ns.shape[-1] + 16)
        torch.testing.assert_close(seen[k][..., :-16], ns)
        torch.testing.assert_close(seen[k][..., -16:], cache.pooled[:, k, None].expand(B, M, 16))
    assert not torch.allclose(cache.pooled[:, 0], cache.pooled[:, 2])


# ----------------------------------------------------------------------------- candidate independence


@pytest.mark.parametrize("variant", ["default", "full", "swiglu", "merged"])
def test_sequence_side_never_depends_on_the_candidates(variant):
    model = make_hyformer(**VARIANTS[variant]).eval()
    batch = make_batch()
    a, b = model.encode_user(batch), model.encode_user(_change_candidates(batch, 7))
    for x, y in zip(_cache_tensors(a), _cache_tensors(b)):
        assert torch.equal(x, y)
    assert not torch.allclose(model(batch)["logits"], model(_change_candidates(batch, 7))["logits"])


def test_candidates_are_scored_independently():
    model = make_hyformer().eval()
    batch = make_batch()
    full = model(batch)["logits"]
    for j in range(M):
        torch.testing.assert_close(model(_one_candidate(batch, j))["logits"][:, 0], full[:, j], rtol=0, atol=1e-5)


def test_the_sequence_side_runs_once_per_request():
    """Forward FLOPs are E + M·c: the sequence side E does not grow with the candidates, and E is encode's."""
    model = make_hyformer(seq_len=8, seq_encoder="full").eval()

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    def batch_with(m: int) -> RequestBatch:
        b = RequestBatch.empty(batch_size=2, history=N, candidates=m, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
        b.hist_len[:] = N
        b.hist_actions[:] = 1.0
        return b

    f1, f2, f4 = (flops(lambda m=m: model(batch_with(m))) for m in (1, 2, 4))
    per_candidate = f2 - f1
    assert per_candidate > 0 and f4 - f1 == 3 * per_candidate
    assert f1 - per_candidate == flops(lambda: model.encode(batch_with(1))) > per_candidate


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", ["default", "full", "swiglu", "merged", "no_pooled_query"])
def test_gradients_reach_the_query_generators_and_the_sequence_encoders(variant):
    model = make_hyformer(**VARIANTS[variant]).train()
    model.training_loss(make_batch()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    c = model.config
    names = ["tokenizer.proj.0.weight", "inputs.item_emb.table.weight", "heads.hidden.weight"]
    for k in range(model.num_sequences):
        names += [f"generators.{k}.first.weight", f"generators.{k}.second.weight", f"seq_tokens.{k}.proj.weight"]
        for layer in range(c.num_layers):
            enc = "ffn.w12.weight" if c.seq_encoder == "swiglu" else "attn.k_proj.weight"
            names += [f"encoders.{layer}.{k}.{enc}", f"decoders.{layer}.{k}.k_proj.weight",
                      f"decoders.{layer}.{k}.v_proj.weight", f"decoders.{layer}.{k}.q_proj.weight",
                      f"boosts.{layer}.ffn.first.weight"]
    for name in names:
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["default", "merged"])
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(variant):
    model = make_hyformer(**VARIANTS[variant]).train()
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
    cost = count_params_flops(make_hyformer(), make_batch())
    assert cost["params_dense"] > 0 and cost["flops_total"] > 2 * cost["flops_forward"] > 0


# ------------------------------------------------------------------------------------------ the mixing


def test_mixing_is_rankmixers_when_t_divides_d_and_a_permutation_otherwise():
    x = torch.randn(3, 15, 16)
    assert mixing_heads(8, 16) == 8 and mixing_heads(15, 16) == 8 and mixing_heads(20, 16) == 16
    assert mixing_heads(3, 16) == 2
    torch.testing.assert_close(shuffle_tokens(x[:, :8], 8), token_mixing(x[:, :8]), rtol=0, atol=0)
    y = shuffle_tokens(x, mixing_heads(15, 16))
    assert y.shape == x.shape
    assert torch.equal(y.flatten(1).sort(-1).values, x.flatten(1).sort(-1).values)  # nothing lost or repeated
    assert not torch.equal(y, x)


def test_sequences_meet_only_in_the_boosting():
    """Without the boosting's mixing, token t's FFN sees token t only: the mixed input of a query token reads
    slices of several tokens (among them other sequences' queries and the NS tokens)."""
    x = torch.zeros(1, 15, 16)
    x[0, 0] = 1.0  # the first click query
    y = shuffle_tokens(x, mixing_heads(15, 16))
    assert int((y[0].abs().sum(-1) > 0).sum()) > 1  # its entries reach several mixed tokens


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("kw,field", [
    (dict(sequences="mixed"), "HyFormerConfig.sequences"),
    (dict(seq_encoder="lstm"), "HyFormerConfig.seq_encoder"),
    (dict(behaviours=["click", "dwell"]), "HyFormerConfig.behaviours"),
    (dict(behaviours=[]), "HyFormerConfig.behaviours"),
    (dict(behaviours="click"), "HyFormerConfig.behaviours"),
    (dict(behaviours=["click", "click"]), "HyFormerConfig.behaviours"),
    (dict(behaviours=["hate"], num_actions=6), "HyFormerConfig.behaviours"),
    (dict(seq_len=0), "HyFormerConfig.seq_len"),
    (dict(num_queries=0), "HyFormerConfig.num_queries"),
    (dict(query_hidden=0), "HyFormerConfig.query_hidden"),
    (dict(short_len=0), "HyFormerConfig.short_len"),
    (dict(num_layers=0), "HyFormerConfig.num_layers"),
    (dict(mixer_mult=0), "HyFormerConfig.mixer_mult"),
    (dict(pooled_query="yes"), "HyFormerConfig.pooled_query"),
    (dict(global_tokens=1), "HyFormerConfig.global_tokens"),
    (dict(token_groups={"all": ["user_sparse_0"]}), "HyFormerConfig.token_groups"),
    (dict(dim=30, heads=4), "HyFormerConfig.dim"),
    (dict(history_mode="target"), "HyFormerConfig.history_mode"),
    (dict(dropout=1.5), "HyFormerConfig.dropout"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        HyFormerConfig(**{**SMALL, **kw})


def test_bad_input_names_the_column():
    model = make_hyformer()
    batch = make_batch()
    with pytest.raises(DataError, match="hist_actions"):
        model(dataclasses.replace(batch, hist_actions=batch.hist_actions[..., :3]))
    with pytest.raises(DataError, match="hist_items"):
        model(dataclasses.replace(batch, hist_items=batch.hist_items + 100))


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("funnelrec.ranking.hyformer"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
