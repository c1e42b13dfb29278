"""Tests of the KuaiRand loader and writers (funnelrec.data.loaders.kuairand) and of load_dataset."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funnelrec.data.loaders import load_dataset
from funnelrec.data.loaders.kuairand import (
    KuaiRandData,
    kuairand_file_names,
    load_kuairand,
    validate_log,
    write_kuairand_csv,
    write_kuairand_parquet,
)
from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS, LOG_COLUMNS, USER_FEATURE_COLUMNS
from funnelrec.errors import ConfigError, DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PURE = FIXTURES / "kuairand_pure"
ASSETS = Path(__file__).resolve().parents[2] / "funnelrec" / "assets" / "kuairand_pure"
STD1, STD2, RAND = (kuairand_file_names("pure")[k][0] for k in ("standard_1", "standard_2", "random"))
USERS, VIDEOS = "user_features_pure.csv", "video_features_basic_pure.csv"
ORDER = ["user_id", "time_ms", "is_rand", "video_id", "play_time_ms"]


def _match(*parts: str) -> str:
    return ".*".join(re.escape(p) for p in parts)


def _raw(name: str) -> pl.DataFrame:
    return pl.read_csv(PURE / name, infer_schema=False)


@pytest.fixture(scope="module")
def pure() -> KuaiRandData:
    return load_kuairand(PURE)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A writable copy of the KuaiRand-Pure fixture."""
    return Path(shutil.copytree(PURE, tmp_path / "kuairand"))


def _edit(path: Path, **exprs) -> None:
    """Rewrite a CSV of the copy with some columns replaced (all values as text)."""
    df = pl.read_csv(path, infer_schema=False)
    df.with_columns(**exprs).write_csv(path)


def _first_row(column: str, value: str) -> pl.Expr:
    """``column`` with its first row set to ``value``."""
    return pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(value)).otherwise(pl.col(column))


# -------------------------------------------------------------------------------------------------------- happy path


def test_loads_pure_fixture(pure):
    sizes = {n: _raw(n).height for n in (STD1, STD2, RAND)}
    assert pure.version == "pure" and pure.path == PURE
    assert pure.log.height == sum(sizes.values())
    assert dict(pure.log.schema) == LOG_COLUMNS and pure.log.columns == list(LOG_COLUMNS)
    assert pure.log["is_rand"].sum() == sizes[RAND]
    assert pure.users.height == 20 and pure.videos.height == 30
    assert dict(pure.users.schema) == USER_FEATURE_COLUMNS


def test_side_tables_equal_the_vendored_real_rows(pure):
    """The fixture's users/videos are real KuaiRand-Pure rows: loading the CSVs gives the same frames."""
    users = pl.read_parquet(ASSETS / "user_features_pure.parquet").filter(
        pl.col("user_id").is_in(pure.users["user_id"].to_list()))
    videos = pl.read_parquet(ASSETS / "video_features_basic_pure.parquet").filter(
        pl.col("video_id").is_in(pure.videos["video_id"].to_list()))
    assert pure.users.equals(users)
    assert pure.videos.equals(videos)


def test_log_sorted_by_user_and_time_keeping_request_order(pure):
    log = pure.log
    assert log.equals(log.sort(["user_id", "time_ms"], maintain_order=True))
    # rows of one request keep their file order (standard files first, then the random file)
    files = pl.concat([_raw(n) for n in (STD1, STD2, RAND)]).select(
        pl.col("user_id", "video_id", "time_ms").cast(pl.Int64))
    request = files.group_by("user_id", "time_ms").len().filter(pl.col("len") >= 3).sort("user_id", "time_ms").row(0)
    key = (pl.col("user_id") == request[0]) & (pl.col("time_ms") == request[1])
    assert log.filter(key)["video_id"].to_list() == files.filter(key)["video_id"].to_list()


def test_log_ids_consistent_with_side_tables(pure):
    assert pure.log["user_id"].is_in(pure.users["user_id"].to_list()).all()
    assert pure.log["video_id"].is_in(pure.videos["video_id"].to_list()).all()


def test_explicit_version_and_official_archive_layout(tmp_path):
    shutil.copytree(PURE, tmp_path / "KuaiRand-Pure" / "data")
    data = load_kuairand(tmp_path / "KuaiRand-Pure", version="pure")
    assert data.path == tmp_path / "KuaiRand-Pure" / "data" and data.log.height > 0


