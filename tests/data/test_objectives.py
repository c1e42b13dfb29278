import pytest

from funnelrec.data import objectives as obj
from funnelrec.data.schema import LABEL_COLUMNS, LOG_COLUMNS
from funnelrec.errors import ConfigError


def test_builtin_order_and_kinds():
    assert obj.task_names() == ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward")
    assert obj.BINARY_TASKS == obj.task_names()
    assert obj.label_columns() == LABEL_COLUMNS
    assert list(obj.OBJECTIVES)[:7] == [*obj.task_names(), "watch_time"]
    wt = obj.get_objective("watch_time")
    assert (wt.kind, wt.label, wt.scale, wt.direction) == ("regression", "play_time_ms", 0.001, 1)
    assert obj.regression_names() == ("watch_time",)
    for name in obj.task_names():
        o = obj.get_objective(name)
        assert o.kind == "binary" and o.direction == 1 and o.label in LOG_COLUMNS


def test_action_columns():
    assert obj.ACTION_COLUMNS == (*obj.BINARY_TASKS, "is_hate")
    assert all(c in LOG_COLUMNS for c in obj.ACTION_COLUMNS)


def test_unknown_objective_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        obj.get_objective("is_clack")
    assert "is_clack" in str(e.value) and "is_click" in str(e.value) and "watch_time" in str(e.value)


def test_register_and_unregister_extension():
    o = obj.register_objective("is_hate", direction=-1)
    try:
        assert o.label == "is_hate" and o.direction == -1
        assert obj.task_names()[-1] == "is_hate"
        assert obj.task_names()[:6] == obj.BINARY_TASKS  # built-in indices never move
        assert obj.get_objective("is_hate") is o
        with pytest.raises(ConfigError, match="already registered"):
            obj.register_objective("is_hate", direction=-1)
        o2 = obj.register_objective(obj.Objective("is_hate", "is_hate", "binary", -1, 1.0, "x"), replace=True)
        assert obj.get_objective("is_hate") is o2
    finally:
        obj.unregister_objective("is_hate")
    assert "is_hate" not in obj.task_names()
    assert len(obj.OBJECTIVES) == 7


def test_register_regression_extension():
    obj.register_objective("profile_stay_s", "profile_stay_time", kind="regression", scale=0.001)
    try:
        assert obj.regression_names() == ("watch_time", "profile_stay_s")
        assert obj.task_names() == obj.BINARY_TASKS
    finally:
        obj.unregister_objective("profile_stay_s")


def test_builtins_are_protected_and_fields_checked():
    with pytest.raises(ConfigError, match="built in"):
        obj.register_objective("is_click", replace=True)
    with pytest.raises(ConfigError, match="built in"):
        obj.unregister_objective("watch_time")
    with pytest.raises(ConfigError, match="unknown objective"):
        obj.unregister_objective("nope")
    with pytest.raises(ConfigError, match="direction"):
        obj.Objective("x", "x", direction=0)
    with pytest.raises(ConfigError, match="kind"):
        obj.Objective("x", "x", kind="ordinal")
    with pytest.raises(ConfigError, match="scale"):
        obj.Objective("x", "x", scale=0)
