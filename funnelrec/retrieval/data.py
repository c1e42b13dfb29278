"""Sequential retrieval data: leave-last-out examples over each user's positives, served as ``RequestBatch``es.

Protocol (RecBole's leave-one-out for sequential recommendation, with funnelrec's no-leakage rule):

* **Positives.** The rows of the log whose ``positive`` column is > 0 (``is_click`` on KuaiRand and the
  simulator); with ``positive=None`` every row is an interaction (MovieLens: every rating counts, as in RecBole).
  With ``dedupe=True`` (default) only the *first* positive of each ``(user, item)`` pair is kept, so every target is
  an item the user has not interacted with before; otherwise history exclusion (below) would make every repeat
  target unreachable (on ``sim:small`` about 46 % of last clicks repeat an earlier click).
* **Split** (:func:`funnelrec.data.splits.leave_last_out` on the positives, ordered by ``time_ms`` then log row):
  per user, the last positive is the **test** target, the second to last the **valid** target, every earlier one a
  **train** positive. Users with fewer than 3 positives only contribute train positives.
* **History** of a target at time t = the user's positives with ``time_ms < t`` (strictly before: a positive on the
  same page / in the same second is not history), the most recent ``max_len`` of them, left-padded. The test
  target's history therefore includes the valid target, unless both share a timestamp (two clicks on one page,
  two MovieLens ratings in one second; RecBole, which orders ties by file order, would count it).
* **Exclusion.** Full-corpus ranking leaves out every item of the target's *whole* history (not only the last
  ``max_len``): :meth:`RetrievalData.exclude_mask`. Item index 0 (padding) is never a candidate (models score it
  ``-inf``).

Batches (``RetrievalData.batches``) are ``RequestBatch``es with ``M = 1``:

* ``mode="example"`` (every split): one row per target. ``hist_items [B, N=max_len]`` = its positive history,
  ``hist_actions [B, N, A]`` = the history rows' ``ACTION_COLUMNS`` flags (A = 7, or 0 when the log lacks them),
  ``cand_items [B, 1]`` = the target, ``cand_sparse [B, 1, Fi]`` / ``cand_dense [B, 1, Di]`` its features,
  ``labels [B, 1, 1]`` = 1, ``request_time_ms`` = the target's time, ``tab`` / ``hour`` from its log row. Train
  positives are examples too (two-tower training: each positive with its strictly-before history).
* ``mode="sequence"`` (train only; SASRec): one row per window of a user's train-positive sequence
  ``s_0 .. s_{n-1}``: ``hist_items [B, L=max_len]`` = inputs ``s_a .. s_{e-2}`` and ``extras["seq_targets"]
  [B, L]`` = next items ``s_{a+1} .. s_{e-1}``, both left-padded with 0 and aligned position by position
  (``hist_len`` = number of valid positions). Windows hold at most ``max_len`` transitions and are cut from the end
  of the sequence, overlapping by one item, so every transition of every user is trained exactly once per epoch.
  ``cand_items [B, 1]`` = the window's last target.

Example:
    >>> from funnelrec.data.sources import load_source
    >>> src = load_source("sim:small?num_users=50&days=2", progress=False)  # doctest: +SKIP
    >>> data = RetrievalData.from_log(src.log, src.users, src.videos, src.feature_spec())  # doctest: +SKIP
    >>> batch = next(data.batches("test", batch_size=32))  # doctest: +SKIP
    >>> batch.cand_items.shape, data.exclude_mask(batch).shape  # doctest: +SKIP
    (torch.Size([32, 1]), torch.Size([32, 7584]))
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.batch import RequestBatch
from funnelrec.data.features import FeatureSpec
from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.data.splits import leave_last_out
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError, DataError

__all__ = ["RetrievalData", "SPLITS", "MODES"]

SPLITS = ("train", "valid", "test")
MODES = ("example", "sequence")
_POS = "__positive"
_ROW = "__row"


class _Examples:
    """Targets of one split: user id, time, item index, tab and hour of each, in (user, time) order."""

    def __init__(self, frame: pl.DataFrame):
        self.user_id = torch.from_numpy(frame.get_column("user_id").to_numpy().astype(np.int64))
        self.time_ms = torch.from_numpy(frame.get_column("time_ms").to_numpy().astype(np.int64))
        self.item = torch.from_numpy(frame.get_column("__item").to_numpy().astype(np.int64))
        self.tab = torch.from_numpy(frame.get_column("__tab").to_numpy().astype(np.int64))
        self.hour = torch.from_numpy(frame.get_column("__hour").to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return int(self.item.shape[0])


class RetrievalData:
    """Leave-last-out retrieval examples of a log (see the module doc). Build with :meth:`from_log`.

    Attributes:
        spec: the fitted feature spec (item index = ``video_id + 1``; ``num_items`` = I incl. padding 0).
        timelines: every user's (deduplicated) positives, for histories and exclusion.
        max_len: N, the history length of every batch (and L of sequence batches).
        positive: the positive column, or None (every row).
        item_sparse_table: [I, Fi] int64 item sparse features by item index (row 0 = padding, zeros).
        item_dense_table: [I, Di] float32 item dense features by item index.
    """

    def __init__(self, spec: FeatureSpec, positives: pl.DataFrame, splits: dict[str, pl.DataFrame],
                 users: pl.DataFrame, videos: pl.DataFrame, max_len: int, positive: str | None):
        self.spec = spec
        self.max_len = int(max_len)
        self.positive = positive
        actions = tuple(c for c in ACTION_COLUMNS if c in positives.columns)
        actions = actions if len(actions) == len(ACTION_COLUMNS) else ()
        self.timelines = Timelines.from_log(positives, spec, action_columns=actions)
        self._examples = {name: _Examples(frame) for name, frame in splits.items()}
        # the train positives as flat arrays sorted by (user, time, row), with one trailing padding entry
        tr = splits["train"]
        self._train_users = torch.from_numpy(np.r_[tr.get_column("user_id").to_numpy(), -1].astype(np.int64))
        self._train_times = torch.from_numpy(np.r_[tr.get_column("time_ms").to_numpy(), 0].astype(np.int64))
        self._train_items = torch.from_numpy(np.r_[tr.get_column("__item").to_numpy(), 0].astype(np.int64))
        flags = np.zeros((tr.height + 1, len(actions)), np.int8)
        for j, c in enumerate(actions):
            flags[:-1, j] = tr.get_column(c).fill_null(0).to_numpy()
        self._train_actions = torch.from_numpy(flags)
        self._windows: tuple[Tensor, Tensor] | None = None

        # side tables -> lookup tensors (users by sorted user id, items by item index)
        user_ids = users.get_column("user_id").cast(pl.Int64).to_numpy()
        order = np.argsort(user_ids, kind="stable")
        self._user_keys = user_ids[order]
        self._user_sparse = torch.from_numpy(spec.transform_users(users)[order])
        self._user_dense = torch.from_numpy(spec.transform_users_dense(users)[order])
        i = spec.num_items
        vid = videos.get_column("video_id").cast(pl.Int64).to_numpy()
        idx = np.asarray(spec.item_index(vid), dtype=np.int64)
        ok = idx > 0
        self.item_sparse_table = torch.zeros(i, spec.num_item_sparse, dtype=torch.int64)
        self.item_dense_table = torch.zeros(i, spec.num_item_dense, dtype=torch.float32)
        self.item_sparse_table[idx[ok]] = torch.from_numpy(spec.transform_items(videos)[ok])
        self.item_dense_table[idx[ok]] = torch.from_numpy(spec.transform_items_dense(videos)[ok])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_log(cls, log: pl.DataFrame, users: pl.DataFrame, videos: pl.DataFrame, spec: FeatureSpec,
                 positive: str | None = "is_click", max_len: int = 50, dedupe: bool = True) -> "RetrievalData":
        """Leave-last-out retrieval data of a KuaiRand-schema log.

        Args:
            log: the interaction log (at least ``user_id, video_id, time_ms`` and the ``positive`` column; ``tab``,
                ``hourmin`` and the ``ACTION_COLUMNS`` are used when present).
            users: user table (``user_id`` unique, every user of the log present).
            videos: video table (``video_id`` unique, every positive video present).
            spec: a ``FeatureSpec``; an unfitted one is fitted (in place) on ``users`` and ``videos``.
            positive: the positive column (rows with a value > 0), or None: every row is an interaction.
            max_len: N, the history length (and L, the window length of sequence batches).
            dedupe: keep only the first positive of each (user, item) pair (see the module doc).

        Raises:
            ConfigError: ``max_len < 1`` or a spec that is not a ``FeatureSpec``.
            DataError: a missing column, no positive rows, a user or video missing from its table, or no user
                with 3 positives (nothing to validate or test on).
        """
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        if not isinstance(spec, FeatureSpec):
            raise ConfigError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
        if not isinstance(log, pl.DataFrame):
            raise DataError(f"expected a polars DataFrame, got {type(log).__name__}", path="log")
        need = ("user_id", "video_id", "time_ms") + ((positive,) if positive is not None else ())
        for c in need:
            if c not in log.columns:
                raise DataError("missing column needed by the retrieval data", path="log", column=c)
        for name, table, key in (("users", users, "user_id"), ("videos", videos, "video_id")):
            if not isinstance(table, pl.DataFrame) or key not in table.columns:
                raise DataError(f"expected a table with a {key!r} column", path=name, column=key)
        if not spec.fitted:
            spec.fit(users, videos)

        extra = [c for c in ACTION_COLUMNS if c in log.columns]
        flag = pl.col(positive).fill_null(0) > 0 if positive is not None else pl.lit(True)
        pos = (log.with_row_index(_ROW)
               .filter(flag)
               .select(_ROW, pl.col("user_id").cast(pl.Int64), pl.col("video_id").cast(pl.Int64),
                       pl.col("time_ms").cast(pl.Int64),
                       (pl.col("tab").cast(pl.Int64) if "tab" in log.columns else pl.lit(0, pl.Int64)).alias("__tab"),
                       ((pl.col("hourmin").cast(pl.Int64) // 100) if "hourmin" in log.columns
                        else pl.lit(0, pl.Int64)).alias("__hour"),
                       *extra)
               .sort(["user_id", "time_ms", _ROW]))
        if pos.height == 0:
            what = f"{positive} > 0" if positive is not None else "any row"
            raise DataError(f"no positive rows ({what})", path="log", column=positive)
        if dedupe:
            pos = pos.filter(pl.int_range(pl.len()).over(["user_id", "video_id"]) == 0)
        item = spec.item_index(pos.get_column("video_id").to_numpy())
        pos = pos.with_columns(pl.Series("__item", np.asarray(item, dtype=np.int64)), pl.lit(1, pl.Int8).alias(_POS))
        pos = pos.filter(pl.col("__item") > 0)  # videos outside the spec's fitted id range cannot be ranked
        splits = leave_last_out(pos.drop(_ROW), positive=_POS)
        missing = pos.select("user_id").unique().join(users.select(pl.col("user_id").cast(pl.Int64)),
                                                      on="user_id", how="anti")
        if missing.height:
            raise DataError(f"{missing.height} user id(s) of the log are not in the users table, e.g. "
                            f"{missing.get_column('user_id').min()}", path="users", column="user_id")
        return cls(spec, pos.drop(_ROW), splits, users, videos, max_len, positive)

    @classmethod
    def from_source(cls, source, spec: FeatureSpec | None = None, max_len: int = 50,
                    dedupe: bool = True) -> "RetrievalData":
        """:meth:`from_log` on a :class:`funnelrec.data.sources.Source` (its positive and its feature spec)."""
        return cls.from_log(source.log, source.users, source.videos, spec or source.feature_spec(),
                            positive=source.positive, max_len=max_len, dedupe=dedupe)

    # ------------------------------------------------------------------ sizes
    @property
    def num_items(self) -> int:
        """I: item indices including padding 0 (= ``spec.num_items``)."""
        return int(self.spec.num_items)

    def num_examples(self, split: str) -> int:
        """Targets of a split (train: train positives)."""
        return len(self._split(split))

    def num_windows(self) -> int:
        """Rows of a sequence-mode epoch."""
        return int(self._sequence_windows()[0].shape[0])

    def targets(self, split: str) -> Tensor:
        """[Q] item index of every target of ``split``, in example order."""
        return self._split(split).item

    def item_popularity(self) -> Tensor:
        """[I] float32 number of train positives of every item index (0 for padding): the popularity signal and the
        sampling distribution of logQ-corrected losses. Never counts valid/test targets."""
        counts = torch.bincount(self._examples["train"].item, minlength=self.num_items)
        counts[0] = 0
        return counts.to(torch.float32)

    @property
    def item_features(self) -> tuple[Tensor, Tensor]:
        """``(item_sparse_table [I, Fi], item_dense_table [I, Di])``, indexed by item index."""
        return self.item_sparse_table, self.item_dense_table

    def _split(self, split: str) -> _Examples:
        if split not in self._examples:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._examples[split]

    # ------------------------------------------------------------------ batches
    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                mode: str = "example") -> Iterator[RequestBatch]:
        """Yield ``RequestBatch``es of a split (see the module doc for the two modes).

        Args:
            split: ``"train"``, ``"valid"`` or ``"test"``.
            batch_size: B.
            shuffle: shuffle with a ``torch.Generator`` seeded by ``seed``.
            drop_last: drop a last, smaller batch.
            mode: ``"example"`` (one row per target) or ``"sequence"`` (train only: one row per window).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if mode not in MODES:
            raise ConfigError(f"unknown batch mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "sequence" and split != "train":
            raise ConfigError(f"mode='sequence' serves the train split only, got split {split!r}")
        n = self.num_windows() if mode == "sequence" else self.num_examples(split)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))) if shuffle
                 else torch.arange(n))
        stop = n - n % batch_size if drop_last else n
        make = self.sequence_batch if mode == "sequence" else (lambda idx: self.batch(split, idx))
        for lo in range(0, stop, batch_size):
            yield make(order[lo: lo + batch_size])

    def num_batches(self, split: str, batch_size: int, mode: str = "example", drop_last: bool = False) -> int:
        n = self.num_windows() if mode == "sequence" else self.num_examples(split)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batch(self, split: str, indices) -> RequestBatch:
        """The example-mode ``RequestBatch`` of the targets ``indices`` ([B] ints) of ``split``."""
        ex = self._split(split)
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(ex)):
            raise DataError(f"example index out of range [0, {len(ex)})", column="indices")
        user, t, item = ex.user_id[idx], ex.time_ms[idx], ex.item[idx]
        hist = self.timelines.history(user, t, self.max_len)
        return self._assemble(user, t, item, hist.items, hist.actions, hist.gap_s, hist.length, ex.tab[idx],
                              ex.hour[idx], extras={"example_index": idx})

    def sequence_batch(self, indices) -> RequestBatch:
        """The sequence-mode ``RequestBatch`` of the training windows ``indices`` ([B] ints)."""
        starts, ends = self._sequence_windows()
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= starts.shape[0]):
            raise DataError(f"window index out of range [0, {starts.shape[0]})", column="indices")
        s, e = starts[idx], ends[idx]  # window = train positives [s, e) of the flat train sequence
        b, n = int(idx.numel()), self.max_len
        length = e - s - 1  # transitions in the window
        pos = torch.arange(n)
        pad = (n - length).unsqueeze(1)
        valid = pos.unsqueeze(0) >= pad  # [B, L]
        first = s.unsqueeze(1) + pos.unsqueeze(0) - pad  # flat index of the input at each position
        spare = self._train_items.shape[0] - 1  # the trailing padding entry of the flat train arrays
        at = torch.where(valid, first, spare)
        inp = self._train_items[at]
        tgt = self._train_items[torch.where(valid, first + 1, spare)]
        user, t = self._train_users[e - 1], self._train_times[e - 1]
        gap = torch.where(valid, (t.unsqueeze(1) - self._train_times[at]).to(torch.float32) * 1e-3, torch.zeros(()))
        actions = self._train_actions[at].to(torch.float32)  # [B, L, A]
        zeros = torch.zeros(b, dtype=torch.int64)
        return self._assemble(user, t, tgt[:, -1], inp, actions, gap, length, zeros, zeros,
                              extras={"seq_targets": tgt, "window_index": idx})

    def _assemble(self, user, t, item, hist_items, hist_actions, hist_gap, hist_len, tab, hour,
                  extras) -> RequestBatch:
        b = int(user.shape[0])
        rows = self._user_rows(user)
        cand = item.unsqueeze(1)
        return RequestBatch(
            user_id=user, request_time_ms=t, user_sparse=self._user_sparse[rows], user_dense=self._user_dense[rows],
            hist_items=hist_items, hist_actions=hist_actions, hist_gap_s=hist_gap, hist_len=hist_len,
            cand_items=cand, cand_mask=torch.ones(b, 1, dtype=torch.bool),
            cand_sparse=self.item_sparse_table[cand], cand_dense=self.item_dense_table[cand], tab=tab, hour=hour,
            position=torch.zeros(b, 1, dtype=torch.int64), duration_s=torch.zeros(b, 1),
            labels=torch.ones(b, 1, 1), extras=extras,
        )

    def _user_rows(self, user: Tensor) -> Tensor:
        u = user.numpy()
        r = np.minimum(np.searchsorted(self._user_keys, u), len(self._user_keys) - 1)
        bad = self._user_keys[r] != u
        if bad.any():
            raise DataError(f"user id {int(u[bad][0])} is not in the users table", path="users", column="user_id")
        return torch.from_numpy(r)

    def _sequence_windows(self) -> tuple[Tensor, Tensor]:
        """``(start, end)`` of every training window: the train positives ``[start, end)`` of the flat arrays."""
        if self._windows is not None:
            return self._windows
        users = self._train_users[:-1].numpy()
        if len(users):
            bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
            u_start, u_end = bounds[:-1], bounds[1:]
        else:
            u_start = u_end = np.zeros(0, np.int64)
        # windows from the end of each sequence: [max(start, e - L - 1), e), next e = window start + 1
        starts, ends = [], []
        e = u_end.copy()
        active = (e - u_start) >= 2
        while active.any():
            s = np.maximum(u_start[active], e[active] - self.max_len - 1)
            starts.append(s)
            ends.append(e[active])
            e[active] = s + 1
            active = (e - u_start) >= 2
        start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        order = np.argsort(start, kind="stable")  # by user, then position (the flat array is user-sorted)
        start, end = start[order].astype(np.int64), end[order].astype(np.int64)
        self._windows = (torch.from_numpy(start), torch.from_numpy(end))
        return self._windows

    # ------------------------------------------------------------------ exclusion
    def history_items(self, user_ids, request_time_ms) -> tuple[Tensor, Tensor]:
        """Every history item of each request (no ``max_len`` cut): ``(row [E'], item [E'])`` pairs, row in [0, B)."""
        start, end = self.timelines.bounds(user_ids, request_time_ms)
        lens = (end - start).astype(np.int64)
        row = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        first = np.repeat(start - np.r_[0, np.cumsum(lens)[:-1]], lens)
        flat = first + np.arange(int(lens.sum()), dtype=np.int64)
        return torch.from_numpy(row), self.timelines.items[torch.from_numpy(flat)]

    def exclude_mask(self, batch: RequestBatch) -> Tensor:
        """[B, I] bool: True at every item of each request's whole positive history (strictly before
        ``request_time_ms``), which full-corpus ranking leaves out. Padding index 0 is left False (models score it
        ``-inf`` themselves)."""
        row, item = self.history_items(batch.user_id, batch.request_time_ms)
        mask = torch.zeros(batch.batch_size, self.num_items, dtype=torch.bool)
        mask[row, item] = True
        mask[:, 0] = False
        return mask.to(batch.device)