def test_detects_1k_names(tmp_path):
    out = tmp_path / "k1"
    out.mkdir()
    for p in PURE.iterdir():
        shutil.copy(p, out / p.name.replace("_pure", "_1k"))
    data = load_kuairand(out)
    assert data.version == "1k"
    assert data.log.equals(load_kuairand(PURE).log)


def test_side_tables_are_optional(folder):
    (folder / USERS).unlink()
    (folder / VIDEOS).unlink()
    data = load_kuairand(folder)
    assert data.users is None and data.videos is None and data.log.height > 0


def test_integral_floats_accepted_in_int_columns(folder):
    _edit(folder / STD1, user_id=pl.col("user_id") + ".0", play_time_ms=pl.col("play_time_ms") + ".0")
    assert load_kuairand(folder).log.equals(load_kuairand(PURE).log)


def test_parquet_folder(tmp_path, pure):
    out = write_kuairand_parquet(pure, tmp_path / "pq")
    assert sorted(p.name for p in out.iterdir()) == ["log.parquet", "user_features.parquet",
                                                     "video_features_basic.parquet"]
    back = load_kuairand(out)
    assert back.version == "parquet"
    assert back.log.equals(pure.log) and back.users.equals(pure.users) and back.videos.equals(pure.videos)


def test_parquet_folder_is_normalised(tmp_path, pure):
    out = tmp_path / "pq"
    out.mkdir()
    pure.log.with_columns(pl.col("user_id", "video_id").cast(pl.Int32), pl.col("is_click").cast(pl.Int64)).reverse() \
        .write_parquet(out / "log.parquet")
    back = load_kuairand(out)
    assert back.users is None
    assert back.log.sort(ORDER).equals(pure.log.sort(ORDER))


# --------------------------------------------------------------------------------------------------------- round trip


def test_csv_round_trip_identical(tmp_path, pure):
    out = write_kuairand_csv(pure, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted([STD1, STD2, RAND, USERS, VIDEOS])
    back = load_kuairand(out)
    assert back.version == "pure"
    assert back.log.sort(ORDER).equals(pure.log.sort(ORDER))
    assert back.users.equals(pure.users) and back.videos.equals(pure.videos)
    for name in (STD1, STD2, RAND):  # each row went to the file it came from
        assert pl.read_csv(out / name).sort(ORDER).equals(pl.read_csv(PURE / name).sort(ORDER))


def test_csv_round_trip_27k_parts(tmp_path, pure):
    out = write_kuairand_csv({"log": pure.log, "users": pure.users}, tmp_path / "out27k", version="27k")
    names = kuairand_file_names("27k")
    for name in names["standard_1"] + names["standard_2"] + names["random"] + names["users"]:
        assert (out / name).is_file()
    assert not (out / names["videos"][0]).exists()
    back = load_kuairand(out)
    assert back.version == "27k" and back.videos is None
    assert back.log.sort(ORDER).equals(pure.log.sort(ORDER))


def _simulated_log(rows: list[tuple[int, int, int, int, int]]) -> pl.DataFrame:
    """A valid log from (user, video, day offset from 2022-04-08 (may be negative), ms of day, is_rand)."""
    df = pl.DataFrame(rows, schema=["user_id", "video_id", "day", "ms", "is_rand"], orient="row")
    local = pl.from_epoch(pl.col("time_ms") + 8 * 3_600_000, time_unit="ms")
    return df.with_columns(time_ms=KUAIRAND_START_MS + pl.col("day") * DAY_MS + pl.col("ms")).with_columns(
        date=local.dt.strftime("%Y%m%d").cast(pl.Int64),
        hourmin=local.dt.hour().cast(pl.Int64) * 100 + local.dt.minute().cast(pl.Int64),
        is_click=pl.col("ms") % 2, is_like=0, is_follow=0, is_comment=0, is_forward=0, is_hate=0,
        long_view=pl.col("ms") % 3 == 0, play_time_ms=pl.col("ms") % 100_000, duration_ms=60_000,
        profile_stay_time=0, comment_stay_time=pl.col("ms") % 7, is_profile_enter=0, tab=pl.col("video_id") % 15,
    ).select([pl.col(c).cast(t) for c, t in LOG_COLUMNS.items()])


def test_simulated_dates_outside_the_real_range(tmp_path):
    log = _simulated_log([(0, 1, -40, 5, 0), (0, 2, 13, 6, 0), (1, 3, 14, 7, 0), (1, 4, 90, 8, 0), (2, 5, -3, 9, 1)])
    out = write_kuairand_csv(log, tmp_path / "sim")
    assert pl.read_csv(out / STD1)["video_id"].to_list() == [1, 2]
    assert pl.read_csv(out / STD2)["video_id"].to_list() == [3, 4]
    assert pl.read_csv(out / RAND)["video_id"].to_list() == [5]
    assert load_kuairand(out).log.equals(log)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(-5, 40), st.integers(0, DAY_MS - 1),
                          st.integers(0, 1)), min_size=1, max_size=30))
