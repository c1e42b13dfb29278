"""MovieLens ratings as a KuaiRand-schema log, plus user / video tables and a MovieLens feature spec.

Every stage of funnelrec reads the KuaiRand log schema (``funnelrec.data.schema.LOG_COLUMNS``), so MovieLens is
adapted once, here, and then flows through the same splits, timelines, datasets and models as KuaiRand and the
simulator. :func:`adapt_movielens` maps a loaded :class:`~funnelrec.data.loaders.movielens.MovieLensData` as follows:

==================  ===============================================================================================
log column          value
==================  ===============================================================================================
user_id             the dense 0-based MovieLens user id
video_id            the dense 0-based item id (``item_id``; every movie of the item table, so the item index of a
                    movie is ``item_id + 1``)
time_ms             ``timestamp * 1000`` (the ratings are in epoch seconds)
date / hourmin      YYYYMMDD / HHMM of ``time_ms`` in **UTC**
is_click            ``rating >= click_threshold`` (default 4: a "liked" rating)
other labels        ``long_view, is_like, is_follow, is_comment, is_forward, is_hate, is_profile_enter`` = 0
play / duration     ``play_time_ms = duration_ms = 0``; ``profile_stay_time = comment_stay_time = 0``
tab, is_rand        0, 0
==================  ===============================================================================================

Rows of the same user with the same timestamp form one request (the log's request key is ``(user_id, time_ms)``),
so ratings given in the same second are never in each other's history (the strictly-before rule of
``funnelrec.data.timeline``). The log is sorted stably by ``(user_id, time_ms)``, like the KuaiRand loader's.

Side tables (one row per dense id, every id of the log present):

* ``users``: ``user_id``, ``raw_user_id``, ``gender``, ``age`` (years for ML-100K, the age code for ML-1M),
  ``age_group`` (ML-1M's codes 1/18/25/35/45/50/56 for both: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+),
  ``occupation`` (ML-100K names, ML-1M codes as text), ``zip_code``. The CSV releases (ML-20M/25M) have no user file:
  the table then holds the ids of the ratings and null features (index 0 everywhere but the id).
* ``videos``: ``video_id``, ``raw_item_id``, ``title``, ``genre_first``, ``genre_second`` (the first two genres
  in file order, null when absent), ``release_year`` (from ML-100K's release date, else the ``(YYYY)`` of the
  title; null when neither has one), ``year_bucket`` (5-year buckets: 1990 = 1990-1994; every year before 1950 is
  bucket 1945).

Feature spec (:func:`movielens_feature_spec`): user sparse ``user_id`` (id), ``gender``, ``age_group``,
``occupation``; item sparse ``video_id`` (id), ``genre_first``, ``genre_second``, ``year_bucket``; no dense
features. Field 0 of each side is the id field, as ``RequestBatch`` requires.

Example:
    >>> from funnelrec.data.loaders.movielens import load_movielens
    >>> ml = adapt_movielens(load_movielens("tests/fixtures/ml-100k"))  # doctest: +SKIP
    >>> ml.log.columns[:5], ml.videos.columns[:4]  # doctest: +SKIP
    (['user_id', 'video_id', 'date', 'hourmin', 'time_ms'], ['video_id', 'raw_item_id', 'title', 'genre_first'])
    >>> spec = movielens_feature_spec().fit(ml.users, ml.videos)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from funnelrec.data.features import FeatureField, FeatureSpec
from funnelrec.data.loaders.kuairand import validate_log
from funnelrec.data.loaders.movielens import MovieLensData
from funnelrec.data.schema import LOG_COLUMNS
from funnelrec.errors import ConfigError, DataError

__all__ = ["MovieLensLog", "adapt_movielens", "movielens_feature_spec", "AGE_GROUPS", "YEAR_BUCKET_FLOOR"]

#: ML-1M age codes (lower bounds of the groups); ML-100K ages are mapped onto them.
AGE_GROUPS: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
#: Release years before this fall into one bucket (``YEAR_BUCKET_FLOOR - 5``).
YEAR_BUCKET_FLOOR = 1950
#: Width of a release-year bucket, in years.
YEAR_BUCKET_WIDTH = 5

_ZERO_COLUMNS = ("is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms",
                 "duration_ms", "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab")


@dataclass
class MovieLensLog:
    """MovieLens in the KuaiRand schema.

    Attributes:
        log: ``LOG_COLUMNS`` in order and dtype, sorted stably by ``(user_id, time_ms)``.
        users: user table (``user_id`` unique; see the module doc for the columns).
        videos: movie table (``video_id`` unique, one row per movie of the item file).
        variant: ``"100k"``, ``"1m"`` or ``"20m"``.
        path: the folder read.
    """

    log: pl.DataFrame
    users: pl.DataFrame
    videos: pl.DataFrame
    variant: str
    path: Path


def adapt_movielens(data: MovieLensData, click_threshold: float = 4.0) -> MovieLensLog:
    """Map loaded MovieLens ratings to a KuaiRand-schema log plus user and video tables (see the module doc).

    Args:
        data: the output of :func:`funnelrec.data.loaders.movielens.load_movielens`.
        click_threshold: ``is_click = rating >= click_threshold``.

    Returns:
        :class:`MovieLensLog`.

    Raises:
        ConfigError: a non-positive ``click_threshold``.
        DataError: ratings without rows, or an id missing from a side table.
    """
    if not isinstance(data, MovieLensData):
        raise ConfigError(f"adapt_movielens expects MovieLensData, got {type(data).__name__}")
    if not click_threshold > 0:
        raise ConfigError(f"click_threshold must be > 0, got {click_threshold!r}")
    r = data.ratings
    if r.height == 0:
        raise DataError("no ratings", path=data.path)
    when = pl.from_epoch(pl.col("timestamp"), time_unit="s")  # naive datetime = UTC
    log = r.select(
        pl.col("user_id"), pl.col("item_id").alias("video_id"),
        (_i64(when.dt.year()) * 10000 + _i64(when.dt.month()) * 100 + _i64(when.dt.day())).alias("date"),
        (_i64(when.dt.hour()) * 100 + _i64(when.dt.minute())).alias("hourmin"),
        (pl.col("timestamp") * 1000).alias("time_ms"),
        (pl.col("rating") >= click_threshold).cast(pl.Int8).alias("is_click"),
        *[pl.lit(0).alias(c) for c in _ZERO_COLUMNS],
    ).select(list(LOG_COLUMNS)).cast(LOG_COLUMNS).sort(["user_id", "time_ms"], maintain_order=True)
    users = _users_table(data)
    videos = _videos_table(data)
    validate_log(log, path=data.path, users=users, videos=videos, users_path="users", videos_path="videos")
    return MovieLensLog(log=log, users=users, videos=videos, variant=data.variant, path=data.path)


def _i64(e: pl.Expr) -> pl.Expr:
    return e.cast(pl.Int64)  # dt.month() etc. are Int8: widen before arithmetic


def _users_table(data: MovieLensData) -> pl.DataFrame:
    if data.users is None:  # the CSV releases have no user file
        ids = data.ratings.select("user_id", "raw_user_id").unique("user_id").sort("user_id")
        return ids.with_columns(
            pl.lit(None, pl.String).alias("gender"), pl.lit(None, pl.Int64).alias("age"),
            pl.lit(None, pl.Int64).alias("age_group"), pl.lit(None, pl.String).alias("occupation"),
            pl.lit(None, pl.String).alias("zip_code"))
    age = pl.col("age")
    if data.variant == "1m":
        group = age  # already the code
    else:
        group = pl.lit(AGE_GROUPS[0])
        for lower in AGE_GROUPS[1:]:
            group = pl.when(age >= lower).then(pl.lit(lower)).otherwise(group)
        group = pl.when(age.is_null()).then(None).otherwise(group)
    return data.users.select("user_id", "raw_user_id", "gender", "age", group.cast(pl.Int64).alias("age_group"),
                             pl.col("occupation").cast(pl.String), "zip_code")


def _videos_table(data: MovieLensData) -> pl.DataFrame:
    items = data.items
    from_title = pl.col("title").str.extract(r"\((\d{4})\)\s*$", 1).cast(pl.Int64, strict=False)
    if "release_date" in items.columns:  # ML-100K: "01-Jan-1995"
        from_date = pl.col("release_date").str.extract(r"(\d{4})\s*$", 1).cast(pl.Int64, strict=False)
        year = pl.coalesce(from_date, from_title)
    else:
        year = from_title
    bucket = (pl.max_horizontal(pl.col("release_year"), pl.lit(YEAR_BUCKET_FLOOR - YEAR_BUCKET_WIDTH))
              // YEAR_BUCKET_WIDTH * YEAR_BUCKET_WIDTH)
    return items.select(
        pl.col("item_id").alias("video_id"), "raw_item_id", "title",
        pl.col("genres").list.get(0, null_on_oob=True).alias("genre_first"),
        pl.col("genres").list.get(1, null_on_oob=True).alias("genre_second"),
        year.alias("release_year"),
    ).with_columns(pl.when(pl.col("release_year").is_null()).then(None).otherwise(bucket).cast(pl.Int64)
                   .alias("year_bucket"))


def movielens_feature_spec() -> FeatureSpec:
    """The (unfitted) MovieLens feature spec: user id, gender, age group, occupation; movie id, first two genres,
    release-year bucket; no dense features (see the module doc). Fit it on the tables of :func:`adapt_movielens`.

    Example:
        >>> spec = movielens_feature_spec()
        >>> spec.names("user_sparse"), spec.names("item_sparse")
        (['user_id', 'gender', 'age_group', 'occupation'], ['video_id', 'genre_first', 'genre_second', 'year_bucket'])
    """
    return FeatureSpec(
        user_sparse=[FeatureField("user_id", encoding="id", embedding_dim=32), FeatureField("gender", embedding_dim=4),
                     FeatureField("age_group", embedding_dim=4), FeatureField("occupation", embedding_dim=8)],
        user_dense=[],
        item_sparse=[FeatureField("video_id", encoding="id", embedding_dim=32),
                     FeatureField("genre_first", embedding_dim=8), FeatureField("genre_second", embedding_dim=8),
                     FeatureField("year_bucket", embedding_dim=4)],
        item_dense=[],
    )
