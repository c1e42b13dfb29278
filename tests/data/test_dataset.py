from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.data.dataset import RequestDataset
from funnelrec.data.features import FeatureSpec
from funnelrec.data.objectives import ACTION_COLUMNS, BINARY_TASKS, register_objective, unregister_objective
from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS, LABEL_COLUMNS, LOG_COLUMNS
from funnelrec.data.splits import split_by_day
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parents[2] / "funnelrec" / "assets" / "kuairand_pure"
N_USERS, N_VIDEOS = 30, 80

FEATURES = ("user_id", "request_time_ms", "user_sparse", "user_dense", "hist_items", "hist_actions", "hist_gap_s",
            "hist_len", "cand_items", "cand_mask", "cand_sparse", "cand_dense", "tab", "hour", "position",
            "duration_s", "is_rand")


def make_log(seed: int = 0, requests: int = 400, days: int = 4, max_page: int = 5, interleave: bool = True,
             users: int = N_USERS, videos: int = N_VIDEOS) -> pl.DataFrame:
    """Synthetic KuaiRand-schema log: pages of 1..max_page rows per (user_id, time_ms), rows of pages interleaved."""
    rng = np.random.default_rng(seed)
    uid = rng.integers(0, users, requests)
    sec = rng.choice(days * DAY_MS // 1000, requests, replace=False)
    t = KUAIRAND_START_MS + sec * 1000
    page = rng.integers(1, max_page + 1, requests)
    rows = int(page.sum())
    req = np.repeat(np.arange(requests), page)
    if interleave:  # rows of different pages interleave in the file; a page's display order = its log order
        req = rng.permutation(req)
    t_row = t[req]
    rel = t_row - KUAIRAND_START_MS
    d = {
        "user_id": uid[req],
        "video_id": rng.integers(0, videos, rows),
        "date": 20220408 + rel // DAY_MS,
        "hourmin": (rel % DAY_MS) // 3_600_000 * 100 + (rel % 3_600_000) // 60_000,
        "time_ms": t_row,
    }
    for c in ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "is_profile_enter"):
        d[c] = (rng.random(rows) < 0.3).astype(np.int8)
    d["play_time_ms"] = rng.integers(0, 60_000, rows)
    d["duration_ms"] = rng.integers(1_000, 60_000, rows)
    d["long_view"] = (d["play_time_ms"] >= np.minimum(d["duration_ms"], 18_000)).astype(np.int8)
    d["profile_stay_time"] = rng.integers(0, 100, rows)
    d["comment_stay_time"] = rng.integers(0, 100, rows)
    d["is_rand"] = (rng.random(rows) < 0.2).astype(np.int8)
    d["tab"] = rng.integers(0, 15, requests)[req]
    return pl.DataFrame(d).select([pl.col(c).cast(dt) for c, dt in LOG_COLUMNS.items()])


@pytest.fixture(scope="module")
def users():
    return pl.read_parquet(ASSETS / "user_features_pure.parquet").head(N_USERS + 5)


@pytest.fixture(scope="module")
def videos():
    return pl.read_parquet(ASSETS / "video_features_basic_pure.parquet").head(N_VIDEOS + 5)


@pytest.fixture(scope="module")
def spec(users, videos):
    return FeatureSpec().fit(users, videos)


@pytest.fixture(scope="module")
def log():
    return make_log()


@pytest.fixture(scope="module")
def ds(log, users, videos, spec):
    return RequestDataset(log, users, videos, spec, Timelines.from_log(log, spec), history_len=16)


def _features(b: RequestBatch, i: int | None = None) -> dict:
    return {k: (getattr(b, k) if i is None else getattr(b, k)[i]) for k in FEATURES}


def _assert_same(a: dict, b: dict):
    for k in FEATURES:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ contract and content
