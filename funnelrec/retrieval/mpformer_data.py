"""Multi-objective retrieval data: next-period targets per objective, served as ``RequestBatch``es.

The protocol of MPFormer's benchmark (``funnelrec bench retrieval-mpformer``; ours — the paper publishes no offline
protocol):

* **Objectives** (:class:`RetrievalObjective`): a name, a 0/1 log column and a *value* (the weight of the
  feedback in the merged "value recall"). On the simulator / KuaiRand: ``is_click`` (value 1), ``long_view`` (2),
  ``is_like`` (4), ``is_follow`` (8) (:data:`SIM_OBJECTIVES`). On MovieLens (:data:`MOVIELENS_OBJECTIVES`,
  columns derived from the raw ratings by :func:`objective_log`): ``rating_ge1`` (every rating, value 1),
  ``rating_ge4`` (2) and ``rating_eq5`` (3).
* **Positives** are the log rows with any objective flag; the user's **history** is every positive strictly
  before the request (``funnelrec.data.timeline``), its action channels are the K objective flags of each event
  (``hist_actions [B, N, K]``).
* **Requests are periods**: one row per (user, ``date``) with at least one positive, at the time of the user's
  first positive that day (``request_time_ms``), so the history holds every earlier day and nothing of this one.
* **Targets**: for each objective, the distinct items with that feedback in the period that are *new* to the user
  (no positive before the request; an item of the history is excluded from ranking, as in the leave-last-out
  protocol of ``funnelrec.retrieval.data``). ``objective_counts`` = the number of targets of each objective: the
  next period's feedback shares that the q(u) head of MPFormer learns.
* **Split** (``split``): ``"global"`` (simulator, KuaiRand) — the last date of the log is the **test** period, the
  one before it **valid**, every earlier date **train**; ``"per_user"`` (MovieLens, where every user has their own
  calendar) — each user's last active date is test, the second to last valid, earlier ones train (users with
  fewer than 3 active dates are train only). ``train_periods`` keeps only the last few train dates (periods) as
  training rows — earlier ones still form the histories — and ``max_valid`` a seeded subset of the valid periods, to
  size a run.
* **Exclusion**: full-corpus ranking leaves out every item of the request's whole history
  (:meth:`MPFormerData.exclude_mask`).

Batch modes (:meth:`MPFormerData.batches`):

* ``"period"``: one row per period with at least one target of the selected objectives; ``extras["targets"]
  [B, K, T]`` (item indices, 0 = padding, first feedback first), ``extras["objective_counts"] [B, K]``,
  ``cand_items [B, 1]`` = the first target. The training loss and the benchmark's evaluation read these.
* ``"example"`` (``fit_retriever``'s and ``evaluate_retriever``'s mode): the train split gives period rows as above;
  valid / test give one row per (period, objective with a target): ``cand_items[:, 0]`` = the objective's first new
  item of the period and ``extras["objective"]`` = its index, so ``evaluate_retriever`` reports a micro-averaged
  leave-one-out recall over objectives — the early-stopping signal.

:meth:`MPFormerData.select` gives a view restricted to some objectives (the dedicated single-objective baselines);
histories, action channels and the sampler's item popularity stay those of all objectives, so every model reads the
same inputs.

Example:
    >>> from funnelrec.data.sources import load_source
    >>> src = load_source("sim:small?num_users=200&days=4", progress=False)  # doctest: +SKIP
    >>> data = MPFormerData.from_source(src, max_len=30)  # doctest: +SKIP
    >>> b = next(data.batches("test", 64, mode="period"))  # doctest: +SKIP
    >>> b.extras["targets"].shape[:2], data.objective_names  # doctest: +SKIP
    (torch.Size([64, 4]), ('is_click', 'long_view', 'is_like', 'is_follow'))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.data.features import FeatureSpec
from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError
from funnelrec.metrics.ranking import topk_metrics, true_recall_at_k
from funnelrec.retrieval.base import NEG_INF

__all__ = ["RetrievalObjective", "SIM_OBJECTIVES", "MOVIELENS_OBJECTIVES", "SPLITS", "SPLIT_RULES", "MODES",
           "MPFormerData", "objective_log", "oracle_objective_scores", "evaluate_objectives", "value_recall"]

SPLITS = ("train", "valid", "test")
SPLIT_RULES = ("global", "per_user")
MODES = ("period", "example")


@dataclass(frozen=True)
class RetrievalObjective:
    """One retrieval objective: ``name``, its 0/1 log ``column`` (> 0 = feedback) and the ``value`` of a feedback
    in the merged value recall."""

    name: str
    column: str
    value: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not self.column:
            raise ConfigError(f"objective name and column must be non-empty, got {self.name!r}, {self.column!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"objective {self.name!r}: value must be a finite number > 0, got {self.value!r}")


#: The objectives on the simulator and KuaiRand.
SIM_OBJECTIVES = (RetrievalObjective("is_click", "is_click", 1.0),
                  RetrievalObjective("long_view", "long_view", 2.0),
                  RetrievalObjective("is_like", "is_like", 4.0),
                  RetrievalObjective("is_follow", "is_follow", 8.0))
#: The objectives on MovieLens (columns added by :func:`objective_log`).
MOVIELENS_OBJECTIVES = (RetrievalObjective("rating_ge1", "rating_ge1", 1.0),
                        RetrievalObjective("rating_ge4", "rating_ge4", 2.0),
                        RetrievalObjective("rating_eq5", "rating_eq5", 3.0))


def objective_log(source) -> tuple[pl.DataFrame, tuple[RetrievalObjective, ...]]:
    """The log of a ``Source`` with its objective columns, and its default objectives.

    On MovieLens the raw ratings are read again from ``source.path`` (the adapted log keeps only ``rating >= 4``)
    and ``rating_ge1`` / ``rating_ge4`` / ``rating_eq5`` are added, row-aligned with the log.

    Raises:
        DataError: MovieLens ratings that do not line up with the log (a changed folder).
    """
    if source.kind != "movielens":
        return source.log, SIM_OBJECTIVES
    from funnelrec.data.loaders.movielens import load_movielens

    ratings = load_movielens(source.path).ratings.sort(["user_id", "timestamp"], maintain_order=True)
    log = source.log
    if ratings.height != log.height or not (
            (ratings.get_column("user_id").cast(pl.Int64) == log.get_column("user_id").cast(pl.Int64)).all()
            and (ratings.get_column("item_id").cast(pl.Int64) == log.get_column("video_id").cast(pl.Int64)).all()):
        raise DataError("the ratings do not line up with the adapted log (did the folder change?)",
                        path=source.path, column="rating")
    r = ratings.get_column("rating")
    log = log.with_columns(pl.Series("rating_ge1", (r >= 1).cast(pl.Int8)), pl.Series("rating_ge4", (r >= 4)
                           .cast(pl.Int8)), pl.Series("rating_eq5", (r >= 5).cast(pl.Int8)))
    return log, MOVIELENS_OBJECTIVES


class MPFormerData:
    """Next-period multi-objective retrieval data of a log (see the module doc). Build with :meth:`from_log` or
    :meth:`from_source`.

    Attributes:
        spec: the fitted feature spec (item index = ``video_id + 1``).
        objectives: every objective of the data (:class:`RetrievalObjective`).
        selected: indices (into ``objectives``) of the objectives this view serves, in batch order.
        timelines: every user's positives (any objective), action channels = the objective flags.
        max_len: N.
        item_sparse_table / item_dense_table: [I, Fi] / [I, Di] item features by item index.
    """

    def __init__(self, spec: FeatureSpec, objectives: tuple[RetrievalObjective, ...], timelines: Timelines,
                 rows: dict[str, np.ndarray], targets: dict[str, np.ndarray], tables: dict[str, object],
                 max_len: int, split: str, selected: tuple[int, ...] | None = None):
        self.spec = spec
        self.objectives = objectives
        self.timelines = timelines
        self.max_len = int(max_len)
        self.split_rule = split
        self._rows = rows  # user [R], time [R], split [R] (0/1/2)
        self._tg = targets  # row [P], obj [P], item [P], sorted by (row, obj, first time); ptr [R*K_all + 1]
        self._tables = tables
        self.item_sparse_table: Tensor = tables["item_sparse"]
        self.item_dense_table: Tensor = tables["item_dense"]
        self.selected = tuple(range(len(objectives))) if selected is None else tuple(selected)
        k_all = len(objectives)
        counts = np.diff(targets["ptr"]).reshape(-1, k_all)  # [R, K_all] targets per row and objective
        self._counts_all = counts
        self._counts = counts[:, list(self.selected)]
        has = self._counts.sum(1) > 0
        self._split_rows = {name: np.flatnonzero(has & (rows["split"] == s)) for s, name in enumerate(SPLITS)}
        self._pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_log(cls, log: pl.DataFrame, users: pl.DataFrame, videos: pl.DataFrame, spec: FeatureSpec,
                 objectives: Sequence[RetrievalObjective] = SIM_OBJECTIVES, max_len: int = 50,
                 split: str = "global", train_periods: int | None = None, max_valid: int | None = None,
                 seed: int = 0) -> "MPFormerData":
        """Build the data of a KuaiRand-schema log.

        Args:
            log: interaction log with ``user_id, video_id, time_ms, date`` and every objective column.
            users / videos: side tables (``user_id`` / ``video_id`` unique; every user and positive video present).
            spec: a ``FeatureSpec``; an unfitted one is fitted (in place) on ``users`` and ``videos``.
            objectives: the K objectives (distinct names).
            max_len: N, the history length of every batch.
            split: ``"global"`` or ``"per_user"`` (module doc).
            train_periods: train on the last this many train dates only (``"global"``; per user's last this many
                train periods with ``"per_user"``); earlier periods still form the histories. None: every one.
            max_valid: keep a seeded random subset of at most this many valid periods (early stopping costs one
                pass over them per epoch); None: every one.
            seed: seed of that subset.

        Raises:
            ConfigError: bad ``max_len``, ``split``, objectives or spec.
            DataError: a missing column, no positive row, a user or video missing from its table, fewer than 3
                dates (``"global"``), or no valid / test period with a target.
        """
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ConfigError(f"max_len must be an integer >= 1, got {max_len!r}")
        if split not in SPLIT_RULES:
            raise ConfigError(f"split must be one of {', '.join(SPLIT_RULES)}, got {split!r}")
        for name, value in (("train_periods", train_periods), ("max_valid", max_valid)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or None, got {value!r}")
        objectives = tuple(objectives)
        if not objectives or not all(isinstance(o, RetrievalObjective) for o in objectives):
            raise ConfigError(f"objectives must be a non-empty sequence of RetrievalObjective, got {objectives!r}")
        if len({o.name for o in objectives}) != len(objectives):
            raise ConfigError(f"objective names must be distinct, got {[o.name for o in objectives]}")
        if not isinstance(spec, FeatureSpec):
            raise ConfigError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
        if not isinstance(log, pl.DataFrame):
            raise DataError(f"expected a polars DataFrame, got {type(log).__name__}", path="log")
        for c in ("user_id", "video_id", "time_ms", "date", *[o.column for o in objectives]):
            if c not in log.columns:
                raise DataError("missing column needed by the multi-objective retrieval data", path="log",
                                column=c)
        for name, table, key in (("users", users, "user_id"), ("videos", videos, "video_id")):
            if not isinstance(table, pl.DataFrame) or key not in table.columns:
                raise DataError(f"expected a table with a {key!r} column", path=name, column=key)
        if not spec.fitted:
            spec.fit(users, videos)
        k_all = len(objectives)
        flags = [(pl.col(o.column).fill_null(0) > 0).cast(pl.Int8).alias(f"__o{j}")
                 for j, o in enumerate(objectives)]
        pos = (log.select(pl.col("user_id").cast(pl.Int64), pl.col("video_id").cast(pl.Int64),
                          pl.col("time_ms").cast(pl.Int64), pl.col("date").cast(pl.Int64), *flags)
               .filter(pl.any_horizontal([pl.col(f"__o{j}") > 0 for j in range(k_all)])))
        if pos.height == 0:
            raise DataError(f"no row with feedback on any objective ({', '.join(o.column for o in objectives)})",
                            path="log")
        item = np.asarray(spec.item_index(pos.get_column("video_id").to_numpy()), dtype=np.int64)
        pos = pos.with_columns(pl.Series("__item", item)).filter(pl.col("__item") > 0)
        pos = pos.sort(["user_id", "time_ms"], maintain_order=True)
        missing = pos.select("user_id").unique().join(users.select(pl.col("user_id").cast(pl.Int64)),
                                                      on="user_id", how="anti")
        if missing.height:
            raise DataError(f"{missing.height} user id(s) of the log are not in the users table, e.g. "
                            f"{missing.get_column('user_id').min()}", path="users", column="user_id")

        # periods: one request per (user, date) at the user's first positive of the date
        req = pos.group_by(["user_id", "date"]).agg(pl.col("time_ms").min().alias("__t")).sort(["user_id", "__t"])
        if split == "global":
            dates = np.sort(req.get_column("date").unique().to_numpy())
            if len(dates) < 3:
                raise DataError(f"split='global' needs at least 3 dates (train, valid, test), got {len(dates)}",
                                path="log", column="date")
            first_train = int(dates[max(0, len(dates) - 2 - train_periods)]) if train_periods else int(dates[0])
            part = (pl.when(pl.col("date") == int(dates[-1])).then(2)
                    .when(pl.col("date") == int(dates[-2])).then(1)
                    .when(pl.col("date") >= first_train).then(0).otherwise(3))
        else:
            back = pl.col("__t").rank("ordinal", descending=True).over("user_id") - 1
            many = pl.len().over("user_id") >= 3
            held = pl.when(many).then(2).otherwise(0)
            part = (pl.when(many & (back == 0)).then(2).when(many & (back == 1)).then(1)
                    .when(back - held < (train_periods or 1 << 40)).then(0).otherwise(3))
        req = req.with_columns(part.cast(pl.Int8).alias("__split")).with_row_index("__row")
        if max_valid is not None:
            valid_rows = np.flatnonzero(req.get_column("__split").to_numpy() == 1)
            if len(valid_rows) > max_valid:
                keep = np.random.default_rng(seed).choice(valid_rows, max_valid, replace=False)
                drop = np.setdiff1d(valid_rows, keep)
                split_col = req.get_column("__split").to_numpy().copy()
                split_col[drop] = 3
                req = req.with_columns(pl.Series("__split", split_col, dtype=pl.Int8))
        # targets: per objective, the distinct items of the period new to the user at the request time
        first = pos.group_by(["user_id", "__item"]).agg(pl.col("time_ms").min().alias("__first"))
        tg = (pos.join(req.select("user_id", "date", "__row", "__t"), on=["user_id", "date"])
              .join(first, on=["user_id", "__item"]).filter(pl.col("__first") >= pl.col("__t")))
        parts = []
        for j in range(k_all):
            parts.append(tg.filter(pl.col(f"__o{j}") > 0).group_by(["__row", "__item"])
                         .agg(pl.col("time_ms").min().alias("__tt"))
                         .with_columns(pl.lit(j, pl.Int64).alias("__obj")))
        tg = pl.concat(parts).sort(["__row", "__obj", "__tt", "__item"])
        r_n = req.height
        t_row = tg.get_column("__row").to_numpy().astype(np.int64)
        t_obj = tg.get_column("__obj").to_numpy().astype(np.int64)
        key = t_row * k_all + t_obj
        targets = {"item": tg.get_column("__item").to_numpy().astype(np.int64),
                   "ptr": np.searchsorted(key, np.arange(r_n * k_all + 1), side="left").astype(np.int64)}
        rows = {"user": req.get_column("user_id").to_numpy().astype(np.int64),
                "time": req.get_column("__t").to_numpy().astype(np.int64),
                "split": req.get_column("__split").to_numpy().astype(np.int8)}
        action_cols = [f"__o{j}" for j in range(k_all)]
        timelines = Timelines.from_log(pos.select("user_id", "video_id", "time_ms", *action_cols), spec,
                                       action_columns=action_cols)
        data = cls(spec, objectives, timelines, rows, targets, _side_tables(spec, users, videos), max_len, split)
        for name in ("valid", "test"):
            if data.num_rows(name) == 0:
                raise DataError(f"no {name} period has a target: the log is too short for split={split!r}",
                                path="log", column="date")
        return data

    @classmethod
    def from_source(cls, source, objectives: Sequence[RetrievalObjective] | None = None, spec: FeatureSpec | None
                    = None, max_len: int = 50, split: str | None = None, train_periods: int | None = None,
                    max_valid: int | None = None, seed: int = 0) -> "MPFormerData":
        """:meth:`from_log` on a ``funnelrec.data.sources.Source``: its log with the objective columns of
        :func:`objective_log`, its feature spec, ``split="per_user"`` on MovieLens and ``"global"`` otherwise."""
        log, default = objective_log(source)
        split = split or ("per_user" if source.kind == "movielens" else "global")
        return cls.from_log(log, source.users, source.videos, spec or source.feature_spec(),
                            objectives=objectives or default, max_len=max_len, split=split,
                            train_periods=train_periods, max_valid=max_valid, seed=seed)

    def select(self, objectives: Sequence[str]) -> "MPFormerData":
        """A view of the data serving only ``objectives`` (names, in the given order); shares every array.

        Raises:
            ConfigError: an unknown or repeated name.
        """
        names = [o.name for o in self.objectives]
        objectives = [objectives] if isinstance(objectives, str) else list(objectives)
        bad = [o for o in objectives if o not in names]
        if bad or not objectives or len(set(objectives)) != len(objectives):
            raise ConfigError(f"select: objectives must be distinct names among {', '.join(names)}, got "
                              f"{objectives!r}")
        return MPFormerData(self.spec, self.objectives, self.timelines, self._rows, self._tg, self._tables,
                            self.max_len, self.split_rule, tuple(names.index(o) for o in objectives))

    # ------------------------------------------------------------------ sizes
    @property
    def objective_names(self) -> tuple[str, ...]:
        """Names of the selected objectives, in batch order (the K axis)."""
        return tuple(self.objectives[j].name for j in self.selected)

    @property
    def values(self) -> Tensor:
        """[K] value of each selected objective's feedback."""
        return torch.tensor([self.objectives[j].value for j in self.selected], dtype=torch.float32)

    @property
    def num_objectives(self) -> int:
        return len(self.selected)

    @property
    def num_items(self) -> int:
        """I: item indices including padding 0."""
        return int(self.spec.num_items)

    @property
    def item_features(self) -> tuple[Tensor, Tensor]:
        """``(item_sparse_table [I, Fi], item_dense_table [I, Di])``."""
        return self.item_sparse_table, self.item_dense_table

    def num_rows(self, split: str) -> int:
        """Periods of ``split`` with at least one target of the selected objectives."""
        return int(len(self._split(split)))

    def num_examples(self, split: str) -> int:
        """Rows of an ``"example"``-mode epoch of ``split`` (train: periods; valid / test: (period, objective))."""
        return self.num_rows(split) if split == "train" else int(len(self._example_pairs(split)[0]))

    def num_targets(self, split: str) -> Tensor:
        """[K] number of (period, item) targets of each selected objective in ``split``."""
        return torch.from_numpy(self._counts[self._split(split)].sum(0).astype(np.int64))

    def num_users(self, split: str) -> Tensor:
        """[K] periods (= users, for valid / test) of ``split`` with at least one target of each objective."""
        return torch.from_numpy((self._counts[self._split(split)] > 0).sum(0).astype(np.int64))

    def item_popularity(self) -> Tensor:
        """[I] float32 train targets of *every* objective per item (the negative sampler of every model, so the
        dedicated models sample like the joint one). Never counts valid / test targets."""
        rows = self._split_rows_all("train")
        k_all = len(self.objectives)
        starts, ends = self._tg["ptr"][rows * k_all], self._tg["ptr"][(rows + 1) * k_all]
        flat = _ranges(starts, ends)
        counts = np.bincount(self._tg["item"][flat], minlength=self.num_items)[: self.num_items]
        counts[0] = 0
        return torch.from_numpy(counts.astype(np.float32))

    def objective_counts(self, split: str) -> Tensor:
        """[R_split, K] targets per period and selected objective, in ``"period"``-batch order."""
        return torch.from_numpy(self._counts[self._split(split)].astype(np.float32))

    def _split(self, split: str) -> np.ndarray:
        if split not in self._split_rows:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._split_rows[split]

    def _split_rows_all(self, split: str) -> np.ndarray:
        return np.flatnonzero(self._rows["split"] == SPLITS.index(split))

    def _example_pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(row [E], objective position [E]) of the ``"example"`` rows of a valid / test split."""
        if split not in self._pairs:
            rows = self._split(split)
            r, k = np.nonzero(self._counts[rows] > 0)
            self._pairs[split] = (rows[r], k.astype(np.int64))
        return self._pairs[split]

    # ------------------------------------------------------------------ batches
    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                mode: str = "example") -> Iterator[RequestBatch]:
        """Yield ``RequestBatch``es of ``split`` (see the module doc for the modes).

        Args:
            split: ``"train"``, ``"valid"`` or ``"test"``.
            batch_size: B.
            shuffle: shuffle with a ``torch.Generator`` seeded by ``seed``.
            drop_last: drop a last, smaller batch.
            mode: ``"period"`` or ``"example"``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if mode not in MODES:
            raise ConfigError(f"unknown batch mode {mode!r}; choose one of {', '.join(MODES)}")
        single = mode == "example" and split != "train"
        n = self.num_examples(split) if single else self.num_rows(split)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).numpy() if shuffle
                 else np.arange(n))
        stop = n - n % batch_size if drop_last else n
        for lo in range(0, stop, batch_size):
            idx = order[lo: lo + batch_size]
            yield self.example_batch(split, idx) if single else self.period_batch(split, idx)

    def period_batch(self, split: str, indices) -> RequestBatch:
        """The ``"period"`` batch of the periods ``indices`` ([B] positions within ``split``'s periods)."""
        rows = self._split(split)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(rows)):
            raise DataError(f"period index out of range [0, {len(rows)})", column="indices")
        r = rows[idx]
        targets = self._targets(r)
        first = targets[:, :, 0]
        cand = first.gather(1, (first > 0).to(torch.int8).argmax(1, keepdim=True))  # first objective with one
        counts = torch.from_numpy(self._counts[r].astype(np.float32))
        return self._assemble(r, cand, {"targets": targets, "objective_counts": counts,
                                        "row_index": torch.from_numpy(r)})

    def example_batch(self, split: str, indices) -> RequestBatch:
        """The ``"example"`` batch of valid / test (period, objective) rows ``indices`` (module doc)."""
        rows, objs = self._example_pairs(split)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(rows)):
            raise DataError(f"example index out of range [0, {len(rows)})", column="indices")
        r, k = rows[idx], objs[idx]
        k_all = len(self.objectives)
        start = self._tg["ptr"][r * k_all + np.asarray(self.selected, dtype=np.int64)[k]]
        cand = torch.from_numpy(self._tg["item"][start]).unsqueeze(1)
        return self._assemble(r, cand, {"objective": torch.from_numpy(k), "row_index": torch.from_numpy(r)})

    def _targets(self, rows: np.ndarray) -> Tensor:
        """[B, K, T] target items of the selected objectives of ``rows`` (0 = padding)."""
        k_all, sel = len(self.objectives), np.asarray(self.selected, dtype=np.int64)
        key = rows[:, None] * k_all + sel[None, :]  # [B, K]
        starts, ends = self._tg["ptr"][key].reshape(-1), self._tg["ptr"][key + 1].reshape(-1)
        lens = ends - starts
        width = max(1, int(lens.max()) if lens.size else 1)
        out = np.zeros((len(lens), width), np.int64)
        flat = _ranges(starts, ends)
        seg = np.repeat(np.arange(len(lens)), lens)
        col = np.arange(len(flat)) - np.repeat(np.r_[0, np.cumsum(lens)[:-1]], lens)
        out[seg, col] = self._tg["item"][flat]
        return torch.from_numpy(out.reshape(len(rows), len(sel), width))

    def _assemble(self, rows: np.ndarray, cand: Tensor, extras: dict[str, Tensor]) -> RequestBatch:
        user = torch.from_numpy(self._rows["user"][rows])
        t = torch.from_numpy(self._rows["time"][rows])
        hist = self.timelines.history(user, t, self.max_len)
        b = int(len(rows))
        urow = self._user_rows(user)
        zeros = torch.zeros(b, dtype=torch.int64)
        return RequestBatch(
            user_id=user, request_time_ms=t, user_sparse=self._tables["user_sparse"][urow],
            user_dense=self._tables["user_dense"][urow], hist_items=hist.items, hist_actions=hist.actions,
            hist_gap_s=hist.gap_s, hist_len=hist.length, cand_items=cand,
            cand_mask=torch.ones(b, 1, dtype=torch.bool), cand_sparse=self.item_sparse_table[cand],
            cand_dense=self.item_dense_table[cand], tab=zeros, hour=zeros,
            position=torch.zeros(b, 1, dtype=torch.int64), duration_s=torch.zeros(b, 1),
            labels=torch.ones(b, 1, 1), extras=extras,
        )

    def _user_rows(self, user: Tensor) -> Tensor:
        keys = self._tables["user_keys"]
        u = user.numpy()
        r = np.minimum(np.searchsorted(keys, u), len(keys) - 1)
        bad = keys[r] != u
        if bad.any():
            raise DataError(f"user id {int(u[bad][0])} is not in the users table", path="users", column="user_id")
        return torch.from_numpy(r)

    # ------------------------------------------------------------------ exclusion
    def history_items(self, user_ids, request_time_ms) -> tuple[Tensor, Tensor]:
        """Every history item of each request (no ``max_len`` cut): ``(row [E'], item [E'])``, row in [0, B)."""
        start, end = self.timelines.bounds(user_ids, request_time_ms)
        lens = (end - start).astype(np.int64)
        row = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        return torch.from_numpy(row), self.timelines.items[torch.from_numpy(_ranges(start, end))]

    def exclude_mask(self, batch: RequestBatch) -> Tensor:
        """[B, I] bool: True at every item of each request's whole positive history (padding 0 left False)."""
        row, item = self.history_items(batch.user_id, batch.request_time_ms)
        mask = torch.zeros(batch.batch_size, self.num_items, dtype=torch.bool)
        mask[row, item] = True
        mask[:, 0] = False
        return mask.to(batch.device)

    def exclude_lists(self, batch: RequestBatch) -> list[np.ndarray]:
        """Each request's history items as a list of arrays (the ``exclude`` of ``AnnIndex.search``)."""
        row, item = self.history_items(batch.user_id, batch.request_time_ms)
        counts = np.bincount(row.numpy(), minlength=batch.batch_size)
        return np.split(item.numpy(), np.cumsum(counts)[:-1])


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` over the pairs, vectorised."""
    lens = (np.asarray(ends) - np.asarray(starts)).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(np.asarray(starts, np.int64) - np.r_[0, np.cumsum(lens)[:-1]], lens)
    return offs + np.arange(total, dtype=np.int64)


def _side_tables(spec: FeatureSpec, users: pl.DataFrame, videos: pl.DataFrame) -> dict[str, object]:
    """User features by sorted user id and item features by item index (as ``RetrievalData`` builds them)."""
    user_ids = users.get_column("user_id").cast(pl.Int64).to_numpy()
    order = np.argsort(user_ids, kind="stable")
    i = spec.num_items
    vid = videos.get_column("video_id").cast(pl.Int64).to_numpy()
    idx = np.asarray(spec.item_index(vid), dtype=np.int64)
    ok = idx > 0
    item_sparse = torch.zeros(i, spec.num_item_sparse, dtype=torch.int64)
    item_dense = torch.zeros(i, spec.num_item_dense, dtype=torch.float32)
    item_sparse[idx[ok]] = torch.from_numpy(spec.transform_items(videos)[ok])
    item_dense[idx[ok]] = torch.from_numpy(spec.transform_items_dense(videos)[ok])
    return {"user_keys": user_ids[order], "user_sparse": torch.from_numpy(spec.transform_users(users)[order]),
            "user_dense": torch.from_numpy(spec.transform_users_dense(users)[order]),
            "item_sparse": item_sparse, "item_dense": item_dense}


# ------------------------------------------------------------------------------------------------ evaluation


def oracle_objective_scores(oracle, user_id: Tensor, request_time_ms: Tensor, num_items: int,
                            tasks: Sequence[str], max_rows: int = 1_000_000) -> Tensor:
    """[B, K, I] the world's true single-item probability of each task for every item index (``-inf`` at 0).

    The ``Oracle.item_scores`` ranking (top position, tab 1, neutral short-term intent, the request's day) for
    several tasks in one pass of ``Oracle.page_probabilities`` (which computes every task at once).

    Args:
        oracle: a ``World`` or its ``Oracle``.
        user_id: [B] real user ids.  request_time_ms: [B] request times (day = (t − start) // day).
        num_items: I (item index j = simulated video j − 1).
        tasks: K task names of ``funnelrec.sim.oracle.TASKS``.
        max_rows: (user, item) pairs per ``page_probabilities`` call (bounds memory).
    """
    from funnelrec.sim.oracle import TASKS

    orc = getattr(oracle, "oracle", oracle)
    if not hasattr(orc, "page_probabilities"):
        raise ConfigError(f"oracle must be a World or an Oracle, got {type(oracle).__name__}")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"no oracle task for objective(s) {', '.join(bad)}; the oracle knows {', '.join(TASKS)}")
    cols = torch.tensor([TASKS.index(t) for t in tasks])
    user = orc.user_index(user_id.cpu())
    day = torch.div(request_time_ms.cpu() - KUAIRAND_START_MS, DAY_MS, rounding_mode="floor").clamp(min=0)
    c = min(orc.world.catalog.num_items, num_items - 1)
    out = torch.full((user.shape[0], len(tasks), num_items), NEG_INF)
    items = torch.arange(c)
    for d in day.unique().tolist():
        rows = torch.nonzero(day == d).squeeze(1)
        chunk = max(1, max_rows // c)
        for lo in range(0, rows.shape[0], chunk):  # chunks of users, each against the whole corpus
            r = rows[lo: lo + chunk]
            uu = user[r].repeat_interleave(c)
            p = orc.page_probabilities(uu, items.repeat(r.shape[0]).unsqueeze(1), tab=1, day=int(d))[:, 0]
            out[r, :, 1: c + 1] = p[:, cols].view(r.shape[0], c, len(tasks)).transpose(1, 2)
    return out


@torch.no_grad()
def evaluate_objectives(score_fns: dict[str, Callable[[RequestBatch], Tensor]], data: MPFormerData,
                        split: str = "test", ks: Sequence[int] = (50, 100, 200), ndcg_ks: Sequence[int] = (50,),
                        true_k: int = 100, oracle=None, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Per-objective full-corpus metrics of several models in one pass (the oracle is computed once per batch).

    For objective k, the rows are the periods of ``split`` with at least one objective-k target; the relevant set is
    those targets, the history is excluded, and ``funnelrec.metrics.ranking.topk_metrics`` gives ``recall@k``
    (hits / targets) and ``ndcg@k``, averaged over those rows; ``true_recall@k`` (with an oracle) is
    ``funnelrec.metrics.ranking.true_recall_at_k`` against the world's true probability of the objective's task.

    Args:
        score_fns: model name → ``fn(batch) -> [B, K, I]`` scores of the K selected objectives.
        data: the data (its selected objectives are the K).
        split: ``"valid"`` or ``"test"``.
        ks: recall cut-offs.  ndcg_ks: NDCG cut-offs.  true_k: the true-recall cut-off.
        oracle: a ``World`` for ``true_recall`` (tasks = the objective names), or None.
        batch_size: periods per batch.

    Returns:
        ``{model: {"OBJECTIVE.recall@k", "OBJECTIVE.ndcg@k", "OBJECTIVE.true_recall@k", "OBJECTIVE.users"}}``.
    """
    names = data.objective_names
    cut = sorted({int(k) for k in (*ks, *ndcg_ks, true_k)})
    sums = {m: {} for m in score_fns}
    users = np.zeros(len(names), np.int64)
    for batch in data.batches(split, batch_size, mode="period"):
        exclude = data.exclude_mask(batch)
        truth = (oracle_objective_scores(oracle, batch.user_id, batch.request_time_ms, data.num_items, names)
                 if oracle is not None else None)
        targets = batch.extras["targets"]
        rel = torch.zeros(batch.batch_size, len(names), data.num_items, dtype=torch.bool)
        rel.scatter_(2, targets, True)
        rel[:, :, 0] = False
        has = rel.any(2)  # [B, K]
        users += has.sum(0).numpy()
        for model, fn in score_fns.items():
            scores = fn(batch).float().cpu()
            for j, name in enumerate(names):
                rows = has[:, j]
                if not rows.any():
                    continue
                n = int(rows.sum())
                s = scores[rows, j].masked_fill(exclude[rows], NEG_INF)
                m = topk_metrics(s, rel[rows, j], cut, exclude=exclude[rows])
                acc = sums[model]
                for k in ks:
                    acc[f"{name}.recall@{k}"] = acc.get(f"{name}.recall@{k}", 0.0) + m[f"recall@{k}"] * n
                for k in ndcg_ks:
                    acc[f"{name}.ndcg@{k}"] = acc.get(f"{name}.ndcg@{k}", 0.0) + m[f"ndcg@{k}"] * n
                if truth is not None:
                    kk = min(true_k, data.num_items - 1)
                    top = s.topk(kk, dim=1).indices
                    tr = true_recall_at_k(top, truth[rows, j].masked_fill(exclude[rows], NEG_INF), kk)
                    acc[f"{name}.true_recall@{true_k}"] = acc.get(f"{name}.true_recall@{true_k}", 0.0) + tr * n
    out = {}
    for model, acc in sums.items():
        res = {}
        for j, name in enumerate(names):
            keys = [f"{name}.recall@{k}" for k in ks] + [f"{name}.ndcg@{k}" for k in ndcg_ks]
            keys += [f"{name}.true_recall@{true_k}"] if oracle is not None else []
            for key in keys:
                res[key] = float(acc.get(key, 0.0) / users[j]) if users[j] else math.nan
            res[f"{name}.users"] = float(users[j])
        out[model] = res
    return out


def value_recall(merged: Tensor, targets: Tensor, values: Tensor) -> tuple[float, int]:
    """Merged-list value recall: Σ value of the hits / Σ value of the targets, averaged over rows with a target.

    An item's value is the sum of the values of the objectives it is a target of (a liked and clicked item counts
    both).

    Args:
        merged: [B, M] int64 merged lists (-1 = empty slot).
        targets: [B, K, T] int64 target items per objective (0 = padding).
        values: [K] value of each objective.

    Returns:
        ``(mean value recall, rows)``.

    Example:
        >>> t = torch.tensor([[[1, 2], [2, 0]]])  # item 1: objective 0; item 2: objectives 0 and 1
        >>> value_recall(torch.tensor([[2, 5, -1]]), t, torch.tensor([1.0, 3.0]))
        (0.8, 1)
    """
    b, k, _ = targets.shape
    num = int(max(int(targets.max()) if targets.numel() else 0, int(merged.max()) if merged.numel() else 0)) + 2
    val = torch.zeros(b, num, dtype=torch.float64)
    w = values.to(torch.float64).view(1, k, 1).expand_as(targets) * (targets > 0)
    val.scatter_add_(1, targets.reshape(b, -1), w.reshape(b, -1))
    val[:, 0] = 0.0
    total = val.sum(1)
    picked = torch.zeros(b, num, dtype=torch.bool)
    picked.scatter_(1, torch.where(merged < 0, num - 1, merged), True)
    picked[:, num - 1] = False
    hit = (val * picked).sum(1)
    keep = total > 0
    if not keep.any():
        return math.nan, 0
    return float((hit[keep] / total[keep]).mean()), int(keep.sum())
