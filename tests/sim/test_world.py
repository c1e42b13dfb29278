"""The simulated world end to end: determinism, the KuaiRand log schema, time columns, writing and reading back,
and the configuration's error handling."""

from __future__ import annotations

import dataclasses
import datetime
import json
import types

import numpy as np
import polars as pl
import pytest

from funnelrec.data.loaders.kuairand import kuairand_file_names, load_kuairand, write_kuairand_csv
from funnelrec.data.schema import BINARY_COLUMNS, DAY_MS, KUAIRAND_START_MS, LOG_COLUMNS, long_view_rule
from funnelrec.errors import ConfigError
from funnelrec.sim import World, apply_overrides, profile
from funnelrec.sim.config import PROFILES
from funnelrec.sim.world import ORACLE_COLUMNS, date_of_day

OVERRIDES = ["num_users=120", "days=2"]
BEIJING = datetime.timezone(datetime.timedelta(hours=8))


@pytest.fixture(scope="module")
def sim():
    return World.from_profile("small", OVERRIDES).simulate(progress=False)


# ------------------------------------------------------------------------------------------------- determinism


def test_same_profile_and_seed_give_identical_logs_and_oracle(sim):
    again = World.from_profile("small", OVERRIDES).simulate(progress=False)
    assert again.log.equals(sim.log)
    assert again.oracle.equals(sim.oracle)
    assert again.questionnaire.equals(sim.questionnaire)
    assert again.users.equals(sim.users)


def test_a_different_seed_changes_the_log(sim):
    other = World.from_profile("small", [*OVERRIDES, "seed=8"]).simulate(progress=False)
    assert other.config.seed == 8 and sim.config.seed == 7
    assert not other.log.equals(sim.log)
    # not just a shuffled copy: the (user, video, time) triples differ
    key = ["user_id", "video_id", "time_ms"]
    assert not other.log.select(key).sort(key).equals(sim.log.select(key).sort(key))


# ------------------------------------------------------------------------------------------------------ schema


def test_log_has_exactly_the_kuairand_schema(sim):
    assert list(sim.log.schema.items()) == list(LOG_COLUMNS.items())
    assert sim.log.height > 1000


def test_binary_columns_are_zero_or_one_and_every_label_occurs(sim):
    for col in BINARY_COLUMNS:
        values = set(sim.log[col].unique().to_list())
        assert values <= {0, 1}, col
    for col in ("is_click", "long_view", "is_like", "is_rand"):
        assert set(sim.log[col].unique().to_list()) == {0, 1}, col


def test_long_view_follows_the_kuairand_rule_and_needs_a_click(sim):
    log = sim.log
    play, dur = log["play_time_ms"].to_numpy(), log["duration_ms"].to_numpy()
    click = log["is_click"].to_numpy() == 1
    expected = click & long_view_rule(play, dur)
    np.testing.assert_array_equal(log["long_view"].to_numpy() == 1, expected)
    assert not ((log["long_view"] == 1) & (log["is_click"] == 0)).any()
    # unclicked impressions play a short part of the first 3 s only
    assert log.filter(pl.col("is_click") == 0)["play_time_ms"].max() <= 3000


def test_counts_and_times_are_non_negative(sim):
    for col in ("play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time", "tab", "video_id"):
        assert sim.log[col].min() >= 0, col
    assert sim.log["duration_ms"].min() > 0


def test_every_simulated_user_appears_in_the_log(sim):
    assert sim.users.height == 120
    assert set(sim.log["user_id"].unique().to_list()) == set(sim.users["user_id"].to_list())
    assert set(sim.log["video_id"].unique().to_list()) <= set(sim.videos["video_id"].to_list())


