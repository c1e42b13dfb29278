"""The popularity/position-only ranker: the floor every model must clear, and ``m_pop`` of "gap closed".

Per task, a logistic regression on non-personal features only: the item's smoothed training rate of the task
(as a logit), log item impressions, the display position and the tab. The rates that the regression is fitted on
are cross-fitted (counted on the other half of the users), so they carry no row's own label. It knows nothing about the user, so the
distance between it and the world's oracle is the personal signal there is to learn (DESIGN §7).

Example:
    >>> import polars as pl
    >>> from funnelrec.sim import World
    >>> log = World.from_profile("small").simulate(days=2, progress=False).log
    >>> model = PopularityPositionModel().fit(log)
    >>> model.predict(log).shape[1]
    6
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from funnelrec.data.schema import LABEL_COLUMNS, NUM_TABS
from funnelrec.errors import DataError

MAX_POSITION = 32


def with_position(log: pl.DataFrame) -> pl.DataFrame:
    """Add ``position``: the display position of each row within its request (user_id, time_ms), in log order."""
    if "position" in log.columns:
        return log
    return log.with_columns(pl.int_range(pl.len()).over("user_id", "time_ms").cast(pl.Int64).alias("position"))


@dataclass
class PopularityPositionModel:
    """Per-task logistic regression on item popularity, position and tab.

    Args:
        tasks: label columns to model (default: the 6 KuaiRand tasks of the registry).
        prior_strength: pseudo-impressions of the Beta prior that smooths each item's rate.
        l2: L2 penalty of the logistic regressions.
    """

    tasks: tuple[str, ...] = LABEL_COLUMNS
    prior_strength: float = 20.0
    l2: float = 1e-4
    _item_stats: pl.DataFrame | None = field(default=None, repr=False)
    _priors: dict[str, float] = field(default_factory=dict, repr=False)
    _weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def _item_table(self, log: pl.DataFrame) -> pl.DataFrame:
        return log.group_by("video_id").agg(
            pl.len().alias("n"), *[pl.col(t).cast(pl.Int64).sum().alias(f"hits_{t}") for t in self.tasks])

    def _features(self, log: pl.DataFrame, task: str, stats: pl.DataFrame | None = None) -> torch.Tensor:
        log = with_position(log)
        stats = self._item_stats if stats is None else stats
        joined = log.select("video_id", "position", "tab").join(stats, on="video_id", how="left",
                                                                 maintain_order="left")
        n = joined["n"].fill_null(0).to_numpy().astype(np.float64)
        hits = joined[f"hits_{task}"].fill_null(0).to_numpy().astype(np.float64)
        prior = self._priors[task]
        rate = (hits + prior * self.prior_strength) / (n + self.prior_strength)
        rate = np.clip(rate, 1e-6, 1 - 1e-6)
        pos = np.clip(joined["position"].to_numpy(), 0, MAX_POSITION - 1)
        tab = np.clip(joined["tab"].to_numpy().astype(np.int64), 0, NUM_TABS - 1)
        x = np.zeros((log.height, 3 + MAX_POSITION + NUM_TABS), dtype=np.float32)
        x[:, 0] = np.log(rate / (1 - rate))
        x[:, 1] = np.log1p(n)
        x[:, 2] = 1.0
        x[np.arange(log.height), 3 + pos] = 1.0
        x[np.arange(log.height), 3 + MAX_POSITION + tab] = 1.0
        return torch.from_numpy(x)

    def fit(self, log: pl.DataFrame) -> "PopularityPositionModel":
        """Fit on a training log (KuaiRand schema)."""
        if log.height == 0:
            raise DataError("cannot fit on an empty log", path="train log")
        missing = [t for t in self.tasks if t not in log.columns]
        if missing:
            raise DataError("missing label column", path="train log", column=missing[0])
        self._item_stats = self._item_table(log)
        # Cross-fitting: each half of the users is described by item rates counted on the other half, so the rate
        # feature never contains the row's own label (which would inflate its weight and bend the position ones).
        fold = (log["user_id"] % 2 == 0).to_numpy()
        halves = [log.filter(pl.Series(fold)), log.filter(pl.Series(~fold))]
        other = [self._item_table(halves[1]), self._item_table(halves[0])]
        for task in self.tasks:
            self._priors[task] = float(log[task].cast(pl.Float64).mean())
            x = torch.cat([self._features(h, task, s) for h, s in zip(halves, other) if h.height])
            y = torch.cat([torch.tensor(h[task].cast(pl.Float32).to_numpy()) for h in halves if h.height])
            self._weights[task] = _fit_logistic(x, y, self.l2)
        return self

    def predict(self, log: pl.DataFrame) -> np.ndarray:
        """[R, T] predicted probabilities for every row of ``log``."""
        if not self._weights:
            raise DataError("the model is not fitted; call fit(train_log) first", path="PopularityPositionModel")
        cols = [torch.sigmoid(self._features(log, t) @ self._weights[t]).numpy() for t in self.tasks]
        return np.stack(cols, axis=1)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 60) -> torch.Tensor:
    """Weights of an L2-regularised logistic regression (full-batch L-BFGS)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w[3:] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()
