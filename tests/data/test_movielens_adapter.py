"""MovieLens → KuaiRand-schema adapter (funnelrec.data.movielens_adapter) on the ML-100K, ML-1M and ML-20M fixtures."""

from __future__ import annotations

import datetime
from pathlib import Path

import polars as pl
import pytest

from funnelrec.data.dataset import RequestDataset
from funnelrec.data.loaders.movielens import load_movielens
from funnelrec.data.movielens_adapter import adapt_movielens, movielens_feature_spec
from funnelrec.data.schema import LOG_COLUMNS
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ZERO = ("is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
        "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab")


@pytest.mark.parametrize("variant", ["ml-100k", "ml-1m", "ml-20m"])
def test_log_follows_the_kuairand_schema(variant):
    data = load_movielens(FIXTURES / variant)
    ml = adapt_movielens(data)
    log = ml.log
    assert log.schema == pl.Schema(LOG_COLUMNS) and log.height == data.ratings.height
    assert log.equals(log.sort(["user_id", "time_ms"], maintain_order=True))
    r = data.ratings  # sorted the same way, so row-aligned
    assert log["user_id"].to_list() == r["user_id"].to_list() and log["video_id"].to_list() == r["item_id"].to_list()
    assert (log["time_ms"] == r["timestamp"] * 1000).all()
    assert (log["is_click"] == (r["rating"] >= 4).cast(pl.Int8)).all()
    assert log["is_click"].sum() > 0 and log["is_click"].sum() < log.height
    for c in ZERO:
        assert (log[c] == 0).all(), c
    for t, date, hm in log.select("time_ms", "date", "hourmin").iter_rows():
        when = datetime.datetime.fromtimestamp(t / 1000, tz=datetime.timezone.utc)
        assert date == when.year * 10000 + when.month * 100 + when.day and hm == when.hour * 100 + when.minute
    # every id of the log is in the side tables; one row per id
    assert log["user_id"].is_in(ml.users["user_id"].implode()).all()
    assert log["video_id"].is_in(ml.videos["video_id"].implode()).all()
    assert ml.users["user_id"].is_unique().all() and ml.videos["video_id"].is_unique().all()
    assert ml.videos.height == data.items.height and ml.variant == data.variant


def test_side_tables_100k_and_1m():
    ml = adapt_movielens(load_movielens(FIXTURES / "ml-100k"))
    toy = ml.videos.row(0, named=True)
    assert (toy["title"], toy["genre_first"], toy["genre_second"], toy["release_year"], toy["year_bucket"]) == \
        ("Toy Story (1995)", "Animation", "Children's", 1995, 1995)
    ages = dict(zip(ml.users["age"].to_list(), ml.users["age_group"].to_list()))
    assert ages[30] == 25 and ages[25] == 25 and ages[65] == 56 and ages[36] == 35
    assert set(ml.users["age_group"].to_list()) <= {1, 18, 25, 35, 45, 50, 56}
    ml1 = adapt_movielens(load_movielens(FIXTURES / "ml-1m"))
    assert (ml1.users["age_group"] == ml1.users["age"]).all()  # ML-1M ages are already the codes
    assert ml1.videos.filter(pl.col("title") == "Four Rooms (1995)")["genre_second"].to_list() == [None]
    years = ml1.videos.drop_nulls("release_year")
    assert (years["year_bucket"] == (years["release_year"].clip(lower_bound=1945) // 5 * 5)).all()


def test_feature_spec_fits_every_variant():
    for variant in ("ml-100k", "ml-1m", "ml-20m"):
        ml = adapt_movielens(load_movielens(FIXTURES / variant))
        spec = movielens_feature_spec().fit(ml.users, ml.videos)
        assert spec.names("user_sparse") == ["user_id", "gender", "age_group", "occupation"]
        assert spec.names("item_sparse") == ["video_id", "genre_first", "genre_second", "year_bucket"]
        assert spec.num_user_dense == spec.num_item_dense == 0
        items = spec.transform_items(ml.videos)
        assert (items[:, 0] == ml.videos["video_id"].to_numpy() + 1).all() and spec.num_items == ml.videos.height + 1
        users = spec.transform_users(ml.users)
        if variant == "ml-20m":  # no user file: only the id is known
            assert (users[:, 1:] == 0).all() and (users[:, 0] > 0).all()
        else:
            assert (users > 0).all()


def test_same_second_ratings_are_one_request():
    ml = adapt_movielens(load_movielens(FIXTURES / "ml-1m"))
    # make two ratings of user 0 share a second: they become one request and never each other's history
    t0 = ml.log.filter(pl.col("user_id") == 0)["time_ms"][0]
    log = ml.log.with_columns(pl.when((pl.col("user_id") == 0) & (pl.int_range(pl.len()).over("user_id") == 1))
                              .then(t0).otherwise(pl.col("time_ms")).alias("time_ms"))
    spec = movielens_feature_spec().fit(ml.users, ml.videos)
    ds = RequestDataset(log, ml.users, ml.videos, spec, tasks=("is_click",), history_len=5)
    assert len(ds) == log.select("user_id", "time_ms").n_unique() == log.height - 1
    b = ds.batch(ds.locate([0], [t0]))
    assert b.cand_mask.sum() == 2 and b.hist_len.item() == 0
    hist = Timelines.from_log(log, spec).history([0], [t0 + 1], max_len=5)
    assert hist.length.item() == 2


def test_click_threshold_and_errors():
    data = load_movielens(FIXTURES / "ml-100k")
    strict = adapt_movielens(data, click_threshold=5)
    assert (strict.log["is_click"] == (data.ratings["rating"] >= 5).cast(pl.Int8)).all()
    with pytest.raises(ConfigError, match="click_threshold"):
        adapt_movielens(data, click_threshold=0)
    with pytest.raises(ConfigError, match="MovieLensData"):
        adapt_movielens("ml-100k")