def test_batch_contract(ds, log, spec):
    n_req = log.select("user_id", "time_ms").n_unique()
    assert len(ds) == n_req and ds.num_rows == log.height
    b = ds.batch(torch.arange(len(ds)))
    assert b.validate() is b
    m = int(ds.request_sizes.max())
    assert b.labels.shape == (n_req, m, len(BINARY_TASKS))
    assert b.hist_actions.shape == (n_req, 16, len(ACTION_COLUMNS))
    assert b.user_sparse.shape == (n_req, spec.num_user_sparse) and b.user_dense.shape == (n_req, spec.num_user_dense)
    assert b.cand_sparse.shape == (n_req, m, spec.num_item_sparse)
    assert b.cand_dense.shape == (n_req, m, spec.num_item_dense)
    assert b.labels.dtype == b.watch_time_s.dtype == b.duration_s.dtype == torch.float32
    assert b.is_rand.dtype == torch.bool
    # requests are chronological
    assert (torch.diff(ds.request_time_ms) >= 0).all()
    # padding is zero everywhere
    pad = ~b.cand_mask
    for t in (b.cand_items, b.position, b.duration_s, b.watch_time_s):
        assert (t[pad] == 0).all()
    assert (b.cand_sparse[pad] == 0).all() and (b.labels[pad] == 0).all() and (b.cand_dense[pad] == 0).all()
    assert (b.extras["log_row"][pad] == -1).all()
    assert (b.cand_sparse[..., 0] == b.cand_items).all()
    sizes = spec.vocab_sizes("item_sparse")
    assert (b.cand_sparse < torch.tensor(sizes)).all() and (b.user_sparse < torch.tensor(
        spec.vocab_sizes("user_sparse"))).all()
    # every history event is strictly before its request
    hm = b.history_mask()
    assert (b.hist_gap_s[hm] > 0).all() and (b.hist_gap_s[~hm] == 0).all() and (b.hist_items[~hm] == 0).all()


