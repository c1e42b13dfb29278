"""The serving cascade end to end on a small trained world: per-stage shapes and sizes, stage nesting, served
lists (distinct, unseen, known items), cold start, count bounds, determinism, real-time feedback, the replay
parity of the ranker's scores with the offline ``RequestDataset`` path, ``dedupe_rows`` / ``FunnelSizes`` and
the ``CascadeBackend``."""

import numpy as np
import polars as pl
import pytest
import torch
from cascade_fixtures import HISTORY_LEN, SIZES, cascade_env  # noqa: F401

from funnelrec.data.dataset import RequestDataset
from funnelrec.data.objectives import get_objective
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError
from funnelrec.serving.build import item_duration_s
from funnelrec.serving.cascade import STAGES, FunnelSizes, dedupe_rows, fusion_inputs
from funnelrec.serving.cascade_backend import CascadeBackend, hour_of
from funnelrec.serving.schemas import Context, FeedbackEvent, RecommendRequest

SCORE_KEYS = {"retrieval", "prerank", "p_click", "watch_s", "fusion"}


def _nonzero_set(row: torch.Tensor) -> set[int]:
    return set(row[row > 0].tolist())


def _unknown_user(env) -> int:
    return int(env.parts.users.get_column("user_id").max()) + 1_000


def _after_log_ms(env) -> int:
    return int(env.parts.history_log.get_column("time_ms").max()) + 3_600_000


# ---------------------------------------------------------------------------------------------- dedupe_rows
def _dedupe_reference(items: torch.Tensor, valid: torch.Tensor, keep: int):
    out_i, out_p = [], []
    for row, ok in zip(items.tolist(), valid.tolist()):
        seen, ri, rp = set(), [], []
        for p, (x, v) in enumerate(zip(row, ok)):
            if v and x not in seen:
                seen.add(x)
                ri.append(x)
                rp.append(p)
        ri, rp = ri[:keep], rp[:keep]
        out_i.append(ri + [0] * (keep - len(ri)))
        out_p.append(rp + [-1] * (keep - len(rp)))
    return torch.tensor(out_i, dtype=torch.int64), torch.tensor(out_p, dtype=torch.int64)


@pytest.mark.parametrize("seed", range(30))
def test_dedupe_rows_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 6, (1,), generator=g))
    c = int(torch.randint(1, 40, (1,), generator=g))
    vocab = int(torch.randint(1, 30, (1,), generator=g))  # small vocabularies: many repeats
    items = torch.randint(0, vocab, (b, c), generator=g)
    valid = torch.rand(b, c, generator=g) < [0.0, 0.5, 0.9, 1.0][seed % 4]
    for keep in (1, 3, c, c + 5):
        got_i, got_p = dedupe_rows(items, valid, keep)
        want_i, want_p = _dedupe_reference(items, valid, keep)
        assert torch.equal(got_i, want_i) and torch.equal(got_p, want_p), (seed, keep)
        assert got_i.shape == (b, keep)


