"""Full-corpus evaluation of a retriever on leave-last-out targets, with the simulator's oracle when there is one.

For every target of the split, the model scores the whole corpus (``score_all`` → [B, I]); the items of the
target's whole history are excluded (``RetrievalData.exclude_mask``), and the rank of the target among the rest
gives (``funnelrec.metrics.ranking.topk_metrics``):

* ``recall@k`` (= ``hr@k`` for one target), ``ndcg@k``, ``mrr@k``, ``hr@k`` for every k in ``ks``, averaged over
  **all** targets: a target that is itself in the history (only possible without ``dedupe``) counts as a miss, as
  in RecBole's full-sort evaluation;
* ``coverage@k``: the share of the corpus's items (index 0 excluded) that appear in at least one top-k list;
* ``true_recall@k`` (when ``oracle`` is given): the share of the oracle's full-corpus top k — items ranked by the
  world's true single-item click probability for that user on the target's day (``Oracle.item_scores``, tab 1,
  neutral short-term intent), history excluded — that the model's top k contains (DESIGN §7);
* ``num_targets``: how many targets were evaluated.

Users are scored in chunks of ``batch_size`` so memory stays at O(batch_size × I).

Example:
    >>> metrics = evaluate_retriever(model, data, "test", ks=(10, 50), oracle=source.world)  # doctest: +SKIP
    >>> sorted(metrics)[:3]  # doctest: +SKIP
    ['coverage@10', 'coverage@50', 'hr@10']
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from funnelrec.data.schema import DAY_MS, KUAIRAND_START_MS
from funnelrec.errors import ConfigError
from funnelrec.metrics.ranking import topk_metrics, true_recall_at_k
from funnelrec.retrieval.base import NEG_INF

__all__ = ["evaluate_retriever", "oracle_scores"]


def _device(model) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def oracle_scores(oracle, user_id: Tensor, request_time_ms: Tensor, num_items: int) -> Tensor:
    """[B, I] the world's true click probability of every item index for each request (``-inf`` at index 0).

    Args:
        oracle: a ``funnelrec.sim.World`` or its ``Oracle``.
        user_id: [B] real user ids (mapped with ``Oracle.user_index``).
        request_time_ms: [B] request times; the day index is ``(t - KUAIRAND_START_MS) // DAY_MS``.
        num_items: I; item index j is simulated video ``j - 1``.
    """
    orc = getattr(oracle, "oracle", oracle)
    if not hasattr(orc, "item_scores"):
        raise ConfigError(f"oracle must be a World or an Oracle, got {type(oracle).__name__}")
    user = orc.user_index(user_id.cpu())
    day = torch.div(request_time_ms.cpu() - KUAIRAND_START_MS, DAY_MS, rounding_mode="floor").clamp(min=0)
    out = torch.full((user.shape[0], num_items), NEG_INF)
    for d in day.unique().tolist():
        rows = torch.nonzero(day == d).squeeze(1)
        p = orc.item_scores(user[rows], day=int(d))  # [b, C] by simulated video id
        c = min(p.shape[1], num_items - 1)
        out[rows, 1: c + 1] = p[:, :c]
    return out


@torch.no_grad()
def evaluate_retriever(model, data, split: str = "test", ks: Sequence[int] = (10, 50), oracle=None,
                       batch_size: int = 512) -> dict[str, float]:
    """Recall / NDCG / MRR / HR / coverage at each k (and true recall with an oracle) of ``model`` on ``split``.

    Args:
        model: a retriever (``funnelrec.retrieval.base.Retriever`` protocol).
        data: the ``RetrievalData``.
        split: ``"valid"`` or ``"test"`` (``"train"`` works too).
        ks: cut-offs.
        oracle: a ``World`` (or ``Oracle``) for ``true_recall@k``; None skips it.
        batch_size: requests scored at once.

    Returns:
        A flat dict of floats (see the module doc); metrics are ``nan`` when the split has no target.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ConfigError(f"ks must be positive cut-offs, got {ks!r}")
    i = data.num_items
    kmax = min(max(ks), i - 1)
    device = _device(model)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    true_sums = {k: 0.0 for k in ks}
    seen = {k: torch.zeros(i, dtype=torch.bool) for k in ks}
    total = 0
    try:
        for batch in data.batches(split, batch_size):
            exclude = data.exclude_mask(batch)
            scores = model.score_all(batch.to(device)).float().cpu().masked_fill(exclude, NEG_INF)
            target = batch.cand_items[:, 0]
            reachable = int((~exclude.gather(1, target.unsqueeze(1))).sum())
            b = batch.batch_size
            total += b
            if reachable:
                for name, value in topk_metrics(scores, target, ks, exclude=exclude).items():
                    sums[name] = sums.get(name, 0.0) + value * reachable  # unreachable targets add 0
            top_s, top_i = scores.topk(kmax, dim=1)
            for k in ks:
                kk = min(k, kmax)
                seen[k][top_i[:, :kk][top_s[:, :kk] > NEG_INF]] = True
            if oracle is not None:
                truth = oracle_scores(oracle, batch.user_id, batch.request_time_ms, i).masked_fill(exclude, NEG_INF)
                for k in ks:
                    kk = min(k, kmax)
                    true_sums[k] += true_recall_at_k(top_i[:, :kk], truth, kk) * b
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for k in ks:
        for name in ("recall", "ndcg", "mrr", "hr"):
            key = f"{name}@{k}"
            out[key] = sums.get(key, 0.0) / total if total else math.nan
        out[f"coverage@{k}"] = float(seen[k][1:].sum()) / max(1, i - 1)
        if oracle is not None:
            out[f"true_recall@{k}"] = true_sums[k] / total if total else math.nan
    out["num_targets"] = float(total)
    return out