def test_batch_matches_log(ds, log, users, videos, spec):
    idx = torch.tensor([0, 5, len(ds) // 2, len(ds) - 1, 7])
    b = ds.batch(idx)
    logi = log.with_row_index("row")
    us, ud = spec.transform_users(users), spec.transform_users_dense(users)
    vs, vd = spec.transform_items(videos), spec.transform_items_dense(videos)
    for i in range(len(idx)):
        u, t = int(b.user_id[i]), int(b.request_time_ms[i])
        rows = logi.filter((pl.col("user_id") == u) & (pl.col("time_ms") == t))  # log order = display order
        k = rows.height
        assert int(b.cand_mask[i].sum()) == k and b.cand_mask[i, :k].all()
        assert b.extras["log_row"][i, :k].tolist() == rows["row"].to_list()
        vid = rows["video_id"].to_numpy()
        assert b.cand_items[i, :k].tolist() == (vid + 1).tolist()
        assert b.position[i, :k].tolist() == list(range(k))
        np.testing.assert_array_equal(b.labels[i, :k].numpy(), rows.select(LABEL_COLUMNS).to_numpy())
        np.testing.assert_allclose(b.watch_time_s[i, :k].numpy(), rows["play_time_ms"].to_numpy() / 1000, rtol=1e-6)
        np.testing.assert_allclose(b.duration_s[i, :k].numpy(), rows["duration_ms"].to_numpy() / 1000, rtol=1e-6)
        assert b.is_rand[i, :k].tolist() == (rows["is_rand"].to_numpy() == 1).tolist()
        assert int(b.tab[i]) == rows["tab"][0] and int(b.hour[i]) == rows["hourmin"][0] // 100
        np.testing.assert_array_equal(b.user_sparse[i].numpy(), us[u])  # users table row u has user_id u
        np.testing.assert_array_equal(b.user_dense[i].numpy(), ud[u])
        np.testing.assert_array_equal(b.cand_sparse[i, :k].numpy(), vs[vid])
        np.testing.assert_array_equal(b.cand_dense[i, :k].numpy(), vd[vid])
        # history = the user's rows strictly before t, most recent last
        past = logi.filter((pl.col("user_id") == u) & (pl.col("time_ms") < t)).sort(["time_ms", "row"]).tail(16)
        n = past.height
        assert int(b.hist_len[i]) == n
        assert b.hist_items[i, 16 - n:].tolist() == (past["video_id"] + 1).to_list()
        np.testing.assert_array_equal(b.hist_actions[i, 16 - n:].numpy(), past.select(ACTION_COLUMNS).to_numpy())
    assert torch.equal(b.extras["request_index"], idx)
    # single-request access and negative indices
    _assert_same(_features(ds[len(ds) - 1]), _features(ds.batch([-1])))


def test_pointwise_mode(log, users, videos, spec, ds):
    pw = RequestDataset(log, users, videos, spec, ds.timelines, history_len=16, mode="pointwise")
    assert len(pw) == log.height
    b = pw.batch(torch.arange(len(pw))).validate()
    assert b.cand_items.shape == (log.height, 1) and b.cand_mask.all()
    assert b.labels.shape == (log.height, 1, 6)
    # same rows, same positions and histories as the request view
    rb = ds.batch(torch.arange(len(ds)))
    flat = rb.extras["log_row"][rb.cand_mask]
    assert sorted(b.extras["log_row"][:, 0].tolist()) == sorted(flat.tolist()) == list(range(log.height))
    by_row_pos = dict(zip(flat.tolist(), rb.position[rb.cand_mask].tolist()))
    assert [by_row_pos[r] for r in b.extras["log_row"][:, 0].tolist()] == b.position[:, 0].tolist()
    q = pw.locate(b.user_id, b.request_time_ms)
    assert (q >= 0).all()


def test_max_candidates(log, users, videos, spec, ds):
    capped = RequestDataset(log, users, videos, spec, ds.timelines, history_len=4, max_candidates=2)
    assert len(capped) == len(ds)
    b = capped.batch(torch.arange(len(capped))).validate()
    assert b.num_candidates == 2
    full = ds.batch(torch.arange(len(ds)))
    assert torch.equal(b.cand_items, full.cand_items[:, :2])
    assert torch.equal(b.labels, full.labels[:, :2])


def test_custom_tasks(log, users, videos, spec, ds):
    register_objective("is_hate", direction=-1)
    try:
        d = RequestDataset(log, users, videos, spec, ds.timelines, history_len=4)
        assert d.tasks[-1] == "is_hate"
        b = d.batch([0, 1, 2])
        assert b.labels.shape[-1] == 7
    finally:
        unregister_objective("is_hate")
    d2 = RequestDataset(log, users, videos, spec, ds.timelines, history_len=4, tasks=["long_view"])
    b2 = d2.batch([0, 1])
    assert torch.equal(b2.labels[..., 0], ds.batch([0, 1]).labels[..., 1])
    with pytest.raises(ConfigError, match="regression"):
        RequestDataset(log, users, videos, spec, ds.timelines, tasks=["watch_time"])


# ------------------------------------------------------------------ leakage
def test_no_leakage_from_own_and_later_events(users, videos, spec):
    full = make_log(seed=7, requests=300, users=8)
    tl = Timelines.from_log(full, spec)
    ds = RequestDataset(full, users, videos, spec, tl, history_len=32)
    b = ds.batch(torch.arange(len(ds)))
    # a request with history and with later events of the same user
    later = torch.tensor([int((ds.user_ids[j + 1:] == ds.user_ids[j]).sum()) for j in range(len(ds))])
    q = int(torch.nonzero((b.hist_len >= 3) & (later >= 3))[0, 0])
    u, t = int(ds.user_ids[q]), int(ds.request_time_ms[q])

    flip = {c: pl.when((pl.col("user_id") == u) & (pl.col("time_ms") >= t)).then(1 - pl.col(c)).otherwise(pl.col(c))
            for c in (*LABEL_COLUMNS, "is_hate")}
    after_t = (pl.col("user_id") == u) & (pl.col("time_ms") > t)
    changed = full.with_columns(
        **{c: e.cast(pl.Int8) for c, e in flip.items()},
        play_time_ms=pl.when((pl.col("user_id") == u) & (pl.col("time_ms") >= t)).then(pl.col("play_time_ms") + 999)
        .otherwise(pl.col("play_time_ms")),
        video_id=pl.when(after_t).then((pl.col("video_id") + 13) % N_VIDEOS).otherwise(pl.col("video_id")),
    )
    extra = full.filter(pl.col("user_id") == u).head(3).with_columns(
        time_ms=pl.Series([t + 1, t + 1, t + 60_000], dtype=pl.Int64), video_id=pl.Series([1, 2, 3], dtype=pl.Int64))
    changed = pl.concat([extra, changed])  # new later events, placed first in the file
    assert changed.height == full.height + 3

    tl2 = Timelines.from_log(changed, spec)
    ds2 = RequestDataset(changed, users, videos, spec, tl2, history_len=32)
    q2 = int(ds2.locate([u], [t])[0])
    before, after = ds.batch([q]), ds2.batch([q2])
    _assert_same(_features(before), _features(after))
    assert not torch.equal(before.labels, after.labels)  # the impression itself did change
    assert not torch.equal(before.watch_time_s, after.watch_time_s)

    # every other request that is not a later request of u is unchanged too
    others = torch.nonzero(~((ds.user_ids == u) & (ds.request_time_ms >= t)))[:, 0]
    o2 = ds2.locate(ds.user_ids[others], ds.request_time_ms[others])
    _assert_same(_features(ds.batch(others)), _features(ds2.batch(o2)))
    # ... while u's later requests do see the new events
    later_q = ds2.locate([u], [t + 60_000])
    assert int(ds2.batch(later_q).hist_len[0]) > int(before.hist_len[0])


def test_same_time_events_excluded(users, videos, spec):
    base = make_log(seed=1, requests=3, users=1, max_page=1, interleave=False)
    t0 = int(base["time_ms"].min())
    page = pl.concat([base.head(1)] * 4).with_columns(
        time_ms=pl.Series([t0, t0 + 5, t0 + 5, t0 + 5], dtype=pl.Int64),
        video_id=pl.Series([10, 11, 12, 13], dtype=pl.Int64))
    ds = RequestDataset(page, users, videos, spec, Timelines.from_log(page, spec), history_len=8)
    assert len(ds) == 2
    b = ds.batch([0, 1])
    assert b.hist_len.tolist() == [0, 1]  # the page at t0+5 sees only the t0 event, not its own rows
    assert b.hist_items[1, -1].item() == 11
    assert b.cand_items[1].tolist() == [12, 13, 14] and b.position[1].tolist() == [0, 1, 2]


def test_test_split_histories_come_from_full_log(users, videos, spec):
    full = make_log(seed=3, requests=300, users=5, days=4)
    parts = split_by_day(full)
    tl = Timelines.from_log(full, spec)
    test_ds = RequestDataset(parts["test"], users, videos, spec, tl, history_len=64)
    own = RequestDataset(parts["test"], users, videos, spec, None, history_len=64)
    b, b_own = test_ds.batch(torch.arange(len(test_ds))), own.batch(torch.arange(len(own)))
    assert (b.hist_len >= b_own.hist_len).all() and (b.hist_len > b_own.hist_len).any()
    assert (b.hist_gap_s[b.history_mask()] > 0).all()


# ------------------------------------------------------------------ iteration
def test_iter_batches_deterministic(ds):
    def run(seed, **kw):
        return [(bb.extras["request_index"].tolist(), bb.cand_items.clone(), bb.hist_items.clone())
                for bb in ds.iter_batches(64, shuffle=True, seed=seed, **kw)]

    a, a2, c = run(3), run(3), run(4)
    assert [x[0] for x in a] == [x[0] for x in a2]
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, a2))
    assert [x[0] for x in a] != [x[0] for x in c]
    seen = sorted(i for x in a for i in x[0])
    assert seen == list(range(len(ds)))
    assert len(a) == ds.num_batches(64)
    dl = run(3, drop_last=True)
    assert len(dl) == len(ds) // 64 and all(len(x[0]) == 64 for x in dl)
    ordered = [bb.extras["request_index"].tolist() for bb in ds.iter_batches(100)]
    assert sum(ordered, []) == list(range(len(ds)))
    for bb in ds.iter_batches(128, shuffle=True, seed=0):
        bb.validate()
    with pytest.raises(ConfigError):
        next(ds.iter_batches(0))


