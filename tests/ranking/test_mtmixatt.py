"""MTmixAtt: the ranker contract for every switch, per-request scoring and scenario routing, MLoRA heads, training
on a fixed batch, determinism, config errors and the FLOPs matched to RankMixer's defaults."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import funnelrec.ranking.mtmixatt as mtmixatt_module
from funnelrec.data.batch import RequestBatch
from funnelrec.data.features import FeatureSpec
from funnelrec.errors import ConfigError
from funnelrec.nn.mix_attention import LearnableTokenMixing
from funnelrec.nn.routers import ReLURouterMoE
from funnelrec.nn.scenario_moe import SharedDenseMoE
from funnelrec.nn.token_mixing import PerTokenFFN, TokenMixing
from funnelrec.ranking import WatchTimeDebiaser, count_params_flops
from funnelrec.ranking.base import TaskHeads
from funnelrec.ranking.mtmixatt import MTmixAtt, MTmixAttConfig
from funnelrec.ranking.rankmixer import RankMixer, RankMixerConfig
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=6,
             dim=12, field_dim=4, num_scenarios=4, scene_hidden=4, lora_rank=2)
VARIANTS = {
    "default": {},
    "random": {"grouping": "random"},
    "manual": {"grouping": "manual"},
    "fixed_mixing": {"mixing": "fixed"},
    "zero_init": {"mixing_init": "zero"},
    "shift_init": {"mixing_init": "shift", "mix_heads": 3},
    "relu_sparse": {"moe": "relu_sparse"},
    "post": {"norm": "post"},
    "pre": {"norm": "pre"},
    "no_shared": {"shared_experts": 0, "scene_shared": 0, "scene_auto": 2},
    "field_mlp": {"field_hidden": 6, "num_tokens": 4, "group_size": 5, "ffn_mult": 2},
    "scene_residual": {"scene_moe": "residual"},
    "no_scene_moe": {"scene_moe": "none", "ffn_mult": 3},
    "plain_heads": {"scenario_heads": False},
    "per_token_ffn": {"moe": "per_token_ffn", "scene_moe": "none", "ffn_mult": 3},
}
MAIN = 1  # the main tab; make_batch's tabs are [1, 2, 0, 14] → scenarios [1, 2, 0, 3]


def make_config(**kw) -> MTmixAttConfig:
    return MTmixAttConfig(**{**SMALL, **kw})


def make_model(seed: int = 0, watch=None, **kw) -> MTmixAtt:
    torch.manual_seed(seed)
    return MTmixAtt(make_config(**kw), watch=watch)


def with_tab(batch: RequestBatch, tab) -> RequestBatch:
    return dataclasses.replace(batch, tab=torch.as_tensor(tab, dtype=torch.int64))


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
        assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["watch"]).all()
        torch.testing.assert_close(model.predict(batch), torch.sigmoid(out["logits"]))
        seconds = model.predict_watch_time(batch)
        assert seconds.shape == (B, M) and (seconds >= 0).all()
        assert model.watch_head == ("log1p" if watch is None else "d2q")
    one = RequestBatch.empty(batch_size=1, history=N, candidates=1, user_fields=2, user_dense=2, item_fields=3,
                             item_dense=3)
    assert model(one)["logits"].shape == (1, 1, T)


def test_switches_build_the_right_layers():
    default = make_model()
    c = default.config
    assert c.tokens == 6 and c.heads == 6 and c.scene_width == 4
    assert default.tokenizer.selection is not None and default.tokenizer.group_size == 3  # ceil(16 fields / 6)
    assert all(isinstance(b.mixer, LearnableTokenMixing) and isinstance(b.dense, SharedDenseMoE)
               for b in default.blocks)
    blk = default.blocks[0]
    assert blk.dense.routed == 6 and blk.dense.shared_experts == 2 and blk.scene.active_experts == 4  # 2 + 1 + 1
    assert blk.scene.num_scenarios == 4 and default.moe_layers() == [] and default.activation_ratio is None
    assert make_model(grouping="random").tokenizer.selection is None
    manual = make_model(grouping="manual")
    assert manual.tokenizer.selection is None and manual.tokenizer.tokenizer.token_names == list(
        RankMixerConfig(**{k: v for k, v in SMALL.items() if k in ("user_vocab", "item_vocab", "user_dense",
                                                                   "item_dense")}).default_token_groups())
    assert all(isinstance(b.mixer, TokenMixing) for b in make_model(mixing="fixed").blocks)
    relu = make_model(moe="relu_sparse")
    assert len(relu.moe_layers()) == 2 and relu.moe_layers()[0].hidden == 12 // 3
    assert all(isinstance(b.dense, ReLURouterMoE) for b in relu.blocks)
    assert isinstance(make_model(norm="pre").final_norm, torch.nn.LayerNorm)
    assert isinstance(default.final_norm, torch.nn.Identity)
    m = make_model(mixing_init="zero").blocks[0].mixer.weight
    assert m.abs().sum() == 0
    w = default.blocks[0].mixer.weight.detach()
    torch.testing.assert_close(w @ w.transpose(1, 2), torch.eye(6).expand(6, 6, 6), atol=1e-5, rtol=0)


def test_scene_moe_and_scenario_head_switches():
    """``scene_moe`` decides whether the dense MoE's output reaches the residual on its own; ``scenario_heads=False``
    is one set of plain heads, so the tab then acts only through the tokens and the scenario MoE."""
    x, scenario = torch.randn(3, 5, 6, 12), torch.tensor([0, 1, 3])
    stacked, residual = make_model().blocks[0], make_model(scene_moe="residual").blocks[0]
    h = stacked.dense(x)
    torch.testing.assert_close(stacked.ffn(x, scenario), stacked.scene(h, scenario))
    torch.testing.assert_close(residual.ffn(x, scenario), h + residual.scene(h, scenario))
    none = make_model(scene_moe="none", ffn_mult=3)
    assert all(b.scene is None for b in none.blocks) and none.blocks[0].dense.sub_hidden == 36 // 8
    torch.testing.assert_close(none.blocks[0].ffn(x, scenario), none.blocks[0].dense(x))
    assert not any("scene" in n for n, _ in none.named_parameters())
    ffn = make_model(moe="per_token_ffn", ffn_mult=3)
    assert all(isinstance(b.dense, PerTokenFFN) and b.dense.first.weight.shape[-1] == 36 for b in ffn.blocks)
    assert ffn.moe_layers() == [] and ffn.activation_ratio is None
    plain = make_model(scenario_heads=False)
    assert type(plain.heads) is TaskHeads and not any("lora" in n for n, _ in plain.named_parameters())
    pooled = torch.randn(2, 4, 12)
    torch.testing.assert_close(plain.heads(pooled), TaskHeads.forward(make_model().heads, pooled))


def test_input_fields_are_rankmixers():
    kw = {k: SMALL[k] for k in ("user_vocab", "item_vocab", "user_dense", "item_dense")}
    assert make_config().input_fields() == RankMixerConfig(**kw).input_fields()
    no_pos = make_config(use_position=False, grouping="manual")
    assert "position" not in no_pos.input_fields() and no_pos.groups()["context"] == ["tab", "hour"]


def test_candidates_and_requests_are_scored_independently():
    model = make_model().eval()
    batch = make_batch()
    base = model(batch)
    changed = dataclasses.replace(batch, cand_sparse=batch.cand_sparse.clone(), cand_dense=batch.cand_dense.clone())
    changed.cand_sparse[1, 4] = torch.tensor([3, 2, 1])  # a padded slot of request 1
    changed.cand_dense[1, 4] = 9.0
    out = model(changed)
    for key in ("logits", "watch"):  # exactly: padded candidates skip the scenario experts, so never regroup them
        torch.testing.assert_close(out[key][:, :4], base[key][:, :4], rtol=0, atol=0)
        torch.testing.assert_close(out[key][[0, 2, 3]], base[key][[0, 2, 3]], rtol=0, atol=0)
    assert (out["logits"][1, 4] - base["logits"][1, 4]).abs().max() > 1e-3
    alone = model(batch.select(torch.tensor([2])))["logits"]
    torch.testing.assert_close(alone[0], base["logits"][2], rtol=1e-5, atol=1e-5)


def test_changing_one_requests_tab_changes_only_that_request():
    model = make_model().eval()
    batch = make_batch()
    base = model(batch)["logits"]
    for tab in ([1, 0, 0, 14], [1, 2, 3, 14]):  # request 1 moves to scenario 0; request 2 to scenario 3
        out = model(with_tab(batch, tab))["logits"]
        diff = (out - base).abs().amax((1, 2))
        moved = [i for i in range(B) if tab[i] != batch.tab[i]]
        assert all(diff[i] > 1e-3 for i in moved)
        assert all(diff[i] < 1e-5 for i in range(B) if i not in moved)  # float rounding of the regrouped experts


def test_a_large_bonus_routes_every_request_to_its_scenario_expert():
    model = make_model(scene_bonus=1e4).eval()
    batch = make_batch()
    seen = []
    for block in model.blocks:
        block.scene.register_forward_pre_hook(lambda mod, args: seen.append(mod.route(args[0], args[1])[0]))
    model(batch)
    scenario = model.scenario(batch)
    assert scenario.tolist() == [1, 2, 0, 3]  # tab 14 (out of range) shares the last scenario
    assert len(seen) == 2
    for idx in seen:  # [B, M, 1 + auto]
        assert (idx == scenario.view(B, 1, 1)).any(-1).all()
    # the same request in every scenario: the scene MoE (not only the tab embedding) makes the outputs differ
    x = torch.randn(1, 1, 6, 12).expand(4, 1, 6, 12)
    out = model.blocks[0].scene(x, torch.arange(4))
    assert all(not torch.allclose(out[0], out[s]) for s in range(1, 4))


def test_mlora_heads_are_the_plain_heads_on_the_main_tab_only():
    model = make_model().eval()
    batch = make_batch()
    heads = model.heads
    pooled = torch.randn(B, M, 12)
    scenario = model.scenario(batch)
    plain = TaskHeads.forward(heads, pooled)
    torch.testing.assert_close(heads(pooled, scenario), plain, rtol=0, atol=0)  # adapters start at 0 (B = 0)
    with torch.no_grad():
        heads.hidden_lora.b.normal_()
        heads.out_lora.b.normal_()
    out = heads(pooled, scenario)
    assert torch.equal(out[0], plain[0])  # request 0 is on the main tab: exactly the plain heads
    assert all((out[i] - plain[i]).abs().max() > 1e-3 for i in (1, 2, 3))
    # through the whole model: only the main-tab request keeps its output
    base = make_model().eval()(batch)["logits"]
    with torch.no_grad():
        model.heads.hidden_lora.b.normal_()
    adapted = model(batch)["logits"]
    assert torch.equal(adapted[0], base[0]) and all(not torch.allclose(adapted[i], base[i]) for i in (1, 2, 3))


@pytest.mark.parametrize("variant", ["default", "relu_sparse", "manual", "pre"])
def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch(variant):
    model = make_model(**VARIANTS[variant])
    batch = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradients_reach_the_shared_parts():
    model = make_model()
    model.training_loss(make_batch()).backward()
    for name in ("tokenizer.selection", "tokenizer.proj.weight", "blocks.0.mixer.weight", "blocks.1.mixer.weight",
                 "blocks.0.dense.router.weight", "blocks.0.dense.experts.first.weight",
                 "blocks.0.scene.shared_router.weight", "blocks.0.scene.scene_router.weight",
                 "blocks.0.scene.first.weight", "blocks.1.scene.shared.second.weight", "heads.hidden.weight",
                 "heads.hidden_lora.b", "inputs.tab_emb.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_relu_sparse_adds_the_router_penalty_in_training_only():
    batch = make_batch()
    model = make_model(moe="relu_sparse", l1_coef=0.01, target_activation=None)
    loss = model.training_loss(batch)
    assert float(model.router_penalty().detach()) > 0
    torch.testing.assert_close(loss, model.loss(model(batch), batch) + model.router_penalty())
    assert 0.0 <= model.activation_ratio <= 1.0
    model.eval()
    torch.testing.assert_close(model.training_loss(batch), model.loss(model(batch), batch))
    dense = make_model()
    torch.testing.assert_close(dense.training_loss(batch), dense.loss(dense(batch), batch))


def test_deterministic_for_a_seed():
    batch = make_batch()
    runs = []
    for _ in range(2):
        model = make_model(seed=5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            loss = model.training_loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    a, c = make_model(seed=3).state_dict(), make_model(seed=4).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(a["tokenizer.selection"], c["tokenizer.selection"])  # W's init follows group_seed
    assert not torch.equal(a["tokenizer.selection"], make_model(seed=3, group_seed=1).state_dict()[
        "tokenizer.selection"])


@pytest.mark.parametrize("bad,field", [
    ({"grouping": "learned"}, "grouping"),
    ({"mixing": "none"}, "mixing"),
    ({"mixing_init": "eye"}, "mixing_init"),
    ({"moe": "dense"}, "moe"),
    ({"norm": "rms"}, "norm"),
    ({"dim": 0}, "dim"),
    ({"num_layers": 0}, "num_layers"),
    ({"field_dim": 0}, "field_dim"),
    ({"ffn_mult": 0}, "ffn_mult"),
    ({"num_experts": 0}, "num_experts"),
    ({"expert_split": 0}, "expert_split"),
    ({"shared_experts": -1}, "shared_experts"),
    ({"scene_shared": -1}, "scene_shared"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"num_tokens": 0}, "num_tokens"),
    ({"num_tokens": 40}, "num_tokens"),  # more tokens than the 16 input fields
    ({"group_size": 17}, "group_size"),
    ({"field_hidden": 0}, "field_hidden"),
    ({"scene_hidden": 0}, "scene_hidden"),
    ({"group_temperature": 0.0}, "group_temperature"),
    ({"group_seed": 1.5}, "group_seed"),
    ({"scene_bonus": -1.0}, "scene_bonus"),
    ({"num_scenarios": 1}, "num_scenarios"),
    ({"num_scenarios": 16}, "num_scenarios"),
    ({"main_tab": 3}, "main_tab"),  # 4 scenarios: tabs >= 3 share the last one
    ({"scene_auto": 4}, "scene_auto"),
    ({"dim": 14}, "dim"),  # H = T = 6 does not divide 14
    ({"mix_heads": 5}, "mix_heads"),
    ({"mixing": "fixed", "mix_heads": 3}, "mix_heads"),
    ({"mixing": "fixed", "dim": 16, "mix_heads": None, "num_tokens": 5}, "dim"),
    ({"ffn_mult": 1, "dim": 6, "num_experts": 4, "mix_heads": 3}, "ffn_mult"),  # 6 < 4·2 + 2 sub-experts
    ({"moe": "relu_sparse", "num_experts": 13}, "num_experts"),
    ({"grouping": "manual", "num_tokens": 4}, "num_tokens"),
    ({"token_groups": {"a": ["user_sparse_0"]}}, "token_groups"),  # only with grouping='manual'
    ({"grouping": "manual", "token_groups": {"a": ["user_sparse_0", "video_id"]}},
     "token_groups.*unknown field 'video_id'"),
    ({"grouping": "manual", "user_vocab": [10], "user_dense": 0}, "token_groups.*'user_profile'"),
    ({"target_activation": 0.0}, "target_activation"),
    ({"l1_coef": -1.0}, "l1_coef"),
    ({"l1_adapt_rate": -0.1}, "l1_adapt_rate"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"scene_moe": "parallel"}, "scene_moe"),
    ({"scenario_heads": 1}, "scenario_heads"),
    ({"field_init": "eye"}, "field_init"),
    ({"field_init": "identity", "field_hidden": 8}, "field_init"),
])
def test_bad_configs_are_named(bad, field):
    with pytest.raises(ConfigError, match=f"MTmixAttConfig.{field}"):
        make_config(**bad)


def test_a_full_scenario_set_lets_the_main_tab_be_the_last():
    assert make_config(num_scenarios=15, main_tab=14).main_tab == 14
    model = make_model(num_scenarios=15, main_tab=14).eval()
    assert model(make_batch())["logits"].shape == (B, M, T)


def test_default_flops_match_rankmixers_defaults():
    """Default sizes on the KuaiRand spec: forward + backward FLOPs per sample within ±20% of RankMixer's, same
    embedding tables (the benchmark compares at matched FLOPs)."""
    from funnelrec.sim.catalog import real_table

    spec = FeatureSpec.kuairand().fit(real_table("users"), real_table("videos"))
    b = RequestBatch.empty(batch_size=8, history=100, candidates=1, user_fields=spec.num_user_sparse,
                           user_dense=spec.num_user_dense, item_fields=spec.num_item_sparse,
                           item_dense=spec.num_item_dense)
    b.hist_len[:] = 100
    b.hist_items = torch.randint(1, spec.num_items, (8, 100), generator=torch.Generator().manual_seed(0))
    b.tab = torch.arange(8)
    sizes = dict(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                 user_dense=spec.num_user_dense, item_dense=spec.num_item_dense, num_tasks=6)
    torch.manual_seed(0)
    ref = count_params_flops(RankMixer(RankMixerConfig(**sizes)), b)
    for switch in ({}, {"grouping": "manual"}, {"moe": "relu_sparse"}, {"scene_moe": "none", "ffn_mult": 3}):
        torch.manual_seed(0)
        ours = count_params_flops(MTmixAtt(MTmixAttConfig(**sizes, **switch)), b)
        assert ours["params_embedding"] == ref["params_embedding"]
        assert abs(ours["flops_per_sample"] / ref["flops_per_sample"] - 1) <= 0.2, (switch, ours, ref)


def test_docstring_examples_run():
    result = doctest.testmod(mtmixatt_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