def test_log_sorted_by_user_then_time_and_requests_in_display_order(sim):
    log = sim.log
    key = log.select("user_id", "time_ms")
    assert key.equals(key.sort("user_id", "time_ms", maintain_order=True))
    m = sim.config.sessions.page_size
    pos_in_log = log.select(pl.int_range(pl.len()).over("user_id", "time_ms").alias("p"))["p"]
    assert pos_in_log.to_list() == sim.oracle["position"].to_list()
    sizes = log.group_by("user_id", "time_ms").len()["len"]
    assert sizes.min() == sizes.max() == m
    assert sim.oracle["position"].max() == m - 1


def test_oracle_table_is_row_aligned_with_valid_probabilities(sim):
    oracle = sim.oracle
    assert oracle.height == sim.log.height
    assert set(ORACLE_COLUMNS) <= set(oracle.columns)
    for col in ("p_click", "p_long_view", "p_like", "p_follow", "p_comment", "p_forward", "p_hate", "p_exam"):
        assert oracle[col].min() >= 0.0 and oracle[col].max() <= 1.0, col
    assert (oracle["p_long_view"] <= oracle["p_click"] + 1e-6).all()
    assert (oracle["p_click"] <= oracle["p_exam"] + 1e-6).all()
    assert oracle["e_play_ms"].min() >= 0
    # the top of every page is always examined; the oracle's exam column starts at 1
    top = oracle.filter(pl.col("position") == 0)["p_exam"]
    assert top.min() == pytest.approx(1.0)
    # one session id per request, and the probabilities carry the log's signal
    per_req = pl.DataFrame({"u": sim.log["user_id"], "t": sim.log["time_ms"], "s": oracle["session_id"]})
    assert per_req.group_by("u", "t").agg(pl.col("s").n_unique())["s"].max() == 1
    clicked = oracle.filter(sim.log["is_click"] == 1)["p_click"].mean()
    unclicked = oracle.filter(sim.log["is_click"] == 0)["p_click"].mean()
    assert clicked > unclicked + 0.05


def test_questionnaire_answers_come_from_clicked_rows(sim):
    q = sim.questionnaire
    assert q.columns == ["user_id", "video_id", "time_ms", "answer"]
    assert set(q["answer"].unique().to_list()) <= {"satisfied", "dissatisfied", "uncertain"}
    joined = q.join(sim.log.select("user_id", "video_id", "time_ms", "is_click"),
                    on=["user_id", "video_id", "time_ms"], how="left")
    assert joined["is_click"].null_count() == 0
    assert (joined["is_click"] == 1).all()


# ------------------------------------------------------------------------------------------------------- times


def test_requests_of_a_user_have_distinct_times_and_sessions_do_not_overlap(sim):
    log, oracle = sim.log, sim.oracle
    req = pl.DataFrame({"u": log["user_id"], "t": log["time_ms"], "s": oracle["session_id"]}).unique()
    assert req.select("u", "t").is_duplicated().sum() == 0
    sessions = (req.group_by("u", "s").agg(pl.col("t").min().alias("start"), pl.col("t").max().alias("end"))
                .sort("u", "start").with_columns(pl.col("end").shift(1).over("u").alias("prev_end")))
    assert sessions.filter(pl.col("start") <= pl.col("prev_end")).height == 0


def test_date_and_hourmin_are_beijing_time_of_time_ms(sim):
    shifted = pl.from_epoch(sim.log["time_ms"] + 8 * 3_600_000, time_unit="ms")
    date = shifted.dt.year().cast(pl.Int64) * 10000 + shifted.dt.month().cast(pl.Int64) * 100 + \
        shifted.dt.day().cast(pl.Int64)
    hourmin = shifted.dt.hour().cast(pl.Int64) * 100 + shifted.dt.minute().cast(pl.Int64)
    assert sim.log["date"].to_list() == date.to_list()
    assert sim.log["hourmin"].to_list() == hourmin.to_list()
    # spot-check against the standard library's time zones
    for row in sim.log.select("time_ms", "date", "hourmin").gather_every(997).iter_rows():
        dt = datetime.datetime.fromtimestamp(row[0] / 1000, tz=BEIJING)
        assert (dt.year * 10000 + dt.month * 100 + dt.day, dt.hour * 100 + dt.minute) == (row[1], row[2])