def test_dedupe_rows_keeps_first_appearance_order():
    items = torch.tensor([[5, 3, 5, 9, 3, 1], [7, 7, 7, 7, 2, 2]])
    valid = torch.tensor([[True, False, True, True, True, True], [False, True, True, True, True, True]])
    got, pos = dedupe_rows(items, valid, 5)
    assert got.tolist() == [[5, 9, 3, 1, 0], [7, 2, 0, 0, 0]]
    assert pos.tolist() == [[0, 3, 4, 5, -1], [1, 4, -1, -1, -1]]
    # positions index the input: items.gather(pos) == output where valid
    m = pos >= 0
    assert torch.equal(items.gather(1, pos.clamp(min=0))[m], got[m])


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("field", ["retrieve", "popular", "prerank", "pool", "serve"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_funnel_sizes_reject_bad_values(field, bad):
    with pytest.raises(ConfigError, match=field):
        FunnelSizes(**{field: bad})


@pytest.mark.parametrize("kwargs", [dict(retrieve=100, prerank=200), dict(prerank=50, pool=60),
                                    dict(pool=5, serve=10)])
def test_funnel_sizes_must_shrink(kwargs):
    with pytest.raises(ConfigError, match="must shrink"):
        FunnelSizes(**kwargs)


def test_funnel_sizes_defaults_and_equal_stages():
    s = FunnelSizes()
    assert (s.retrieve, s.popular, s.prerank, s.pool, s.serve) == (1000, 200, 200, 60, 10)
    FunnelSizes(retrieve=5, popular=1, prerank=5, pool=5, serve=5)  # equal sizes are allowed


def test_fusion_inputs():
    pxtr, watch = torch.rand(2, 3, 8), torch.tensor([[0.0, 30.0, 90.0], [1.0, 2.0, 3.0]])
    x = fusion_inputs(pxtr, watch)
    assert x.shape == (2, 3, 7)
    torch.testing.assert_close(x[..., :6], pxtr[..., :6])
    torch.testing.assert_close(x[0, :, 6], torch.tensor([0.0, 0.5, 0.75]))


# ---------------------------------------------------------------------------------------------- the cascade
@pytest.fixture(scope="module")
def served(cascade_env):
    """One batch of the test day's requests through the shared cascade."""
    return cascade_env.cascade0.recommend(*cascade_env.args())


def test_shapes_and_sizes_per_stage(cascade_env, served):
    b = cascade_env.requests.height
    out = served
    assert out.items.shape == (b, SIZES.serve) and out.items.dtype == np.int64
    shapes = {"retrieval": SIZES.retrieve, "prerank": SIZES.prerank, "fusion": SIZES.pool,
              "rerank": SIZES.serve}
    assert set(out.stage_items) == set(shapes)
    for stage, width in shapes.items():
        assert tuple(out.stage_items[stage].shape) == (b, width), stage
    assert set(out.sizes) == set(STAGES) and set(out.timings_ms) == set(STAGES)
    limits = {"retrieval": SIZES.retrieve, "prerank": SIZES.prerank, "ranking": SIZES.prerank,
              "fusion": SIZES.pool, "rerank": SIZES.serve}
    for stage, limit in limits.items():
        assert 1 <= out.sizes[stage] <= limit, stage
        kept = out.stage_items.get(stage, out.stage_items["prerank"])  # ranking scores the pre-ranked items
        assert int((kept > 0).sum(1).max()) == out.sizes[stage]
    assert all(v >= 0 for v in out.timings_ms.values())
    assert set(out.scores) == SCORE_KEYS
    for k, v in out.scores.items():
        assert v.shape == (b, SIZES.serve), k
    assert out.pxtr.shape == (b, SIZES.serve, len(cascade_env.parts.tasks))
    assert out.tasks == cascade_env.parts.tasks and out.cold_start.shape == (b,)
    # the small world has thousands of items: every list is full
    assert (out.items >= 0).all()


def test_served_lists_are_distinct_unseen_known(cascade_env, served):
    c, (users, times, _, _) = cascade_env.cascade0, cascade_env.args()
    videos = set(cascade_env.parts.videos.get_column("video_id").to_list())
    hist = c.history.history(users, times, HISTORY_LEN)
    assert hist.length.max() > 0
    for i in range(len(users)):
        row = served.items[i]
        assert len(set(row.tolist())) == len(row), f"request {i}: repeated item"
        assert set(row.tolist()) <= videos and all(c.known_item(int(v)) for v in row)
        seen = _nonzero_set(hist.items[i])
        # the history the cascade reads is excluded from the whole funnel, not just the served list
        assert not seen & _nonzero_set(served.stage_items["retrieval"][i]), f"request {i}: history retrieved"
        assert not {v + 1 for v in row.tolist()} & seen


def test_stages_nest(served):
    s = served.stage_items
    assert torch.equal(s["rerank"], torch.from_numpy(served.items + 1).clamp(min=0))
    for i in range(s["retrieval"].shape[0]):
        final, pool = _nonzero_set(s["rerank"][i]), _nonzero_set(s["fusion"][i])
        pre, ret = _nonzero_set(s["prerank"][i]), _nonzero_set(s["retrieval"][i])
        assert final <= pool <= pre <= ret, i
        assert len(_nonzero_set(s["retrieval"][i])) == int((s["retrieval"][i] > 0).sum())  # distinct


def test_scores_belong_to_the_served_items(cascade_env, served):
    """Each per-stage score recomputed for the served item from the stage's own model."""
    c = cascade_env.cascade0
    users, times, tab, hour = cascade_env.args()
    idx = torch.from_numpy(served.items + 1)
    with torch.inference_mode():
        hist = c.history.history(users, times, HISTORY_LEN)
        empty = torch.zeros(len(users), 1, dtype=torch.int64)
        batch0 = c.request_batch(users, times, tab, hour, empty, empty.bool(), history=hist)
        u = c.retriever.user_vectors(batch0)
        v = c.item_vectors[idx]
        pre = c.preranker.score(u, v, c.item_log_pop[idx])
        ip = (u.unsqueeze(1) * v).sum(-1)
    np.testing.assert_allclose(served.scores["prerank"], pre.numpy(), rtol=0, atol=1e-5)
    ret = served.scores["retrieval"]
    finite = np.isfinite(ret)
    assert finite.any()
    np.testing.assert_allclose(ret[finite], ip.numpy()[finite], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(served.scores["p_click"], served.pxtr[..., 0])
    assert ((served.pxtr > 0) & (served.pxtr < 1)).all() and (served.scores["watch_s"] >= 0).all()
    # score-order re-ranking: the served list is sorted by fused score
    fused = served.scores["fusion"]
    assert (np.diff(fused, axis=1) <= 0).all()


def test_cold_start(cascade_env):
    c = cascade_env.cascade0
    users, times, tab, hour = cascade_env.args(cascade_env.requests.head(2))
    new = _unknown_user(cascade_env)
    assert not c.known_user(new) and c.known_user(int(users[0]))
    out = c.recommend([new, users[0], new], [times[0], times[0], times[1]], [tab[0]] * 3, [hour[0]] * 3)
    assert out.cold_start.tolist() == [True, False, True]
    assert (out.items >= 0).all() and out.items.shape == (3, SIZES.serve)
    assert len(set(out.items[0].tolist())) == SIZES.serve
    # a cold-start request depends on nothing but the context: equal for two times of the same hour/tab
    np.testing.assert_array_equal(out.items[0], out.items[2])


def test_popularity_channel_contributes_to_retrieval(cascade_env):
    c = cascade_env.cascade0
    out = c.recommend([_unknown_user(cascade_env)], [_after_log_ms(cascade_env)], [1], [12])
    top = set(c.popular_items[: SIZES.popular].tolist())
    assert top <= _nonzero_set(out.stage_items["retrieval"][0])


@pytest.mark.parametrize("count", [0, -1, SIZES.pool + 1])
def test_count_bounds(cascade_env, count):
    users, times, tab, hour = cascade_env.args(cascade_env.requests.head(1))
    with pytest.raises(DataError, match="count") as e:
        cascade_env.cascade0.recommend(users, times, tab, hour, count=count)
    assert e.value.column == "count"


def test_count_range_and_request_shapes(cascade_env):
    c = cascade_env.cascade0
    users, times, tab, hour = cascade_env.args(cascade_env.requests.head(3))
    assert c.recommend(users, times, tab, hour, count=1).items.shape == (3, 1)
    full = c.recommend(users, times, tab, hour, count=SIZES.pool)
    assert full.items.shape == (3, SIZES.pool)
    # the served list is the fusion pool (ordered by fused score)
    for i in range(3):
        assert set((full.items[i] + 1).tolist()) == _nonzero_set(full.stage_items["fusion"][i])
    with pytest.raises(DataError):
        c.recommend(users, times[:2], tab, hour)
    with pytest.raises(DataError):
        c.recommend(users, times, tab[:1], hour)
    with pytest.raises(DataError):
        c.recommend([], [], [], [])


def test_deterministic(cascade_env, served):
    a = cascade_env.cascade0.recommend(*cascade_env.args())
    b = cascade_env.cascade().recommend(*cascade_env.args())  # a second cascade over the same parts
    for out in (a, b):
        np.testing.assert_array_equal(out.items, served.items)
        for k in SCORE_KEYS:
            np.testing.assert_array_equal(out.scores[k], served.scores[k])  # NaN == NaN here
        np.testing.assert_array_equal(out.pxtr, served.pxtr)
        for k, v in served.stage_items.items():
            assert torch.equal(out.stage_items[k], v), k
        np.testing.assert_array_equal(out.cold_start, served.cold_start)


def test_feedback_changes_the_next_request(cascade_env):
    c = cascade_env.cascade()  # its own live history
    users, _, tab, hour = cascade_env.args(cascade_env.requests.head(2))
    u, other = int(users[0]), int(users[1])
    t = _after_log_ms(cascade_env)
    before = c.recommend([u, other], [t, t], tab, hour)
    hist_before = c.history.history([u], [t], HISTORY_LEN)
    early_before = c.history.history([u], [t - 2_000], HISTORY_LEN)
    v = int(before.items[0, 0])
    c.history.append(pl.DataFrame({"user_id": [u], "video_id": [v], "time_ms": [t - 1_000], "is_click": [1],
                                   "long_view": [1], "play_time_ms": [12_000]}))
    assert c.history.version(u) == 1 and c.history.version(other) == 0
    hist = c.history.history([u], [t], HISTORY_LEN)
    assert hist.items[0, -1].item() == v + 1 and hist.gap_s[0, -1].item() == pytest.approx(1.0)
    assert hist.actions[0, -1, :2].tolist() == [1.0, 1.0]
    assert torch.equal(hist.items[0, :-1], hist_before.items[0, 1:])  # the rest shifted by one
    after = c.recommend([u, other], [t, t], tab, hour)
    assert v not in after.items[0].tolist()
    assert v + 1 not in _nonzero_set(after.stage_items["retrieval"][0])
    np.testing.assert_array_equal(after.items[1], before.items[1])  # other users are unaffected
    # a request before the feedback's time does not see it
    for got, want in zip(c.history.history([u], [t - 2_000], HISTORY_LEN), early_before):
        assert torch.equal(got, want)
    # the shared cascade was not touched
    assert cascade_env.cascade0.history.version(u) == 0


def test_feedback_ends_a_cold_start(cascade_env):
    c = cascade_env.cascade()
    new, t = _unknown_user(cascade_env), _after_log_ms(cascade_env)
    first = c.recommend([new], [t], [1], [12])
    assert first.cold_start.tolist() == [True]
    v = int(first.items[0, 0])
    c.history.append(pl.DataFrame({"user_id": [new], "video_id": [v], "time_ms": [t - 10], "is_click": [1]}))
    second = c.recommend([new], [t], [1], [12])
    assert second.cold_start.tolist() == [False] and v not in second.items[0].tolist()


# ---------------------------------------------------------------------------------------------- replay parity
def _offline_batches(env, served, users, times, tab, hour):
    """Per served slot j: the RequestDataset batch of the logged (user, served video, time) rows — one row per
    request, so position 0 — over the same history source, the request's tab/hour and the video table's
    durations."""
    parts = env.parts
    timelines = Timelines.from_log(parts.history_log, parts.spec)  # the base log the cascade's histories use
    dur = item_duration_s(parts.videos, parts.spec)
    labels = [get_objective(t).label for t in parts.tasks]
    b = len(users)
    for j in range(served.items.shape[1]):
        vid = served.items[:, j]
        frame = pl.DataFrame({
            "user_id": users, "video_id": vid, "time_ms": times, "hourmin": hour * 100, "tab": tab,
            "is_rand": np.zeros(b, np.int8), "play_time_ms": np.zeros(b, np.int64),
            "duration_ms": dur[torch.from_numpy(vid + 1)].double().numpy() * 1000.0,
            **{c: np.zeros(b, np.int8) for c in labels}})
        ds = RequestDataset(frame, parts.users, parts.videos, parts.spec, timelines, history_len=HISTORY_LEN,
                            tasks=parts.tasks)
        idx = ds.locate(users, times)
        assert (idx >= 0).all()
        yield j, ds.batch(idx)


def test_replay_parity_with_the_offline_path(cascade_env, served):
    """The cascade's ranker scores of its served items == the same ranker's ``predict`` on a RequestDataset
    batch of those (user, video, time) rows: training and serving featurise identically."""
    c, parts = cascade_env.cascade0, cascade_env.parts
    users, times, tab, hour = cascade_env.args()
    assert (c.history.history(users, times, HISTORY_LEN).length == 0).any(), "want some empty histories too"
    fields = ("user_sparse", "user_dense", "hist_items", "hist_actions", "hist_gap_s", "hist_len",
              "cand_items", "cand_sparse", "cand_dense", "tab", "hour", "position", "duration_s")
    final = torch.from_numpy(served.items + 1)
    online = c.request_batch(users, times, tab, hour, final, final > 0)
    worst = 0.0
    for j, batch in _offline_batches(cascade_env, served, users, times, tab, hour):
        # features first (exact), for a precise diagnosis should the scores differ
        for f in fields:
            off, on = getattr(batch, f), getattr(online, f)
            if f.startswith("cand") or f in ("position", "duration_s"):
                on = on[:, j: j + 1]
            assert torch.equal(off, on), f"slot {j}: feature {f} differs (RequestDataset vs the cascade)"
        with torch.inference_mode():
            p = parts.ranker.predict(batch)[:, 0]  # [B, T]
            w = parts.ranker.predict_watch_time(batch)[:, 0]
        np.testing.assert_allclose(served.pxtr[:, j], p.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(served.scores["p_click"][:, j], p[:, 0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(served.scores["watch_s"][:, j], w.numpy(), rtol=1e-5, atol=1e-5)
        worst = max(worst, float(np.abs(served.pxtr[:, j] - p.numpy()).max()))
    assert worst <= 1e-5


# ---------------------------------------------------------------------------------------------- backend
def _request(env, i=0, **kw):
    r = env.requests.row(i, named=True)
    args = dict(user_id=r["user_id"], count=5, time_ms=r["time_ms"], request_id="req-1",
                context=Context(tab=r["tab"], hour=r["hour"]))
    args.update(kw)
    return RecommendRequest(**args)


def test_backend_recommend(cascade_env):
    backend = CascadeBackend(cascade_env.cascade0)
    req = _request(cascade_env)
    resp = backend.recommend(req)
    assert resp.request_id == "req-1" and resp.user_id == req.user_id and not resp.cold_start
    assert [it.rank for it in resp.items] == [1, 2, 3, 4, 5]
    direct = cascade_env.cascade0.recommend([req.user_id], [req.time_ms], [req.context.tab],
                                            [req.context.hour], count=5)
    assert [it.item_id for it in resp.items] == direct.items[0].tolist()
    for it in resp.items:
        assert {"prerank", "p_click", "watch_s", "fusion"} <= set(it.scores) <= SCORE_KEYS
        assert all(np.isfinite(v) for v in it.scores.values())
    assert set(resp.timings_ms) == set(STAGES) and set(resp.sizes) == set(STAGES)
    assert resp.sizes["rerank"] == 5
    # more than the pool: clipped to the pool
    assert len(backend.recommend(_request(cascade_env, count=SIZES.pool + 20)).items) == SIZES.pool
    d = backend.describe()
    assert d["items"] == cascade_env.parts.spec.num_items - 1 and d["sizes"]["serve"] == SIZES.serve
    assert backend.known_item(resp.items[0].item_id) and not backend.known_item(10**12)
    assert backend.known_user(req.user_id) and not backend.known_user(_unknown_user(cascade_env))


def test_backend_defaults_use_the_logs_clock(cascade_env):
    """No hour → the hour of the request time in the log's clock (``hourmin``); no time → the clock's."""
    backend = CascadeBackend(cascade_env.cascade0, clock_ms=lambda: int(cascade_env.requests["time_ms"][0]))
    explicit = backend.recommend(_request(cascade_env))
    assert hour_of(cascade_env.requests["time_ms"][0]) == cascade_env.requests["hour"][0]
    no_hour = backend.recommend(_request(cascade_env, context=Context(tab=cascade_env.requests["tab"][0])))
    no_time = backend.recommend(_request(cascade_env, time_ms=None))
    for resp in (no_hour, no_time):
        assert [(it.item_id, it.scores["p_click"]) for it in resp.items] == \
            [(it.item_id, it.scores["p_click"]) for it in explicit.items]
    hours = cascade_env.source.log.get_column("hourmin").to_numpy() // 100
    t = cascade_env.source.log.get_column("time_ms").to_numpy()
    assert all(hour_of(int(x)) == int(h) for x, h in zip(t[::97], hours[::97]))


def test_backend_observe_then_recommend(cascade_env):
    backend = CascadeBackend(cascade_env.cascade())
    req = _request(cascade_env, time_ms=_after_log_ms(cascade_env))
    first = backend.recommend(req)
    top = first.items[0].item_id
    backend.observe([FeedbackEvent(event_id="e1", user_id=req.user_id, item_id=top,
                                   time_ms=req.time_ms - 5_000, is_click=1, play_time_ms=4_000)])
    backend.observe([])
    assert backend.describe()["recent_events"] == 1
    second = backend.recommend(req)
    assert top not in [it.item_id for it in second.items] and len(second.items) == 5
    # a cold-start user through the backend
    cold = backend.recommend(_request(cascade_env, user_id=_unknown_user(cascade_env)))
    assert cold.cold_start and len(cold.items) == 5
