"""The multi-task ranking loss every ranker trains with.

``multitask_loss`` = mean binary cross-entropy over the T tasks and the real candidates (``cand_mask``) +
``watch_weight`` × the mean watch-time loss over the real candidates (D2Q quantile BCE when a
``WatchTimeDebiaser`` is given, else squared error on log(1 + seconds); see ``funnelrec.ranking.watch_time``).
Padded candidates contribute nothing, whatever their labels or outputs (even non-finite ones).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> batch = RequestBatch.empty(batch_size=2, history=0, candidates=3)
    >>> out = {"logits": torch.zeros(2, 3, 6), "watch": torch.zeros(2, 3)}
    >>> round(float(multitask_loss(out, batch)), 4)        # BCE of p = 0.5 is log 2
    0.6931
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.ranking.watch_time import WatchTimeDebiaser, watch_loss


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [B, M] over ``mask`` [B, M] (0 when nothing is real); masked entries may be non-finite."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def multitask_loss(out: dict[str, Tensor], batch: RequestBatch, watch_weight: float = 0.1,
                   watch: WatchTimeDebiaser | None = None) -> Tensor:
    """Mean BCE over tasks × real candidates + ``watch_weight`` × watch loss.

    Args:
        out: a ranker's output: ``logits`` [B, M, T] and ``watch`` [B, M] (a quantile logit for a D2Q head, else
            predicted log(1 + watch seconds)).
        batch: the batch, with ``labels`` [B, M, T]; ``watch_time_s`` None skips the watch term.
        watch_weight: weight of the watch term (0 skips it).
        watch: the model's ``WatchTimeDebiaser`` for a D2Q head; None for a log1p head. A ranker's own
            ``loss(out, batch)`` passes the right one.
    """
    mask = batch.cand_mask
    bce = nn.functional.binary_cross_entropy_with_logits(out["logits"], batch.labels, reduction="none")
    loss = masked_mean(bce.mean(-1), mask)
    if batch.watch_time_s is not None and watch_weight > 0:
        loss = loss + watch_weight * masked_mean(watch_loss(out["watch"], batch.watch_time_s, batch.duration_s,
                                                            watch), mask)
    return loss
