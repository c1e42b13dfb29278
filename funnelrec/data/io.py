"""Table I/O with clear errors: atomic zstd Parquet, typed CSV reading, and text-line splitting.

Every reader raises :class:`~funnelrec.errors.DataError` naming the file (and the column or line) on a missing file,
a missing column, a wrong dtype or a value that does not parse, so a user can fix the input without a traceback.
Every writer is atomic (:func:`funnelrec.utils.io.atomic_path`): a failure leaves no partial output.

Functions:
    write_parquet(df, path)                         atomic zstd Parquet.
    read_parquet(path, schema=None, required=None)  Parquet with column and dtype checks.
    read_csv(path, schema=None, required=None)      CSV cast to ``schema`` (integral floats such as "3.0" accepted
                                                    for integer columns; anything else that does not fit is a
                                                    DataError).
    cast_columns(df, schema, path=...)              the same normalisation for an in-memory frame.
    read_lines(path, encoding) / split_fields(...)  text files with multi-character separators (MovieLens ``::``,
                                                    RecBole tab files), line numbers kept for messages.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.parquet"
    >>> _ = write_parquet(pl.DataFrame({"user_id": [1, 2]}), p)
    >>> read_parquet(p, schema={"user_id": pl.Int64}).shape
    (2, 1)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from funnelrec.errors import DataError
from funnelrec.utils.io import atomic_path

__all__ = ["write_parquet", "read_parquet", "read_csv", "cast_columns", "read_lines", "split_fields"]

#: Name of the line-number column that :func:`read_lines` and :func:`split_fields` add (1-based file lines).
LINE_COLUMN = "_line"

Schema = Mapping[str, pl.DataType]


# ----------------------------------------------------------------------------------------------------------- Parquet


def write_parquet(df: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to ``path`` as zstd Parquet, atomically (a failed write leaves no file behind).

    Args:
        df: the frame to write.
        path: the target file; parent folders are created.

    Returns:
        The target path.
    """
    if not isinstance(df, pl.DataFrame):
        raise TypeError(f"write_parquet expects a polars DataFrame, got {type(df).__name__}")
    path = Path(path)
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression="zstd")
    return path


def read_parquet(
    path: str | os.PathLike,
    schema: Schema | None = None,
    required: Iterable[str] | None = None,
) -> pl.DataFrame:
    """Read a Parquet file, checking required columns and dtypes.

    Args:
        path: the file.
        schema: expected dtypes; every schema column that is present must have exactly that dtype.
        required: columns that must be present; defaults to every column of ``schema``.

    Returns:
        The frame, unchanged (no casting).

    Raises:
        DataError: missing or unreadable file, missing column, wrong dtype (naming the file and the column).
    """
    path = Path(path)
    _require_file(path)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise DataError(f"not a readable Parquet file ({_first_line(exc)})", path=path) from None
    schema = dict(schema or {})
    check_columns(df, schema if required is None else required, path=path)
    for name, dtype in schema.items():
        if name in df.columns and df.schema[name] != dtype:
            raise DataError(f"expected dtype {dtype}, got {df.schema[name]}", path=path, column=name)
    return df


# --------------------------------------------------------------------------------------------------------------- CSV


def read_csv(
    path: str | os.PathLike,
    schema: Schema | None = None,
    required: Iterable[str] | None = None,
    *,
    separator: str = ",",
) -> pl.DataFrame:
    """Read a CSV file with a header and cast the ``schema`` columns to their dtypes.

    Fast path: polars parses the schema columns directly. If that fails, the file is re-read as text and each column
    is cast by :func:`cast_columns`, which names the column and the first bad line. Columns outside ``schema`` keep
    polars' inferred dtype.

    Args:
        path: the file.
        schema: the dtypes of known columns (absent ones are ignored unless ``required``).
        required: columns that must be present; defaults to every column of ``schema``.
        separator: one-character field separator.

    Raises:
        DataError: missing or empty file, malformed CSV, missing column, a value that does not fit its dtype.
    """
    path = Path(path)
    _require_file(path)
    schema = dict(schema or {})
    header = _csv_header(path, separator)
    check_columns(header, schema if required is None else required, path=path)
    known = {c: schema[c] for c in header.columns if c in schema}
    try:
        return pl.read_csv(path, separator=separator, schema_overrides=known, infer_schema_length=10_000)
    except pl.exceptions.PolarsError:
        pass  # diagnose below, with the column and the line
    try:
        text = pl.read_csv(path, separator=separator, schema_overrides={c: pl.String for c in known},
                           infer_schema_length=10_000)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"malformed CSV ({_first_line(exc)})", path=path) from None
    return cast_columns(text, known, path=path, first_line=2)


