"""The plain full-attention Transformer ranker (LONGER's "Transformer" baseline): contract, padding, full
(non-causal) attention, gradients, cost against LONGER, training steps, config errors."""

from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.ranking.budget import count_params_flops
from funnelrec.ranking.longer import Longer, LongerConfig
from funnelrec.ranking.transformer import TransformerRankerConfig, TransformerRanker
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch, loss_after_steps

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=N,
             dim=16, heads=2, num_layers=2)


def make_transformer(seed: int = 0, **kw) -> TransformerRanker:
    torch.manual_seed(seed)
    return TransformerRanker(TransformerRankerConfig(**{**SMALL, **kw}))


def test_contract_shapes():
    model = make_transformer().eval()
    batch = make_batch()
    out = model(batch)
    assert out["logits"].shape == (B, M, T) and out["watch"].shape == (B, M)
    assert torch.isfinite(out["logits"]).all()
    torch.testing.assert_close(model.predict(batch), torch.sigmoid(out["logits"]))
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    assert model(empty)["logits"].shape == (2, 3, T)


def test_padding_changes_nothing_and_candidates_are_independent():
    model = make_transformer().eval()
    batch = make_batch()
    base = model(batch)["logits"]
    pad = ~batch.history_mask()
    noisy = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items),
                                hist_actions=torch.where(pad.unsqueeze(-1), 1.0, batch.hist_actions))
    torch.testing.assert_close(model(noisy)["logits"], base, rtol=0, atol=1e-6)
    dense = batch.cand_dense.clone()
    dense[:, 0] += 3.0
    out = model(dataclasses.replace(batch, cand_dense=dense))["logits"]
    torch.testing.assert_close(out[:, 1:], base[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0, 0], base[0, 0])


def test_attention_is_full_not_causal():
    """History tokens read the candidate and later events (what LONGER's mask forbids)."""
    model = make_transformer(num_layers=1).eval()
    batch = make_batch()
    outs = []
    hook = model.layers[0].register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone()))
    model(batch)
    dense = batch.cand_dense + 1.0
    model(dataclasses.replace(batch, cand_dense=dense))
    items = batch.hist_items.clone()
    items[3, -1] = items[3, -1] % (ITEM_VOCAB[0] - 1) + 1
    model(dataclasses.replace(batch, hist_items=items))
    hook.remove()
    g = 2  # candidate, user
    row = 3 * M  # request 3 (full history), candidate 0
    assert not torch.allclose(outs[0][row, g:], outs[1][row, g:])  # history tokens see the candidate
    assert not torch.allclose(outs[0][row, g], outs[2][row, g])  # the oldest event sees the newest


def test_gradients_reach_every_parameter():
    model = make_transformer()
    model.training_loss(make_batch()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.get_parameter("seq_tokens.proj.weight").grad.abs().sum() > 0


def test_longer_costs_less_than_the_transformer_on_long_histories():
    """The paper's point, at toy scale: with 64 events the merged, query-compressed model needs fewer FLOPs."""
    batch = RequestBatch.empty(batch_size=4, history=64, candidates=1, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    batch.hist_len[:] = 64
    torch.manual_seed(0)
    full = count_params_flops(TransformerRanker(TransformerRankerConfig(**{**SMALL, "history_pool": 64,
                                                                    "num_layers": 3})), batch)
    longer = count_params_flops(Longer(LongerConfig(**{**SMALL, "history_pool": 64, "num_queries": 8})), batch)
    assert longer["flops_per_sample"] < 0.5 * full["flops_per_sample"], (longer, full)


def test_a_few_training_steps_lower_the_loss(tiny_world):
    spec = tiny_world["spec"]
    torch.manual_seed(0)
    model = TransformerRanker(TransformerRankerConfig(
        user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
        user_dense=spec.num_user_dense, item_dense=spec.num_item_dense, history_pool=20, dim=16, num_layers=2))
    before, after = loss_after_steps(model, tiny_world["train"])
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("kw,field", [
    (dict(num_layers=0), "TransformerRankerConfig.num_layers"),
    (dict(dim=10, heads=4), "TransformerRankerConfig.dim"),
    (dict(ffn_mult=0), "TransformerRankerConfig.ffn_mult"),
    (dict(history_mode="target"), "TransformerRankerConfig.history_mode"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TransformerRankerConfig(**{**SMALL, **kw})


def test_bad_input_names_the_column():
    batch = make_batch()
    with pytest.raises(DataError, match="cand_dense"):
        make_transformer()(dataclasses.replace(batch, cand_dense=batch.cand_dense[..., :1]))


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("funnelrec.ranking.transformer"),
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
