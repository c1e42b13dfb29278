"""Dataclass configs: YAML load, ``key=value`` overrides, YAML dump.

Every config in funnelrec is a (possibly nested) dataclass with typed fields. This module turns dicts and YAML
files into such dataclasses, checking every key and value against the field types, and applies command-line
overrides ``a.b.c=value`` (dotted keys reach nested dataclasses and entries of free-form ``dict`` fields).

Values of an override are parsed by the field's type: ``bool`` (true/false/yes/no/on/off/1/0), ``int``, ``float``,
``str`` (taken verbatim), ``None`` (``none``/``null`` where the field is optional), lists (``[1, 2]`` or
``1,2``), ``Literal[...]`` choices; fields without a precise type (``Any``, dict entries) are parsed as a YAML
scalar. An unknown key, a bad value, or an override of a whole mapping (``dict`` or nested dataclass) is a
``ConfigError`` naming the key.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Opt:
    ...     lr: float = 1e-3
    ...     betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    >>> @dataclass
    ... class Run:
    ...     name: str = "x"
    ...     opt: Opt = field(default_factory=Opt)
    ...     extra: dict = field(default_factory=dict)
    >>> cfg = load_config(Run, {"opt": {"lr": 0.01}}, ["opt.betas=[0.8, 0.9]", "extra.depth=3", "name=007"])
    >>> cfg.opt.lr, cfg.opt.betas, cfg.extra, cfg.name
    (0.01, [0.8, 0.9], {'depth': 3}, '007')
    >>> print(to_yaml(cfg), end="")
    name: '007'
    opt:
      lr: 0.01
      betas:
      - 0.8
      - 0.9
    extra:
      depth: 3
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

from funnelrec.errors import ConfigError

T = TypeVar("T")
_MISSING = object()
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


# ---------------------------------------------------------------------------------------------------- types
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass type (string annotations from ``__future__`` included).

    An annotation that cannot be resolved (a class defined in a local scope) falls back to the type of the
    field's default value, or ``Any``."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        pass
    import sys

    module = vars(sys.modules.get(cls.__module__, typing))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = f.type
        if isinstance(tp, str):
            try:
                tp = eval(tp, dict(module), {})  # noqa: S307 - annotations of our own dataclasses
            except Exception:
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                tp = type(default) if default is not None else Any
        out[f.name] = tp
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _optional(tp: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None)."""
    if tp is type(None) or tp is None:
        return True, Any
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(tp))
        return allows_none, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or a parsed override) checked and converted to the annotation ``tp``."""
    if tp is Any or tp is object or isinstance(tp, str):
        return copy.deepcopy(value)
    allows_none, base = _optional(tp)
    if value is None:
        if allows_none or base is Any:
            return None
        raise ConfigError(f"{key}: expected {_type_name(base)}, got null")
    if _is_union(base):  # e.g. int | str: the first member that accepts the value
        for member in typing.get_args(base):
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(base)}, got {value!r}")
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(base) and isinstance(base, type):
        if isinstance(value, base):
            return copy.deepcopy(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {base.__name__} keys, got {value!r}")
        return from_dict(base, value, prefix=f"{key}.")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if base in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(base)
        elem = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else Any
        out = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (base is tuple or origin is tuple) else out
    if base is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(base) or (Any, Any))
        return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(base, type) and not isinstance(value, base):
        raise ConfigError(f"{key}: expected {_type_name(base)}, got {value!r}")
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------------- parsing
def _yaml_scalar(text: str) -> Any:
    """A YAML reading of ``text`` (numbers such as ``1e-3`` included); the raw text where YAML fails."""
    low = text.strip().lower()
    if low in ("none", "null", "~"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if value is not None or text.strip() == "" else text


def parse_value(text: str, tp: Any = Any, current: Any = _MISSING, key: str = "value") -> Any:
    """Parse the override text ``text`` for a field of annotation ``tp`` (or, without one, like ``current``).

    Raises ``ConfigError`` for a mapping-valued field (override its entries one by one instead).
    """
    if tp is Any and current is not _MISSING and current is not None:
        tp = type(current)
    allows_none, base = _optional(tp)
    origin = typing.get_origin(base)
    if (base is dict or origin is dict or (dataclasses.is_dataclass(base) and isinstance(base, type))
            or isinstance(current, dict) or (dataclasses.is_dataclass(current) and current is not _MISSING)):
        raise ConfigError(f"{key}: this key holds a mapping; override its entries one by one (key.sub=value) "
                          "or use a config file")
    low = text.strip().lower()
    if low in ("none", "null", "~") and (allows_none or base is Any):
        return None
    if base is bool:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean, got {text!r}")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if base is str:
        return text
    if base in (list, tuple) or origin in (list, tuple):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                value = yaml.safe_load(stripped)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: expected a list such as [1, 2], got {text!r}") from None
        else:
            value = [_yaml_scalar(v.strip()) for v in stripped.split(",")] if stripped else []
        return _coerce(value, tp, key)
    if origin is Literal:
        choices = typing.get_args(base)
        for c in choices:
            if str(c) == text or (isinstance(c, str) and c.lower() == low):
                return c
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {text!r}")
    return _coerce(_yaml_scalar(text), tp, key)


# ---------------------------------------------------------------------------------------------------- build
def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from a (nested) dict; ``ConfigError`` naming any unknown key or bad
    value (missing keys take their defaults)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ConfigError(f"{cls!r} is not a dataclass type")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key {prefix + str(key)!r} (valid keys: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints.get(key, Any), prefix + key)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {prefix + missing[0]!r}")
    try:
        obj = cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-serialisable) dict of a dataclass instance, fields in declaration order."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise ConfigError(f"expected a dataclass instance, got {type(obj).__name__}")
    return _plain(dataclasses.asdict(obj))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def apply_overrides(obj: T, overrides: Iterable[str] | None) -> T:
    """A copy of the dataclass ``obj`` with ``key=value`` overrides applied (dotted keys reach nested dataclasses
    and entries of ``dict`` fields); each value is parsed by the field's type (see the module doc)."""
    obj = copy.deepcopy(obj)
    for item in overrides or ():
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            _set(obj, parts, text, key)
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
    if hasattr(obj, "validate") and callable(obj.validate):
        obj.validate()
    return obj


