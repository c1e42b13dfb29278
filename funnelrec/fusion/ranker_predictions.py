"""Trained-ranker predictions for the fusion session environment (``SessionEnvConfig(predictions="ranker")``).

The env's default predictions are the oracle's with calibrated noise. This mode asks a trained cascade's ranker
instead: for each request, the env's candidates (catalogue rows) become item indices, the ranker reads the user's
features and history (logged events + everything the env has served so far, via the cascade's
``LiveTimelines``), and returns the six task probabilities and the predicted watch seconds. After each page the
sampled feedback is appended to the live histories (the same records as the closed-loop cascade,
:mod:`funnelrec.serving.closed_loop`), so the next request of the session reads it. A ranker's errors are then
those of a real model: biased per user and item, dependent on the history, not Gaussian on the logits.

Requests carry the closed loop's conventions (the end of the session day as their time, hour 20; the env's tab),
and ``reset()`` forgets the appended events, so two policies evaluated one after the other start from the same
histories.

Paper's / ours: xMTF fuses a production ranker's predictions [SRC]; the adapter, the time / hour conventions and
the reset rule are ours.

Example:
    >>> from funnelrec.data.sources import load_source
    >>> from funnelrec.serving.build import train_cascade
    >>> source = load_source("sim:bench-v1")                                                # doctest: +SKIP
    >>> world = source.world                                                                # doctest: +SKIP
    >>> parts = train_cascade(source)                       # every stage, ~11 min on one thread  # doctest: +SKIP
    >>> preds = CascadeRankerPredictions(parts.cascade(), world, day=world.cfg.days)        # doctest: +SKIP
    >>> env = SessionEnv(SessionEnvConfig(predictions="ranker", day=world.cfg.days), world=world,
    ...                  predictor=preds)                                                   # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from funnelrec.errors import ConfigError
from funnelrec.serving.cascade import Cascade
from funnelrec.serving.closed_loop import REQUEST_HOUR, LiveFeedback, request_time_ms
from funnelrec.sim.oracle import TASKS as ORACLE_TASKS

__all__ = ["CascadeRankerPredictions"]


class CascadeRankerPredictions(LiveFeedback):
    """The env's predictions from a trained cascade's ranker, with the session's feedback fed back.

    Args:
        cascade: a trained cascade (its ranker must predict every task of ``funnelrec.sim.oracle.TASKS``).
        world: the env's world (ids and catalogue).
        day: the session day (requests carry the end of it); the env's ``day`` must equal it.
    """

    def __init__(self, cascade: Cascade, world, day: int):
        super().__init__(cascade, world)
        missing = [t for t in ORACLE_TASKS if t not in cascade.tasks]
        if missing:
            raise ConfigError(f"the cascade's ranker predicts {list(cascade.tasks)}; the fusion env needs "
                              f"{', '.join(missing)} too")
        self.day = int(day)
        self.request_ms = request_time_ms(self.day)
        self.task_index = torch.tensor([cascade.tasks.index(t) for t in ORACLE_TASKS])

    def reset(self) -> None:
        """Forget every appended event (back to the logged histories)."""
        self.cascade.history.reset()

    @torch.inference_mode()
    def predict(self, users: Tensor, candidates: Tensor, tab: Tensor) -> tuple[Tensor, Tensor]:
        """Predictions for B requests.

        Args:
            users: [B] population rows.
            candidates: [B, C] catalogue rows.
            tab: [B] the requests' tabs.

        Returns:
            ``([B, C, 6] task probabilities in the order of funnelrec.sim.oracle.TASKS, [B, C] watch seconds)``.
        """
        uid = self.user_ids[users].numpy()
        b = len(uid)
        items = self.video_ids[candidates] + 1  # catalogue row -> item index
        mask = torch.ones_like(items, dtype=torch.bool)
        time_ms = np.full(b, self.request_ms)
        hist = self.cascade.history.history(uid, time_ms, self.cascade.history_len)
        pxtr, watch = self.cascade.rank(uid, time_ms, tab.numpy(), np.full(b, REQUEST_HOUR), items, mask, hist)
        return pxtr[..., self.task_index], watch
