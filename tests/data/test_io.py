"""Tests of funnelrec.data.io: atomic Parquet, typed CSV reading, casting and text-line splitting."""

from __future__ import annotations

import re

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funnelrec.data.io import cast_columns, read_csv, read_lines, read_parquet, split_fields, write_parquet
from funnelrec.errors import DataError


def _frame() -> pl.DataFrame:
    return pl.DataFrame({"user_id": [3, 1, 2], "score": [0.5, None, 1.5], "tag": ["a", "b,c", None]},
                        schema={"user_id": pl.Int64, "score": pl.Float64, "tag": pl.String})


def _match(*parts: str) -> str:
    """A regex matching every part, in order."""
    return ".*".join(re.escape(p) for p in parts)


# ----------------------------------------------------------------------------------------------------------- Parquet


def test_parquet_round_trip_is_identical_and_zstd(tmp_path):
    df = _frame()
    out = write_parquet(df, tmp_path / "sub" / "t.parquet")
    assert out == tmp_path / "sub" / "t.parquet"
    back = read_parquet(out, schema=dict(df.schema))
    assert back.equals(df)
    assert pq.ParquetFile(out).metadata.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.parquet"]


def test_write_parquet_replaces_existing_file(tmp_path):
    write_parquet(_frame(), tmp_path / "t.parquet")
    write_parquet(_frame().head(1), tmp_path / "t.parquet")
    assert read_parquet(tmp_path / "t.parquet").height == 1


def test_failing_parquet_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, file, **kwargs):
        with open(file, "wb") as fh:
            fh.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(_frame(), tmp_path / "out" / "t.parquet")
    assert list((tmp_path / "out").iterdir()) == []


def test_write_parquet_rejects_non_frames(tmp_path):
    with pytest.raises(TypeError, match="polars DataFrame"):
        write_parquet({"a": [1]}, tmp_path / "t.parquet")


def test_read_parquet_missing_file(tmp_path):
    with pytest.raises(DataError, match=_match("nope.parquet", "file not found")):
        read_parquet(tmp_path / "nope.parquet")


def test_read_parquet_missing_column(tmp_path):
    write_parquet(_frame(), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=_match("t.parquet", "column 'video_id'", "missing column")):
        read_parquet(tmp_path / "t.parquet", required=["user_id", "video_id"])
    with pytest.raises(DataError, match=_match("t.parquet", "column 'video_id'")):
        read_parquet(tmp_path / "t.parquet", schema={"video_id": pl.Int64})


def test_read_parquet_wrong_dtype(tmp_path):
    write_parquet(_frame(), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=_match("t.parquet", "column 'user_id'", "expected dtype Int32, got Int64")):
        read_parquet(tmp_path / "t.parquet", schema={"user_id": pl.Int32})


def test_read_parquet_optional_schema_column(tmp_path):
    write_parquet(_frame(), tmp_path / "t.parquet")
    df = read_parquet(tmp_path / "t.parquet", schema={"user_id": pl.Int64, "extra": pl.Int8}, required=["user_id"])
    assert df.columns == ["user_id", "score", "tag"]


def test_read_parquet_corrupt_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=_match("bad.parquet", "not a readable Parquet file")):
        read_parquet(tmp_path / "bad.parquet")


def test_read_parquet_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        read_parquet(tmp_path)


# --------------------------------------------------------------------------------------------------------------- CSV


def test_read_csv_casts_schema_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("user_id,flag,score,name,other\n1,1,0.5,a,7\n2,0,3,b,8\n")
    df = read_csv(p, {"user_id": pl.Int64, "flag": pl.Int8, "score": pl.Float64, "name": pl.String})
    assert df.schema == pl.Schema({"user_id": pl.Int64, "flag": pl.Int8, "score": pl.Float64, "name": pl.String,
                                   "other": pl.Int64})


