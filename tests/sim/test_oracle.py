"""The oracle and the response model: exact marginals, ranking quality, list effects, input checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from funnelrec.data.schema import LABEL_COLUMNS, long_view_rule
from funnelrec.errors import DataError
from funnelrec.metrics import auc
from funnelrec.ranking.popularity import PopularityPositionModel
from funnelrec.sim import World
from funnelrec.sim.oracle import TASKS
from funnelrec.sim.responses import PageState

LIST_EFFECTS_OFF = ["lists.cascade_enabled=false", "lists.saturation_enabled=false",
                    "lists.similarity_enabled=false"]


@pytest.fixture(scope="module")
def world_and_sim():
    world = World.from_profile("small", ["num_users=300", "days=3"])
    return world, world.simulate(progress=False)


@pytest.fixture(scope="module")
def world(world_and_sim):
    return world_and_sim[0]


@pytest.fixture(scope="module")
def world_no_list_effects():
    return World.from_profile("small", ["num_users=20", "days=1", *LIST_EFFECTS_OFF])


def _page_state(world: World, users: list[int], seed: int = 0) -> PageState:
    g = torch.Generator().manual_seed(seed)
    user = torch.tensor(users)
    items, _ = world.logging_policy.select(user, g)
    b, w = user.shape[0], world.cfg.sessions.repeat_window
    none = torch.full((b, w), -1, dtype=torch.int64)
    return PageState(user=user, items=items, tab=torch.tensor([1, 2, 4, 0][:b]),
                     long_term=world.long_term_on_day(0)[user], short_term=world.draw_short_term(user, g),
                     recent_tags=none, recent_creators=none.clone())


# ---------------------------------------------------------------------------------------------- exact marginals


def test_marginals_are_exact_for_the_sequential_sampler(world):
    rm = world.responses
    assert world.cfg.lists.cascade_enabled
    state = _page_state(world, [3, 11, 42])
    probs = rm.page(state)
    marg = rm.marginals(probs)
    b, m = state.items.shape
    reps = 60_000  # 180k pages of 6 items
    many = dataclasses.replace(probs, **{f.name: getattr(probs, f.name).repeat_interleave(reps, dim=0)
                                         for f in dataclasses.fields(probs)})
    draw = rm.sample(many, torch.Generator().manual_seed(123))

    def rate(x: torch.Tensor) -> torch.Tensor:
        return x.float().view(b, reps, m).mean(1)

    long_view = draw["click"] & long_view_rule(draw["play_ms"], many.duration_ms)
    checks = {
        "exam": (draw["exam"], marg["exam"]),
        "is_click": (draw["click"], marg["tasks"][..., 0]),
        "long_view": (long_view, marg["tasks"][..., 1]),
        "is_like": (draw["like"], marg["tasks"][..., 2]),
        "is_follow": (draw["follow"], marg["tasks"][..., 3]),
        "is_hate": (draw["hate"], marg["hate"]),
    }
    for name, (sampled, p) in checks.items():
        se = (p * (1 - p) / reps).sqrt()
        err = (rate(sampled) - p).abs()
        assert (err <= 5 * se + 2e-4).all(), (name, err.max().item(), se.max().item())
    # the cascade is doing something: examination and clicks fall down the page
    assert (marg["exam"][:, -1] < 0.9).all()
    assert (marg["exam"][:, 1:] <= marg["exam"][:, :-1]).all()
    # mean play time per position (log-normal watch on a click, a uniform part of the first 3 s otherwise)
    play = draw["play_ms"].view(b, reps, m)
    se = play.std(1) / reps ** 0.5
    err = (play.mean(1) - marg["play_ms"]).abs()
    assert (err <= 5 * se).all(), (err / se).max().item()


def test_marginals_without_cascade_examine_everything(world_no_list_effects):
    w = world_no_list_effects
    probs = w.responses.page(_page_state(w, [0, 5]))
    marg = w.responses.marginals(probs)
    assert torch.equal(marg["exam"], torch.ones_like(marg["exam"]))
    torch.testing.assert_close(marg["tasks"][..., 0], probs.click)
    draw = w.responses.sample(probs, torch.Generator().manual_seed(0))
    assert draw["exam"].all()


# ------------------------------------------------------------------------------------------- ranking quality


def test_oracle_auc_is_high_and_beats_popularity_position(world_and_sim):
    _, sim = world_and_sim
    log = sim.log.with_columns(pl.Series("position", sim.oracle["position"]))
    last = log["date"].max()
    is_test = (log["date"] == last).to_numpy()
    train, test = log.filter(~pl.Series(is_test)), log.filter(pl.Series(is_test))
    oracle = sim.oracle.filter(pl.Series(is_test))
    pop = PopularityPositionModel().fit(train).predict(test)
    for task, col in (("is_click", "p_click"), ("long_view", "p_long_view")):
        y = test[task].to_numpy()
        a_oracle = auc(oracle[col].to_numpy(), y)
        a_pop = auc(pop[:, LABEL_COLUMNS.index(task)], y)
        assert a_oracle > 0.7, (task, a_oracle)
        assert a_oracle > a_pop + 0.05, (task, a_oracle, a_pop)
        assert a_pop > 0.5


# ---------------------------------------------------------------------------------------------------- queries


def test_page_probabilities_shape_and_range(world):
    items = torch.tensor([[1, 2, 3, 4], [40, 50, 60, 70], [7000, 7001, 7002, 7582]])
    p = world.oracle.page_probabilities(torch.tensor([0, 1, 2]), items)
    assert p.shape == (3, 4, len(TASKS))
    assert ((p >= 0) & (p <= 1)).all()
    assert (p[..., 1] <= p[..., 0]).all()  # long_view needs a click
    assert (p[..., 2:] <= p[..., :1]).all()  # so do like/follow/comment/forward
    w = world.oracle.expected_watch_time(torch.tensor([0, 1, 2]), items)
    assert w.shape == (3, 4) and (w > 0).all()


def test_item_scores_are_top_position_single_item_probabilities(world):
    user = torch.tensor([4, 9])
    items = torch.tensor([10, 200, 3000])
    scores = world.oracle.item_scores(user, items=items, task="long_view")
    assert scores.shape == (2, 3)
    for b in range(2):
        for j in range(3):
            single = world.oracle.page_probabilities(user[b:b + 1], items[j].view(1, 1))[0, 0, 1]
            assert scores[b, j].item() == pytest.approx(single.item(), rel=1e-5)
    # chunking does not change the answer
    torch.testing.assert_close(world.oracle.item_scores(user, items=items, task="long_view", max_rows=2), scores)


def test_topk_returns_the_highest_scoring_items(world):
    user = torch.tensor([0, 1, 2])
    scores = world.oracle.item_scores(user)
    assert scores.shape == (3, world.catalog.num_items)
    top = world.oracle.topk(user, k=10)
    assert top.shape == (3, 10)
    for b in range(3):
        chosen = scores[b, top[b]]
        rest = scores[b].clone()
        rest[top[b]] = -1.0
        assert chosen.min() >= rest.max()
        assert torch.equal(chosen, chosen.sort(descending=True).values)
    # a user's own taste matters: not everybody gets the same list
    assert len({tuple(t) for t in top.tolist()}) > 1
    # excluding the top items moves the list down
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[torch.arange(3).unsqueeze(1), top[:, :3]] = True
    top2 = world.oracle.topk(user, k=10, exclude=exclude)
    assert torch.equal(top2[:, :7], top[:, 3:])


def test_expected_list_value_is_positive_and_depends_on_order(world):
    user = torch.tensor([0, 1])
    state = _page_state(world, [0, 1], seed=3)
    lists = state.items
    value = world.oracle.expected_list_value(user, lists)
    assert value.shape == (2,) and (value > 0).all()
    reversed_value = world.oracle.expected_list_value(user, lists.flip(1))
    assert not torch.allclose(value, reversed_value)
    p = world.oracle.page_probabilities(user, lists)
    p_rev = world.oracle.page_probabilities(user, lists.flip(1)).flip(1)
    assert not torch.allclose(p, p_rev)
    # task weights add their expected counts; the top item of a list is read alone
    with_likes = world.oracle.expected_list_value(user, lists, weights={"is_like": 100.0, "is_hate": -1.0})
    expected = value + 100.0 * p[..., 2].sum(1)
    assert (with_likes < expected + 1e-4).all() and (with_likes > value).all()
    single = world.oracle.page_probabilities(user, lists[:, :1])
    torch.testing.assert_close(single[:, 0], p[:, 0])


def test_without_list_effects_per_item_probabilities_ignore_order(world_no_list_effects):
    w = world_no_list_effects
    user = torch.tensor([0, 1, 2])
    lists = _page_state(w, [0, 1, 2], seed=5).items
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    p = w.oracle.page_probabilities(user, lists)
    p_perm = w.oracle.page_probabilities(user, lists[:, perm])
    torch.testing.assert_close(p_perm, p[:, perm])
    torch.testing.assert_close(w.oracle.expected_list_value(user, lists[:, perm]),
                               w.oracle.expected_list_value(user, lists))
    # and each item reads exactly as it would alone
    alone = w.oracle.item_scores(user, items=lists[0])
    torch.testing.assert_close(p[0, :, 0], alone[0])


@pytest.mark.parametrize("effect", ["cascade", "saturation", "similarity"])
def test_each_list_effect_alone_lowers_a_repeated_item(effect):
    others = [f"lists.{e}_enabled=false" for e in ("cascade", "saturation", "similarity") if e != effect]
    w = World.from_profile("small", ["num_users=5", "days=1", *others])
    user = torch.tensor([0])
    item = int(w.oracle.topk(user, k=1)[0, 0])
    alone = w.oracle.page_probabilities(user, torch.tensor([[item]]))[0, 0, 0]
    twice = w.oracle.page_probabilities(user, torch.tensor([[item, item]]))[0, :, 0]
    assert twice[0] == pytest.approx(alone.item(), rel=1e-6)
    assert twice[1] < alone - 1e-3


# ------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("user, items", [
    ([0], [[7583]]),  # item out of range
    ([0], [[-1]]),
    ([300], [[1]]),  # user out of range
    ([-1], [[1]]),
    ([0, 1], [[1, 2]]),  # B mismatch
    ([0], [1, 2]),  # items not [B, M]
    ([[0]], [[1, 2]]),  # user not [B]
])
def test_bad_queries_are_data_errors(world, user, items):
    with pytest.raises(DataError):
        world.oracle.page_probabilities(torch.tensor(user), torch.tensor(items))
    with pytest.raises(DataError):
        world.oracle.expected_list_value(torch.tensor(user), torch.tensor(items))


def test_unknown_tasks_are_data_errors(world):
    user = torch.tensor([0])
    with pytest.raises(DataError, match="is_watch"):
        world.oracle.item_scores(user, task="is_watch")
    with pytest.raises(DataError, match="is_watch"):
        world.oracle.topk(user, k=3, task="is_watch")
    with pytest.raises(DataError, match="watch_time"):
        world.oracle.expected_list_value(user, torch.tensor([[1, 2]]), weights={"watch_time": 1.0})


@pytest.mark.parametrize("tab", [-1, 15])
def test_tab_out_of_range_is_a_data_error(world, tab):
    with pytest.raises(DataError):
        world.oracle.page_probabilities(torch.tensor([0]), torch.tensor([[1, 2]]), tab=tab)


def test_user_index_maps_real_ids_and_rejects_unknown_ones(world):
    ids = world.population.user_id
    assert torch.equal(world.oracle.user_index(ids[[5, 0, 7]]), torch.tensor([5, 0, 7]))
    assert torch.equal(world.oracle.user_index(ids), torch.arange(ids.shape[0]))
    absent = sorted(set(range(int(ids.max()) + 2)) - set(ids.tolist()))
    for bad in (absent[0], int(ids.max()) + 1, -3):
        with pytest.raises(DataError, match=f"user id {bad} "):
            world.oracle.user_index(torch.tensor([int(ids[0]), bad]))
    assert np.all(np.diff(ids.numpy()) > 0)  # ids are sorted, which user_index relies on
