"""PreRanker: shapes, the fused score, config validation, training (logged labels and distillation) on
learnable synthetic tasks, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from funnelrec.errors import ConfigError
from funnelrec.serving.prerank import PreRanker, PreRankerConfig, distill_preranker, fit_preranker


def test_shapes_and_score():
    torch.manual_seed(0)
    model = PreRanker(PreRankerConfig(dim=8, hidden=16, tasks=("is_click", "long_view", "is_like")))
    u, v, pop = torch.randn(3, 8), torch.randn(3, 5, 8), torch.rand(3, 5)
    logits = model.logits(u, v, pop)
    assert logits.shape == (3, 5, 3)
    score = model.score(u, v, pop)
    assert score.shape == (3, 5) and (score <= 0).all()
    torch.testing.assert_close(score, F.logsigmoid(logits).sum(-1))
    # candidates are scored independently: a candidate's score does not depend on the others of its row
    torch.testing.assert_close(model.score(u, v[:, 2:3], pop[:, 2:3])[:, 0], score[:, 2])


@pytest.mark.parametrize("kwargs, field", [({"dim": 0}, "dim"), ({"dim": 4, "hidden": -1}, "hidden"),
                                           ({"dim": 4, "tasks": ()}, "tasks")])
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PreRankerConfig(**kwargs)


def _synthetic(r: int, d: int, seed: int):
    """Labels a pre-ranker can learn: click = [u·v > 0], long view = [log-popularity > 1]."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(r, d, generator=g), torch.randn(r, d, generator=g)
    pop = torch.rand(r, generator=g) * 2
    labels = torch.stack([((u * v).sum(-1) > 0).float(), (pop > 1).float()], -1)
    return u, v, pop, labels


def _loss(model, u, v, pop, labels):
    with torch.no_grad():
        logits = model.logits(u, v.unsqueeze(1), pop.unsqueeze(1)).squeeze(1)
        return F.binary_cross_entropy_with_logits(logits, labels).item()


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    u, v, pop, labels = _synthetic(4000, 8, seed=1)
    model = PreRanker(PreRankerConfig(dim=8, hidden=32))
    before = _loss(model, u, v, pop, labels)
    out = fit_preranker(model, u, v, pop, labels, epochs=6, batch_size=256, lr=1e-2, seed=0)
    assert set(out) == {"loss", "seconds"} and out["seconds"] >= 0
    after = _loss(model, u, v, pop, labels)
    assert after < 0.5 * before, (before, after)
    # generalises to fresh data of the same task, and ranks positives first
    u2, v2, pop2, y2 = _synthetic(2000, 8, seed=2)
    assert _loss(model, u2, v2, pop2, y2) < 0.6 * before
    with torch.no_grad():
        click = model.logits(u2, v2.unsqueeze(1), pop2.unsqueeze(1))[:, 0, 0]
    assert ((click > 0).float() == y2[:, 0]).float().mean() > 0.85


def test_training_is_seeded():
    u, v, pop, labels = _synthetic(500, 4, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = PreRanker(PreRankerConfig(dim=4, hidden=8))
        fit_preranker(model, u, v, pop, labels, epochs=2, batch_size=64, seed=5)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("which", ["item", "pop", "labels", "empty"])
def test_mismatched_rows_raise(which):
    u, v, pop, labels = _synthetic(10, 4, seed=0)
    if which == "item":
        v = v[:9]
    elif which == "pop":
        pop = pop[:8]
    elif which == "labels":
        labels = labels[:3]
    else:
        u, v, pop, labels = u[:0], v[:0], pop[:0], labels[:0]
    model = PreRanker(PreRankerConfig(dim=4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="pre-ranker training rows"):
        fit_preranker(model, u, v, pop, labels)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _distill_case(r: int, c: int, d: int, items: int, seed: int):
    """Requests whose teacher prefers items with a large first vector coordinate (learnable from u ⊙ v)."""
    g = torch.Generator().manual_seed(seed)
    item_vectors = torch.randn(items, d, generator=g)
    item_vectors[0] = 0
    log_pop = torch.rand(items, generator=g)
    user_vec = torch.randn(r, d, generator=g).abs() + 0.5
    cand = torch.randint(1, items, (r, c), generator=g)
    mask = torch.rand(r, c, generator=g) < 0.9
    teacher = item_vectors[cand][..., 0] * user_vec[:, :1]
    return user_vec, cand * mask, mask, teacher, item_vectors, log_pop


def test_distillation_learns_the_teachers_top_k():
    torch.manual_seed(0)
    user_vec, cand, mask, teacher, vectors, log_pop = _distill_case(256, 40, 8, 500, seed=0)
    model = PreRanker(PreRankerConfig(dim=8, hidden=32))
    k = 5
    before = distill_preranker(model, user_vec, cand, mask, teacher, vectors, log_pop, k, epochs=0)
    out = distill_preranker(model, user_vec, cand, mask, teacher, vectors, log_pop, k, epochs=15, lr=1e-2)
    assert set(out) == {"loss", "seconds", "recall_at_k"}
    assert out["recall_at_k"] > max(0.6, before["recall_at_k"] + 0.3), (before, out)
    # the student never keeps a padding candidate ahead of real ones
    with torch.no_grad():
        s = model.score(user_vec, vectors[cand], log_pop[cand]).masked_fill(~mask, float("-inf"))
    kept = s.topk(k, dim=1).indices
    assert mask.gather(1, kept).all()


def test_distillation_rejects_bad_inputs():
    user_vec, cand, mask, teacher, vectors, log_pop = _distill_case(8, 6, 4, 30, seed=1)
    model = PreRanker(PreRankerConfig(dim=4))
    with pytest.raises(ConfigError, match="distillation rows"):
        distill_preranker(model, user_vec[:7], cand, mask, teacher, vectors, log_pop, 2)
    with pytest.raises(ConfigError, match="distillation rows"):
        distill_preranker(model, user_vec, cand, mask, teacher[:3], vectors, log_pop, 2)
    with pytest.raises(ConfigError, match="top_k"):
        distill_preranker(model, user_vec, cand, mask, teacher, vectors, log_pop, 0)
