"""``FeatureTables``: the featurised user and item tables, looked up by raw id — shared by training and serving.

A fitted ``FeatureSpec`` turns the user and video tables into dense lookup tensors once; ``RequestDataset`` (training,
offline evaluation) and the serving cascade both take their user and candidate features from this one object, so a
request is featurised identically on both paths (the cascade's replay test checks it end to end).

Each table has one extra all-zero row at its end: the row of an unknown id (a cold-start user, padding
candidates). Zero is the "unknown / out of vocabulary" index of every sparse field and the training mean of every
standardised dense feature.

Example:
    >>> import polars as pl
    >>> from funnelrec.data.features import FeatureSpec
    >>> from funnelrec.assets import load_kuairand_pure                               # doctest: +SKIP
    >>> tables = FeatureTables(users, videos, spec)                                    # doctest: +SKIP
    >>> rows, known = tables.user_rows([0, 10**9], allow_unknown=True)                 # doctest: +SKIP
    >>> known.tolist()                                                                 # doctest: +SKIP
    [True, False]
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.features import FeatureSpec
from funnelrec.errors import ConfigError, DataError

__all__ = ["FeatureTables", "table_rows"]


def _sorted_keys(table_keys: np.ndarray, table: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(table_keys, kind="stable")
    sorted_keys = table_keys[order]
    if len(sorted_keys) == 0:
        raise DataError("empty table", path=table)
    if len(sorted_keys) > 1 and (dup := np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])).size:
        raise DataError(f"duplicate ids in the {table} table, e.g. {int(sorted_keys[dup[0]])}", path=table,
                        column=column)
    return order, sorted_keys


def table_rows(keys: np.ndarray, table_keys: np.ndarray, *, table: str, column: str,
               allow_unknown: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row of ``table_keys`` holding each of ``keys``, and whether it was found.

    Args:
        keys: [Q] ids to look up.
        table_keys: [R] the table's ids (unique).
        table, column: named in errors.
        allow_unknown: map unknown ids to row ``R`` (the zero row) instead of raising ``DataError``.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    order, sorted_keys = _sorted_keys(np.asarray(table_keys, dtype=np.int64), table, column)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    found = sorted_keys[pos] == keys
    if not found.all() and not allow_unknown:
        missing = np.unique(keys[~found])
        raise DataError(f"{len(missing)} id(s) of the log are not in the {table} table, e.g. "
                        f"{missing[:5].tolist()}", path="log", column=column)
    return np.where(found, order[pos], len(sorted_keys)), found


class FeatureTables:
    """User and item feature rows of a fitted spec (see the module doc).

    Args:
        users_df: user table (``user_id`` unique).
        videos_df: video table (``video_id`` unique).
        spec: a fitted ``FeatureSpec``.

    Attributes:
        user_sparse: [U + 1, Fu] int64; user_dense: [U + 1, Du] float32 (last row: unknown user).
        item_sparse: [I + 1, Fi] int64; item_dense: [I + 1, Di] float32 (last row: unknown / padding item).
        user_keys: [U] user ids of the rows; video_keys: [I] video ids of the rows.
    """

    def __init__(self, users_df: pl.DataFrame, videos_df: pl.DataFrame, spec: FeatureSpec):
        if not isinstance(spec, FeatureSpec) or not spec.fitted:
            raise ConfigError("spec must be a fitted FeatureSpec (call FeatureSpec.fit first)")
        for name, df, key in (("users", users_df, "user_id"), ("videos", videos_df, "video_id")):
            if not isinstance(df, pl.DataFrame):
                raise DataError(f"expected a polars DataFrame, got {type(df).__name__}", path=name)
            if key not in df.columns:
                raise DataError("missing key column", path=name, column=key)
        self.spec = spec

        def with_zero_row(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.concatenate([a, np.zeros((1, a.shape[1]), dtype=a.dtype)]))

        self.user_sparse = with_zero_row(spec.transform_users(users_df))
        self.user_dense = with_zero_row(spec.transform_users_dense(users_df))
        self.item_sparse = with_zero_row(spec.transform_items(videos_df))
        self.item_dense = with_zero_row(spec.transform_items_dense(videos_df))
        self.user_keys = users_df.get_column("user_id").cast(pl.Int64).to_numpy()
        self.video_keys = videos_df.get_column("video_id").cast(pl.Int64).to_numpy()
        _sorted_keys(self.user_keys, "users", "user_id")  # fail early on duplicate ids
        _sorted_keys(self.video_keys, "videos", "video_id")

    @property
    def unknown_user_row(self) -> int:
        return len(self.user_keys)

    @property
    def unknown_item_row(self) -> int:
        return len(self.video_keys)

    def user_rows(self, user_ids, allow_unknown: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """([Q] table rows, [Q] known) of raw user ids (unknown → the zero row when ``allow_unknown``)."""
        return table_rows(user_ids, self.user_keys, table="users", column="user_id", allow_unknown=allow_unknown)

    def item_rows(self, video_ids, allow_unknown: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """([Q] table rows, [Q] known) of raw video ids."""
        return table_rows(video_ids, self.video_keys, table="videos", column="video_id",
                          allow_unknown=allow_unknown)

    def user_features(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(user_sparse [B, Fu], user_dense [B, Du]) of table rows [B]."""
        return self.user_sparse.index_select(0, rows), self.user_dense.index_select(0, rows)

    def item_features(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(cand_sparse [..., Fi], cand_dense [..., Di]) of table rows of any shape."""
        flat = rows.reshape(-1)
        sparse = self.item_sparse.index_select(0, flat).view(*rows.shape, -1)
        dense = self.item_dense.index_select(0, flat).view(*rows.shape, -1)
        return sparse, dense
