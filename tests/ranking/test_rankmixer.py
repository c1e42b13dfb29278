"""RankMixer: the ranker contract, its switches (tokenizer, mixing, FFN kind, sparse MoE, DTSI), training on the tiny
world, determinism and the matched budget."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import funnelrec.ranking.rankmixer as rankmixer_module
from funnelrec.data.batch import RequestBatch
from funnelrec.data.features import FeatureSpec
from funnelrec.errors import ConfigError
from funnelrec.nn.routers import ReLURouterMoE
from funnelrec.nn.token_mixing import PerTokenFFN, SharedFFN
from funnelrec.nn.tokenizers import AutoSplitTokenizer, SemanticTokenizer
from funnelrec.ranking import WatchTimeDebiaser, build_ranker, count_params_flops
from funnelrec.ranking.rankmixer import RankMixer, RankMixerConfig
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=6,
             dim=12, ffn_mult=2)
VARIANTS = {
    "default": {},
    "auto": {"tokenizer": "auto"},
    "shared": {"ffn": "shared"},
    "no_mixing": {"mixing": False},
    "sparse_moe": {"ffn": "sparse_moe", "num_experts": 3},
    "dtsi": {"ffn": "sparse_moe", "num_experts": 3, "dtsi": True},
}


def make_config(**kw) -> RankMixerConfig:
    return RankMixerConfig(**{**SMALL, **kw})


def make_model(seed: int = 0, watch=None, **kw) -> RankMixer:
    torch.manual_seed(seed)
    return RankMixer(make_config(**kw), watch=watch)


def spec_config(spec: FeatureSpec, **kw) -> RankMixerConfig:
    """What ``ranker_config("rankmixer", spec, **kw)`` will give once the model is registered."""
    return RankMixerConfig(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                           user_dense=spec.num_user_dense, item_dense=spec.num_item_dense, num_tasks=6, **kw)


def tokens_before_pooling(model: RankMixer, batch: RequestBatch) -> torch.Tensor:
    x = model.tokenizer(model.features(batch).flat)
    for block in model.blocks:
        x = block(x, batch.cand_mask)
    return x  # [B, M, T, D]


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_and_the_prediction_methods(variant):
    g = torch.Generator().manual_seed(1)
    duration = torch.rand(2000, generator=g) * 60 + 5
    debiaser = WatchTimeDebiaser.fit(duration, duration * torch.rand(2000, generator=g), buckets=5, quantiles=10)
    batch = make_batch()
    for watch in (None, debiaser):
        model = make_model(watch=watch, **VARIANTS[variant]).eval()
        out = model(batch)
        assert set(out) == {"logits", "watch"}
        assert out["logits"].shape == (B, M, T) and out["watch"].shape == (B, M)
        torch.testing.assert_close(model.predict(batch), torch.sigmoid(out["logits"]))
        seconds = model.predict_watch_time(batch)
        assert seconds.shape == (B, M) and (seconds >= 0).all()
        assert model.watch_head == ("log1p" if watch is None else "d2q")
    one = RequestBatch.empty(batch_size=1, history=N, candidates=1, user_fields=2, user_dense=2, item_fields=3,
                             item_dense=3)
    assert model(one)["logits"].shape == (1, 1, T)


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidates_and_requests_are_scored_independently(variant):
    model = make_model(**VARIANTS[variant]).eval()
    batch = make_batch()
    base = model(batch)
    changed = dataclasses.replace(batch, cand_sparse=batch.cand_sparse.clone(), cand_dense=batch.cand_dense.clone())
    changed.cand_sparse[1, 4] = torch.tensor([3, 2, 1])  # a padded slot of request 1
    changed.cand_dense[1, 4] = 9.0
    out = model(changed)
    torch.testing.assert_close(out["logits"][:, :4], base["logits"][:, :4], rtol=0, atol=0)
    torch.testing.assert_close(out["logits"][[0, 2, 3]], base["logits"][[0, 2, 3]], rtol=0, atol=0)
    assert not torch.allclose(out["logits"][1, 4], base["logits"][1, 4])
    alone = model(batch.select(torch.tensor([2])))["logits"]
    torch.testing.assert_close(alone[0], base["logits"][2], rtol=1e-5, atol=1e-6)
    # padded history events do not matter
    pad = ~batch.history_mask()
    noisy = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items))
    torch.testing.assert_close(model(noisy)["logits"], base["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = make_model(**VARIANTS[variant])
    batch = make_batch()
    model.training_loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_switches_build_the_right_layers():
    default = make_model()
    assert isinstance(default.tokenizer, SemanticTokenizer) and default.config.tokens == 6
    assert default.tokenizer.token_names == ["user_id", "user_profile", "item_id", "item_profile", "context",
                                             "history"]
    assert all(isinstance(b.ffn, PerTokenFFN) and b.mix_norm is not None for b in default.blocks)
    assert len(default.blocks) == 2 and default.activation_ratio is None and default.moe_layers() == []
    auto = make_model(tokenizer="auto", num_tokens=4)
    assert isinstance(auto.tokenizer, AutoSplitTokenizer) and auto.tokenizer.num_tokens == 4
    assert all(b.mix_norm is None for b in make_model(mixing=False).blocks)
    shared = make_model(ffn="shared")
    assert all(isinstance(b.ffn, SharedFFN) for b in shared.blocks)
    per_ffn = sum(p.numel() for p in default.blocks[0].ffn.parameters())
    assert per_ffn == 6 * sum(p.numel() for p in shared.blocks[0].ffn.parameters())  # separate weights per token
    sparse = make_model(ffn="sparse_moe", num_experts=3)
    moe = sparse.blocks[0].ffn
    assert isinstance(moe, ReLURouterMoE) and moe.train_router is None and moe.hidden == 24 // 3
    dtsi = make_model(ffn="sparse_moe", num_experts=3, dtsi=True, expert_hidden=5, target_activation=0.4)
    moe = dtsi.blocks[1].ffn
    assert moe.train_router is not None and moe.hidden == 5 and moe.controller.target == 0.4
    assert len(dtsi.moe_layers()) == 2


def test_without_mixing_tokens_meet_only_in_the_pooling():
    batch = make_batch()
    other = dataclasses.replace(batch, tab=batch.tab.clone())
    other.tab[:] = 3  # the context token's input only
    for mixing in (False, True):
        model = make_model(mixing=mixing).eval()
        diff = (tokens_before_pooling(model, other) - tokens_before_pooling(model, batch)).abs().sum((0, 1, 3))
        changed = (diff > 0).tolist()
        if mixing:
            assert all(changed)  # every token has seen the context through the mixing
        else:
            assert changed == [False, False, False, False, True, False]


def test_dtsi_inference_uses_the_inference_router_only():
    model = make_model(ffn="sparse_moe", num_experts=3, dtsi=True).eval()
    batch = make_batch()
    base = model(batch)["logits"]
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.train_router.weight.add_(torch.randn_like(moe.train_router.weight))
            moe.train_router.bias.fill_(3.0)
    torch.testing.assert_close(model(batch)["logits"], base, rtol=0, atol=0)
    with torch.no_grad():
        model.moe_layers()[0].router.bias.add_(0.5)
    assert not torch.allclose(model(batch)["logits"], base)
    assert 0.0 <= model.activation_ratio <= 1.0


def test_training_loss_adds_the_router_penalty_in_training_only():
    batch = make_batch()
    model = make_model(ffn="sparse_moe", num_experts=3, l1_coef=0.01, target_activation=None)
    loss = model.training_loss(batch)
    penalty = model.router_penalty()
    assert float(penalty.detach()) > 0
    torch.testing.assert_close(penalty, sum(m.penalty for m in model.moe_layers()))
    torch.testing.assert_close(loss, model.loss(model(batch), batch) + model.router_penalty())
    model.eval()
    torch.testing.assert_close(model.training_loss(batch), model.loss(model(batch), batch))
    assert float(model.router_penalty()) == 0.0
    dense = make_model()
    torch.testing.assert_close(dense.training_loss(batch), dense.loss(dense(batch), batch))
    # the controller state travels in the state dict
    steered = make_model(ffn="sparse_moe", num_experts=3, target_activation=0.1)
    for _ in range(3):
        steered.training_loss(batch)
    state = steered.state_dict()
    assert state["blocks.0.ffn.controller.coef"] != pytest.approx(1e-5)
    fresh = make_model(seed=5, ffn="sparse_moe", num_experts=3, target_activation=0.1)
    fresh.load_state_dict(state)
    assert fresh.moe_layers()[0].l1_coef == steered.moe_layers()[0].l1_coef


def test_custom_token_groups():
    groups = {"user": ["user_sparse_0", "user_sparse_1", "user_dense_0", "user_dense_1"],
              "item": ["item_sparse_0", "item_sparse_1", "item_sparse_2", "item_dense_0", "item_dense_1",
                       "item_dense_2", "duration"],
              "rest": ["tab", "hour", "position", "history_mean", "history_positive"]}
    model = make_model(token_groups=groups).eval()
    assert model.tokenizer.token_names == ["user", "item", "rest"] and model.config.tokens == 3
    assert model(make_batch())["logits"].shape == (B, M, T)
    no_pos = make_config(use_position=False)
    assert "position" not in no_pos.input_fields() and no_pos.groups()["context"] == ["tab", "hour"]


@pytest.mark.parametrize("bad,field", [
    ({"tokenizer": "bpe"}, "tokenizer"),
    ({"ffn": "moe"}, "ffn"),
    ({"dim": 16}, "dim"),  # T = 6 does not divide 16
    ({"dim": 0}, "dim"),
    ({"num_layers": 0}, "num_layers"),
    ({"ffn_mult": 0}, "ffn_mult"),
    ({"num_experts": 0}, "num_experts"),
    ({"expert_hidden": 0}, "expert_hidden"),
    ({"num_tokens": 4}, "num_tokens"),  # semantic: must equal the 6 groups
    ({"tokenizer": "auto", "num_tokens": 500}, "num_tokens"),
    ({"dtsi": True}, "dtsi"),  # needs ffn="sparse_moe"
    ({"mixing": "yes"}, "mixing"),
    ({"dtsi_mix": "mean"}, "dtsi_mix"),
    ({"target_activation": 0.0}, "target_activation"),
    ({"target_activation": 1.5}, "target_activation"),
    ({"l1_coef": -1.0}, "l1_coef"),
    ({"l1_adapt_rate": -0.1}, "l1_adapt_rate"),
    ({"token_groups": {"a": ["user_sparse_0", "video_id"]}}, "token_groups.*unknown field 'video_id'"),
    ({"token_groups": {"a": ["user_sparse_0"]}}, "token_groups.*not placed"),
    ({"user_vocab": [10], "user_dense": 0}, "token_groups.*'user_profile'"),  # an empty default group
    ({"embed_dim": 0}, "embed_dim"),
])
def test_bad_configs_are_named(bad, field):
    with pytest.raises(ConfigError, match=f"RankMixerConfig.{field}"):
        make_config(**bad)


def test_an_empty_default_group_is_fine_with_the_auto_tokenizer():
    model = make_model(user_vocab=[10], user_dense=0, tokenizer="auto")
    b = RequestBatch.empty(batch_size=2, history=3, candidates=2, user_fields=1, item_fields=3, item_dense=3)
    assert model.eval()(b)["logits"].shape == (2, 2, T)


def train(model, ds, epochs: int = 1, seed: int = 0, lr: float = 2e-3):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    losses, ratios = [], []
    for epoch in range(epochs):
        model.train()
        for batch in ds.iter_batches(64, shuffle=True, seed=seed + epoch):
            loss = model.training_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(float(loss.detach()))
            ratios.append(model.activation_ratio)
    return losses, ratios


@pytest.mark.parametrize("variant", ["default", "dtsi"])
def test_trains_on_the_tiny_world(variant, tiny_world):
    torch.manual_seed(0)
    model = RankMixer(spec_config(tiny_world["spec"], history_pool=20, **VARIANTS[variant]))
    losses, ratios = train(model, tiny_world["train"])
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    if variant == "dtsi":
        assert all(0.0 <= r <= 1.0 for r in ratios)
        assert model.moe_layers()[0].l1_coef != pytest.approx(1e-5)  # the controller steered λ


def test_training_is_deterministic_for_a_seed(tiny_world):
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = RankMixer(spec_config(tiny_world["spec"], history_pool=20, **VARIANTS["dtsi"]))
        losses, _ = train(model, tiny_world["train"], seed=3)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    a, b, c = make_model(seed=3), make_model(seed=3), make_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_default_budget_matches_the_baselines():
    """Default sizes on the KuaiRand spec: dense parameters and FLOPs per sample within ±20% of MMoE's and
    DCNv2's (DESIGN §7), same embedding tables."""
    from funnelrec.sim.catalog import real_table

    spec = FeatureSpec.kuairand().fit(real_table("users"), real_table("videos"))
    b = RequestBatch.empty(batch_size=8, history=100, candidates=1, user_fields=spec.num_user_sparse,
                           user_dense=spec.num_user_dense, item_fields=spec.num_item_sparse,
                           item_dense=spec.num_item_dense)
    b.hist_len[:] = 100
    b.hist_items = torch.randint(1, spec.num_items, (8, 100), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = count_params_flops(RankMixer(spec_config(spec)), b)
    for name in ("mmoe", "dcnv2"):
        torch.manual_seed(0)
        ref = count_params_flops(build_ranker(name, spec), b)
        assert ours["params_embedding"] == ref["params_embedding"]
        assert abs(ours["params_dense"] / ref["params_dense"] - 1) <= 0.2, (name, ours, ref)
        assert abs(ours["flops_per_sample"] / ref["flops_per_sample"] - 1) <= 0.2, (name, ours, ref)


def test_docstring_examples_run():
    result = doctest.testmod(rankmixer_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
