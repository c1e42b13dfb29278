"""Tests of the RecBole atomic-file loader (funnelrec.data.loaders.recbole)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from funnelrec.data.loaders.recbole import load_recbole, read_atomic, to_interactions
from funnelrec.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recbole"
MINI = FIXTURES / "ml-mini"
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def _match(*parts: str) -> str:
    return ".*".join(re.escape(p) for p in parts)


def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mini():
    return load_recbole(MINI)


# -------------------------------------------------------------------------------------------------------- happy path


def test_loads_fixture(mini):
    n_lines = len((MINI / "ml-mini.inter").read_text().splitlines()) - 1
    assert mini.dataset == "ml-mini" and mini.path == MINI
    assert mini.inter.schema == pl.Schema({"user_id": pl.String, "item_id": pl.String, "rating": pl.Float64,
                                           "timestamp": pl.Float64})
    assert mini.inter.height == n_lines
    assert mini.user.columns == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert mini.item.schema["movie_title"] == pl.List(pl.String)
    assert mini.item.schema["class"] == pl.List(pl.String)
    assert mini.item.row(0, named=True)["movie_title"] == ["Toy", "Story"]
    assert mini.field_types["item"] == {"item_id": "token", "movie_title": "token_seq", "release_year": "token",
                                        "class": "token_seq"}


def test_path_forms(mini):
    assert load_recbole(FIXTURES, dataset="ml-mini").inter.equals(mini.inter)
    assert load_recbole(MINI / "ml-mini.inter").inter.equals(mini.inter)
    assert load_recbole(str(MINI), dataset="ml-mini").user.equals(mini.user)


def test_side_files_optional(tmp_path):
    folder = Path(shutil.copytree(MINI, tmp_path / "ml-mini"))
    (folder / "ml-mini.user").unlink()
    (folder / "ml-mini.item").unlink()
    data = load_recbole(folder)
    assert data.user is None and data.item is None and set(data.field_types) == {"inter"}


def test_seq_types_and_empty_fields(tmp_path):
    p = _write(tmp_path, "x.item", ["item_id:token\temb:float_seq\ttags:token_seq\tprice:float",
                                    "a\t0.5 1 -2e3\tx y\t",
                                    "b\t\t\t3"])
    df, types = read_atomic(p)
    assert types == {"item_id": "token", "emb": "float_seq", "tags": "token_seq", "price": "float"}
    assert df.schema["emb"] == pl.List(pl.Float64)
    assert df["emb"].to_list() == [[0.5, 1.0, -2000.0], []]
    assert df["tags"].to_list() == [["x", "y"], []]
    assert df["price"].to_list() == [None, 3.0]


def test_to_interactions(mini):
    inter = to_interactions(mini)
    assert inter.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Float64,
                                      "raw_user_id": pl.String, "raw_item_id": pl.String, "rating": pl.Float64})
    assert inter.height == mini.inter.height
    assert inter.equals(inter.sort(["user_id", "timestamp"], maintain_order=True))
    # numeric tokens are ordered numerically, and the .item table's unrated items get ids too
    items = inter.select("item_id", "raw_item_id").unique().sort("item_id")
    assert items["raw_item_id"].cast(pl.Int64).is_sorted()
    assert inter["item_id"].max() < mini.item.height
    pairs = inter.select("user_id", "raw_user_id").unique()
    assert pairs.height == inter["user_id"].n_unique() == inter["raw_user_id"].n_unique()


def test_to_interactions_token_order_and_custom_fields(tmp_path):
    _write(tmp_path / "ds", "ds.inter", ["uid:token\tiid:token\tts:float",
                                         "u10\tb\t3", "u9\ta\t1", "u10\ta\t2", "9\tc\t0"])
    data = load_recbole(tmp_path / "ds")
    inter = to_interactions(data, user_field="uid", item_field="iid", time_field="ts")
    assert inter["raw_user_id"].to_list() == ["9", "u10", "u10", "u9"]  # lexicographic: tokens are not all ints
    assert inter["user_id"].to_list() == [0, 1, 1, 2]
    assert inter["timestamp"].to_list() == [0.0, 2.0, 3.0, 1.0]
    assert "rating" not in inter.columns
    no_time = to_interactions(data, user_field="uid", item_field="iid")
    assert no_time["timestamp"].null_count() == no_time.height


# ------------------------------------------------------------------------------------------------------------ errors


def test_missing_inter_file(tmp_path):
    with pytest.raises(DataError, match=_match("nowhere", "folder not found")):
        load_recbole(tmp_path / "nowhere")
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=_match("ds.inter", "file not found", "'ds'")):
        load_recbole(tmp_path / "ds")
    other = _write(tmp_path, "ds.user", ["user_id:token", "1"])
    with pytest.raises(DataError, match=_match("ds.user", "expected a RecBole .inter file")):
        load_recbole(other)


@pytest.mark.parametrize(("header", "column", "reason"), [
    ("user_id:token\titem_id:int", "item_id", "unknown field type 'int'"),
    ("user_id\titem_id:token", "user_id", "has no ':type' suffix"),
    ("user_id:token\tuser_id:float", "user_id", "duplicate header field"),
    (":token\titem_id:token", ":token", "has no ':type' suffix"),
])
def test_bad_header(tmp_path, header, column, reason):
    _write(tmp_path / "ds", "ds.inter", [header, "1\t2"])
    with pytest.raises(DataError, match=_match("ds.inter", f"column '{column}'", reason)):
        load_recbole(tmp_path / "ds")


def test_wrong_field_count(tmp_path):
    _write(tmp_path / "ds", "ds.inter", [HEADER, "1\t2\t3\t4", "1\t2\t3"])
    with pytest.raises(DataError, match=_match("ds.inter", "line 3", "expected 4 tab-separated fields", "got 3")):
        load_recbole(tmp_path / "ds")
    _write(tmp_path / "ds", "ds.inter", [HEADER, "1 2 3 4"])
    with pytest.raises(DataError, match=_match("ds.inter", "line 2", "got 1")):
        load_recbole(tmp_path / "ds")


def test_bad_float(tmp_path):
    _write(tmp_path / "ds", "ds.inter", [HEADER, "1\t2\t3\t4", "1\t3\tgood\t5"])
    with pytest.raises(DataError, match=_match("ds.inter", "column 'rating'", "expected a number, got 'good'",
                                               "line 3")):
        load_recbole(tmp_path / "ds")


def test_bad_float_seq(tmp_path):
    _write(tmp_path / "ds", "ds.inter", [HEADER, "1\t2\t3\t4"])
    _write(tmp_path / "ds", "ds.item", ["item_id:token\temb:float_seq", "2\t0.1 0.2", "3\t0.1 x"])
    with pytest.raises(DataError, match=_match("ds.item", "column 'emb'", "expected space-separated floats",
                                               "'0.1 x'", "line 3")):
        load_recbole(tmp_path / "ds")


def test_empty_tables(tmp_path):
    _write(tmp_path / "ds", "ds.inter", [HEADER])
    with pytest.raises(DataError, match=_match("ds.inter", "empty table")):
        load_recbole(tmp_path / "ds")
    (tmp_path / "ds" / "ds.inter").write_text("")
    with pytest.raises(DataError, match=_match("ds.inter", "empty file")):
        load_recbole(tmp_path / "ds")


def test_to_interactions_errors(tmp_path):
    _write(tmp_path / "ds", "ds.inter", ["uid:token\titem_id:token", "1\t2", "\t3"])
    data = load_recbole(tmp_path / "ds")
    with pytest.raises(DataError, match=_match("ds.inter", "column 'user_id'", "missing field")):
        to_interactions(data)
    with pytest.raises(DataError, match=_match("ds.inter", "column 'uid'", "missing id")):
        to_interactions(data, user_field="uid")