# ------------------------------------------------------------------ errors
def test_errors(log, users, videos, spec, ds):
    tl = ds.timelines
    with pytest.raises(DataError) as e:
        RequestDataset(log.drop("tab"), users, videos, spec, tl)
    assert e.value.column == "tab" and e.value.path == "log"
    with pytest.raises(DataError) as e:
        RequestDataset(log.drop("long_view"), users, videos, spec, tl)
    assert e.value.column == "long_view"
    bad = log.with_columns(video_id=pl.when(pl.int_range(pl.len()) == 3).then(7_000).otherwise(pl.col("video_id")))
    with pytest.raises(DataError) as e:
        RequestDataset(bad, users, videos, spec, tl)
    assert e.value.column == "video_id" and "7000" in str(e.value) and "videos" in str(e.value)
    with pytest.raises(DataError) as e:
        RequestDataset(log, users.filter(pl.col("user_id") != 3), videos, spec, tl)
    assert e.value.column == "user_id" and "[3]" in str(e.value)
    with pytest.raises(DataError, match="duplicate"):
        RequestDataset(log, users, pl.concat([videos, videos.head(1)]), spec, tl)
    with pytest.raises(DataError, match="empty log"):
        RequestDataset(log.clear(), users, videos, spec, tl)
    with pytest.raises(DataError, match="null"):
        RequestDataset(log.with_columns(pl.lit(None, dtype=pl.Int64).alias("time_ms")), users, videos, spec, tl)
    with pytest.raises(DataError, match="negative"):
        RequestDataset(log.with_columns(pl.col("user_id") - 100), users, videos, spec, tl)
    with pytest.raises(ConfigError, match="fitted"):
        RequestDataset(log, users, videos, FeatureSpec(), tl)
    with pytest.raises(ConfigError, match="mode"):
        RequestDataset(log, users, videos, spec, tl, mode="listwise")
    with pytest.raises(DataError, match="range"):
        ds.batch([len(ds)])
