"""Data sources (funnelrec.data.sources): the simulated-world cache, KuaiRand and MovieLens folders, errors."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from funnelrec.data.features import FeatureSpec
from funnelrec.data.schema import LABEL_COLUMNS, LOG_COLUMNS
from funnelrec.data.sources import load_source, sim_cache_folder
from funnelrec.errors import ConfigError, DataError
from funnelrec.sim import World, apply_overrides, profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = "sim:small?num_users=50&days=2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, load_source(TINY, cache_dir=cache, progress=False)


def test_sim_source_is_cached_and_reread_through_the_kuairand_loader(tiny, monkeypatch):
    cache, src = tiny
    cfg = apply_overrides(profile("small"), ["num_users=50", "days=2"])
    folder = sim_cache_folder(cfg, cache)
    assert src.path == folder and folder.parent == cache / "sim" and folder.name.startswith("small-")
    assert (folder / "world.json").is_file() and (folder / "log.parquet").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert src.kind == "sim" and src.tasks == LABEL_COLUMNS and src.positive == "is_click"
    assert src.log.schema == pl.Schema(LOG_COLUMNS) and src.log["user_id"].n_unique() == 50
    # the second load reads the cache: same frames, no simulation
    monkeypatch.setattr(World, "simulate", lambda *a, **k: pytest.fail("simulated again instead of reading the cache"))
    again = load_source(TINY, cache_dir=cache)
    assert again.path == folder
    for name in ("log", "users", "videos", "oracle"):
        assert getattr(again, name).equals(getattr(src, name)), name


def test_sim_source_matches_a_direct_simulation(tiny):
    _, src = tiny
    sim = World(apply_overrides(profile("small"), ["num_users=50", "days=2"])).simulate(progress=False)
    assert src.log.equals(sim.log)
    assert src.oracle.equals(sim.oracle)  # the ground-truth rows stay aligned with the log rows
    # the world is rebuilt from the config, so the oracle API answers
    top = src.world.oracle.topk(src.world.oracle.user_index(torch.tensor(src.log["user_id"][:2].to_list())), k=5)
    assert top.shape == (2, 5)


def test_spec_factory_gives_fresh_unfitted_specs(tiny):
    _, src = tiny
    a, b = src.spec_factory(), src.feature_spec()
    assert isinstance(a, FeatureSpec) and not a.fitted and a is not b
    a.fit(src.users, src.videos)
    assert not b.fitted and a.num_items == src.videos["video_id"].max() + 2


def test_cache_key_follows_the_config(tmp_path, monkeypatch):
    small = profile("small")
    assert sim_cache_folder(small, tmp_path) == sim_cache_folder(profile("small"), tmp_path)
    assert sim_cache_folder(apply_overrides(small, ["days=3"]), tmp_path) != sim_cache_folder(small, tmp_path)
    monkeypatch.setenv("FUNNELREC_CACHE_DIR", str(tmp_path / "env"))
    assert sim_cache_folder(small).parent == tmp_path / "env" / "sim"


def test_a_failed_simulation_leaves_no_cache(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(World, "simulate", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_source("sim:small?num_users=5&days=1", cache_dir=tmp_path)
    assert not (tmp_path / "sim").exists() or not any((tmp_path / "sim").iterdir())


def test_kuairand_source():
    src = load_source(f"kuairand:{FIXTURES / 'kuairand_pure'}")
    assert src.kind == "kuairand" and src.world is None and src.oracle is None
    assert src.tasks == LABEL_COLUMNS and src.log.schema == pl.Schema(LOG_COLUMNS)
    spec = src.spec_factory().fit(src.users, src.videos)
    assert spec.num_user_sparse == 27 and spec.num_item_sparse == 7


def test_kuairand_source_without_side_tables(tmp_path):
    folder = tmp_path / "kr"
    folder.mkdir()
    for f in (FIXTURES / "kuairand_pure").glob("log_*.csv"):
        (folder / f.name).write_bytes(f.read_bytes())
    src = load_source(f"kuairand:{folder}")
    assert src.users.columns == ["user_id"] and src.videos.columns == ["video_id"]
    spec = src.spec_factory().fit(src.users, src.videos)
    assert spec.names("user_sparse") == ["user_id"] and spec.names("item_sparse") == ["video_id"]
    assert not src.spec_factory().fitted  # fields are fresh on every call


def test_movielens_source():
    src = load_source(f"movielens:{FIXTURES / 'ml-100k'}")
    assert src.kind == "movielens" and src.tasks == ("is_click",) and src.positive is None
    assert src.world is None and src.log.schema == pl.Schema(LOG_COLUMNS)
    assert src.spec_factory().names("item_sparse") == ["video_id", "genre_first", "genre_second", "year_bucket"]


@pytest.mark.parametrize("spec, error, message", [
    ("foo:bar", ConfigError, "unknown data source 'foo:bar': expected one of sim:PROFILE"),
    ("no-scheme", ConfigError, "unknown data source"),
    ("sim:", ConfigError, "missing its profile"),
    ("movielens:  ", ConfigError, "missing its path"),
    ("sim:huge", ConfigError, "unknown world profile 'huge'; choose one of small, bench-v1, long"),
    ("sim:small?nope=1", ConfigError, "unknown key 'nope'"),
    ("sim:small?days", ConfigError, "key=value"),
    ("sim:small?days=x", ConfigError, "expected an integer"),
    ("kuairand:/no/such/folder", DataError, "folder not found"),
    ("movielens:/no/such/folder", DataError, "folder not found"),
])
def test_errors_are_one_line(spec, error, message, tmp_path):
    with pytest.raises(error, match=message) as info:
        load_source(spec, cache_dir=tmp_path)
    assert "\n" not in str(info.value)
