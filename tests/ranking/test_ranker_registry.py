"""The ranker registry (``build_ranker`` / ``ranker_config``) and the matched budgets of the default configs."""

from __future__ import annotations

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.data.features import FeatureSpec
from funnelrec.errors import ConfigError
from funnelrec.ranking import (RANKERS, MultiTaskRanker, RankerConfig, build_ranker, count_params,
                               count_params_flops, ranker_config)
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from funnelrec.sim.catalog import real_table
from ranking_testkit import BASELINE_NAMES, RANKER_NAMES


@pytest.fixture(scope="module")
def spec():
    """The default KuaiRand spec fitted on the vendored KuaiRand-Pure tables (27 + 4 user, 7 + 2 item features)."""
    return FeatureSpec.kuairand().fit(real_table("users"), real_table("videos"))


@pytest.fixture(scope="module")
def batch(spec):
    """A pointwise batch (M = 1) with a full history of 100 events."""
    b = RequestBatch.empty(batch_size=8, history=100, candidates=1, user_fields=spec.num_user_sparse,
                           user_dense=spec.num_user_dense, item_fields=spec.num_item_sparse,
                           item_dense=spec.num_item_dense)
    b.hist_len[:] = 100
    b.hist_items = torch.randint(1, spec.num_items, (8, 100), generator=torch.Generator().manual_seed(0))
    return b


def test_registry_names_and_classes():
    assert set(RANKERS) == set(RANKER_NAMES)
    for config_cls, model_cls in RANKERS.values():
        assert issubclass(config_cls, RankerConfig) and issubclass(model_cls, MultiTaskRanker)
        assert config_cls.__name__ == model_cls.__name__ + "Config"  # one model and one config per file


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_build_ranker_fills_sizes_from_the_spec(name, spec, batch):
    cfg = ranker_config(name, spec)
    assert cfg.user_vocab == spec.vocab_sizes("user_sparse") and cfg.item_vocab == spec.vocab_sizes("item_sparse")
    assert (cfg.user_dense, cfg.item_dense, cfg.num_tasks, cfg.embed_dim) == (4, 2, 6, 16)
    sequence_models = ("longer", "transformer", "hyformer", "longer_rankmixer")
    want = 8192 if name == "solar" else 256 if name in sequence_models else 100  # sequence models read more
    assert cfg.history_pool == want
    model = build_ranker(name, spec, embed_dim=8, head=4)
    assert isinstance(model, RANKERS[name][1]) and model.config.embed_dim == 8 and model.config.head == 4
    assert model(batch)["logits"].shape == (8, 1, 6)
    g = torch.Generator().manual_seed(0)
    dur = torch.rand(100, generator=g) * 50
    d2q = WatchTimeDebiaser.fit(dur, dur * 0.3, buckets=4, quantiles=8)
    assert build_ranker(name, spec, watch=d2q).watch_head == "d2q"
    assert build_ranker(name, spec, watch=d2q, watch_head="log1p").watch is None


def test_registry_errors_name_the_problem(spec):
    valid = ("dcnv2, din, hyformer, longer, longer_rankmixer, mmoe, mtmixatt, onerank, ple, rankmixer, "
             "shared_bottom, solar, transformer")
    with pytest.raises(ConfigError, match=rf"unknown ranker 'xgboost'; valid rankers: {valid}"):
        build_ranker("xgboost", spec)
    with pytest.raises(ConfigError, match=r"unknown option 'num_expert' for ranker 'mmoe'.*num_experts"):
        build_ranker("mmoe", spec, num_expert=3)
    with pytest.raises(ConfigError, match="'bottom' for ranker 'ple'"):
        ranker_config("ple", spec, bottom=[8])
    with pytest.raises(ConfigError, match="fitted FeatureSpec"):
        ranker_config("din", FeatureSpec.kuairand())
    with pytest.raises(ConfigError, match="num_levels"):
        build_ranker("ple", spec, num_levels=0)


def test_default_configs_match_budgets(spec, batch):
    """Same embedding tables; dense parameters and forward+backward FLOPs per sample within ±20% of
    Shared-Bottom's (DESIGN §7)."""
    costs = {}
    for name in (*BASELINE_NAMES, "rankmixer"):
        torch.manual_seed(0)
        costs[name] = count_params_flops(build_ranker(name, spec), batch)
    ref = costs["shared_bottom"]
    for name, c in costs.items():
        assert c["params_embedding"] == ref["params_embedding"], name
        assert abs(c["params_dense"] / ref["params_dense"] - 1) <= 0.2, (name, c, ref)
        assert abs(c["flops_per_sample"] / ref["flops_per_sample"] - 1) <= 0.2, (name, c, ref)
    dense = [c["params_dense"] for c in costs.values()]
    assert max(dense) / min(dense) <= 1.2


def test_hyformer_matches_the_two_stage_pipeline_budget(spec):
    """HyFormer is compared with LONGER + RankMixer at equal FLOPs (the paper's claim): defaults within +-25 %."""
    from funnelrec.data.batch import RequestBatch

    b = RequestBatch.empty(batch_size=4, history=128, candidates=2, user_fields=len(spec.user_sparse),
                           user_dense=spec.num_user_dense, item_fields=len(spec.item_sparse),
                           item_dense=spec.num_item_dense)
    b.hist_len[:] = 128
    b.hist_items[:] = 1
    b.hist_actions[..., :3] = 1.0  # every event a click, long view and like: full behaviour sequences
    costs = {n: count_params_flops(build_ranker(n, spec, history_pool=128), b)["flops_per_sample"]
             for n in ("hyformer", "longer_rankmixer")}
    assert 0.8 <= costs["hyformer"] / costs["longer_rankmixer"] <= 1.25, costs


def test_count_params_flops_counts_what_it_says():
    lin = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    assert count_params(lin) == {"params_total": 40 + 15, "params_embedding": 40, "params_dense": 15}
    from ranking_testkit import make_batch, make_model

    model = make_model("shared_bottom")
    b = make_batch()
    cost = count_params_flops(model, b)
    assert cost["samples"] == int(b.cand_mask.sum())
    assert cost["flops_forward"] < cost["flops_total"] <= 3.5 * cost["flops_forward"]
    assert all(p.grad is None for p in model.parameters())  # gradients cleared
    # the bottom MLP's first layer alone: 2 * B * M * F_in * width forward FLOPs
    first = model.bottom[0].net[0]
    assert cost["flops_forward"] >= 2 * b.cand_mask.numel() * first.in_features * first.out_features
