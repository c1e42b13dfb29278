"""Dataclass configs: YAML loading, key=value overrides, errors that name the key, YAML round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from funnelrec.config import apply_overrides, from_dict, load_config, parse_value, save_yaml, to_dict, to_yaml
from funnelrec.errors import ConfigError
from funnelrec.sim.config import profile
from funnelrec.sim.config import WorldConfig
from funnelrec.train.config import RunConfig, TrainConfig


@dataclass
class Inner:
    width: int = 4
    rate: float = 0.5
    tags: list[str] = field(default_factory=lambda: ["a"])
    sizes: list[int] = field(default_factory=lambda: [8, 4])


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    limit: int | None = None
    mode: Literal["fast", "slow"] = "fast"
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)
    table: dict[int, float] = field(default_factory=lambda: {1: 0.5})


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Outer(), ["name=123", "flag=yes", "limit=7", "mode=slow", "inner.width=9",
                                    "inner.rate=1e-3", "inner.sizes=[16, 8, 2]", "inner.tags=b,c",
                                    "extra.depth=3", "extra.act=relu", "extra.drop=0.1", "extra.none=null",
                                    "table.2=0.25"])
    assert cfg.name == "123" and cfg.flag is True and cfg.limit == 7 and cfg.mode == "slow"
    assert cfg.inner.width == 9 and cfg.inner.rate == 1e-3 and cfg.inner.sizes == [16, 8, 2]
    assert cfg.inner.tags == ["b", "c"]
    assert cfg.extra == {"depth": 3, "act": "relu", "drop": 0.1, "none": None}
    assert cfg.table == {1: 0.5, 2: 0.25}
    assert apply_overrides(cfg, ["limit=none"]).limit is None
    assert Outer().inner.width == 4  # the input is never modified


@pytest.mark.parametrize("override, needle", [
    ("nope=1", "'nope'"),
    ("inner.nope=1", "'inner.nope'"),
    ("name.sub=1", "'name.sub'"),
    ("flag=maybe", "boolean"),
    ("inner.width=2.5", "integer"),
    ("inner.rate=fast", "number"),
    ("inner.sizes=[1, x]", "inner.sizes"),
    ("mode=medium", "fast"),
    ("limit=", "integer"),
    ("inner=3", "mapping"),
    ("extra=3", "mapping"),
    ("table=3", "mapping"),
    ("width", "key=value"),
    ("=3", "empty key"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Outer(), [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_from_dict_checks_keys_and_types():
    cfg = from_dict(Outer, {"inner": {"width": 3, "rate": 1}, "limit": None, "extra": {"k": [1, 2]}})
    assert cfg.inner.width == 3 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    with pytest.raises(ConfigError, match="'inner.depth'"):
        from_dict(Outer, {"inner": {"depth": 3}})
    with pytest.raises(ConfigError, match="inner.width: expected an integer"):
        from_dict(Outer, {"inner": {"width": "3"}})
    with pytest.raises(ConfigError, match="flag: expected a boolean"):
        from_dict(Outer, {"flag": 1})
    with pytest.raises(ConfigError, match="inner: expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = load_config(RunConfig, None, ["data=sim:small?num_users=100&days=3", "train.epochs=4",
                                        "model_args.bottom=[64, 32]", "train.sparse_lr=0.05"])
    path = save_yaml(cfg, tmp_path / "run.yaml")
    back = load_config(RunConfig, path)
    assert back == cfg and back.model_args == {"bottom": [64, 32]} and back.data.endswith("days=3")
    assert to_yaml(back) == to_yaml(cfg) and to_dict(back)["train"]["epochs"] == 4
    assert load_config(RunConfig, path, ["train.lr=0.1"]).train.lr == 0.1

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(RunConfig, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config(RunConfig, bad)
    bad.write_text("train:\n  epoks: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.epoks'"):
        load_config(RunConfig, bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(RunConfig, tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, needle", [
    ("train.epochs=0", "train.epochs"),
    ("train.embedding_optimizer=sgd", "embedding_optimizer"),
    ("train.metric_mode=up", "metric_mode"),
    ("train.clip_norm=-1", "clip_norm"),
    ("train.run_name=a/b", "run_name"),
    ("stage=fusion", "stage"),
])
def test_train_configs_validate(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, None, [override])


def test_world_configs_work_with_the_generic_machinery():
    cfg = apply_overrides(profile("small"), ["interests.long_term_enabled=false", "days=2", "num_users=none"])
    assert cfg.interests.long_term_enabled is False and cfg.days == 2 and cfg.num_users is None
    with pytest.raises(ConfigError, match="mapping"):
        apply_overrides(profile("small"), ["tabs=3"])
    with pytest.raises(ConfigError, match="out of range"):  # WorldConfig.validate runs after overrides
        apply_overrides(profile("small"), ["days=0"])
    assert load_config(WorldConfig, profile("small").to_dict()) == profile("small")


def test_parse_value_without_a_type_follows_the_current_value():
    assert parse_value("3", current=1.5) == 3.0 and isinstance(parse_value("3", current=1.5), float)
    assert parse_value("off", current=True) is False
    assert parse_value("[1, 2]") == [1, 2] and parse_value("abc") == "abc" and parse_value("null") is None
    assert TrainConfig().validate().epochs == 3
