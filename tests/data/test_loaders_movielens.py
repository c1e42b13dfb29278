"""Tests of the MovieLens loader (funnelrec.data.loaders.movielens) on ML-100K, ML-1M and ML-20M format fixtures."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from funnelrec.data.loaders.movielens import GENRES_100K, load_movielens
from funnelrec.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RATING_SCHEMA = pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64,
                           "raw_user_id": pl.Int64, "raw_item_id": pl.Int64})


def _match(*parts: str) -> str:
    return ".*".join(re.escape(p) for p in parts)


def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _raw_lines(path: Path, sep: str, names: list[str]) -> pl.DataFrame:
    """The fixture file parsed independently of the loader (plain Python, tiny files)."""
    rows = [line.split(sep) for line in path.read_text("latin-1").splitlines() if line]
    return pl.DataFrame(rows, schema=names, orient="row")


def _check_common(data, n_ratings: int) -> None:
    r = data.ratings
    assert r.schema == RATING_SCHEMA and r.height == n_ratings
    assert r.equals(r.sort(["user_id", "timestamp"], maintain_order=True))
    assert data.items["item_id"].to_list() == list(range(data.items.height))
    assert data.items["raw_item_id"].is_sorted()
    assert r["item_id"].max() < data.num_items and r["user_id"].max() < data.num_users
    # dense ids are consistent with the raw ids
    pairs = r.select("user_id", "raw_user_id").unique()
    assert pairs.height == r["user_id"].n_unique() == r["raw_user_id"].n_unique()
    joined = r.join(data.items.select("item_id", "raw_item_id"), on="item_id", suffix="_items")
    assert (joined["raw_item_id"] == joined["raw_item_id_items"]).all()
    if data.users is not None:
        assert data.users["user_id"].to_list() == list(range(data.users.height))
        joined = r.join(data.users.select("user_id", "raw_user_id"), on="user_id", suffix="_users")
        assert (joined["raw_user_id"] == joined["raw_user_id_users"]).all()


# -------------------------------------------------------------------------------------------------------- happy path


def test_ml_100k():
    data = load_movielens(FIXTURES / "ml-100k")
    raw = _raw_lines(FIXTURES / "ml-100k" / "u.data", "\t", ["u", "i", "r", "t"])
    assert data.variant == "100k"
    _check_common(data, raw.height)
    assert data.items.columns == ["item_id", "raw_item_id", "title", "genres", "release_date", "video_release_date",
                                  "imdb_url"]
    assert data.items.schema["genres"] == pl.List(pl.String)
    toy = data.items.row(0, named=True)
    assert toy["raw_item_id"] == 1 and toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == ["Animation", "Children's", "Comedy"] and toy["video_release_date"] is None
    assert "Misérables, Les (1995)" in data.items["title"].to_list()  # latin-1 decoded
    assert data.items["genres"].to_list()[-1] == ["unknown"] and data.items["title"][-1] == "unknown"
    assert data.users.columns == ["user_id", "raw_user_id", "age", "gender", "occupation", "zip_code"]
    assert data.users.schema["age"] == pl.Int64 and data.users.schema["zip_code"] == pl.String
    assert "T8H1N" in data.users["zip_code"].to_list()
    # the multiset of (raw user, raw item, rating, timestamp) is unchanged
    got = data.ratings.select(pl.col("raw_user_id", "raw_item_id").cast(pl.String), pl.col("rating").cast(pl.Int64)
                              .cast(pl.String), pl.col("timestamp").cast(pl.String)).sort(pl.all())
    assert got.rows() == raw.sort(pl.all()).rows()


def test_ml_1m_remaps_gapped_ids():
    data = load_movielens(FIXTURES / "ml-1m")
    raw = _raw_lines(FIXTURES / "ml-1m" / "movies.dat", "::", ["id", "title", "genres"])
    assert data.variant == "1m"
    _check_common(data, len((FIXTURES / "ml-1m" / "ratings.dat").read_text().splitlines()))
    assert data.items["raw_item_id"].to_list() == sorted(int(x) for x in raw["id"])
    assert data.items["raw_item_id"].max() > data.num_items  # ids had gaps, dense ids do not
    assert data.items.columns == ["item_id", "raw_item_id", "title", "genres"]
    assert "Misérables, Les (1995)" in data.items["title"].to_list()
    assert data.users.schema["occupation"] == pl.String and data.users["gender"].is_in(["M", "F"]).all()


def test_ml_20m_csv():
    data = load_movielens(FIXTURES / "ml-20m" / "ratings.csv")  # a file path selects its folder
    assert data.variant == "20m" and data.users is None
    _check_common(data, pl.read_csv(FIXTURES / "ml-20m" / "ratings.csv").height)
    assert (data.ratings["rating"] % 1 != 0).any()  # half stars kept
    assert data.items["genres"].to_list()[-1] == []  # "(no genres listed)"
    assert "Misérables, Les (1995)" in data.items["title"].to_list()  # quoted title with a comma
    assert data.num_users == data.ratings["raw_user_id"].n_unique()


def test_users_file_is_optional(tmp_path):
    folder = _copy(tmp_path, "ml-100k")
    (folder / "u.user").unlink()
    data = load_movielens(folder)
    assert data.users is None and data.num_users == data.ratings["raw_user_id"].n_unique()


def test_crlf_line_endings(tmp_path):
    folder = _copy(tmp_path, "ml-1m")
    for p in folder.iterdir():
        p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    assert load_movielens(folder).ratings.equals(load_movielens(FIXTURES / "ml-1m").ratings)


# ------------------------------------------------------------------------------------------------------------ errors


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match=_match("nowhere", "folder not found")):
        load_movielens(tmp_path / "nowhere")
    with pytest.raises(DataError, match=_match(str(tmp_path), "no MovieLens ratings file found")):
        load_movielens(tmp_path)
    folder = _copy(tmp_path, "ml-100k")
    (folder / "u.item").unlink()
    with pytest.raises(DataError, match=_match("u.item", "file not found")):
        load_movielens(folder)


def test_wrong_separator(tmp_path):
    folder = _copy(tmp_path, "ml-100k")
    p = folder / "u.data"
    p.write_text(p.read_text().replace("\t", ","))
    with pytest.raises(DataError, match=_match("u.data", "line 1", "expected 4 tab-separated fields", "got 1")):
        load_movielens(folder)


def test_wrong_field_count(tmp_path):
    folder = _copy(tmp_path, "ml-1m")
    p = folder / "ratings.dat"
    lines = p.read_text().splitlines()
    lines[4] = "1::2::3"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=_match("ratings.dat", "line 5", "expected 4 '::'-separated fields", "got 3")):
        load_movielens(folder)


def test_non_numeric_rating(tmp_path):
    folder = _copy(tmp_path, "ml-100k")
    p = folder / "u.data"
    lines = p.read_text().splitlines()
    lines[2] = "1\t2\tfive\t881250949"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=_match("u.data", "column 'rating'", "expected a number, got 'five'",
                                               "line 3")):
        load_movielens(folder)


def test_non_integer_id(tmp_path):
    folder = _copy(tmp_path, "ml-1m")
    p = folder / "users.dat"
    p.write_text(p.read_text().replace("1::", "x1::", 1))
    with pytest.raises(DataError, match=_match("users.dat", "column 'user_id'", "expected an integer, got 'x1'")):
        load_movielens(folder)


def test_missing_value(tmp_path):
    folder = _copy(tmp_path, "ml-1m")
    p = folder / "ratings.dat"
    lines = p.read_text().splitlines()
    lines[1] = "1::2::4::"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=_match("ratings.dat", "column 'timestamp'", "missing value (line 2)")):
        load_movielens(folder)


def test_empty_files(tmp_path):
    folder = _copy(tmp_path, "ml-100k")
    (folder / "u.data").write_text("")
    with pytest.raises(DataError, match=_match("u.data", "empty file")):
        load_movielens(folder)
    folder = _copy(tmp_path, "ml-20m")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=_match("ratings.csv", "empty file")):
        load_movielens(folder)


def test_unknown_ids(tmp_path):
    folder = _copy(tmp_path, "ml-100k")
    with open(folder / "u.data", "a") as fh:
        fh.write("1\t999\t4\t881250949\n")
    with pytest.raises(DataError, match=_match("u.data", "column 'item_id'", "id 999 not found in u.item")):
        load_movielens(folder)
    folder = _copy(tmp_path, "ml-1m")
    with open(folder / "ratings.dat", "a") as fh:
        fh.write("77::1::4::978300760\n")
    with pytest.raises(DataError, match=_match("ratings.dat", "column 'user_id'", "id 77 not found in users.dat")):
        load_movielens(folder)


def test_duplicate_item(tmp_path):
    folder = _copy(tmp_path, "ml-1m")
    p = folder / "movies.dat"
    p.write_bytes(p.read_bytes() + p.read_bytes().splitlines(keepends=True)[0])
    with pytest.raises(DataError, match=_match("movies.dat", "column 'movie_id'", "duplicate id 1")):
        load_movielens(folder)


def test_bad_genre_flag(tmp_path):
    folder = _copy(tmp_path, "ml-100k")
    p = folder / "u.item"
    text = p.read_bytes().decode("latin-1").splitlines()
    text[0] = text[0][:-1] + "7"
    p.write_bytes(("\n".join(text) + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=_match("u.item", f"column '{GENRES_100K[-1]}'", "must be 0 or 1, got '7'")):
        load_movielens(folder)


def test_csv_errors(tmp_path):
    folder = _copy(tmp_path, "ml-20m")
    p = folder / "ratings.csv"
    original = p.read_text()
    p.write_text(original.replace("4.5", "great", 1))
    with pytest.raises(DataError, match=_match("ratings.csv", "column 'rating'", "expected a number, got 'great'")):
        load_movielens(folder)
    p.write_text(original.replace(",", "\t"))
    with pytest.raises(DataError, match=_match("ratings.csv", "column 'userId'", "missing column")):
        load_movielens(folder)
    p.write_text(original.replace("rating,", "stars,", 1))
    with pytest.raises(DataError, match=_match("ratings.csv", "column 'rating'", "missing column")):
        load_movielens(folder)
