"""Duration-debiased watch-time labels in the D2Q style, and the two watch-time heads of every ranker.

**D2Q** (Zhan et al., *Deconfounding Duration Bias in Watch-time Prediction for Video Recommendation*, KDD'22).
Duration drives watch time two ways: longer videos can be watched longer (a real effect, to keep) and the logging
policy shows some durations more than others (a confounder, to remove). D2Q removes the second by never comparing
watch times across durations:

* *(paper)* split the training impressions into ``buckets`` equal-frequency groups of video duration;
* *(paper)* within each group, the label of an impression is the **quantile** of its watch time in that group's
  empirical watch-time distribution (a value in [0, 1], comparable across groups);
* *(paper)* one model is trained across all groups on that label (their Fig. 5b/c, with duration information still
  in the network: here the log duration is an input of every ranker);
* *(paper)* at serving, a predicted quantile maps back to seconds through the group's quantile function.

Our choices, not the paper's:

* the empirical distribution of each group is summarised by ``quantiles + 1`` knots (levels 0, 1/Q, …, 1) and read
  **piecewise-linearly** both ways (CDF and inverse CDF), so ``to_seconds(to_quantile(w, d), d) == w`` for every
  ``w`` inside the group's range (up to float rounding); a watch time shared by several knots (an atom, e.g. many
  full plays of the same length) maps to the middle of its knots;
* duration-group edges are training-data points (``inverted_cdf`` quantiles), de-duplicated, so ties in duration
  never leave an empty group (``num_buckets`` may be below ``buckets``);
* the head is a **sigmoid trained with BCE against the soft quantile label** (the paper regresses the quantile);
  ``predict_watch_time`` maps the predicted quantile to seconds;
* ``watch_head="log1p"`` is the non-debiased option: MSE on ``log(1 + seconds)``.

The debiaser is an ``nn.Module`` holding two buffers (``edges`` [K − 1], ``table`` [K, Q + 1]), so it travels inside
the model's ``state_dict`` (under ``watch.``) and moves with ``.to(device)``; ``state_dict()`` /
``WatchTimeDebiaser.from_state_dict`` serialise it alone.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> duration = torch.rand(5000, generator=g) * 60 + 5
    >>> watch = duration * torch.rand(5000, generator=g)
    >>> d2q = WatchTimeDebiaser.fit(duration, watch, buckets=10, quantiles=20)
    >>> q = d2q.to_quantile(watch, duration)                  # labels in [0, 1]
    >>> bool((q >= 0).all() and (q <= 1).all())
    True
    >>> torch.allclose(d2q.to_seconds(q, duration), watch, atol=1e-3)
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError, DataError

WATCH_HEADS = ("auto", "d2q", "log1p")


def _as_array(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    a = a.astype(np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise DataError("non-finite values", column=name)
    if (a < 0).any():
        raise DataError("negative values", column=name)
    return a


class WatchTimeDebiaser(nn.Module):
    """Duration buckets and per-bucket watch-time quantile tables (see the module docstring).

    Build it with ``WatchTimeDebiaser.fit`` (or ``from_log`` / ``from_state_dict``); the constructor takes the
    fitted tensors.

    Args:
        edges: [K − 1] increasing inner duration edges (seconds); bucket b holds durations in
            ``[edges[b − 1], edges[b])``.
        table: [K, Q + 1] watch seconds at quantile levels ``0, 1/Q, …, 1`` of each bucket (non-decreasing rows).
    """

    def __init__(self, edges: Tensor, table: Tensor):
        super().__init__()
        edges, table = torch.as_tensor(edges, dtype=torch.float32), torch.as_tensor(table, dtype=torch.float32)
        if edges.dim() != 1 or table.dim() != 2 or table.shape[0] != edges.numel() + 1 or table.shape[1] < 2:
            raise ConfigError(f"WatchTimeDebiaser needs edges [K-1] and table [K, Q+1] with Q >= 1, got "
                              f"{list(edges.shape)} and {list(table.shape)}")
        if (edges[1:] <= edges[:-1]).any() or (table[:, 1:] < table[:, :-1]).any():
            raise ConfigError("WatchTimeDebiaser: edges must increase and table rows must not decrease")
        self.register_buffer("edges", edges)
        self.register_buffer("table", table)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, duration_s: Any, watch_s: Any, buckets: int = 20, quantiles: int = 50) -> "WatchTimeDebiaser":
        """Fit duration buckets and watch-time tables on training impressions.

        Args:
            duration_s: [R] video durations in seconds (tensor, array or list; any shape, flattened).
            watch_s: [R] watch (play) times in seconds, same size.
            buckets: duration groups wanted (equal frequency; fewer when durations tie).
            quantiles: Q, the quantile resolution of each group's table (Q + 1 knots).
        """
        if buckets < 1 or quantiles < 1:
            raise ConfigError(f"buckets and quantiles must be >= 1, got {buckets} and {quantiles}")
        d, w = _as_array(duration_s, "duration_s"), _as_array(watch_s, "watch_s")
        if d.size != w.size:
            raise DataError(f"duration_s has {d.size} values but watch_s has {w.size}", column="watch_s")
        if d.size == 0:
            raise DataError("no impressions to fit on", column="duration_s")
        edges = np.unique(np.quantile(d, np.arange(1, buckets) / buckets, method="inverted_cdf"))
        edges = edges[edges > d.min()]  # every bucket holds at least its lower edge
        bucket = np.searchsorted(edges, d, side="right")
        levels = np.arange(quantiles + 1) / quantiles
        table = np.stack([np.quantile(w[bucket == b], levels) for b in range(len(edges) + 1)])  # K is small
        return cls(torch.from_numpy(edges), torch.from_numpy(table))

    @classmethod
    def from_log(cls, log, buckets: int = 20, quantiles: int = 50) -> "WatchTimeDebiaser":
        """Fit on a KuaiRand-schema log (polars DataFrame with ``duration_ms`` and ``play_time_ms``)."""
        for c in ("duration_ms", "play_time_ms"):
            if c not in log.columns:
                raise DataError("missing column", path="log", column=c)
        return cls.fit(log.get_column("duration_ms").to_numpy() / 1000.0,
                       log.get_column("play_time_ms").to_numpy() / 1000.0, buckets, quantiles)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "WatchTimeDebiaser":
        """Inverse of ``state_dict()`` (a dict with ``edges`` and ``table``)."""
        missing = [k for k in ("edges", "table") if k not in state]
        if missing:
            raise ConfigError(f"WatchTimeDebiaser state: missing {missing}")
        return cls(state["edges"], state["table"])

    # ------------------------------------------------------------------ sizes
    @property
    def num_buckets(self) -> int:
        """K."""
        return int(self.table.shape[0])

    @property
    def num_quantiles(self) -> int:
        """Q."""
        return int(self.table.shape[1]) - 1

    def bucket(self, duration_s: Tensor) -> Tensor:
        """[...] int64 duration bucket of every duration."""
        return torch.searchsorted(self.edges, duration_s.float().contiguous(), right=True)

    # ------------------------------------------------------------------ mappings
    def to_quantile(self, watch_s: Tensor, duration_s: Tensor) -> Tensor:
        """[...] watch times → their quantile in [0, 1] within their duration bucket (the D2Q label).

        Piecewise-linear between the table's knots; 0 below the bucket's smallest knot, 1 above its largest; a watch
        time equal to several knots gets the middle of their levels.
        """
        shape = watch_s.shape
        w = watch_s.float().reshape(-1, 1).contiguous()
        rows = self.table[self.bucket(duration_s).reshape(-1)]  # [R, Q + 1]
        q = self.num_quantiles
        lo = torch.searchsorted(rows, w).squeeze(1)  # knots < w
        hi = torch.searchsorted(rows, w, right=True).squeeze(1)  # knots <= w
        w = w.squeeze(1)
        j = (lo - 1).clamp(0, q - 1)
        v0, v1 = rows.gather(1, j[:, None]).squeeze(1), rows.gather(1, (j + 1)[:, None]).squeeze(1)
        between = (j + (w - v0) / (v1 - v0).clamp(min=1e-12)) / q
        tie = (lo + hi - 1).float() / (2 * q)
        out = torch.where(hi > lo, tie, between)
        out = torch.where(hi == 0, torch.zeros_like(out), out)
        out = torch.where(lo == q + 1, torch.ones_like(out), out)
        return out.clamp(0, 1).reshape(shape)

    def to_seconds(self, quantile: Tensor, duration_s: Tensor) -> Tensor:
        """[...] quantiles in [0, 1] → watch seconds (the bucket's piecewise-linear quantile function)."""
        shape = quantile.shape
        x = quantile.float().reshape(-1).clamp(0, 1) * self.num_quantiles
        rows = self.table[self.bucket(duration_s).reshape(-1)]  # [R, Q + 1]
        j = x.floor().long().clamp(max=self.num_quantiles - 1)
        v0, v1 = rows.gather(1, j[:, None]).squeeze(1), rows.gather(1, (j + 1)[:, None]).squeeze(1)
        return (v0 + (x - j) * (v1 - v0)).reshape(shape)

    def extra_repr(self) -> str:
        return f"buckets={self.num_buckets}, quantiles={self.num_quantiles}"


def resolve_watch_head(watch_head: str, watch: WatchTimeDebiaser | None) -> str:
    """The watch head a model builds: ``"auto"`` is ``"d2q"`` when given a debiaser, else ``"log1p"``."""
    if watch_head not in WATCH_HEADS:
        raise ConfigError(f"watch_head must be one of {WATCH_HEADS}, got {watch_head!r}")
    if watch is not None and not isinstance(watch, WatchTimeDebiaser):
        raise ConfigError(f"watch must be a WatchTimeDebiaser or None, got {type(watch).__name__}")
    if watch_head == "auto":
        return "d2q" if watch is not None else "log1p"
    if watch_head == "d2q" and watch is None:
        raise ConfigError("watch_head='d2q' needs a fitted WatchTimeDebiaser (WatchTimeDebiaser.fit(duration_s, "
                          "watch_s) on the training log); pass it as watch=..., or use watch_head='log1p'")
    return watch_head


def watch_loss(pred: Tensor, batch_watch_s: Tensor, duration_s: Tensor, watch: WatchTimeDebiaser | None) -> Tensor:
    """[B, M] per-candidate watch loss: BCE against the D2Q quantile label (``watch`` given; ``pred`` is a logit), or
    squared error on log(1 + seconds) (``watch`` None; ``pred`` is log1p seconds)."""
    if watch is None:
        return (pred - torch.log1p(batch_watch_s.clamp(min=0))) ** 2
    with torch.no_grad():
        label = watch.to_quantile(batch_watch_s.clamp(min=0), duration_s)
    return nn.functional.binary_cross_entropy_with_logits(pred, label, reduction="none")


def watch_seconds(pred: Tensor, duration_s: Tensor, watch: WatchTimeDebiaser | None) -> Tensor:
    """[B, M] watch seconds from the watch head's output (inverse of what ``watch_loss`` trains)."""
    if watch is None:
        return torch.expm1(pred.clamp(min=0))
    return watch.to_seconds(torch.sigmoid(pred), duration_s)