def test_read_csv_accepts_integral_floats(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("user_id,flag\n1234.0,1.0\n5,0\n,\n")
    df = read_csv(p, {"user_id": pl.Int64, "flag": pl.Int8})
    assert df["user_id"].to_list() == [1234, 5, None]
    assert df["flag"].dtype == pl.Int8


@pytest.mark.parametrize(("value", "reason"), [
    ("1.5", "expected an integer, got '1.5' (line 3)"),
    ("abc", "expected an integer, got 'abc' (line 3)"),
    ("nan", "expected an integer, got 'nan' (line 3)"),
    ("300", "value out of range for Int8: '300' (line 3)"),
])
def test_read_csv_rejects_bad_integers(tmp_path, value, reason):
    p = tmp_path / "t.csv"
    p.write_text(f"user_id,flag\n1,0\n2,{value}\n")
    with pytest.raises(DataError, match=_match("t.csv", "column 'flag'", reason)):
        read_csv(p, {"user_id": pl.Int64, "flag": pl.Int8})


def test_read_csv_rejects_bad_floats(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("score\n1.5\n1.5x\n")
    with pytest.raises(DataError, match=_match("t.csv", "column 'score'", "expected a number")):
        read_csv(p, {"score": pl.Float64})


def test_read_csv_missing_column_and_file(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("user_id\n1\n")
    with pytest.raises(DataError, match=_match("t.csv", "column 'video_id'", "missing column")):
        read_csv(p, {"user_id": pl.Int64, "video_id": pl.Int64})
    with pytest.raises(DataError, match=_match("missing.csv", "file not found")):
        read_csv(tmp_path / "missing.csv")


def test_read_csv_empty_and_malformed(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=_match("empty.csv", "empty file")):
        read_csv(tmp_path / "empty.csv")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=_match("ragged.csv", "malformed CSV")):
        read_csv(tmp_path / "ragged.csv", {"a": pl.Int64})


# ----------------------------------------------------------------------------------------------------------- casting


def test_cast_columns_from_parquet_like_dtypes():
    df = pl.DataFrame({"a": pl.Series([1, 2], dtype=pl.Int32), "b": [1.0, None], "c": [1, 2]})
    out = cast_columns(df, {"a": pl.Int64, "b": pl.Int8, "c": pl.String, "absent": pl.Int64}, path="x")
    assert out.schema == pl.Schema({"a": pl.Int64, "b": pl.Int8, "c": pl.String})
    assert out["b"].to_list() == [1, None]


def test_cast_columns_names_row_without_line_numbers():
    df = pl.DataFrame({"b": [1.0, 2.5]})
    with pytest.raises(DataError, match=_match("x.parquet", "column 'b'", "expected an integer, got 2.5 (row 1)")):
        cast_columns(df, {"b": pl.Int64}, path="x.parquet")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-(2 ** 53), max_value=2 ** 53), min_size=1, max_size=20))
def test_cast_columns_integral_float_strings_round_trip(values):
    text = pl.DataFrame({"v": [f"{v}.0" for v in values]})
    assert cast_columns(text, {"v": pl.Int64}, path="x")["v"].to_list() == values


# ------------------------------------------------------------------------------------------------------------- lines


def test_read_lines_latin1_keeps_line_numbers_and_nel_bytes(tmp_path):
    p = tmp_path / "u.item"
    p.write_bytes("1|Misérables, Les\x85 (1995)\r\n\n2|Désiré\n".encode("latin-1"))
    lines = read_lines(p, "latin-1")
    assert lines["_line"].to_list() == [1, 3]
    assert lines["line"].to_list() == ["1|Misérables, Les\x85 (1995)", "2|Désiré"]
    fields = split_fields(lines, "|", ["id", "title"], path=p)
    assert fields["title"][1] == "Désiré"


def test_read_lines_errors(tmp_path):
    (tmp_path / "blank").write_text("\n \n")
    with pytest.raises(DataError, match=_match("blank", "empty file")):
        read_lines(tmp_path / "blank")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=_match("bin", "not valid utf-8")):
        read_lines(tmp_path / "bin")
    with pytest.raises(DataError, match=_match("nope", "file not found")):
        read_lines(tmp_path / "nope")


def test_split_fields_wrong_count_names_line(tmp_path):
    p = tmp_path / "ratings.dat"
    p.write_text("1::2::5::100\n1::3::4\n")
    with pytest.raises(DataError, match=_match("ratings.dat", "line 2", "expected 4 '::'-separated fields", "got 3")):
        split_fields(read_lines(p), "::", ["u", "i", "r", "t"], path=p)


def test_split_fields_empty_fields_are_null(tmp_path):
    p = tmp_path / "t"
    p.write_text("a\t\tc\n")
    out = split_fields(read_lines(p), "\t", ["x", "y", "z"], path=p)
    assert out.row(0) == (1, "a", None, "c")
