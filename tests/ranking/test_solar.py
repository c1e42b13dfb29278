"""SOLAR ranker: the attention switch, exactness of ``svd_exact`` at full rank, truncation to ``history_pool``, no
[M, N] tensor in the SVD path, the serving cache, the spectrum helpers and bad configs."""

from __future__ import annotations

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.ranking.solar import energy_ranks
from funnelrec.utils.probes import ShapeProbe
from ranking_testkit import make_batch, make_model


def clone_with(model, **changes):
    """A model with the same weights and other attention settings."""
    other = make_model("solar", **{"history_pool": model.config.history_pool, **changes})
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("mode", ["full", "svd_exact", "svd_compact", "linear", "sim"])
def test_every_attention_mode_scores_the_batch(mode):
    model = make_model("solar", attention=mode).eval()
    out = model(make_batch())
    assert out["logits"].shape == (4, 5, 6) and torch.isfinite(out["logits"]).all()


def test_svd_exact_at_full_rank_equals_full_softmax_attention():
    base = make_model("solar", attention="full", rank=8).eval()  # rank = dim: every history has rank <= R
    exact = clone_with(base, attention="svd_exact", rank=8)
    batch = make_batch()
    with torch.no_grad():
        assert torch.allclose(exact(batch)["logits"], base(batch)["logits"], atol=1e-5)


def test_the_attention_reads_only_the_last_history_pool_events():
    batch = make_batch()
    old = batch.history_mask().clone()
    old[:, -3:] = False  # events older than the last 3 (requests 2 and 3 have some)
    changed = RequestBatch(**{**batch.__dict__})
    changed.hist_items = torch.where(old, (batch.hist_items + 7) % 29 + 1, batch.hist_items)
    with torch.no_grad():
        short = make_model("solar", attention="full", history_pool=3, short_pool=3).eval()
        assert torch.equal(short(batch)["logits"], short(changed)["logits"])
        longer = make_model("solar", attention="full", history_pool=6, short_pool=3).eval()
        a, b = longer(batch)["logits"], longer(changed)["logits"]
    assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2:], b[2:])  # the attention saw the older events


def probe_batch(m: int = 13, n: int = 37) -> RequestBatch:
    g = torch.Generator().manual_seed(0)
    b = RequestBatch.empty(batch_size=2, history=n, candidates=m, tasks=6, user_fields=2, user_dense=2,
                           item_fields=3, item_dense=3)
    b.hist_len = torch.tensor([n, n - 5])
    b.hist_items = torch.where(b.history_mask(), torch.randint(1, 30, (2, n), generator=g), 0)
    b.cand_items = torch.randint(1, 30, (2, m), generator=g)
    b.cand_sparse[..., 0] = b.cand_items
    return b


@pytest.mark.parametrize("mode", ["svd_compact", "svd_exact", "linear"])
def test_no_candidate_by_history_tensor_in_the_forward(mode):
    m, n = 13, 37
    # svd_exact streams the scores over chunks of 8 events: memory O(M · chunk), never [M, N]
    model = make_model("solar", attention=mode, history_pool=64, rank=4, chunk=8)
    batch = probe_batch(m, n)
    with ShapeProbe() as probe:
        model.training_loss(batch).backward()
    assert probe.shapes and any(n in s for s in probe.shapes)  # the history was read
    assert not [s for s in probe.shapes if m in s and n in s]


def test_the_probe_sees_candidate_by_history_scores():
    model = make_model("solar", attention="sim", history_pool=64)  # top-k selection scores every (m, n) pair
    with ShapeProbe() as probe:
        model(probe_batch())
    assert any(13 in s and 37 in s for s in probe.shapes)


@pytest.mark.parametrize("mode", ["svd_compact", "svd_exact", "full"])
def test_serving_cache_gives_the_forward_outputs(mode):
    model = make_model("solar", attention=mode).eval()
    batch = make_batch()
    cache = model.encode_user(batch)
    with torch.no_grad():
        ref = model(batch)
    out = model.score_with_cache(cache, batch)
    assert torch.allclose(out["logits"], ref["logits"], atol=1e-6) and torch.allclose(out["watch"], ref["watch"],
                                                                                     atol=1e-6)
    if mode == "svd_compact":
        assert cache.history is None  # only the Gram and the factors are kept


def test_training_path_uses_a_float32_gram_and_still_matches_inference():
    model = make_model("solar", attention="svd_compact")
    batch = make_batch()
    train_out = model(batch)["logits"]  # autograd on: float32 Gram
    with torch.no_grad():
        infer = model(batch)["logits"]  # float64 Gram
    assert torch.allclose(train_out, infer, atol=1e-4)


def test_history_spectrum_equals_the_singular_values_of_the_event_tokens():
    model = make_model("solar").eval()
    batch = make_batch()
    s, events = model.history_spectrum(batch)
    assert events.tolist() == [0, 3, 6, 6]  # request 3 has 8 events, history_pool = 6
    x, valid = model.history_tokens(batch)
    for i in range(4):
        want = torch.linalg.svdvals(x[i][valid[i]].double()) if events[i] else torch.zeros(0, dtype=torch.float64)
        got = s[i, : len(want)]
        assert torch.allclose(got, want, atol=1e-6)
        assert (s[i, len(want):].abs() < 1e-6).all()


def test_centered_spectrum_removes_the_mean_event():
    model = make_model("solar").eval()
    batch = make_batch()
    s, events = model.history_spectrum(batch, centered=True)
    x, valid = model.history_tokens(batch)
    for i in range(1, 4):
        xi = x[i][valid[i]].double()
        want = torch.linalg.svdvals(xi - xi.mean(0))
        assert torch.allclose(s[i, : len(want)], want, atol=1e-6)
    assert (s[0].abs() < 1e-6).all()  # an empty history has no spectrum


def test_energy_ranks():
    s = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [10.0, 2.0, 1.5, 0.1]])
    r = energy_ranks(s, (0.9, 0.95, 0.99)).tolist()
    assert r[0] == [1, 2, 2]  # 9 / 10 of the energy in the first value
    assert r[1] == [4, 4, 4]  # a flat spectrum needs every direction
    assert r[2] == [0, 0, 0]  # an empty history
    assert r[3] == [1, 2, 3]  # shares 100 / 106.26 = 0.941, 104 / 106.26 = 0.979, 106.25 / 106.26


@pytest.mark.parametrize("bad, needle", [({"attention": "flash"}, "attention must be one of"),
                                         ({"rank": 9}, "rank must be <= dim"),
                                         ({"short_pool": 0}, "short_pool must be an int >= 1"),
                                         ({"tower": []}, "tower")])
def test_bad_configs_are_named(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        make_model("solar", **bad)
