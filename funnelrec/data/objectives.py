"""The objective registry: which log columns are learned, how, and in which direction fusion should push them.

The classification *tasks* of every multi-task ranker are the binary objectives of the registry, in registration
order. The built-in registry holds KuaiRand's six binary feedback signals, in this order::

    is_click, long_view, is_like, is_follow, is_comment, is_forward

followed by the regression objective ``watch_time`` (``play_time_ms`` in seconds). ``labels[..., t]`` of a
``RequestBatch`` is the label of ``task_names()[t]``.

Extensions are registered at run time (for example the negative signal ``is_hate`` with ``direction=-1``), which
appends them to ``task_names()``; ``BINARY_TASKS`` stays the built-in six.

History action channels (``RequestBatch.hist_actions[..., a]``) are fixed and independent of the registry:
``ACTION_COLUMNS`` = the six built-in task labels followed by ``is_hate``.

Example:
    >>> task_names()
    ('is_click', 'long_view', 'is_like', 'is_follow', 'is_comment', 'is_forward')
    >>> get_objective("watch_time").scale
    0.001
    >>> ACTION_COLUMNS[-1]
    'is_hate'
"""

from __future__ import annotations

from dataclasses import dataclass

from funnelrec.errors import ConfigError

_KINDS = ("binary", "regression")


@dataclass(frozen=True)
class Objective:
    """One learnable objective.

    Args:
        name: registry key (for binary tasks usually the label column itself).
        label: the log column holding the label.
        kind: ``"binary"`` (a 0/1 label, a classification task) or ``"regression"``.
        direction: +1 if more is better for the user/platform, -1 if less is better (used by score fusion).
        scale: the label is ``column * scale`` (``watch_time``: milliseconds → seconds).
        description: one line for reports.
    """

    name: str
    label: str
    kind: str = "binary"
    direction: int = 1
    scale: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"objective name must be a non-empty string, got {self.name!r}")
        if self.kind not in _KINDS:
            raise ConfigError(f"objective {self.name!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        if self.direction not in (1, -1):
            raise ConfigError(f"objective {self.name!r}: direction must be +1 or -1, got {self.direction!r}")
        if not (self.scale > 0):
            raise ConfigError(f"objective {self.name!r}: scale must be > 0, got {self.scale!r}")


_BUILTIN: tuple[Objective, ...] = (
    Objective("is_click", "is_click", "binary", 1, 1.0, "click (two-column UI) / valid play (single-column UI)"),
    Objective("long_view", "long_view", "binary", 1, 1.0, "play ≥ min(duration, 18 s)"),
    Objective("is_like", "is_like", "binary", 1, 1.0, "like"),
    Objective("is_follow", "is_follow", "binary", 1, 1.0, "follow the author"),
    Objective("is_comment", "is_comment", "binary", 1, 1.0, "comment"),
    Objective("is_forward", "is_forward", "binary", 1, 1.0, "forward / share"),
    Objective("watch_time", "play_time_ms", "regression", 1, 0.001, "play time in seconds"),
)

#: The registry, in registration order (built-ins first). Use the functions below rather than mutating it.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in _BUILTIN}

#: The six built-in binary tasks, in label order (does not change when objectives are registered).
BINARY_TASKS: tuple[str, ...] = tuple(o.name for o in _BUILTIN if o.kind == "binary")

#: History action channels (``hist_actions[..., a]``): the six built-in task labels, then ``is_hate``.
ACTION_COLUMNS: tuple[str, ...] = tuple(o.label for o in _BUILTIN if o.kind == "binary") + ("is_hate",)


def task_names() -> tuple[str, ...]:
    """Names of every registered binary objective, in registration order (the T axis of ``labels``)."""
    return tuple(o.name for o in OBJECTIVES.values() if o.kind == "binary")


def regression_names() -> tuple[str, ...]:
    """Names of every registered regression objective."""
    return tuple(o.name for o in OBJECTIVES.values() if o.kind == "regression")


def get_objective(name: str) -> Objective:
    """The objective registered as ``name``; ``ConfigError`` listing the valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}") from None


def label_columns(names=None) -> tuple[str, ...]:
    """Log columns of the objectives ``names`` (default: ``task_names()``)."""
    names = task_names() if names is None else tuple(names)
    return tuple(get_objective(n).label for n in names)


def register_objective(
    name: str | Objective, label: str | None = None, kind: str = "binary", direction: int = 1, scale: float = 1.0,
    description: str = "", *, replace: bool = False,
) -> Objective:
    """Add an objective to the registry (appended, so built-in task indices never move) and return it.

    Pass either an ``Objective`` or its fields (``label`` defaults to ``name``). Registering an existing name raises
    ``ConfigError`` unless ``replace=True``; built-in objectives can never be replaced.

    Example:
        >>> o = register_objective("is_hate", direction=-1)
        >>> task_names()[-1], o.direction
        ('is_hate', -1)
        >>> unregister_objective("is_hate")
    """
    obj = name if isinstance(name, Objective) else Objective(
        name, label if label is not None else name, kind, direction, scale, description)
    if obj.name in OBJECTIVES:
        if obj.name in {o.name for o in _BUILTIN}:
            raise ConfigError(f"objective {obj.name!r} is built in and cannot be replaced")
        if not replace:
            raise ConfigError(f"objective {obj.name!r} is already registered (pass replace=True to replace it)")
    OBJECTIVES[obj.name] = obj
    return obj


def unregister_objective(name: str) -> None:
    """Remove a registered extension (built-in objectives cannot be removed)."""
    if name in {o.name for o in _BUILTIN}:
        raise ConfigError(f"objective {name!r} is built in and cannot be removed")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
    del OBJECTIVES[name]
