"""``RequestDataset``: a KuaiRand-schema log plus side tables, served as ``RequestBatch``es.

A *request* is the group of log rows with the same ``(user_id, time_ms)``: the items shown on one page, in their log
order (``position`` 0 = first row of the group). Requests are ordered chronologically (by ``time_ms``, then
``user_id``); ``RequestDataset[i]`` / ``batch([i, ...])`` address them by that order. In ``mode="pointwise"`` every
log row is its own request with M = 1 (its ``position`` is still its order within its page).

Construction does all the grouping, joins and feature transforms once, vectorised (polars / numpy); ``batch`` only
gathers from flat tensors, so a batch of 4096 requests takes milliseconds.

Histories come from a ``Timelines`` object, which may (and usually should) be built from the *full* log
(train + valid + test): its strictly-before rule keeps every target's own and later feedback out of its features.
The dataset's log only defines which requests are targets.

Batch layout (see ``funnelrec.data.batch``): candidates are right-padded to the longest request of the batch
(``cand_mask``); ``labels[..., t]`` is task ``tasks[t]`` (default ``objectives.task_names()``);
``watch_time_s`` = play_time_ms / 1000; ``duration_s`` = the log's duration_ms / 1000; ``hour`` = hourmin // 100
of the request; ``extras["request_index"]`` [B] and ``extras["log_row"]`` [B, M] (row of the dataset's log
frame, -1 at padding) map predictions back to the log.

Example:
    >>> ds = RequestDataset(log, users, videos, spec, Timelines.from_log(full_log, spec))   # doctest: +SKIP
    >>> for batch in ds.iter_batches(4096, shuffle=True, seed=0):                          # doctest: +SKIP
    ...     loss = model(batch.validate())
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.data.feature_tables import FeatureTables
from funnelrec.data.features import FeatureSpec
from funnelrec.data.objectives import get_objective, task_names
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError

_MODES = ("request", "pointwise")
_BASE_COLUMNS = ("user_id", "video_id", "time_ms", "hourmin", "tab", "is_rand", "play_time_ms", "duration_ms")


class RequestDataset:
    """Requests of a log as ``RequestBatch``es (see the module doc).

    Args:
        log_df: the target log (KuaiRand schema; at least user_id, video_id, time_ms, hourmin, tab, is_rand,
            play_time_ms, duration_ms and the task label columns).
        users_df: user feature table (one row per user_id; every user of the log must be in it).
        videos_df: video feature table (one row per video_id; every video of the log must be in it).
        spec: a fitted ``FeatureSpec``.
        timelines: history source (typically ``Timelines.from_log(full_log, spec)``); None builds it from
            ``log_df`` itself.
        history_len: N, the padded history length.
        mode: ``"request"`` (one request per (user_id, time_ms)) or ``"pointwise"`` (one request per row).
        max_candidates: keep at most this many rows of each request (the first by position); None keeps all.
        tasks: the objectives whose labels fill ``labels`` (default ``task_names()``; regression objectives are not
            allowed here — watch time is ``watch_time_s``).
    """

    def __init__(
        self, log_df: pl.DataFrame, users_df: pl.DataFrame, videos_df: pl.DataFrame, spec: FeatureSpec,
        timelines: Timelines | None = None, history_len: int = 100, mode: str = "request",
        max_candidates: int | None = None, tasks: Sequence[str] | None = None,
    ):
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
        if history_len < 0:
            raise ConfigError(f"history_len must be >= 0, got {history_len}")
        if max_candidates is not None and max_candidates < 1:
            raise ConfigError(f"max_candidates must be >= 1, got {max_candidates}")
        if not isinstance(spec, FeatureSpec) or not spec.fitted:
            raise ConfigError("spec must be a fitted FeatureSpec (call FeatureSpec.fit first)")
        for name, df in (("log", log_df), ("users", users_df), ("videos", videos_df)):
            if not isinstance(df, pl.DataFrame):
                raise DataError(f"expected a polars DataFrame, got {type(df).__name__}", path=name)
        self.tasks = tuple(task_names() if tasks is None else tasks)
        objs = [get_objective(t) for t in self.tasks]
        for o in objs:
            if o.kind != "binary":
                raise ConfigError(f"objective {o.name!r} is a {o.kind} objective; labels hold binary tasks only")
        label_cols = [o.label for o in objs]
        for c in (*_BASE_COLUMNS, *label_cols):
            if c not in log_df.columns:
                raise DataError("missing column", path="log", column=c)
        if log_df.height == 0:
            raise DataError("empty log: no requests", path="log")
        nulls = log_df.select([pl.col(c).null_count() for c in dict.fromkeys((*_BASE_COLUMNS, *label_cols))]).row(0)
        for c, k in zip(dict.fromkeys((*_BASE_COLUMNS, *label_cols)), nulls):
            if k:
                raise DataError(f"{k} null value(s)", path="log", column=c)
        for c in ("user_id", "video_id"):
            if (k := log_df.get_column(c).lt(0).sum()):
                raise DataError(f"{k} negative id(s)", path="log", column=c)
        for name, df, key in (("users", users_df, "user_id"), ("videos", videos_df, "video_id")):
            if key not in df.columns:
                raise DataError("missing key column", path=name, column=key)

        self.spec = spec
        self.mode = mode
        self.history_len = int(history_len)
        self.max_candidates = max_candidates
        self.timelines = timelines if timelines is not None else Timelines.from_log(log_df, spec)

        # ---- side tables -> dense lookup tensors (the same featurisation the serving cascade uses)
        self.tables = FeatureTables(users_df, videos_df, spec)

        # ---- sort rows chronologically by request, keeping log order inside a request
        df = (log_df.select(
            pl.col("user_id").cast(pl.Int64), pl.col("video_id").cast(pl.Int64), pl.col("time_ms").cast(pl.Int64),
            (pl.col("hourmin").cast(pl.Int64) // 100).alias("__hour"), pl.col("tab").cast(pl.Int64),
            pl.col("is_rand").cast(pl.Boolean), (pl.col("play_time_ms").cast(pl.Float64) / 1000.0).alias("__watch"),
            (pl.col("duration_ms").cast(pl.Float64) / 1000.0).alias("__dur"),
            *[pl.col(c).cast(pl.Float32).alias(f"__y{j}") for j, c in enumerate(label_cols)],
        ).with_row_index("__row").sort(["time_ms", "user_id"], maintain_order=True))
        uid = df.get_column("user_id").to_numpy()
        tms = df.get_column("time_ms").to_numpy()
        r = len(uid)
        new = np.r_[True, (uid[1:] != uid[:-1]) | (tms[1:] != tms[:-1])]
        req_start = np.flatnonzero(new)
        req_of_row = np.cumsum(new) - 1
        position = np.arange(r, dtype=np.int64) - req_start[req_of_row]
        keep = np.ones(r, dtype=bool) if max_candidates is None else position < max_candidates
        first = np.flatnonzero(keep) if mode == "pointwise" else req_start

        vid = df.get_column("video_id").to_numpy()[keep]
        vrow, _ = self.tables.item_rows(vid)
        n_keep = int(keep.sum())
        # per-row tables with one extra padding row at index R (gathers need no masking afterwards):
        # ints: item index, video-table row (padding -> the zero row appended to the item tables), position, log row
        rows_i = np.zeros((n_keep + 1, 4), dtype=np.int64)
        rows_i[:-1, 0] = spec.item_index(vid)
        rows_i[:-1, 1] = vrow
        rows_i[-1, 1] = self.tables.unknown_item_row
        rows_i[:-1, 2] = position[keep]
        rows_i[:-1, 3] = df.get_column("__row").to_numpy()[keep]
        rows_i[-1, 3] = -1
        # floats: the T labels, watch time (s), duration (s), is_rand
        t_ = len(objs)
        rows_f = np.zeros((n_keep + 1, t_ + 3), dtype=np.float32)
        for j in range(t_):
            rows_f[:-1, j] = df.get_column(f"__y{j}").to_numpy()[keep]
        rows_f[:-1, t_] = df.get_column("__watch").to_numpy()[keep]
        rows_f[:-1, t_ + 1] = df.get_column("__dur").to_numpy()[keep]
        rows_f[:-1, t_ + 2] = df.get_column("is_rand").to_numpy()[keep]
        self._rows_i = torch.from_numpy(rows_i)
        self._rows_f = torch.from_numpy(rows_f)

        # ---- per-request arrays
        if mode == "pointwise":
            counts = np.ones(int(keep.sum()), dtype=np.int64)
        else:
            counts = np.bincount(req_of_row[keep], minlength=len(req_start)).astype(np.int64)
        self._offsets = torch.from_numpy(np.r_[0, np.cumsum(counts)].astype(np.int64))
        self._user_id = torch.from_numpy(uid[first])
        self._time = torch.from_numpy(tms[first])
        self._urow = torch.from_numpy(self.tables.user_rows(uid[first])[0])
        self._tab = torch.from_numpy(df.get_column("tab").to_numpy()[first].astype(np.int64))
        self._hour = torch.from_numpy(df.get_column("__hour").to_numpy()[first].astype(np.int64))

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return int(self._user_id.shape[0])

    @property
    def num_rows(self) -> int:
        """Log rows (impressions) kept by the dataset."""
        return int(self._rows_i.shape[0]) - 1

    @property
    def user_ids(self) -> Tensor:
        """[Q] user id of every request."""
        return self._user_id

    @property
    def request_time_ms(self) -> Tensor:
        """[Q] time of every request."""
        return self._time

    @property
    def request_sizes(self) -> Tensor:
        """[Q] candidates of every request."""
        return self._offsets[1:] - self._offsets[:-1]

    def locate(self, user_ids, time_ms) -> Tensor:
        """Request index of each ``(user_id, time_ms)`` (the first of them in pointwise mode); -1 where absent."""
        q = pl.DataFrame({"user_id": np.asarray(user_ids, dtype=np.int64).reshape(-1),
                          "time_ms": np.asarray(time_ms, dtype=np.int64).reshape(-1)})
        reqs = (pl.DataFrame({"user_id": self._user_id.numpy(), "time_ms": self._time.numpy()})
                .with_row_index("__i").group_by(["user_id", "time_ms"]).agg(pl.col("__i").min()))
        out = q.join(reqs, on=["user_id", "time_ms"], how="left", maintain_order="left").get_column("__i")
        return torch.from_numpy(out.cast(pl.Int64).fill_null(-1).to_numpy().astype(np.int64))

    # ------------------------------------------------------------------ batches
    def __getitem__(self, index: int) -> RequestBatch:
        """A batch of the single request ``index``."""
        return self.batch([index])

    def batch(self, indices) -> RequestBatch:
        """The ``RequestBatch`` of the requests ``indices`` ([B] ints, numpy array or tensor)."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices,
                              dtype=torch.int64).reshape(-1)
        q = len(self)
        if idx.numel() and (int(idx.min()) < -q or int(idx.max()) >= q):
            raise DataError(f"request index out of range [0, {q})", column="indices")
        idx = torch.where(idx < 0, idx + q, idx)
        start = self._offsets[idx]
        count = self._offsets[idx + 1] - start
        b = int(idx.numel())
        m = int(count.max()) if b else 0
        ar = torch.arange(m, dtype=torch.int64)
        mask = ar.unsqueeze(0) < count.unsqueeze(1)  # [B, M]
        rows = torch.where(mask, start.unsqueeze(1) + ar, self.num_rows).reshape(-1)  # padding -> the zero row
        ri = self._rows_i.index_select(0, rows).view(b, m, 4)
        rf = self._rows_f.index_select(0, rows).view(b, m, -1)
        t_ = len(self.tasks)
        vrow = ri[..., 1].reshape(-1)
        urow = self._urow.index_select(0, idx)
        user_id, t = self._user_id.index_select(0, idx), self._time.index_select(0, idx)
        hist = self.timelines.history(user_id, t, self.history_len)
        user_sparse, user_dense = self.tables.user_features(urow)
        cand_sparse, cand_dense = self.tables.item_features(vrow.view(b, m))
        return RequestBatch(
            user_id=user_id, request_time_ms=t, user_sparse=user_sparse, user_dense=user_dense,
            hist_items=hist.items, hist_actions=hist.actions, hist_gap_s=hist.gap_s, hist_len=hist.length,
            cand_items=ri[..., 0].contiguous(), cand_mask=mask, cand_sparse=cand_sparse, cand_dense=cand_dense,
            tab=self._tab.index_select(0, idx), hour=self._hour.index_select(0, idx),
            position=ri[..., 2].contiguous(), duration_s=rf[..., t_ + 1].contiguous(),
            labels=rf[..., :t_].contiguous(), watch_time_s=rf[..., t_].contiguous(), is_rand=rf[..., t_ + 2] > 0,
            extras={"request_index": idx, "log_row": ri[..., 3].contiguous()},
        )

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                     drop_last: bool = False) -> Iterator[RequestBatch]:
        """Yield batches of ``batch_size`` requests (in order, or shuffled by a seeded ``torch.Generator``)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        else:
            order = torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            yield self.batch(order[i: i + batch_size])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)
