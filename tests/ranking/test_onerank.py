"""OneRank: the ranker contract for every switch, mutual invisibility of the task tokens at injection, the
read-only cross-task memory, the exact gradient isolation of the detach switches, the situational descriptor's
padding rules, training on a fixed batch, config errors, the doctest and the FLOPs matched to MMoE / PLE."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import funnelrec.ranking.onerank as onerank_module
from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.ranking import WatchTimeDebiaser
from funnelrec.ranking.base import TaskHeads
from funnelrec.ranking.onerank import MatchingHeads, OneRank, OneRankConfig, SituationalDescriptor
from ranking_testkit import ITEM_VOCAB, USER_VOCAB, B, M, N, T, make_batch

SMALL = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=6,
             dim=8, heads=2, ffn_mult=1)
VARIANTS = {
    "default": {},
    "no_situational": {"situational": False},
    "no_mask": {"task_mask": False},
    "no_detach": {"detach_cross": False, "detach_shared": False},
    "no_detach_cross": {"detach_cross": False},
    "mlp": {"scoring": "mlp"},
    "dot": {"match_normalize": False, "temperature": 4.0},
    "deep": {"inject_layers": 2, "cross_layers": 2},
    "no_cross": {"cross_layers": 0},
}
K = T + 1  # the task channels: T tasks + the watch head


def make_config(**kw) -> OneRankConfig:
    return OneRankConfig(**{**SMALL, **kw})


def make_model(seed: int = 0, watch=None, **kw) -> OneRank:
    torch.manual_seed(seed)
    return OneRank(make_config(**kw), watch=watch)


def task_loss(model: OneRank, batch: RequestBatch, k: int) -> torch.Tensor:
    """L_k: the BCE of task k over the real candidates (k = T: the watch channel's loss)."""
    out = model(batch)
    m = batch.cand_mask
    if k == T:
        return (out["watch"][m] - torch.log1p(batch.watch_time_s[m])).pow(2).mean()
    return torch.nn.functional.binary_cross_entropy_with_logits(out["logits"][..., k][m], batch.labels[..., k][m])


def private_grads(model: OneRank, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂loss/∂(every task-private parameter), [K, ...] each (zeros where no gradient arrives)."""
    params = model.task_private_parameters()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


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
        states = model.encode(batch)
        d = model.config.dim
        assert states["shared"].shape == (B, M, model.num_shared_tokens, d)
        assert states["injected"].shape == states["tasks"].shape == (B, M, K, d)
    one = RequestBatch.empty(batch_size=1, history=N, candidates=1, user_fields=2, user_dense=2, item_fields=3,
                             item_dense=3)
    assert model(one)["logits"].shape == (1, 1, T)
    empty = RequestBatch.empty(batch_size=2, history=0, candidates=3, user_fields=2, user_dense=2, item_fields=3,
                               item_dense=3)
    assert torch.isfinite(model(empty)["logits"]).all()


def test_switches_build_the_right_layers():
    default = make_model()
    assert default.num_shared_tokens == 7 and default.num_channels == K and default.task_tokens.shape == (K, 8)
    assert isinstance(default.situational, SituationalDescriptor) and isinstance(default.heads, MatchingHeads)
    assert len(default.inject) == 1 and len(default.cross) == 1
    assert default.inject[0].task_mask and default.inject[0].detach_shared and default.cross[0].detach
    assert make_model(situational=False).num_shared_tokens == 6
    assert isinstance(make_model(scoring="mlp").heads, TaskHeads)
    no = make_model(task_mask=False, detach_cross=False, detach_shared=False)
    assert not no.inject[0].task_mask and not no.inject[0].detach_shared and not no.cross[0].detach
    assert no.inject[0].task_mask_.all()
    assert torch.equal(default.inject[0].task_mask_[:, 7:], torch.eye(K, dtype=torch.bool))


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_candidates_and_other_requests_do_not_matter(variant):
    model = make_model(**VARIANTS[variant]).eval()
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
    alone = model(batch.select(torch.tensor([2])))["logits"]
    torch.testing.assert_close(alone[0], base["logits"][2], rtol=1e-5, atol=1e-6)
    pad = ~batch.history_mask()
    noisy = dataclasses.replace(batch, hist_items=torch.where(pad, 17, batch.hist_items))
    torch.testing.assert_close(model(noisy)["logits"], base["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("situational", [True, False])
def test_the_situational_descriptor_reads_the_other_real_candidates(situational):
    """Candidate-aware: a real competitor changes a candidate's score (and only with the descriptor on)."""
    model = make_model(situational=situational).eval()
    batch = make_batch()
    base = model(batch)["logits"]
    changed = dataclasses.replace(batch, cand_dense=batch.cand_dense.clone())
    changed.cand_dense[0, 0] += 3.0  # a real candidate of request 0
    out = model(changed)["logits"]
    assert not torch.allclose(out[0, 0], base[0, 0])
    assert torch.allclose(out[0, 1:], base[0, 1:]) != situational
    torch.testing.assert_close(out[1:], base[1:], rtol=0, atol=0)  # other requests never


def test_situational_statistics_are_masked():
    desc = SituationalDescriptor(in_dim=2, dim=4)
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [float("nan"), 1e9]]])
    mask = torch.tensor([[True, True, False]])
    mean, std = desc.stats(x, mask)
    torch.testing.assert_close(mean, torch.tensor([[[2.0, 4.0]]]))
    torch.testing.assert_close(std, torch.sqrt(torch.tensor([[[1.0, 4.0]]]) + desc.eps))
    assert torch.isfinite(desc(x, mask)[:, :2]).all()
    none = desc.stats(x, torch.zeros(1, 3, dtype=torch.bool))[0]
    assert torch.equal(none, torch.zeros(1, 1, 2))  # no real candidate: μ = 0, no NaN


