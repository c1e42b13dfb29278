"""KuaiRand loader (Pure, 1K, 27K, and funnelrec Parquet folders) and the writer of the official CSV file set.

The log is returned in the schema of :mod:`funnelrec.data.schema` (``LOG_COLUMNS``, in that column order and with
those dtypes): the standard-policy files and the random-exposure file concatenated, then sorted stably by
``(user_id, time_ms)`` so rows of one request (same user and ``time_ms``) keep their file order (standard files
first, then the random file). ``is_rand`` is kept as in the files. Simulated logs are written with
:func:`write_kuairand_csv` and read back by :func:`load_kuairand` with every row and value unchanged; the one
thing the official file set cannot carry is where a randomly exposed row stood *within* its request (the random
rows live in their own file), so within a request they come back after the standard rows. funnelrec's own Parquet
folders keep the order exactly.

Files per version (in ``path`` or in ``path/data``):

=======  ==========================================================================================================
pure     log_standard_4_08_to_4_21_pure.csv, log_standard_4_22_to_5_08_pure.csv, log_random_4_22_to_5_08_pure.csv,
         user_features_pure.csv, video_features_basic_pure.csv
1k       the same names with ``_1k``
27k      log_standard_4_08_to_4_21_27k_part{1,2}.csv, log_standard_4_22_to_5_08_27k_part{1,2}.csv,
         log_random_4_22_to_5_08_27k.csv, user_features_27k.csv, video_features_basic_27k.csv
parquet  log.parquet, user_features.parquet, video_features_basic.parquet (written by funnelrec)
=======  ==========================================================================================================

Every log file of the version is required; the user and video tables are optional (``None`` when absent). When they
are present, every log ``user_id``/``video_id`` must be in them. Only the ``user_id``/``video_id`` columns of the
side tables are required; the known feature columns are cast to ``USER_FEATURE_COLUMNS``/``VIDEO_FEATURE_COLUMNS``
dtypes and other columns are kept as read.

Example:
    >>> data = load_kuairand("tests/fixtures/kuairand_pure")  # doctest: +SKIP
    >>> data.version, data.log.columns[:3]  # doctest: +SKIP
    ('pure', ['user_id', 'video_id', 'date'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from funnelrec.data.io import cast_columns, check_columns, read_csv, read_parquet
from funnelrec.data.schema import (
    BINARY_COLUMNS,
    LOG_COLUMNS,
    NONNEGATIVE_COLUMNS,
    NUM_TABS,
    USER_FEATURE_COLUMNS,
    VIDEO_FEATURE_COLUMNS,
)
from funnelrec.errors import ConfigError, DataError
from funnelrec.utils.io import atomic_path

__all__ = [
    "KuaiRandData", "load_kuairand", "write_kuairand_csv", "write_kuairand_parquet", "validate_log",
    "kuairand_file_names", "VERSIONS",
]

#: The CSV versions of KuaiRand.
VERSIONS: tuple[str, ...] = ("pure", "1k", "27k")
#: Parquet file names of a funnelrec KuaiRand folder.
PARQUET_FILES = {"log": "log.parquet", "users": "user_features.parquet", "videos": "video_features_basic.parquet"}
#: Last date (YYYYMMDD) of the first standard log file.
FIRST_PERIOD_LAST_DATE = 20220421

#: Log columns that may not hold nulls.
_NOT_NULL = ("user_id", "video_id", "date", "hourmin", "time_ms", "tab", *BINARY_COLUMNS)
_SORT = ["user_id", "time_ms"]


@dataclass
class KuaiRandData:
    """A loaded KuaiRand dataset.

    Attributes:
        log: the interaction log, ``LOG_COLUMNS`` in order and dtype, sorted stably by ``(user_id, time_ms)``.
        users: the user-feature table (``user_id`` unique) or None.
        videos: the basic video-feature table (``video_id`` unique) or None.
        path: the folder the files were read from.
        version: ``"pure"``, ``"1k"``, ``"27k"`` or ``"parquet"``.
    """

    log: pl.DataFrame
    users: pl.DataFrame | None
    videos: pl.DataFrame | None
    path: Path
    version: str


# -------------------------------------------------------------------------------------------------------- file names


def kuairand_file_names(version: str) -> dict[str, list[str]]:
    """The official file names of a KuaiRand version.

    Returns:
        ``{"standard_1": [...], "standard_2": [...], "random": [...], "users": [name], "videos": [name]}``;
        the two standard periods are 4_08..4_21 and 4_22..5_08 (two parts each for 27K).
    """
    if version not in VERSIONS:
        raise ConfigError(f"unknown KuaiRand version {version!r} (expected one of {', '.join(VERSIONS)}, or "
                          "'auto'/'parquet' when loading)")
    parts = ("_part1", "_part2") if version == "27k" else ("",)
    return {
        "standard_1": [f"log_standard_4_08_to_4_21_{version}{p}.csv" for p in parts],
        "standard_2": [f"log_standard_4_22_to_5_08_{version}{p}.csv" for p in parts],
        "random": [f"log_random_4_22_to_5_08_{version}.csv"],
        "users": [f"user_features_{version}.csv"],
        "videos": [f"video_features_basic_{version}.csv"],
    }


def _log_names(version: str) -> list[str]:
    names = kuairand_file_names(version)
    return names["standard_1"] + names["standard_2"] + names["random"]


def _resolve_folder(path: Path) -> Path:
    if not path.exists():
        raise DataError("folder not found", path=path)
    if not path.is_dir():
        raise DataError("expected a KuaiRand folder, got a file", path=path)
    if not _versions_in(path) and (path / "data").is_dir():
        return path / "data"  # the layout of the official archive
    return path


def _versions_in(folder: Path) -> list[str]:
    found = [v for v in VERSIONS if any((folder / n).is_file() for n in _log_names(v))]
    return found + (["parquet"] if (folder / PARQUET_FILES["log"]).is_file() else [])


def _detect_version(folder: Path) -> str:
    found = _versions_in(folder)
    if not found:
        raise DataError(
            "no KuaiRand log found (expected e.g. log_standard_4_08_to_4_21_pure.csv or log.parquet)", path=folder)
    if len(found) > 1:
        raise DataError(f"several KuaiRand versions found ({', '.join(found)}); pass version=", path=folder)
    return found[0]


# ------------------------------------------------------------------------------------------------------------ loader


def load_kuairand(path: str | os.PathLike, version: str = "auto") -> KuaiRandData:
    """Load a KuaiRand folder.

    Args:
        path: the folder with the official CSV files (or its parent holding ``data/``), or a funnelrec Parquet folder.
        version: ``"auto"`` (detect from the file names), ``"pure"``, ``"1k"``, ``"27k"`` or ``"parquet"``.

    Returns:
        :class:`KuaiRandData`; ``log`` has ``LOG_COLUMNS`` (extra columns are dropped).

    Raises:
        DataError: a missing file or column, a value of the wrong type, a non-binary label, a negative count, a tab
            outside [0, 15), a null id, an empty log, or a log id missing from the user/video table. The message
            names the file and the column.
    """
    folder = _resolve_folder(Path(path))
    version = _detect_version(folder) if version == "auto" else version
    if version == "parquet":
        return _load_parquet(folder)
    names = kuairand_file_names(version)
    users_path, videos_path = folder / names["users"][0], folder / names["videos"][0]
    users = _read_side_csv(users_path, "user_id", USER_FEATURE_COLUMNS)
    videos = _read_side_csv(videos_path, "video_id", VIDEO_FEATURE_COLUMNS)
    parts = []
    for name in _log_names(version):
        part = _read_log_csv(folder / name, version)
        validate_log(part, path=folder / name, users=users, videos=videos, users_path=users_path,
                     videos_path=videos_path, allow_empty=True)
        parts.append(part)
    log = _finish_log(parts, folder)
    return KuaiRandData(log=log, users=users, videos=videos, path=folder, version=version)


def _read_log_csv(path: Path, version: str) -> pl.DataFrame:
    if not path.is_file():
        raise DataError(f"file not found (a KuaiRand-{version} log file)", path=path)
    return read_csv(path, LOG_COLUMNS).select(list(LOG_COLUMNS))


def _read_side_csv(path: Path, key: str, schema) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    table = read_csv(path, schema, required=[key])
    _validate_side(table, key, path)
    return table


def _load_parquet(folder: Path) -> KuaiRandData:
    log_path = folder / PARQUET_FILES["log"]
    users_path, videos_path = folder / PARQUET_FILES["users"], folder / PARQUET_FILES["videos"]
    users = _read_side_parquet(users_path, "user_id", USER_FEATURE_COLUMNS)
    videos = _read_side_parquet(videos_path, "video_id", VIDEO_FEATURE_COLUMNS)
    log = read_parquet(log_path, required=list(LOG_COLUMNS))
    log = cast_columns(log, LOG_COLUMNS, path=log_path).select(list(LOG_COLUMNS))
    validate_log(log, path=log_path, users=users, videos=videos, users_path=users_path, videos_path=videos_path,
                 allow_empty=True)
    return KuaiRandData(log=_finish_log([log], log_path), users=users, videos=videos, path=folder,
                        version="parquet")


def _read_side_parquet(path: Path, key: str, schema) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    table = cast_columns(read_parquet(path, required=[key]), schema, path=path)
    _validate_side(table, key, path)
    return table


def _finish_log(parts: list[pl.DataFrame], where: Path) -> pl.DataFrame:
    log = pl.concat(parts, how="vertical")
    if log.height == 0:
        raise DataError("empty log: no interaction rows in any log file", path=where)
    return log.sort(_SORT, maintain_order=True)


# -------------------------------------------------------------------------------------------------------- validation


def validate_log(
    log: pl.DataFrame,
    *,
    path: object = "log",
    users: pl.DataFrame | None = None,
    videos: pl.DataFrame | None = None,
    users_path: object = "users",
    videos_path: object = "videos",
    allow_empty: bool = False,
) -> None:
    """Check a log in the KuaiRand schema (already cast to ``LOG_COLUMNS`` dtypes).

    Checks: every ``LOG_COLUMNS`` column present; no nulls in ids, dates, times, labels and ``tab``; binary columns
    in {0, 1}; ``NONNEGATIVE_COLUMNS`` ≥ 0; ``tab`` in [0, 15); at least one row (unless ``allow_empty``); every
    ``user_id``/``video_id`` in ``users``/``videos`` when given.

    Raises:
        DataError: naming ``path``, the column and an example bad value.
    """
    check_columns(log, LOG_COLUMNS, path=path)
    if log.height == 0 and not allow_empty:
        raise DataError("empty log: no interaction rows", path=path)
    rules = _value_rules()
    flags = log.select([bad.any().alias(f"{col}|{what}") for col, what, bad in rules]).row(0)
    for (col, what, bad), flagged in zip(rules, flags):
        if flagged:
            example = log.filter(bad.fill_null(False)).get_column(col)[0]
            raise DataError(f"{what}, got {example!r}", path=path, column=col)
    for key, table, table_path in (("user_id", users, users_path), ("video_id", videos, videos_path)):
        if table is not None:
            _check_known_ids(log, key, table, path, table_path)


def _value_rules() -> list[tuple[str, str, pl.Expr]]:
    rules = [(c, "must not be null", pl.col(c).is_null()) for c in _NOT_NULL]
    rules += [(c, "must be 0 or 1", ~pl.col(c).is_in([0, 1])) for c in BINARY_COLUMNS]
    rules += [(c, "must be >= 0", pl.col(c) < 0) for c in NONNEGATIVE_COLUMNS]
    rules.append(("tab", f"must be in [0, {NUM_TABS})", pl.col("tab") >= NUM_TABS))
    return rules


def _check_known_ids(log: pl.DataFrame, key: str, table: pl.DataFrame, path: object, table_path: object) -> None:
    unknown = log.select(pl.col(key).unique()).join(table.select(key), on=key, how="anti")
    if unknown.height:
        example = unknown.get_column(key).min()
        raise DataError(f"id {example} not found in {Path(str(table_path)).name} ({unknown.height} unknown ids)",
                        path=path, column=key)


def _validate_side(table: pl.DataFrame, key: str, path: object) -> None:
    ids = table.get_column(key)
    if not ids.dtype.is_integer():
        raise DataError(f"expected integer ids, got dtype {ids.dtype}", path=path, column=key)
    if ids.null_count():
        raise DataError("must not be null", path=path, column=key)
    if (ids < 0).any():
        raise DataError(f"must be >= 0, got {ids.min()}", path=path, column=key)
    duplicated = ids.filter(ids.is_duplicated())
    if duplicated.len():
        raise DataError(f"duplicate id {duplicated.min()}", path=path, column=key)


# ----------------------------------------------------------------------------------------------------------- writers


def write_kuairand_csv(
    data_or_frames: KuaiRandData | pl.DataFrame | Mapping[str, pl.DataFrame | None],
    out_dir: str | os.PathLike,
    version: str = "pure",
) -> Path:
    """Write a log (and side tables) as the official KuaiRand CSV file set, atomically.

    Standard rows (``is_rand == 0``) with ``date <= 20220421`` go to ``log_standard_4_08_to_4_21_*``, the other
    standard rows to ``log_standard_4_22_to_5_08_*``, and every ``is_rand == 1`` row to ``log_random_4_22_to_5_08_*``
    (dates outside the real range are allowed). Every log file is written, header-only when it gets no rows; for 27K
    each standard period is split into two halves (``_part1``/``_part2``). Rows keep the order they have in the input.
    Only ``LOG_COLUMNS`` are written. ``out_dir`` is written as a temporary folder and renamed at the end, replacing
    an existing ``out_dir`` only if that holds nothing but KuaiRand files.

    Args:
        data_or_frames: a :class:`KuaiRandData`, a log frame, or a mapping with ``"log"`` and optional ``"users"`` and
            ``"videos"``.
        out_dir: the folder to create.
        version: ``"pure"``, ``"1k"`` or ``"27k"`` (file names).

    Returns:
        ``out_dir``.

    Raises:
        DataError: an invalid log (see :func:`validate_log`) or an ``out_dir`` holding other files.
    """
    names = kuairand_file_names(version)
    log, users, videos = _prepared_frames(data_or_frames)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    standard = pl.col("is_rand") == 0
    first = standard & (pl.col("date") <= FIRST_PERIOD_LAST_DATE)
    split = {
        "standard_1": log.filter(first),
        "standard_2": log.filter(standard & ~first),
        "random": log.filter(pl.col("is_rand") == 1),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for key, frame in split.items():
            for name, chunk in zip(names[key], _halves(frame, len(names[key]))):
                chunk.write_csv(tmp / name)
        if users is not None:
            users.write_csv(tmp / names["users"][0])
        if videos is not None:
            videos.write_csv(tmp / names["videos"][0])
    return out_dir


def write_kuairand_parquet(
    data_or_frames: KuaiRandData | pl.DataFrame | Mapping[str, pl.DataFrame | None],
    out_dir: str | os.PathLike,
) -> Path:
    """Write a log (and side tables) as a funnelrec Parquet folder (zstd), atomically; see :func:`load_kuairand`."""
    log, users, videos = _prepared_frames(data_or_frames)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for key, frame in (("log", log), ("users", users), ("videos", videos)):
            if frame is not None:
                frame.write_parquet(tmp / PARQUET_FILES[key], compression="zstd")
    return out_dir


def _prepared_frames(data) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """Cast and validate the frames to write: (log, users, videos)."""
    if isinstance(data, KuaiRandData):
        log, users, videos = data.log, data.users, data.videos
    elif isinstance(data, pl.DataFrame):
        log, users, videos = data, None, None
    elif isinstance(data, Mapping) and "log" in data:
        log, users, videos = data["log"], data.get("users"), data.get("videos")
    else:
        raise TypeError("expected KuaiRandData, a log DataFrame, or a mapping with 'log', 'users', 'videos'")
    check_columns(log, LOG_COLUMNS, path="log")
    log = cast_columns(log.select(list(LOG_COLUMNS)), LOG_COLUMNS, path="log")
    if users is not None:
        users = cast_columns(users, USER_FEATURE_COLUMNS, path="users")
        check_columns(users, ["user_id"], path="users")
        _validate_side(users, "user_id", "users")
    if videos is not None:
        videos = cast_columns(videos, VIDEO_FEATURE_COLUMNS, path="videos")
        check_columns(videos, ["video_id"], path="videos")
        _validate_side(videos, "video_id", "videos")
    validate_log(log, path="log", users=users, videos=videos)
    return log, users, videos


def _halves(frame: pl.DataFrame, n: int) -> list[pl.DataFrame]:
    if n == 1:
        return [frame]
    cut = (frame.height + 1) // 2
    return [frame.slice(0, cut), frame.slice(cut)]


def _kuairand_names() -> set[str]:
    names = {n for v in VERSIONS for group in kuairand_file_names(v).values() for n in group}
    extra = {f"video_features_statistic_{v}{p}.csv" for v in VERSIONS for p in ("", "_part1", "_part2", "_part3")}
    return names | extra | set(PARQUET_FILES.values())


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError("exists and is not a folder", path=out_dir)
    if out_dir.is_dir():
        known = _kuairand_names()
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in known)
        if other:
            raise DataError(f"refusing to replace a folder that holds non-KuaiRand files (e.g. {other[0]!r})",
                            path=out_dir)
