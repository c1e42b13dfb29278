"""The feature spec: which user and item columns become model inputs, and how raw values map to indices.

Every sparse feature is an integer *index* into an embedding table of ``vocab_size`` rows, where **index 0 means
padding or unknown** (out of vocabulary, null, below ``min_freq``), so ``nn.Embedding(field.vocab_size, D)`` applies
directly. A sparse field is encoded in one of three ways (``FeatureField.encoding``):

* ``"id"`` — a dense integer id space: ``index = value + 1`` for ``0 <= value <= max_id`` (fitted on the table),
  else 0; ``vocab_size = max_id + 2``. Used for ``user_id`` and ``video_id``.
* ``"vocab"`` — a dense vocabulary of the values seen at least ``min_freq`` times (most frequent first,
  ties by value), indices ``1..K``; ``vocab_size = K + 1``.
* ``"hash"`` — ``1 + splitmix64(value ^ salt(field)) mod hash_buckets`` (deterministic across runs and machines;
  strings are first hashed with BLAKE2b); ``vocab_size = hash_buckets + 1``.
* ``"auto"`` — ``"vocab"`` unless the column has more than ``hash_threshold`` distinct values, then ``"hash"``.

**Item-index convention**: the item index of a video is ``video_id + 1`` (index 0 stays padding). It is field 0
of ``cand_sparse`` and the value of ``cand_items`` / ``hist_items``; see ``item_index`` and ``video_id``.

Dense features are transformed (``"log1p"``, ``"ratio"`` or ``"identity"``, after multiplying by ``scale``) and then
standardised with a mean and standard deviation fitted on the training data; nulls and non-finite values become 0
(the mean) after standardisation.

Default KuaiRand spec (``FeatureSpec()`` / ``FeatureSpec.kuairand()``):

* user sparse (Fu = 27): ``user_id`` (id), ``user_active_degree``, ``is_lowactive_period``, ``is_live_streamer``,
  ``is_video_author``, ``follow_user_num_range``, ``fans_user_num_range``, ``friend_user_num_range``,
  ``register_days_range``, ``onehot_feat0`` … ``onehot_feat17`` (vocab; nulls → 0)
* user dense (Du = 4): ``log_follow_user_num``, ``log_fans_user_num``, ``log_friend_user_num``,
  ``log_register_days`` (log1p, z-scored)
* item sparse (Fi = 7): ``video_id`` (id), ``author_id`` (auto: vocab or hash), ``video_type``, ``upload_type``,
  ``music_type``, ``tag_first``, ``tag_second`` (first / second comma-separated token of ``tag``)
* item dense (Di = 2): ``log_duration_s`` (log1p of ``video_duration`` in seconds), ``aspect_ratio``
  (``server_width / server_height``), z-scored

Example:
    >>> import polars as pl
    >>> users = pl.DataFrame({"user_id": [0, 1, 2], "user_active_degree": ["full_active", "full_active", "x"]})
    >>> spec = FeatureSpec(user_sparse=[FeatureField("user_id", encoding="id"),
    ...                                 FeatureField("user_active_degree", min_freq=2)],
    ...                    user_dense=[], item_sparse=[], item_dense=[])
    >>> spec = spec.fit(users, None)
    >>> spec.transform_users(users).tolist()
    [[1, 1], [2, 1], [3, 0]]
    >>> int(item_index(41)), int(video_id(42))
    (42, 41)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from funnelrec.errors import ConfigError, DataError

#: Hash buckets of a hashed field when none is configured.
DEFAULT_HASH_BUCKETS = 1 << 18
#: ``"auto"`` fields with more distinct values than this are hashed.
DEFAULT_HASH_THRESHOLD = 100_000

_KINDS = ("sparse", "dense", "sequence")
_ENCODINGS = ("id", "vocab", "hash", "auto")
_TRANSFORMS = ("identity", "log1p", "ratio")
_SPEC_VERSION = 1


# --------------------------------------------------------------------------------------------- item index
def item_index(video_ids):
    """Item index of raw video ids: ``video_id + 1`` (0 is padding). Works on ints, numpy arrays and tensors."""
    return video_ids + 1


def video_id(item_index):
    """Raw video id of item indices: ``item_index - 1`` (padding 0 gives -1)."""
    return item_index - 1


# --------------------------------------------------------------------------------------------- hashing
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x) -> np.ndarray:
    """The splitmix64 finaliser on int64/uint64 values (numpy, wrapping arithmetic): a deterministic 64-bit hash."""
    z = np.asarray(x)
    if z.dtype != np.uint64:
        z = z.astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _salt(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))


def _string_keys(values: pl.Series) -> np.ndarray:
    """uint64 keys of strings (BLAKE2b of each distinct value; the loop runs over distinct values only)."""
    uniq = values.drop_nulls().unique()
    keys = np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
                     for v in uniq.to_list()], dtype=np.uint64)
    idx = values.replace_strict(uniq, pl.arange(0, len(uniq), eager=True), default=0, return_dtype=pl.Int64)
    return keys[idx.to_numpy()] if len(keys) else np.zeros(len(values), dtype=np.uint64)


def hash_index(values: pl.Series, buckets: int, salt: str = "") -> np.ndarray:
    """``1 + hash(value) mod buckets`` as int64 (nulls → 0). Integers hash with splitmix64, strings with BLAKE2b."""
    if buckets < 1:
        raise ConfigError(f"hash_buckets must be >= 1, got {buckets}")
    null = values.is_null().to_numpy()
    if values.dtype.is_integer():
        keys = values.fill_null(0).cast(pl.Int64).to_numpy().view(np.uint64)
    else:
        keys = _string_keys(values.cast(pl.String))
    with np.errstate(over="ignore"):
        h = splitmix64(keys ^ _salt(salt))
    out = (h % np.uint64(buckets)).astype(np.int64) + 1
    out[null] = 0
    return out


# --------------------------------------------------------------------------------------------- fields
def _canonical(s: pl.Series) -> pl.Series:
    """Values as comparable keys: integral floats become Int64 (9.0 → 9), NaN → null, other types stay or → String."""
    if s.dtype.is_float():
        s = s.fill_nan(None)
        integral = (s.is_finite() & (s == s.round())).fill_null(True)
        if bool(integral.all()):
            return s.cast(pl.Int64, strict=False)
        frame = pl.DataFrame({"s": s, "i": integral})
        return frame.select(pl.when(pl.col("i")).then(pl.col("s").cast(pl.Int64, strict=False).cast(pl.String))
                            .otherwise(pl.col("s").cast(pl.String))).to_series().alias(s.name)
    if s.dtype == pl.Boolean:
        return s.cast(pl.Int64)
    if s.dtype.is_integer():
        return s.cast(pl.Int64)
    if s.dtype == pl.String:
        return s
    return s.cast(pl.String)


@dataclass
class FeatureField:
    """One model input column.

    Args:
        name: feature name (unique within the spec).
        kind: ``"sparse"`` (an index), ``"dense"`` (a float), or ``"sequence"`` (reserved for history features,
            which ``funnelrec.data.timeline`` builds; not valid in the spec's user/item groups).
        source: the table column it is computed from (default: ``name``).
        vocab_size: embedding rows including index 0 (set by ``fit`` for sparse fields; 0 for dense).
        embedding_dim: suggested embedding width.
        hash_buckets: buckets of a hashed field (default ``DEFAULT_HASH_BUCKETS`` when hashing).
        min_freq: values seen fewer times than this map to index 0 (vocab encoding).
        encoding: sparse encoding, one of ``"id"``, ``"vocab"``, ``"hash"``, ``"auto"`` (see the module doc).
        split_index: for a comma-separated string column (``tag``), use its ``split_index``-th token.
        transform: dense transform before standardisation: ``"identity"``, ``"log1p"`` or ``"ratio"``.
        scale: dense values are multiplied by this first (e.g. 0.001 for ms → s).
        denominator: the denominator column of a ``"ratio"`` transform.
        standardize: z-score dense values with the fitted ``mean`` / ``std``.

    Fitted state (set by ``FeatureSpec.fit``): ``method`` (the resolved encoding), ``vocab`` (values in index
    order 1..K, as JSON scalars), ``max_id``, ``mean``, ``std``.
    """

    name: str
    kind: str = "sparse"
    source: str = ""
    vocab_size: int = 0
    embedding_dim: int = 16
    hash_buckets: int | None = None
    min_freq: int = 1
    encoding: str = "vocab"
    split_index: int | None = None
    transform: str = "identity"
    scale: float = 1.0
    denominator: str | None = None
    standardize: bool = True
    method: str | None = None
    vocab: list | None = None
    max_id: int | None = None
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.source:
            self.source = self.name
        if self.kind not in _KINDS:
            raise ConfigError(f"feature {self.name!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        if self.encoding not in _ENCODINGS:
            raise ConfigError(f"feature {self.name!r}: encoding must be one of {_ENCODINGS}, got {self.encoding!r}")
        if self.transform not in _TRANSFORMS:
            raise ConfigError(f"feature {self.name!r}: transform must be one of {_TRANSFORMS}, got {self.transform!r}")
        if self.transform == "ratio" and not self.denominator:
            raise ConfigError(f"feature {self.name!r}: a 'ratio' transform needs a denominator column")
        if self.min_freq < 1:
            raise ConfigError(f"feature {self.name!r}: min_freq must be >= 1, got {self.min_freq}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ConfigError(f"feature {self.name!r}: hash_buckets must be >= 1, got {self.hash_buckets}")

    @property
    def fitted(self) -> bool:
        return self.method is not None

    @property
    def columns(self) -> tuple[str, ...]:
        """Table columns this field reads."""
        return (self.source,) + ((self.denominator,) if self.kind == "dense" and self.transform == "ratio" else ())

    # ------------------------------------------------------------------ raw values
    def _column(self, df: pl.DataFrame, col: str, table: str) -> pl.Series:
        if col not in df.columns:
            raise DataError(f"missing column needed by feature {self.name!r}", path=table, column=col)
        return df.get_column(col)

    def _sparse_raw(self, df: pl.DataFrame, table: str) -> pl.Series:
        s = self._column(df, self.source, table)
        if self.split_index is not None:
            s = s.cast(pl.String).str.split(",").list.get(self.split_index, null_on_oob=True).str.strip_chars()
            s = s.replace("", None)
        return _canonical(s)

    def _dense_raw(self, df: pl.DataFrame, table: str) -> np.ndarray:
        s = self._column(df, self.source, table)
        try:
            x = s.cast(pl.Float64).fill_null(np.nan).to_numpy().astype(np.float64) * self.scale
        except Exception as e:  # noqa: BLE001 - wrong dtype
            raise DataError(f"expected a numeric column for dense feature {self.name!r} ({e})", path=table,
                            column=self.source) from None
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.transform == "log1p":
                x = np.log1p(np.where(x >= 0, x, np.nan))
            elif self.transform == "ratio":
                d = self._column(df, self.denominator, table).cast(pl.Float64).fill_null(np.nan).to_numpy()
                x = np.where(d > 0, x / np.where(d > 0, d, 1.0), np.nan)
        x[~np.isfinite(x)] = np.nan
        return x

    # ------------------------------------------------------------------ fit / transform
    def fit(self, df: pl.DataFrame, weights: np.ndarray | None, *, table: str, hash_threshold: int) -> None:
        """Fit this field on ``df`` (rows weighted by ``weights``, default 1)."""
        w = np.ones(len(df), dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.kind == "dense":
            x = self._dense_raw(df, table)
            ok = np.isfinite(x) & (w > 0)
            total = float(w[ok].sum())
            if self.standardize and total > 0:
                mean = float((w[ok] * x[ok]).sum() / total)
                var = float((w[ok] * (x[ok] - mean) ** 2).sum() / total)
                std = math.sqrt(var)
                self.mean, self.std = mean, (std if std > 1e-12 else 1.0)
            else:
                self.mean, self.std = 0.0, 1.0
            self.method, self.vocab_size = self.transform, 0
            return
        if self.kind != "sparse":
            raise ConfigError(f"feature {self.name!r}: kind {self.kind!r} cannot be fitted on a feature table")
        s = self._sparse_raw(df, table)
        if self.encoding == "id":
            if not s.dtype.is_integer():
                raise DataError(f"an 'id' feature needs integer values, got {s.dtype}", path=table, column=self.source)
            mx = s.max()
            self.max_id = -1 if mx is None else int(mx)
            self.method, self.vocab, self.vocab_size = "id", None, self.max_id + 2
            return
        counts = (pl.DataFrame({"v": s, "w": w}).drop_nulls("v").filter(pl.col("w") > 0)
                  .group_by("v").agg(pl.col("w").sum()))
        method = self.encoding
        if method == "auto":
            method = "hash" if counts.height > hash_threshold else "vocab"
        if method == "hash":
            self.hash_buckets = self.hash_buckets or DEFAULT_HASH_BUCKETS
            self.method, self.vocab, self.vocab_size = "hash", None, self.hash_buckets + 1
            return
        keep = counts.filter(pl.col("w") >= self.min_freq).sort(["w", "v"], descending=[True, False])
        self.method = "vocab"
        self.vocab = keep.get_column("v").to_list()
        self.vocab_size = len(self.vocab) + 1

    def transform_df(self, df: pl.DataFrame, *, table: str) -> np.ndarray:
        """Indices (int64, sparse) or standardised values (float32, dense) of every row of ``df``."""
        if not self.fitted:
            raise ConfigError(f"feature {self.name!r} is not fitted; call FeatureSpec.fit first")
        if self.kind == "dense":
            x = self._dense_raw(df, table)
            x = (x - self.mean) / self.std
            return np.nan_to_num(x, nan=0.0).astype(np.float32)
        s = self._sparse_raw(df, table)
        if self.method == "id":
            v = s.fill_null(-1).cast(pl.Int64).to_numpy()
            return np.where((v >= 0) & (v <= self.max_id), v + 1, 0).astype(np.int64)
        if self.method == "hash":
            return hash_index(s, int(self.hash_buckets), salt=self.name)
        vocab = pl.Series(self.vocab) if self.vocab else pl.Series([], dtype=s.dtype)
        if s.dtype != vocab.dtype:
            s, vocab = s.cast(pl.String), vocab.cast(pl.String)
        idx = s.replace_strict(vocab, pl.arange(1, len(vocab) + 1, eager=True), default=0, return_dtype=pl.Int64)
        return idx.fill_null(0).to_numpy().astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- the spec
def _kuairand_user_sparse() -> list[FeatureField]:
    cats = ["user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
            "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range"]
    return ([FeatureField("user_id", encoding="id", embedding_dim=32)]
            + [FeatureField(c, embedding_dim=8) for c in cats]
            + [FeatureField(f"onehot_feat{i}", embedding_dim=8) for i in range(18)])


def _kuairand_user_dense() -> list[FeatureField]:
    return [FeatureField(f"log_{c}", kind="dense", source=c, transform="log1p")
            for c in ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")]


def _kuairand_item_sparse() -> list[FeatureField]:
    return [
        FeatureField("video_id", encoding="id", embedding_dim=32),
        FeatureField("author_id", encoding="auto", embedding_dim=16),
        FeatureField("video_type", embedding_dim=4),
        FeatureField("upload_type", embedding_dim=8),
        FeatureField("music_type", embedding_dim=4),
        FeatureField("tag_first", source="tag", split_index=0, embedding_dim=8),
        FeatureField("tag_second", source="tag", split_index=1, embedding_dim=8),
    ]


def _kuairand_item_dense() -> list[FeatureField]:
    return [
        FeatureField("log_duration_s", kind="dense", source="video_duration", transform="log1p", scale=0.001),
        FeatureField("aspect_ratio", kind="dense", source="server_width", transform="ratio",
                     denominator="server_height"),
    ]


_GROUPS = ("user_sparse", "user_dense", "item_sparse", "item_dense")


@dataclass
class FeatureSpec:
    """Ordered user and item feature fields, and their fitted vocabularies / statistics.

    ``FeatureSpec()`` is the default KuaiRand spec (see the module doc); pass lists to define another one.
    Field 0 of ``user_sparse`` must be the user-id field and field 0 of ``item_sparse`` the item-id field (an
    ``"id"`` field on ``video_id``), matching the ``RequestBatch`` contract.

    Args:
        user_sparse / user_dense / item_sparse / item_dense: ordered fields of each group.
        hash_threshold: ``"auto"`` fields with more distinct values than this are hashed.
    """

    user_sparse: list[FeatureField] = field(default_factory=_kuairand_user_sparse)
    user_dense: list[FeatureField] = field(default_factory=_kuairand_user_dense)
    item_sparse: list[FeatureField] = field(default_factory=_kuairand_item_sparse)
    item_dense: list[FeatureField] = field(default_factory=_kuairand_item_dense)
    hash_threshold: int = DEFAULT_HASH_THRESHOLD

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for group in _GROUPS:
            want = "sparse" if group.endswith("sparse") else "dense"
            for f in getattr(self, group):
                if not isinstance(f, FeatureField):
                    raise ConfigError(f"{group}: expected FeatureField, got {type(f).__name__}")
                if f.kind != want:
                    raise ConfigError(f"{group}: feature {f.name!r} has kind {f.kind!r}, expected {want!r}")
                if f.name in seen:
                    raise ConfigError(f"duplicate feature name {f.name!r}")
                seen.add(f.name)
        if self.hash_threshold < 0:
            raise ConfigError(f"hash_threshold must be >= 0, got {self.hash_threshold}")

    @classmethod
    def kuairand(cls) -> "FeatureSpec":
        """The default (unfitted) KuaiRand spec."""
        return cls()

    # ------------------------------------------------------------------ introspection
    @property
    def fitted(self) -> bool:
        return all(f.fitted for g in _GROUPS for f in getattr(self, g))

    def fields(self, group: str) -> list[FeatureField]:
        if group not in _GROUPS:
            raise ConfigError(f"unknown feature group {group!r}; valid groups: {', '.join(_GROUPS)}")
        return getattr(self, group)

    def field(self, name: str) -> FeatureField:
        for g in _GROUPS:
            for f in getattr(self, g):
                if f.name == name:
                    return f
        raise ConfigError(f"unknown feature {name!r}; valid features: "
                          f"{', '.join(f.name for g in _GROUPS for f in getattr(self, g))}")

    def names(self, group: str) -> list[str]:
        return [f.name for f in self.fields(group)]

    def vocab_sizes(self, group: str) -> list[int]:
        """Embedding rows (index 0 included) of every field of a sparse group."""
        return [f.vocab_size for f in self.fields(group)]

    @property
    def num_user_sparse(self) -> int:  # Fu
        return len(self.user_sparse)

    @property
    def num_user_dense(self) -> int:  # Du
        return len(self.user_dense)

    @property
    def num_item_sparse(self) -> int:  # Fi
        return len(self.item_sparse)

    @property
    def num_item_dense(self) -> int:  # Di
        return len(self.item_dense)

    @property
    def num_items(self) -> int:
        """Rows of an item-index embedding table (``max video_id + 2``; index 0 is padding)."""
        return self._id_field("item_sparse").vocab_size

    @property
    def num_users(self) -> int:
        """Rows of a user-index embedding table (``max user_id + 2``; index 0 is padding/unknown)."""
        return self._id_field("user_sparse").vocab_size

    def _id_field(self, group: str) -> FeatureField:
        fs = self.fields(group)
        if not fs or fs[0].encoding != "id":
            raise ConfigError(f"{group}: field 0 must be an 'id' field")
        if not fs[0].fitted:
            raise ConfigError(f"feature {fs[0].name!r} is not fitted; call FeatureSpec.fit first")
        return fs[0]

    def item_index(self, video_ids):
        """``video_id + 1``, and 0 for ids outside the fitted video-id range (numpy arrays, tensors, ints)."""
        f = self._id_field("item_sparse")
        idx = video_ids + 1
        ok = (video_ids >= 0) & (video_ids <= f.max_id)
        if isinstance(idx, (int, np.integer)):
            return int(idx) if ok else 0
        return idx * ok

    @staticmethod
    def video_id(item_index):
        """Raw video id of item indices (``item_index - 1``)."""
        return item_index - 1

    # ------------------------------------------------------------------ fit / transform
    def fit(
        self, users_df: pl.DataFrame | None, videos_df: pl.DataFrame | None, log_df: pl.DataFrame | None = None, *,
        min_freq: int | None = None, hash_buckets: int | None = None, hash_threshold: int | None = None,
    ) -> "FeatureSpec":
        """Fit vocabularies and dense statistics; returns ``self`` (fitted in place).

        Without ``log_df`` every table row counts once. With ``log_df`` (the *training* log) each user / video row
        is weighted by its number of log rows, so vocabularies keep only values seen in training at least
        ``min_freq`` times and dense statistics follow the training impressions. ``"id"`` fields always span the
        whole table. ``min_freq`` / ``hash_buckets`` override every vocab / hash field, ``hash_threshold`` the
        spec's. A group whose table is None must be empty (or already fitted).
        """
        if min_freq is not None and min_freq < 1:
            raise ConfigError(f"min_freq must be >= 1, got {min_freq}")
        if hash_buckets is not None and hash_buckets < 1:
            raise ConfigError(f"hash_buckets must be >= 1, got {hash_buckets}")
        if hash_threshold is not None:
            if hash_threshold < 0:
                raise ConfigError(f"hash_threshold must be >= 0, got {hash_threshold}")
            self.hash_threshold = hash_threshold
        for side, df, key in (("user", users_df, "user_id"), ("item", videos_df, "video_id")):
            groups = [f"{side}_sparse", f"{side}_dense"]
            flds = [f for g in groups for f in getattr(self, g)]
            table = "users" if side == "user" else "videos"
            if df is None:
                if any(not f.fitted for f in flds):
                    raise DataError(f"no {table} table given to fit the {side} features", path=table)
                continue
            if df.height == 0:
                raise DataError("empty table", path=table)
            weights = None
            if log_df is not None:
                if key not in df.columns:
                    raise DataError("missing key column", path=table, column=key)
                if key not in log_df.columns:
                    raise DataError("missing key column", path="log", column=key)
                counts = log_df.group_by(key).agg(pl.len().alias("__n"))
                weights = (df.select(pl.col(key).cast(pl.Int64)).join(
                    counts.with_columns(pl.col(key).cast(pl.Int64)), on=key, how="left", maintain_order="left")
                    .get_column("__n").fill_null(0).to_numpy().astype(np.float64))
            for f in flds:
                if f.kind == "sparse" and f.encoding in ("vocab", "auto") and min_freq is not None:
                    f.min_freq = min_freq
                if f.kind == "sparse" and f.encoding in ("hash", "auto") and hash_buckets is not None:
                    f.hash_buckets = hash_buckets
                f.fit(df, weights, table=table, hash_threshold=self.hash_threshold)
        return self

    def _transform(self, df: pl.DataFrame, group: str, table: str, dtype) -> np.ndarray:
        if df is None or not isinstance(df, pl.DataFrame):
            raise DataError(f"expected a polars DataFrame, got {type(df).__name__}", path=table)
        flds = self.fields(group)
        out = np.zeros((df.height, len(flds)), dtype=dtype)
        for j, f in enumerate(flds):
            out[:, j] = f.transform_df(df, table=table)
        return out

    def transform_users(self, df: pl.DataFrame) -> np.ndarray:
        """[U, Fu] int64 user sparse indices of every row of ``df``."""
        return self._transform(df, "user_sparse", "users", np.int64)

    def transform_users_dense(self, df: pl.DataFrame) -> np.ndarray:
        """[U, Du] float32 standardised user dense features."""
        return self._transform(df, "user_dense", "users", np.float32)

    def transform_items(self, df: pl.DataFrame) -> np.ndarray:
        """[I, Fi] int64 item sparse indices of every row of ``df`` (field 0 = item index = video_id + 1)."""
        return self._transform(df, "item_sparse", "videos", np.int64)

    def transform_items_dense(self, df: pl.DataFrame) -> np.ndarray:
        """[I, Di] float32 standardised item dense features."""
        return self._transform(df, "item_dense", "videos", np.float32)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (fields, fitted vocabularies and statistics)."""
        return {"version": _SPEC_VERSION, "hash_threshold": self.hash_threshold,
                **{g: [f.to_dict() for f in getattr(self, g)] for g in _GROUPS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        """Inverse of ``to_dict``."""
        if not isinstance(d, dict):
            raise ConfigError(f"feature spec: expected a dict, got {type(d).__name__}")
        if d.get("version") != _SPEC_VERSION:
            raise ConfigError(f"feature spec: unsupported version {d.get('version')!r} (expected {_SPEC_VERSION})")
        names = {f.name for f in dataclasses.fields(FeatureField)}
        groups = {}
        for g in _GROUPS:
            if g not in d:
                raise ConfigError(f"feature spec: missing group {g!r}")
            out = []
            for fd in d[g]:
                unknown = set(fd) - names
                if unknown:
                    raise ConfigError(f"feature spec: unknown keys {sorted(unknown)} in {g}")
                out.append(FeatureField(**copy.deepcopy(fd)))
            groups[g] = out
        return cls(**groups, hash_threshold=int(d.get("hash_threshold", DEFAULT_HASH_THRESHOLD)))

    def copy(self) -> "FeatureSpec":
        return FeatureSpec.from_dict(self.to_dict())