def _csv_header(path: Path, separator: str) -> pl.DataFrame:
    try:
        return pl.read_csv(path, separator=separator, n_rows=0, infer_schema=False)
    except pl.exceptions.NoDataError:
        raise DataError("empty file (no header)", path=path) from None
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"malformed CSV header ({_first_line(exc)})", path=path) from None


# ----------------------------------------------------------------------------------------------------------- casting


def check_columns(df: pl.DataFrame, required: Iterable[str], *, path: object) -> None:
    """Raise DataError naming ``path`` and the first column of ``required`` missing from ``df``."""
    for name in required:
        if name not in df.columns:
            raise DataError(f"missing column (have: {', '.join(df.columns) or 'none'})", path=path, column=name)


def cast_columns(
    df: pl.DataFrame,
    schema: Schema,
    *,
    path: object,
    first_line: int | None = None,
) -> pl.DataFrame:
    """Cast the ``schema`` columns of ``df`` to their dtypes, strictly.

    Integer targets accept integers, integral floats (``1234.0``) and numeric strings (``"1234"``, ``"1234.0"``);
    non-integral values, non-numbers and values out of the target's range are rejected. Float targets accept numbers
    and numeric strings. String targets accept anything (numbers are formatted). Nulls stay null.

    Args:
        df: the frame; columns absent from ``schema`` are kept as they are.
        schema: target dtypes; columns of ``schema`` absent from ``df`` are ignored.
        path: the file named in errors.
        first_line: file line of row 0 (e.g. 2 for a CSV with a header); errors then say ``line N``, else ``row N``.
            If ``df`` has a ``_line`` column (from :func:`split_fields`) that is used instead.

    Raises:
        DataError: naming the file, the column and the first offending value.
    """
    lines = df.get_column(LINE_COLUMN) if LINE_COLUMN in df.columns else None
    out = [
        _cast_series(df.get_column(c), schema[c], _Where(path, c, lines, first_line)) if c in schema
        else df.get_column(c)
        for c in df.columns
    ]
    return pl.DataFrame(out)


class _Where:
    """Where a column came from, to point an error at the file, column and line."""

    def __init__(self, path: object, column: str, lines: pl.Series | None, first_line: int | None):
        self.path, self.column, self.lines, self.first_line = path, column, lines, first_line

    def fail(self, what: str, series: pl.Series, bad: pl.Series) -> DataError:
        idx = int(bad.fill_null(False).arg_true()[0])
        if self.lines is not None:
            at = f"line {self.lines[idx]}"
        elif self.first_line is not None:
            at = f"line {idx + self.first_line}"
        else:
            at = f"row {idx}"
        return DataError(f"{what} {series[idx]!r} ({at})", path=self.path, column=self.column)


def _cast_series(s: pl.Series, dtype: pl.DataType, where: _Where) -> pl.Series:
    if s.dtype == dtype:
        return s
    if dtype.is_integer():
        return _to_int(s, dtype, where)
    if dtype.is_float():
        return _to_float(s, where).cast(dtype)
    if dtype == pl.String:
        return s.cast(pl.String)
    try:
        return s.cast(dtype)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot cast {s.dtype} to {dtype} ({_first_line(exc)})", path=where.path,
                        column=where.column) from None


def _to_float(s: pl.Series, where: _Where, kind: str = "a number") -> pl.Series:
    if s.dtype.is_numeric() or s.dtype == pl.Boolean:
        return s.cast(pl.Float64)
    if s.dtype != pl.String:
        raise DataError(f"expected numbers, got dtype {s.dtype}", path=where.path, column=where.column)
    text = _clean_text(s)
    out = text.cast(pl.Float64, strict=False)
    bad = text.is_not_null() & out.is_null()
    if bad.any():
        raise where.fail(f"expected {kind}, got", s, bad)
    return out


