"""RecBole atomic-file loader (``DATASET.inter``, optional ``DATASET.user`` and ``DATASET.item``).

Atomic files are UTF-8, tab-separated, with a header whose fields are ``name:type``::

    user_id:token	item_id:token	rating:float	timestamp:float

Types: ``token`` → String, ``float`` → Float64, ``token_seq`` → List[String] and ``float_seq`` → List[Float64] (both
split on single spaces; an empty field is an empty list). Names lose their ``:type`` suffix; empty scalar fields are
null. :func:`to_interactions` turns the ``.inter`` table into dense integer ids for training.

Example:
    >>> data = load_recbole("tests/fixtures/recbole/ml-mini")  # doctest: +SKIP
    >>> data.inter.columns, data.field_types["rating"]  # doctest: +SKIP
    (['user_id', 'item_id', 'rating', 'timestamp'], 'float')
    >>> to_interactions(data).columns  # doctest: +SKIP
    ['user_id', 'item_id', 'timestamp', 'raw_user_id', 'raw_item_id', 'rating']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from funnelrec.data.io import LINE_COLUMN, cast_columns, read_lines, split_fields
from funnelrec.errors import DataError

__all__ = ["RecBoleData", "load_recbole", "to_interactions", "FIELD_TYPES"]

#: RecBole field types and the polars dtypes they load as.
FIELD_TYPES: dict[str, pl.DataType] = {
    "token": pl.String,
    "float": pl.Float64,
    "token_seq": pl.List(pl.String),
    "float_seq": pl.List(pl.Float64),
}


@dataclass
class RecBoleData:
    """A loaded RecBole dataset.

    Attributes:
        inter: the interactions (one column per header field, dtypes from :data:`FIELD_TYPES`), in file order.
        user: the ``.user`` table or None.
        item: the ``.item`` table or None.
        dataset: the dataset name (the files' stem).
        path: the folder read.
        field_types: ``{"inter": {name: type}, "user": {...}, "item": {...}}`` as written in the headers.
    """

    inter: pl.DataFrame
    user: pl.DataFrame | None
    item: pl.DataFrame | None
    dataset: str
    path: Path
    field_types: dict[str, dict[str, str]] = field(default_factory=dict)


def load_recbole(path_or_dataset_dir: str | os.PathLike, dataset: str | None = None) -> RecBoleData:
    """Load RecBole atomic files.

    Args:
        path_or_dataset_dir: the dataset folder (``.../ml-100k`` holding ``ml-100k.inter``), its parent (with
            ``dataset`` given), or the ``.inter`` file itself.
        dataset: the dataset name; defaults to the ``.inter`` file's stem or the folder name.

    Returns:
        :class:`RecBoleData`.

    Raises:
        DataError: missing ``.inter`` file, a header field without ``:type`` or with an unknown type, a duplicate
            field, a line with the wrong number of fields, a float that does not parse, or an empty table.
    """
    inter_path = _find_inter(Path(path_or_dataset_dir), dataset)
    folder, name = inter_path.parent, inter_path.stem
    types: dict[str, dict[str, str]] = {}
    inter, types["inter"] = read_atomic(inter_path)
    user = item = None
    if (folder / f"{name}.user").is_file():
        user, types["user"] = read_atomic(folder / f"{name}.user")
    if (folder / f"{name}.item").is_file():
        item, types["item"] = read_atomic(folder / f"{name}.item")
    return RecBoleData(inter=inter, user=user, item=item, dataset=name, path=folder, field_types=types)


def _find_inter(path: Path, dataset: str | None) -> Path:
    if path.is_file():
        if path.suffix != ".inter":
            raise DataError("expected a RecBole .inter file or a dataset folder", path=path)
        return path
    if not path.is_dir():
        raise DataError("folder not found", path=path)
    name = dataset or path.name
    for candidate in (path / f"{name}.inter", path / name / f"{name}.inter"):
        if candidate.is_file():
            return candidate
    raise DataError(f"file not found (RecBole interactions of dataset {name!r})", path=path / f"{name}.inter")


def read_atomic(path: str | os.PathLike) -> tuple[pl.DataFrame, dict[str, str]]:
    """Read one atomic file.

    Returns:
        ``(frame, {name: type})``: columns named without the ``:type`` suffix, typed per :data:`FIELD_TYPES`.

    Raises:
        DataError: as :func:`load_recbole`, naming the file and the field or line.
    """
    path = Path(path)
    lines = read_lines(path, "utf-8")
    header, body = lines.row(0, named=True), lines.slice(1)
    types = _parse_header(header["line"], path)
    if body.height == 0:
        raise DataError("empty table (header only)", path=path)
    raw = split_fields(body, "\t", list(types), path=path)
    scalars = {n: FIELD_TYPES[t] for n, t in types.items() if not t.endswith("_seq")}
    frame = cast_columns(raw, scalars, path=path)
    frame = frame.with_columns(_parse_seq(frame, n, t, path) for n, t in types.items() if t.endswith("_seq"))
    return frame.drop(LINE_COLUMN), types


def _parse_header(header: str, path: Path) -> dict[str, str]:
    types: dict[str, str] = {}
    for token in header.split("\t"):
        name, sep, kind = token.strip().rpartition(":")
        if not sep or not name:
            raise DataError(f"header field {token!r} has no ':type' suffix", path=path, column=token)
        if kind not in FIELD_TYPES:
            raise DataError(f"unknown field type {kind!r} (expected one of {', '.join(FIELD_TYPES)})",
                            path=path, column=name)
        if name in types:
            raise DataError("duplicate header field", path=path, column=name)
        types[name] = kind
    return types


def _parse_seq(frame: pl.DataFrame, name: str, kind: str, path: Path) -> pl.Series:
    """Split a ``*_seq`` column on spaces; ``float_seq`` elements must parse as floats."""
    tokens = frame[name].fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    if kind == "token_seq":
        return tokens
    floats = tokens.list.eval(pl.element().cast(pl.Float64, strict=False))
    bad = (floats.list.eval(pl.element().is_null()).list.any())
    if bad.any():
        idx = int(bad.arg_true()[0])
        raise DataError(f"expected space-separated floats, got {frame[name][idx]!r} (line {frame[LINE_COLUMN][idx]})",
                        path=path, column=name)
    return floats


# ------------------------------------------------------------------------------------------------------ interactions


def to_interactions(
    data: RecBoleData,
    *,
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
) -> pl.DataFrame:
    """Dense-id interactions from ``data.inter``.

    Ids are dense over the tokens of the ``.inter`` file and of the ``.user``/``.item`` table (when given),
    ordered numerically when every token is an integer, else lexicographically.

    Returns:
        ``user_id``, ``item_id`` (Int64, 0-based), ``timestamp`` (Float64, as in the file; null when the file has no
        time field), ``raw_user_id``, ``raw_item_id`` (String tokens), plus ``rating`` (Float64) when present; sorted
        stably by ``(user_id, timestamp)``.

    Raises:
        DataError: a missing user or item field, or a null id.
    """
    inter = data.inter
    where = data.path / f"{data.dataset}.inter"
    for name in (user_field, item_field):
        if name not in inter.columns:
            raise DataError(f"missing field (have: {', '.join(inter.columns)})", path=where, column=name)
        if inter[name].null_count():
            raise DataError("missing id", path=where, column=name)
    users = _vocabulary(inter[user_field], data.user, user_field)
    items = _vocabulary(inter[item_field], data.item, item_field)
    time = pl.col(time_field).cast(pl.Float64) if time_field in inter.columns else pl.lit(None, pl.Float64)
    extra = [pl.col("rating").cast(pl.Float64)] if "rating" in inter.columns else []
    return inter.select(
        pl.col(user_field).replace_strict(users, pl.int_range(len(users), eager=True), return_dtype=pl.Int64)
        .alias("user_id"),
        pl.col(item_field).replace_strict(items, pl.int_range(len(items), eager=True), return_dtype=pl.Int64)
        .alias("item_id"),
        time.alias("timestamp"),
        pl.col(user_field).cast(pl.String).alias("raw_user_id"),
        pl.col(item_field).cast(pl.String).alias("raw_item_id"),
        *extra,
    ).sort(["user_id", "timestamp"], maintain_order=True)


def _vocabulary(tokens: pl.Series, table: pl.DataFrame | None, name: str) -> pl.Series:
    """Sorted unique tokens of ``tokens`` and of ``table[name]`` (numeric order when all are integers)."""
    parts = [tokens.cast(pl.String)]
    if table is not None and name in table.columns:
        parts.append(table[name].cast(pl.String))
    vocab = pl.DataFrame({"token": pl.concat(parts)}).drop_nulls().unique()
    vocab = vocab.with_columns(number=pl.col("token").cast(pl.Int64, strict=False))
    keys = ["number", "token"] if vocab["number"].null_count() == 0 else ["token"]
    return vocab.sort(keys).get_column("token")
