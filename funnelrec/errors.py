"""Errors raised on bad input.

Every message is one line and names what is wrong: the file, the column or field, and the offending value or id,
so a user can fix the input without reading a traceback.
"""

from __future__ import annotations


class FunnelrecError(Exception):
    """Base class of every error funnelrec raises on purpose."""


class DataError(FunnelrecError, ValueError):
    """Bad input data: a missing file or column, a wrong dtype, an id out of range, an empty table.

    Args:
        message: what is wrong.
        path: the file (or table name) the problem is in, if any.
        column: the column or field the problem is in, if any.

    Example:
        >>> str(DataError("expected an integer dtype, got str", path="log.csv", column="user_id"))
        "log.csv: column 'user_id': expected an integer dtype, got str"
    """

    def __init__(self, message: str, *, path: object | None = None, column: str | None = None):
        self.path = None if path is None else str(path)
        self.column = column
        self.reason = message
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if column is not None:
            parts.append(f"column {column!r}")
        parts.append(message)
        super().__init__(": ".join(parts))


class ConfigError(FunnelrecError, ValueError):
    """A bad configuration value (unknown key, wrong type, negative size, unknown profile)."""