def perturbed(model: OneRank, j: int) -> OneRank:
    other = make_model(**{f: getattr(model.config, f) for f in ("task_mask", "detach_cross", "detach_shared")})
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.task_tokens[j] += torch.randn(model.config.dim, generator=torch.Generator().manual_seed(j))
    return other.eval()


@pytest.mark.parametrize("j", [0, 3, T])
def test_perturbing_one_task_token_is_invisible_to_the_others_until_the_cross_task_layer(j):
    model = make_model().eval()
    batch = make_batch()
    base, after = model.encode(batch), perturbed(model, j).encode(batch)
    others = [k for k in range(K) if k != j]
    # injection stage: τ_k (k ≠ j) bit-identical, τ_j changed, the shared tokens untouched
    torch.testing.assert_close(after["injected"][..., others, :], base["injected"][..., others, :], rtol=0, atol=0)
    assert not torch.allclose(after["injected"][..., j, :], base["injected"][..., j, :])
    torch.testing.assert_close(after["shared"], base["shared"], rtol=0, atol=0)
    # the cross-task layer: every τ_k now reads τ_j
    for k in others:
        assert not torch.allclose(after["tasks"][..., k, :], base["tasks"][..., k, :]), k


def test_without_the_mask_task_tokens_see_each_other_at_injection():
    model = make_model(task_mask=False).eval()
    batch = make_batch()
    base, after = model.encode(batch), perturbed(model, 0).encode(batch)
    for k in range(1, K):
        assert not torch.allclose(after["injected"][..., k, :], base["injected"][..., k, :]), k
    assert not torch.allclose(after["shared"], base["shared"])  # full attention: shared tokens read tasks too


@pytest.mark.parametrize("k", [0, 2, T])
def test_cross_task_detachment_makes_the_other_channels_gradient_exactly_zero(k):
    """∂L_k/∂θ_j = 0 exactly for every parameter producing τ_j (j ≠ k) with detachment on; non-zero with it off."""
    batch = make_batch()
    others = [j for j in range(K) if j != k]
    for detach_shared in (True, False):
        grads = private_grads(m := make_model(detach_shared=detach_shared), task_loss(m, batch, k))
        assert "task_tokens" in grads and any(n.startswith("cross.") for n in grads)
        assert any(n.startswith("inject.") for n in grads) and "heads.out.weight" in grads
        for name, g in grads.items():
            assert g[others].abs().sum() == 0, name
        assert grads["task_tokens"][k].abs().sum() > 0 and grads["inject.0.t_qkv.weight"][k].abs().sum() > 0
    grads = private_grads(m := make_model(detach_cross=False, detach_shared=False), task_loss(m, batch, k))
    for j in others:
        assert grads["task_tokens"][j].abs().sum() > 0, j
        assert grads["inject.0.t_qkv.weight"][j].abs().sum() > 0 and grads["cross.0.qkv.weight"][j].abs().sum() > 0
    assert grads["heads.out.weight"][others].abs().sum() == 0  # task j's own head never sees L_k
    # the mask matters too: without it the injection stage carries L_k into τ_j even with the detach on
    grads = private_grads(m := make_model(task_mask=False), task_loss(m, batch, k))
    assert all(grads["task_tokens"][j].abs().sum() > 0 for j in others)