def _set(obj: Any, parts: list[str], text: str, key: str) -> None:
    target: Any = obj
    tp: Any = type(obj)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(target) and not isinstance(target, type):
            names = {f.name for f in dataclasses.fields(target)}
            if part not in names:
                raise ConfigError(f"unknown key {here!r} (valid keys: {', '.join(sorted(names))})")
            ftp = _hints(type(target)).get(part, Any)
            if last:
                setattr(target, part, parse_value(text, ftp, getattr(target, part), here))
                return
            target, tp = getattr(target, part), ftp
        elif isinstance(target, dict):
            _, base = _optional(tp)
            kt, vt = typing.get_args(base) or (Any, Any)
            k = _coerce(_yaml_scalar(part), kt, f"{here} key") if kt not in (Any, str) else part
            if last:
                current = target.get(k, _MISSING)
                target[k] = parse_value(text, vt, current, here)
                return
            if k not in target:
                raise ConfigError(f"unknown key {here!r}")
            target, tp = target[k], vt
        else:
            raise ConfigError(f"unknown key {here!r}: {'.'.join(parts[:i])!r} is not a mapping")


def load_config(cls: type[T], path_or_dict: str | Path | dict[str, Any] | T | None = None,
                overrides: Iterable[str] | None = None) -> T:
    """A ``cls`` instance from a YAML file, a dict or an instance (None: the defaults), then ``key=value``
    overrides. Errors name the file and the key."""
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {cls.__name__} keys")
        try:
            obj = from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    elif isinstance(path_or_dict, cls):
        obj = copy.deepcopy(path_or_dict)
    else:
        obj = from_dict(cls, path_or_dict)
    obj = apply_overrides(obj, overrides)
    return obj


def to_yaml(obj: Any) -> str:
    """YAML text of a dataclass instance (or a plain dict), keys in declaration order."""
    data = obj if isinstance(obj, dict) else to_dict(obj)
    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_yaml(obj: Any, path: str | Path) -> Path:
    """Write ``to_yaml(obj)`` to ``path`` atomically."""
    from funnelrec.utils.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(obj))
    return path



def check_positive_ints(config, names, label: str) -> None:
    """``ConfigError`` naming ``label`` and the field unless every field ``names`` of ``config`` is an int >= 1.

    Example:
        >>> from types import SimpleNamespace
        >>> check_positive_ints(SimpleNamespace(steps=3), ["steps"], "train config")
    """
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{label}: {name}={v!r} must be a positive integer")

__all__ = ["apply_overrides", "check_positive_ints", "from_dict", "load_config", "parse_value", "save_yaml", "to_dict",
           "to_yaml"]
