"""``RequestBatch``: the one input contract of every funnelrec model, and the shape glossary.

Every retriever, ranker, fusion and re-ranking model takes a ``RequestBatch``, so the same model trains on logs and
serves live requests. A *request* is one user at one moment asking for a list; on KuaiRand files it is the group of
log rows with the same ``(user_id, time_ms)``. A pointwise training row is a request with ``M = 1``.

Shape letters (used the same way everywhere in funnelrec):

====  ==========================================================
B     requests in the batch
N     history length (padded)
M     candidates per request (padded)
T     tasks (the classification objectives of the registry)
S     tokens
K     lists (re-ranking)
L     list length
D     width
E     experts
R     rank
Fu    user sparse fields;  Du user dense features
Fi    item sparse fields;  Di item dense features
A     history action channels
====  ==========================================================

Index conventions: every id tensor holds *feature-spec indices*, where index 0 means padding or unknown (out of
vocabulary), so ``nn.Embedding(vocab, D)`` applies directly. Histories are **left-padded**: the most recent event is at
position ``N - 1`` and ``hist_len`` counts the valid events; a history holds only events strictly before
``request_time_ms`` (the no-leakage rule, enforced where batches are built: ``funnelrec.data.timeline``).

Example:
    >>> import torch
    >>> b = RequestBatch.empty(batch_size=2, history=4, candidates=3, tasks=6)
    >>> b.cand_items.shape, b.history_mask().shape
    (torch.Size([2, 3]), torch.Size([2, 4]))
    >>> b.validate() is b
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from funnelrec.errors import DataError


@dataclass
class RequestBatch:
    """A batch of recommendation requests with their histories, candidates, context and (optionally) labels.

    Args:
        user_id: [B] int64 raw user ids (for grouping metrics and caches; models use ``user_sparse``).
        request_time_ms: [B] int64 epoch milliseconds of each request.
        user_sparse: [B, Fu] int64 user sparse-feature indices (field 0 is the user-id index).
        user_dense: [B, Du] float32 user dense features.
        hist_items: [B, N] int64 item indices of past events, left-padded with 0.
        hist_actions: [B, N, A] float32 feedback of each past event (by default the 6 task labels + is_hate).
        hist_gap_s: [B, N] float32 seconds between each past event and the request (≥ 0, 0 at padding).
        hist_len: [B] int64 number of valid history events.
        cand_items: [B, M] int64 candidate item indices (0 at padding).
        cand_mask: [B, M] bool, True where a candidate is real.
        cand_sparse: [B, M, Fi] int64 candidate sparse-feature indices (field 0 is the item-id index).
        cand_dense: [B, M, Di] float32 candidate dense features.
        tab: [B] int64 scenario (KuaiRand tab).
        hour: [B] int64 hour of day of the request.
        position: [B, M] int64 display position of each candidate in the served list (0 = top).
        labels: [B, M, T] float32 task labels, or None when serving.
        watch_time_s: [B, M] float32 play time in seconds, or None.
        duration_s: [B, M] float32 candidate duration in seconds.
        is_rand: [B, M] bool, True for randomly exposed impressions, or None.
        context_dense: [B, C] float32 extra context (device/network state), or None.
        extras: free-form per-batch tensors keyed by name (stage-specific inputs), not validated.
    """

    user_id: Tensor
    request_time_ms: Tensor
    user_sparse: Tensor
    user_dense: Tensor
    hist_items: Tensor
    hist_actions: Tensor
    hist_gap_s: Tensor
    hist_len: Tensor
    cand_items: Tensor
    cand_mask: Tensor
    cand_sparse: Tensor
    cand_dense: Tensor
    tab: Tensor
    hour: Tensor
    position: Tensor
    duration_s: Tensor
    labels: Tensor | None = None
    watch_time_s: Tensor | None = None
    is_rand: Tensor | None = None
    context_dense: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.cand_items.shape[0])

    @property
    def num_candidates(self) -> int:
        """M."""
        return int(self.cand_items.shape[1])

    @property
    def history_length(self) -> int:
        """N (padded)."""
        return int(self.hist_items.shape[1])

    @property
    def device(self) -> torch.device:
        return self.cand_items.device

    def history_mask(self) -> Tensor:
        """[B, N] bool, True at valid (non-padding) history positions of the left-padded history."""
        n = self.history_length
        pos = torch.arange(n, device=self.hist_items.device)
        return pos.unsqueeze(0) >= (n - self.hist_len).unsqueeze(1)

    # ------------------------------------------------------------- transforms
    def _map(self, fn) -> "RequestBatch":
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                kwargs[f.name] = fn(value)
            elif f.name == "extras":
                kwargs[f.name] = {k: fn(v) for k, v in value.items()}
            else:
                kwargs[f.name] = value
        return RequestBatch(**kwargs)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RequestBatch":
        """The same batch on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "RequestBatch":
        """The same batch in pinned host memory (for fast, asynchronous copies to a GPU)."""
        return self._map(lambda t: t.pin_memory())

    def select(self, index: Tensor) -> "RequestBatch":
        """The requests at ``index`` ([B'] int64 or [B] bool), every per-request tensor sliced on dim 0."""
        return self._map(lambda t: t[index])

    def truncate_history(self, n: int) -> "RequestBatch":
        """Keep only the ``n`` most recent history positions (the last ``n`` columns of the left-padded history)."""
        if n < 0:
            raise DataError(f"history length must be >= 0, got {n}", column="hist_items")
        start = self.history_length - min(n, self.history_length)
        return dataclasses.replace(
            self, hist_items=self.hist_items[:, start:], hist_actions=self.hist_actions[:, start:],
            hist_gap_s=self.hist_gap_s[:, start:], hist_len=self.hist_len.clamp(max=n),
        )

    # ------------------------------------------------------------- checking
    def validate(self) -> "RequestBatch":
        """Check every shape and dtype against the contract; raise ``DataError`` naming the field. Returns self."""
        b, m = self.cand_items.shape if self.cand_items.dim() == 2 else (None, None)
        if b is None:
            raise DataError(f"expected [B, M], got shape {tuple(self.cand_items.shape)}", column="cand_items")
        n = self.hist_items.shape[1] if self.hist_items.dim() == 2 else None
        if n is None:
            raise DataError(f"expected [B, N], got shape {tuple(self.hist_items.shape)}", column="hist_items")
        expect: dict[str, tuple] = {
            "user_id": (b,), "request_time_ms": (b,), "hist_len": (b,), "tab": (b,), "hour": (b,),
            "hist_items": (b, n), "hist_gap_s": (b, n), "cand_mask": (b, m), "position": (b, m), "duration_s": (b, m),
        }
        prefix: dict[str, tuple] = {
            "user_sparse": (b,), "user_dense": (b,), "hist_actions": (b, n), "cand_sparse": (b, m),
            "cand_dense": (b, m),
        }
        optional = {"watch_time_s": (b, m), "is_rand": (b, m)}
        for name, shape in expect.items():
            self._check_shape(name, getattr(self, name), shape, exact=True)
        for name, shape in prefix.items():
            self._check_shape(name, getattr(self, name), shape, exact=False, extra_dims=1)
        for name, shape in optional.items():
            if getattr(self, name) is not None:
                self._check_shape(name, getattr(self, name), shape, exact=True)
        if self.labels is not None:
            self._check_shape("labels", self.labels, (b, m), exact=False, extra_dims=1)
        if self.context_dense is not None:
            self._check_shape("context_dense", self.context_dense, (b,), exact=False, extra_dims=1)
        for name in ("user_id", "hist_items", "hist_len", "cand_items", "user_sparse", "cand_sparse", "tab", "hour",
                     "position"):
            t = getattr(self, name)
            if t.dtype != torch.int64:
                raise DataError(f"expected int64, got {t.dtype}", column=name)
        if self.cand_mask.dtype != torch.bool:
            raise DataError(f"expected bool, got {self.cand_mask.dtype}", column="cand_mask")
        if self.hist_len.numel() and (int(self.hist_len.min()) < 0 or int(self.hist_len.max()) > n):
            raise DataError(f"hist_len must lie in [0, {n}]", column="hist_len")
        return self

    @staticmethod
    def _check_shape(name: str, t: Tensor, shape: tuple, *, exact: bool, extra_dims: int = 0) -> None:
        if not isinstance(t, Tensor):
            raise DataError(f"expected a tensor, got {type(t).__name__}", column=name)
        got = tuple(t.shape)
        ok = got == shape if exact else (len(got) == len(shape) + extra_dims and got[: len(shape)] == shape)
        if not ok:
            want = "[" + ", ".join(str(s) for s in shape) + (", ·" * extra_dims) + "]"
            raise DataError(f"expected shape {want}, got {list(got)}", column=name)

    # ------------------------------------------------------------ factories
    @classmethod
    def empty(
        cls, batch_size: int, history: int, candidates: int, tasks: int = 6, user_fields: int = 1,
        user_dense: int = 0, item_fields: int = 1, item_dense: int = 0, actions: int = 7,
    ) -> "RequestBatch":
        """A zero-filled batch of the given sizes (for shape checks, tracing and examples)."""
        for name, v in dict(batch_size=batch_size, history=history, candidates=candidates, tasks=tasks).items():
            if v < 0:
                raise DataError(f"size must be >= 0, got {v}", column=name)
        b, n, m = batch_size, history, candidates
        z = torch.zeros
        return cls(
            user_id=z(b, dtype=torch.int64), request_time_ms=z(b, dtype=torch.int64),
            user_sparse=z(b, user_fields, dtype=torch.int64), user_dense=z(b, user_dense),
            hist_items=z(b, n, dtype=torch.int64), hist_actions=z(b, n, actions), hist_gap_s=z(b, n),
            hist_len=z(b, dtype=torch.int64), cand_items=z(b, m, dtype=torch.int64),
            cand_mask=torch.ones(b, m, dtype=torch.bool), cand_sparse=z(b, m, item_fields, dtype=torch.int64),
            cand_dense=z(b, m, item_dense), tab=z(b, dtype=torch.int64), hour=z(b, dtype=torch.int64),
            position=z(b, m, dtype=torch.int64), duration_s=z(b, m), labels=z(b, m, tasks),
            watch_time_s=z(b, m), is_rand=z(b, m, dtype=torch.bool),
        )