def test_round_trip_property(tmp_path_factory, rows):
    log = _simulated_log(rows)
    back = load_kuairand(write_kuairand_csv(log, tmp_path_factory.mktemp("rt") / "out")).log
    assert back.sort(ORDER).equals(log.sort(ORDER))


def test_failing_write_leaves_no_partial_output(tmp_path, pure, monkeypatch):
    calls = []
    original = pl.DataFrame.write_csv

    def flaky(self, file=None, **kwargs):
        calls.append(file)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, file, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_csv", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_kuairand_csv(pure, tmp_path / "out")
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_failing_write_keeps_previous_output(tmp_path, pure, monkeypatch):
    out = write_kuairand_csv(pure, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(pl.DataFrame, "write_csv", lambda self, file=None, **kw: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        write_kuairand_csv(pure.log, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_replaces_kuairand_folder_but_not_other_folders(tmp_path, pure):
    out = write_kuairand_csv(pure, tmp_path / "out")
    write_kuairand_csv(pure.log, out)  # a KuaiRand folder may be replaced
    assert not (out / USERS).exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=_match("out", "refusing to replace", "notes.txt")):
        write_kuairand_csv(pure.log, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_write_validates_before_writing(tmp_path, pure):
    bad = pure.log.with_columns(is_click=pl.lit(2, pl.Int8))
    with pytest.raises(DataError, match=_match("log", "column 'is_click'", "must be 0 or 1")):
        write_kuairand_csv(bad, tmp_path / "out")
    with pytest.raises(DataError, match=_match("log", "column 'user_id'", "not found in users")):
        write_kuairand_csv({"log": pure.log, "users": pure.users.head(3)}, tmp_path / "out")
    with pytest.raises(DataError, match=_match("log", "column 'tab'", "missing column")):
        write_kuairand_csv(pure.log.drop("tab"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError):
        write_kuairand_csv([pure.log], tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------ errors


def test_missing_folder_and_no_files(tmp_path):
    with pytest.raises(DataError, match=_match("nowhere", "folder not found")):
        load_kuairand(tmp_path / "nowhere")
    with pytest.raises(DataError, match=_match(str(tmp_path), "no KuaiRand log found")):
        load_kuairand(tmp_path)


def test_missing_log_file(folder):
    (folder / STD2).unlink()
    with pytest.raises(DataError, match=_match(STD2, "file not found")):
        load_kuairand(folder)


def test_wrong_version(folder):
    with pytest.raises(DataError, match=_match("log_standard_4_08_to_4_21_1k.csv", "file not found")):
        load_kuairand(folder, version="1k")
    with pytest.raises(ConfigError, match="unknown KuaiRand version 'big'"):
        load_kuairand(folder, version="big")


def test_ambiguous_versions(folder):
    shutil.copy(folder / RAND, folder / RAND.replace("_pure", "_1k"))
    with pytest.raises(DataError, match="several KuaiRand versions found \\(pure, 1k\\)"):
        load_kuairand(folder)
    assert load_kuairand(folder, version="pure").log.height > 0


def test_missing_column(folder):
    pl.read_csv(folder / STD1, infer_schema=False).drop("tab").write_csv(folder / STD1)
    with pytest.raises(DataError, match=_match(STD1, "column 'tab'", "missing column")):
        load_kuairand(folder)


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("user_id", "abc", "expected an integer, got 'abc' (line 2)"),
    ("is_click", "0.5", "expected an integer, got '0.5' (line 2)"),
    ("tab", "200", "value out of range for Int8: '200' (line 2)"),
    ("is_click", "2", "must be 0 or 1, got 2"),
    ("long_view", "-1", "must be 0 or 1, got -1"),
    ("is_rand", "3", "must be 0 or 1, got 3"),
    ("play_time_ms", "-5", "must be >= 0, got -5"),
    ("comment_stay_time", "-1", "must be >= 0, got -1"),
    ("tab", "15", "must be in [0, 15), got 15"),
    ("tab", "-1", "must be >= 0, got -1"),
    ("time_ms", "", "must not be null"),
])
def test_bad_log_values(folder, column, value, reason):
    _edit(folder / RAND, **{column: _first_row(column, value)})
    with pytest.raises(DataError, match=_match(RAND, f"column '{column}'", reason)):
        load_kuairand(folder)


def test_unknown_user_and_video_ids(folder):
    _edit(folder / STD2, user_id=_first_row("user_id", "999999"))
    with pytest.raises(DataError, match=_match(STD2, "column 'user_id'", "id 999999 not found in " + USERS)):
        load_kuairand(folder)
    shutil.copy(PURE / STD2, folder / STD2)
    _edit(folder / STD1, video_id=_first_row("video_id", "123456"))
    with pytest.raises(DataError, match=_match(STD1, "column 'video_id'", "id 123456 not found in " + VIDEOS)):
        load_kuairand(folder)


def test_bad_side_tables(folder):
    users = pl.read_csv(folder / USERS, infer_schema=False)
    pl.concat([users, users.head(1)]).write_csv(folder / USERS)
    with pytest.raises(DataError, match=_match(USERS, "column 'user_id'", "duplicate id")):
        load_kuairand(folder)
    users.drop("user_id").write_csv(folder / USERS)
    with pytest.raises(DataError, match=_match(USERS, "column 'user_id'", "missing column")):
        load_kuairand(folder)
    users.write_csv(folder / USERS)
    _edit(folder / VIDEOS, video_duration=_first_row("video_duration", "long"))
    with pytest.raises(DataError, match=_match(VIDEOS, "column 'video_duration'", "expected a number, got 'long'")):
        load_kuairand(folder)


def test_empty_log(folder):
    for name in (STD1, STD2, RAND):
        pl.read_csv(folder / name, infer_schema=False).head(0).write_csv(folder / name)
    with pytest.raises(DataError, match=_match(str(folder), "empty log")):
        load_kuairand(folder)


def test_empty_log_file_without_header(folder):
    (folder / RAND).write_text("")
    with pytest.raises(DataError, match=_match(RAND, "empty file")):
        load_kuairand(folder)


def test_parquet_errors(tmp_path, pure):
    out = write_kuairand_parquet(pure, tmp_path / "pq")
    pure.log.drop("is_like").write_parquet(out / "log.parquet")
    with pytest.raises(DataError, match=_match("log.parquet", "column 'is_like'", "missing column")):
        load_kuairand(out)
    pure.log.with_columns(pl.col("play_time_ms").cast(pl.Float64) + 0.5).write_parquet(out / "log.parquet")
    with pytest.raises(DataError, match=_match("log.parquet", "column 'play_time_ms'", "expected an integer")):
        load_kuairand(out)
    pure.log.with_columns(pl.col("duration_ms").cast(pl.String)).write_parquet(out / "log.parquet")
    assert load_kuairand(out).log.equals(pure.log)  # numeric text is accepted, as in CSV


def test_validate_log_directly(pure):
    validate_log(pure.log, users=pure.users, videos=pure.videos)
    with pytest.raises(DataError, match=_match("sim", "empty log")):
        validate_log(pure.log.head(0), path="sim")


# ------------------------------------------------------------------------------------------------------ load_dataset


def test_load_dataset_dispatches():
    assert load_dataset(f"kuairand:{PURE}").version == "pure"
    assert load_dataset(f"movielens:{FIXTURES / 'ml-1m'}").variant == "1m"
    assert load_dataset(f"recbole:{FIXTURES / 'recbole' / 'ml-mini'}").dataset == "ml-mini"


@pytest.mark.parametrize("spec", ["netflix:/data", str(PURE), "", "kuairand:", "kuairand:  "])
def test_load_dataset_bad_spec(spec):
    with pytest.raises(ConfigError, match="kuairand:PATH, movielens:PATH, recbole:PATH"):
        load_dataset(spec)