def test_the_log_starts_on_2022_04_08_and_spans_the_simulated_days(sim):
    assert KUAIRAND_START_MS == int(datetime.datetime(2022, 4, 8, tzinfo=BEIJING).timestamp() * 1000)
    assert sim.log["time_ms"].min() >= KUAIRAND_START_MS
    assert sim.log["date"].min() == 20220408 == date_of_day(0)
    # sessions start inside the 2 simulated days; a late one may run past the last midnight
    assert sim.log["time_ms"].max() < KUAIRAND_START_MS + 2 * DAY_MS + 6 * 3_600_000
    assert set(sim.log["date"].unique().to_list()) <= {20220408, 20220409, 20220410}
    assert {20220408, 20220409} <= set(sim.log["date"].unique().to_list())


# ----------------------------------------------------------------------------------------------- write / read


def test_write_creates_every_file_and_the_loader_reads_the_log_back(sim, tmp_path):
    out = sim.write(tmp_path / "world")
    assert out == tmp_path / "world"
    for name in ("log.parquet", "user_features.parquet", "video_features_basic.parquet", "oracle/oracle.parquet",
                 "oracle/questionnaire.parquet", "world.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "world.json").read_text())
    assert meta["rows"] == sim.log.height and meta["users"] == 120
    assert meta["config"]["seed"] == 7 and meta["config"]["num_users"] == 120
    data = load_kuairand(out)
    assert data.version == "parquet"
    assert data.log.equals(sim.log)
    assert data.users.equals(sim.users)
    assert data.videos.equals(sim.videos)
    assert pl.read_parquet(out / "oracle" / "oracle.parquet").equals(sim.oracle)
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary folder left behind


class _BrokenFrame:
    def write_parquet(self, *args, **kwargs):
        raise OSError("disk full")


def test_a_failed_write_leaves_no_folder(sim, tmp_path):
    broken = dataclasses.replace(sim, extras={"network": _BrokenFrame()})
    with pytest.raises(OSError, match="disk full"):
        broken.write(tmp_path / "world")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_an_existing_folder(sim, tmp_path, monkeypatch):
    sim.write(tmp_path / "world")
    before = sorted(p.name for p in (tmp_path / "world").iterdir())

    def boom(*args, **kwargs):
        raise OSError("no json today")

    monkeypatch.setattr("funnelrec.sim.world.json", types.SimpleNamespace(dumps=boom))
    with pytest.raises(OSError, match="no json today"):
        sim.write(tmp_path / "world")
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


def test_csv_round_trip_gives_identical_tables(sim, tmp_path):
    out = write_kuairand_csv({"log": sim.log, "users": sim.users, "videos": sim.videos}, tmp_path / "csv")
    names = kuairand_file_names("pure")
    for group in names.values():
        for name in group:
            assert (out / name).is_file(), name
    data = load_kuairand(out)
    assert data.version == "pure"
    cols = list(LOG_COLUMNS)
    assert data.log.sort(cols).equals(sim.log.sort(cols))
    assert data.users.equals(sim.users)
    assert data.videos.equals(sim.videos)
    # requests and their (user, time) order survive; random rows land in the random file
    key = data.log.select("user_id", "time_ms")
    assert key.equals(sim.log.select("user_id", "time_ms"))
    random_file = pl.read_csv(out / names["random"][0])
    assert random_file.height == int(sim.log["is_rand"].sum()) > 0


def test_csv_round_trip_order_within_requests(sim, tmp_path):
    """The official file set keeps random rows in their own file, so within a request they come back after the
    standard rows (each group in its original order); everything else is exactly the input."""
    out = write_kuairand_csv({"log": sim.log, "users": sim.users, "videos": sim.videos}, tmp_path / "csv")
    expected = sim.log.sort(["user_id", "time_ms", "is_rand"], maintain_order=True)
    assert load_kuairand(out).log.equals(expected)


# ------------------------------------------------------------------------------------------------------ config


def test_overrides_apply_to_nested_keys_and_keep_the_profile():
    cfg = apply_overrides(profile("small"), ["interests.long_term_enabled=off", "days=2", "logging.random_share=0",
                                             "sessions.page_size=4", "num_users=none", "catalog.num_items=9000"])
    assert cfg.interests.long_term_enabled is False
    assert (cfg.days, cfg.logging.random_share, cfg.sessions.page_size) == (2, 0.0, 4)
    assert cfg.num_users is None and cfg.catalog.num_items == 9000
    assert cfg.name == "small" and cfg.seed == 7
    assert profile("small").days == 4  # the profile itself is not modified
    assert profile("sim:small").name == "small"


@pytest.mark.parametrize("override, key", [
    ("nope=1", "nope"),
    ("interests.nope=1", "interests.nope"),
    ("days.x=1", "days.x"),
    ("lists.cascade=false", "lists.cascade"),
])
def test_unknown_override_key_is_a_config_error_naming_it(override, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        apply_overrides(profile("small"), [override])
    with pytest.raises(ConfigError, match="unknown key"):
        World.from_profile("small", [override])


@pytest.mark.parametrize("override, what", [
    ("days=abc", "integer"),
    ("days=1.5", "integer"),
    ("seed=true", "integer"),
    ("interests.long_term_enabled=maybe", "boolean"),
    ("logging.random_share=lots", "number"),
    ("days", "key=value"),
])
def test_bad_override_values_are_config_errors(override, what):
    with pytest.raises(ConfigError, match=what) as info:
        apply_overrides(profile("small"), [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("days=-1", "days"),
    ("days=0", "days"),
    ("logging.random_share=1.5", "logging.random_share"),
    ("logging.random_share=-0.1", "logging.random_share"),
    ("sessions.page_size=0", "sessions.page_size"),
    ("sessions.page_size=65", "sessions.page_size"),
    ("num_users=0", "num_users"),
    ("activity.scale=0", "activity.scale"),
    ("extensions.questionnaire_rate=2", "extensions.questionnaire_rate"),
])
def test_out_of_range_values_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(profile("small"), [override])


def test_too_few_policy_candidates_for_a_page_is_a_config_error():
    with pytest.raises(ConfigError, match="num_popular"):
        apply_overrides(profile("small"), ["logging.num_popular=2", "logging.num_interest=3"])


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(ConfigError) as info:
        profile("huge")
    for name in PROFILES:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="huge"):
        World.from_profile("huge")


def test_simulate_rejects_zero_days():
    world = World.from_profile("small", ["num_users=5", "days=1"])
    with pytest.raises(ConfigError, match="days"):
        world.simulate(days=0, progress=False)


@pytest.mark.parametrize("override", ["tabs=1", "catalog=3", "activity.sessions_per_day=5"])
def test_overrides_of_non_scalar_keys_are_config_errors(override):
    with pytest.raises(ConfigError):
        apply_overrides(profile("small"), [override])


def test_sessions_do_not_overlap_across_midnight(monkeypatch):
    import torch

    import funnelrec.sim.world as world_mod

    hours = torch.zeros(24)
    hours[23] = hours[0] = 1.0  # every session starts in the hour before or after midnight
    monkeypatch.setattr(world_mod, "HOUR_WEIGHTS", hours)
    sim = World.from_profile("small", ["num_users=200", "days=3", "sessions.leave_bias=-6",
                                       "sessions.max_pages=30"]).simulate(progress=False)
    req = pl.DataFrame({"u": sim.log["user_id"], "t": sim.log["time_ms"], "s": sim.oracle["session_id"]})
    sessions = (req.group_by("u", "s").agg(pl.col("t").min().alias("start"), pl.col("t").max().alias("end"))
                .sort("u", "start").with_columns(pl.col("end").shift(1).over("u").alias("prev_end")))
    assert sessions.filter(pl.col("start") <= pl.col("prev_end")).height == 0