def _to_int(s: pl.Series, dtype: pl.DataType, where: _Where) -> pl.Series:
    if s.dtype.is_integer() or s.dtype == pl.Boolean:
        values = s
    elif s.dtype.is_float():
        values = _integral_floats(s, s, where)
    elif s.dtype == pl.String:
        text = _clean_text(s)
        exact = text.cast(pl.Int64, strict=False)
        floats = _to_float(s, where, kind="an integer")
        values = exact.fill_null(_integral_floats(floats.set(exact.is_not_null(), 0.0), s, where))
    else:
        raise DataError(f"expected integers, got dtype {s.dtype}", path=where.path, column=where.column)
    out = values.cast(dtype, strict=False)
    bad = values.is_not_null() & out.is_null()
    if bad.any():
        raise where.fail(f"value out of range for {dtype}:", s, bad)
    return out


def _integral_floats(floats: pl.Series, original: pl.Series, where: _Where) -> pl.Series:
    """Floats → Int64, rejecting NaN, infinities, fractions and values beyond Int64."""
    ok = floats.is_finite() & (floats == floats.floor()) & (floats.abs() < 9.2e18)
    bad = floats.is_not_null() & ~ok.fill_null(False)
    if bad.any():
        raise where.fail("expected an integer, got", original, bad)
    return floats.cast(pl.Int64)


def _clean_text(s: pl.Series) -> pl.Series:
    text = s.str.strip_chars()
    return pl.select(pl.when(text == "").then(None).otherwise(text)).to_series().alias(s.name)


# ------------------------------------------------------------------------------------------------------ text lines


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> pl.DataFrame:
    """Read a text file as a frame of non-blank lines.

    Args:
        path: the file.
        encoding: its text encoding (e.g. ``"latin-1"`` for MovieLens ``u.item``/``movies.dat``).

    Returns:
        Frame with ``_line`` (UInt32, 1-based line number) and ``line`` (String, without the line break); blank lines
        are dropped.

    Raises:
        DataError: missing file, undecodable bytes, or a file with no non-blank line ("empty file").
    """
    path = Path(path)
    _require_file(path)
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid {encoding} text (byte {exc.start})", path=path) from None
    lines = (
        pl.DataFrame({"line": [text]})
        .select(pl.col("line").str.split("\n").explode().str.strip_chars_end("\r"))
        .with_row_index(LINE_COLUMN, offset=1)
        .filter(pl.col("line").str.strip_chars() != "")
    )
    if lines.height == 0:
        raise DataError("empty file", path=path)
    return lines


def split_fields(lines: pl.DataFrame, separator: str, names: list[str], *, path: object) -> pl.DataFrame:
    """Split each ``line`` on ``separator`` (any length, taken literally) into String columns ``names``.

    Args:
        lines: the output of :func:`read_lines` (or a slice of it).
        separator: e.g. ``"\\t"``, ``"|"``, ``"::"``.
        names: the expected fields, in order.
        path: the file named in errors.

    Returns:
        Frame with ``_line`` then one String column per name (empty fields are null).

    Raises:
        DataError: a line with another number of fields (names the line; a wrong separator shows up here).
    """
    parts = lines.select(LINE_COLUMN, pl.col("line").str.split(separator, literal=True).alias("parts"))
    counts = parts.get_column("parts").list.len()
    bad = counts != len(names)
    if bad.any():
        idx = int(bad.arg_true()[0])
        sep = {"\t": "tab", ",": "comma"}.get(separator, repr(separator))
        raise DataError(
            f"line {parts[LINE_COLUMN][idx]}: expected {len(names)} {sep}-separated fields "
            f"({', '.join(names)}), got {counts[idx]}", path=path)
    fields = [pl.col("parts").list.get(i).alias(n) for i, n in enumerate(names)]
    out = parts.select(LINE_COLUMN, *fields)
    return out.with_columns(pl.when(pl.col(n) == "").then(None).otherwise(pl.col(n)).alias(n) for n in names)


# ----------------------------------------------------------------------------------------------------------- helpers


def _require_file(path: Path) -> None:
    if not path.is_file():
        what = "is a folder, expected a file" if path.is_dir() else "file not found"
        raise DataError(what, path=path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
