"""MovieLens loader: ML-100K, ML-1M and the CSV releases (ML-20M, ML-25M, ml-latest), with dense 0-based ids.

=======  ========================================================================================================
variant  files (in the folder given)
=======  ========================================================================================================
100k     ``u.data`` (tab: user item rating timestamp), ``u.item`` (pipe, latin-1: movie id | title | release date |
         video release date | IMDb URL | 19 genre flags), ``u.user`` (pipe: user id | age | gender | occupation | zip)
1m       ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``movies.dat`` (MovieID::Title::Genres, latin-1),
         ``users.dat`` (UserID::Gender::Age::Occupation::Zip-code)
20m      ``ratings.csv`` (userId,movieId,rating,timestamp), ``movies.csv`` (movieId,title,genres); also 25M/latest
=======  ========================================================================================================

Ids: ``item_id`` is dense over the item table (every movie in it, ascending raw id → 0, 1, ...), so
``items["item_id"]`` is the row index; ``user_id`` is dense over the user table when there is one, else over the
users in the ratings. Every rated id must appear in the item (and user) table. Raw ids are kept as ``raw_user_id``
and ``raw_item_id``. Ratings are sorted stably by ``(user_id, timestamp)``.

Example:
    >>> data = load_movielens("tests/fixtures/ml-100k")  # doctest: +SKIP
    >>> data.variant, data.ratings.columns  # doctest: +SKIP
    ('100k', ['user_id', 'item_id', 'rating', 'timestamp', 'raw_user_id', 'raw_item_id'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from funnelrec.data.io import LINE_COLUMN, cast_columns, read_csv, read_lines, split_fields
from funnelrec.errors import DataError

__all__ = ["MovieLensData", "load_movielens", "GENRES_100K"]

#: The 19 genre flags of ML-100K ``u.item``, in file order.
GENRES_100K: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_RATING_FIELDS = ["user_id", "item_id", "rating", "timestamp"]
_RATING_TYPES = {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
_USER_FIELDS = ["user_id", "age", "gender", "occupation", "zip_code"]
_USER_TYPES = {"user_id": pl.Int64, "age": pl.Int64}
_RATINGS_FILE = {"100k": "u.data", "1m": "ratings.dat", "20m": "ratings.csv"}
_ITEMS_FILE = {"100k": "u.item", "1m": "movies.dat", "20m": "movies.csv"}
_USERS_FILE = {"100k": "u.user", "1m": "users.dat"}


@dataclass
class MovieLensData:
    """A loaded MovieLens dataset.

    Attributes:
        ratings: ``user_id``, ``item_id`` (Int64, dense 0-based), ``rating`` (Float64), ``timestamp`` (Int64, epoch
            seconds), ``raw_user_id``, ``raw_item_id`` (Int64, the file's ids); sorted by ``(user_id, timestamp)``.
        items: ``item_id``, ``raw_item_id``, ``title`` (String), ``genres`` (List[String]); ML-100K adds
            ``release_date``, ``video_release_date``, ``imdb_url``. Sorted by ``item_id``.
        users: ``user_id``, ``raw_user_id``, ``age`` (Int64), ``gender``, ``occupation``, ``zip_code`` (String;
            ML-1M occupation codes as text), sorted by ``user_id``; None for the CSV releases.
        variant: ``"100k"``, ``"1m"`` or ``"20m"`` (the CSV format, also ML-25M).
        path: the folder read.
    """

    ratings: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame | None
    variant: str
    path: Path

    @property
    def num_users(self) -> int:
        """Number of dense user ids."""
        return len(self.users) if self.users is not None else self.ratings["user_id"].max() + 1

    @property
    def num_items(self) -> int:
        """Number of dense item ids (every movie of the item table)."""
        return len(self.items)


def load_movielens(path: str | os.PathLike) -> MovieLensData:
    """Load a MovieLens folder (or the folder of a given ratings file), detecting the variant from the file names.

    Args:
        path: folder holding ``u.data`` (100K), ``ratings.dat`` (1M) or ``ratings.csv`` (20M/25M), or that file.

    Returns:
        :class:`MovieLensData`.

    Raises:
        DataError: missing folder or file, a line with the wrong number of fields (wrong separator), a value that is
            not a number, a missing value, an empty file, a duplicate id, or a rated id missing from the item/user
            table. The message names the file and the line or column.
    """
    folder, variant = _detect(Path(path))
    ratings_path, items_path = folder / _RATINGS_FILE[variant], folder / _ITEMS_FILE[variant]
    users_path = folder / _USERS_FILE[variant] if variant in _USERS_FILE else None
    ratings = _RATINGS_READERS[variant](ratings_path)
    items = _ITEMS_READERS[variant](items_path)
    users = _read_users(users_path, variant) if users_path is not None and users_path.is_file() else None
    return _assemble(ratings, items, users, variant, folder, (ratings_path, items_path, users_path))


def _detect(path: Path) -> tuple[Path, str]:
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise DataError("folder not found", path=path)
    for variant, name in _RATINGS_FILE.items():
        if (path / name).is_file():
            return path, variant
    raise DataError("no MovieLens ratings file found (expected u.data, ratings.dat or ratings.csv)", path=path)


# ----------------------------------------------------------------------------------------------------------- readers


def _read_delimited(path: Path, separator: str, names: list[str], types: dict) -> pl.DataFrame:
    """Lines of ``path`` split on ``separator`` into ``names``, cast to ``types``; keeps ``_line``."""
    fields = split_fields(read_lines(path, "latin-1"), separator, names, path=path)
    return cast_columns(fields, types, path=path)


def _ratings_text(separator: str):
    def read(path: Path) -> pl.DataFrame:
        df = _read_delimited(path, separator, _RATING_FIELDS, _RATING_TYPES)
        _check_no_nulls(df, _RATING_FIELDS, path)
        return df.rename({"user_id": "raw_user_id", "item_id": "raw_item_id"})
    return read


def _ratings_csv(path: Path) -> pl.DataFrame:
    types = {"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
    df = read_csv(path, types).select(list(types))
    if df.height == 0:
        raise DataError("empty file (no ratings)", path=path)
    df = df.with_columns((pl.int_range(pl.len(), dtype=pl.UInt32) + 2).alias(LINE_COLUMN))
    _check_no_nulls(df, list(types), path)
    return df.rename({"userId": "raw_user_id", "movieId": "raw_item_id"})


def _items_100k(path: Path) -> pl.DataFrame:
    names = ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES_100K]
    df = _read_delimited(path, "|", names, {"movie_id": pl.Int64})
    for genre in GENRES_100K:
        bad = ~df[genre].is_in(["0", "1"]).fill_null(False)
        if bad.any():
            line = df[LINE_COLUMN].filter(bad)[0]
            raise DataError(f"genre flag must be 0 or 1, got {df[genre].filter(bad)[0]!r} (line {line})",
                            path=path, column=genre)
    genres = pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in GENRES_100K]).list.drop_nulls()
    return df.select(LINE_COLUMN, pl.col("movie_id").alias("raw_item_id"), "title", genres.alias("genres"),
                     "release_date", "video_release_date", "imdb_url")


def _items_1m(path: Path) -> pl.DataFrame:
    df = _read_delimited(path, "::", ["movie_id", "title", "genres"], {"movie_id": pl.Int64})
    return df.select(LINE_COLUMN, pl.col("movie_id").alias("raw_item_id"), "title", _split_genres("genres"))


def _items_csv(path: Path) -> pl.DataFrame:
    df = read_csv(path, {"movieId": pl.Int64, "title": pl.String, "genres": pl.String})
    df = df.with_columns((pl.int_range(pl.len(), dtype=pl.UInt32) + 2).alias(LINE_COLUMN))
    return df.select(LINE_COLUMN, pl.col("movieId").alias("raw_item_id"), "title", _split_genres("genres"))


def _split_genres(column: str) -> pl.Expr:
    """``"A|B"`` → ``["A", "B"]``; ``"(no genres listed)"`` and null → ``[]``."""
    text = pl.when(pl.col(column) == "(no genres listed)").then(pl.lit("")).otherwise(pl.col(column).fill_null(""))
    return text.str.split("|").list.eval(pl.element().filter(pl.element() != "")).alias("genres")


def _read_users(path: Path, variant: str) -> pl.DataFrame:
    if variant == "100k":
        df = _read_delimited(path, "|", _USER_FIELDS, _USER_TYPES)
    else:
        df = _read_delimited(path, "::", ["user_id", "gender", "age", "occupation", "zip_code"], _USER_TYPES)
    return df.select(LINE_COLUMN, pl.col("user_id").alias("raw_user_id"), "age", "gender", "occupation", "zip_code")


_RATINGS_READERS = {"100k": _ratings_text("\t"), "1m": _ratings_text("::"), "20m": _ratings_csv}
_ITEMS_READERS = {"100k": _items_100k, "1m": _items_1m, "20m": _items_csv}


# ---------------------------------------------------------------------------------------------------------- assembly


def _assemble(ratings, items, users, variant, folder, paths) -> MovieLensData:
    ratings_path, items_path, users_path = paths
    items = _dense_table(items, "raw_item_id", "item_id", items_path, "movieId" if variant == "20m" else "movie_id")
    users = None if users is None else _dense_table(users, "raw_user_id", "user_id", users_path, "user_id")
    _check_known(ratings, items, "raw_item_id", ratings_path, items_path, variant)
    if users is not None:
        _check_known(ratings, users, "raw_user_id", ratings_path, users_path, variant)
        user_ids = users["raw_user_id"]
    else:
        user_ids = ratings["raw_user_id"].unique().sort()
    ratings = ratings.select(
        pl.col("raw_user_id").replace_strict(user_ids, pl.int_range(len(user_ids), eager=True),
                                             return_dtype=pl.Int64).alias("user_id"),
        pl.col("raw_item_id").replace_strict(items["raw_item_id"], items["item_id"]).alias("item_id"),
        "rating", "timestamp", "raw_user_id", "raw_item_id",
    ).sort(["user_id", "timestamp"], maintain_order=True)
    return MovieLensData(ratings=ratings, items=items, users=users, variant=variant, path=folder)


def _dense_table(table: pl.DataFrame, raw: str, dense: str, path: Path, column: str) -> pl.DataFrame:
    """Check raw ids (non-null, unique), sort by them and add the dense id as the first column."""
    _check_no_nulls(table, [raw], path, names={raw: column})
    dup = table.filter(pl.col(raw).is_duplicated())
    if dup.height:
        raise DataError(f"duplicate id {dup[raw][0]} (line {dup[LINE_COLUMN][0]})", path=path, column=column)
    table = table.sort(raw).drop(LINE_COLUMN)
    return table.select(pl.int_range(pl.len(), dtype=pl.Int64).alias(dense), pl.all())


def _check_known(ratings, table, raw, ratings_path, table_path, variant) -> None:
    unknown = ratings.join(table.select(raw), on=raw, how="anti", maintain_order="left")
    if unknown.height:
        column = _file_column(raw, variant)
        raise DataError(f"id {unknown[raw][0]} not found in {table_path.name} (line {unknown[LINE_COLUMN][0]})",
                        path=ratings_path, column=column)


def _file_column(raw: str, variant: str) -> str:
    if variant == "20m":
        return {"raw_user_id": "userId", "raw_item_id": "movieId"}[raw]
    return {"raw_user_id": "user_id", "raw_item_id": "item_id"}[raw]


def _check_no_nulls(df: pl.DataFrame, columns: list[str], path: Path, names: dict | None = None) -> None:
    for column in columns:
        missing = df[column].is_null()
        if missing.any():
            line = df[LINE_COLUMN].filter(missing)[0]
            raise DataError(f"missing value (line {line})", path=path, column=(names or {}).get(column, column))