def test_shared_detachment_keeps_task_gradients_out_of_the_shared_extractor():
    """With ``detach_shared`` the task-token states carry no gradient into the shared extractor (inputs,
    tokenizer, situational descriptor, shared-token layers); without it they do. Either way the loss still trains
    the shared extractor (through the scoring's shared path)."""
    batch = make_batch()
    for detach in (True, False):
        model = make_model(detach_shared=detach)
        shared = {n: p for n, p in model.named_parameters()
                  if n.startswith(("inputs.", "tokenizer.", "situational.")) or ".s_" in n}
        grads = torch.autograd.grad(model.encode(batch)["tasks"].square().sum(), list(shared.values()),
                                    allow_unused=True)
        total = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert (total == 0) == detach, total
        model.zero_grad()
        model.training_loss(batch).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = make_model(**VARIANTS[variant])
    batch = make_batch()
    model.training_loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["default", "mlp"])
def test_the_watch_channel_learns_from_the_watch_loss_alone(variant):
    from funnelrec.ranking import multitask_loss

    model = make_model(**VARIANTS[variant])
    batch = make_batch()
    out = model(batch)
    (model.loss(out, batch) - multitask_loss(out, batch, watch_weight=0.0)).backward()
    assert model.heads.out.weight.grad[-1].abs().sum() > 0
    assert model.heads.out.weight.grad[:-1].abs().sum() == 0


@pytest.mark.parametrize("variant", ["default", "no_detach", "mlp", "no_mask"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(variant):
    model = make_model(**VARIANTS[variant])
    batch = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(model.training_loss(batch))
    for _ in range(30):
        loss = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model.training_loss(batch))
    assert after < 0.8 * before, (before, after)


def test_matching_temperature_scales_the_scores():
    heads = MatchingHeads(dim=4, hidden=8, num_heads=3, temperature=1.0)
    h, c = torch.randn(5, 3, 4), torch.randn(5, 4)
    base = heads(h, c)
    heads.temperature = 0.5
    torch.testing.assert_close(heads(h, c), 2 * base)
    assert (base.abs() <= 1 + 1e-6).all()  # cosine / 1 with a zero bias


def test_construction_is_deterministic_for_a_seed():
    a, b, c = make_model(seed=3), make_model(seed=3), make_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("bad,field", [
    ({"dim": 0}, "OneRankConfig.dim"), ({"heads": 3}, "OneRankConfig.heads"),
    ({"inject_layers": 0}, "OneRankConfig.inject_layers"), ({"cross_layers": -1}, "OneRankConfig.cross_layers"),
    ({"ffn_mult": 0}, "OneRankConfig.ffn_mult"), ({"situational": 1}, "OneRankConfig.situational"),
    ({"task_mask": "yes"}, "OneRankConfig.task_mask"), ({"detach_cross": None}, "OneRankConfig.detach_cross"),
    ({"detach_shared": 0}, "OneRankConfig.detach_shared"), ({"scoring": "dot"}, "OneRankConfig.scoring"),
    ({"temperature": 0.0}, "OneRankConfig.temperature"), ({"temperature": float("inf")}, "OneRankConfig.temperature"),
    ({"match_normalize": "no"}, "OneRankConfig.match_normalize"),
    ({"token_groups": {"a": ["user_sparse_0"]}}, "OneRankConfig.token_groups"),
    ({"embed_dim": 0}, "OneRankConfig.embed_dim"),
])
def test_bad_configs_are_named(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_config(**bad)


def test_default_budget_matches_mmoe_and_ple():
    """Default sizes on the KuaiRand spec: forward+backward FLOPs per sample and dense parameters within ±20% of
    MMoE's and PLE's (DESIGN §7), same embedding tables."""
    from funnelrec.data.features import FeatureSpec
    from funnelrec.ranking import build_ranker, count_params_flops, ranker_config
    from funnelrec.sim.catalog import real_table

    spec = FeatureSpec.kuairand().fit(real_table("users"), real_table("videos"))
    b = RequestBatch.empty(batch_size=8, history=100, candidates=1, user_fields=spec.num_user_sparse,
                           user_dense=spec.num_user_dense, item_fields=spec.num_item_sparse,
                           item_dense=spec.num_item_dense)
    b.hist_len[:] = 100
    b.hist_items = torch.randint(1, spec.num_items, (8, 100), generator=torch.Generator().manual_seed(0))
    filled = {f: getattr(ranker_config("mmoe", spec), f)
              for f in ("user_vocab", "item_vocab", "user_dense", "item_dense", "num_tasks")}
    torch.manual_seed(0)
    ours = count_params_flops(OneRank(OneRankConfig(**filled)), b)
    for name in ("mmoe", "ple"):
        torch.manual_seed(0)
        ref = count_params_flops(build_ranker(name, spec), b)
        assert ours["params_embedding"] == ref["params_embedding"]
        assert abs(ours["params_dense"] / ref["params_dense"] - 1) <= 0.2, (name, ours, ref)
        assert abs(ours["flops_per_sample"] / ref["flops_per_sample"] - 1) <= 0.2, (name, ours, ref)


def test_docstring_examples_run():
    result = doctest.testmod(onerank_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
