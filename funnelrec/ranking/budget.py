"""Model size and cost for fair comparisons: parameters (embedding vs. dense) and forward+backward FLOPs per sample.

DESIGN §7: rankers are compared at matched budgets (within ±20%), with the same embedding tables. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications, forward and backward, as PyTorch counts them;
element-wise ops and embedding lookups are not counted). A *sample* is one real candidate (``cand_mask``), so pass
a batch shaped like the traffic you care about (``M = 1`` gives the pointwise cost, where nothing per request is
shared between candidates).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig
    >>> model = SharedBottom(SharedBottomConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0))
    >>> cost = count_params_flops(model, RequestBatch.empty(batch_size=4, history=5, candidates=1))
    >>> cost["params_total"] == cost["params_embedding"] + cost["params_dense"]
    True
    >>> cost["flops_per_sample"] == cost["flops_total"] / 4
    True
"""

from __future__ import annotations

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import DataError


def count_params(model: nn.Module) -> dict[str, int]:
    """``params_total``, ``params_embedding`` (every ``nn.Embedding``) and ``params_dense`` (the rest)."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False))
    return {"params_total": int(total), "params_embedding": int(emb), "params_dense": int(total - emb)}


def count_params_flops(model: nn.Module, batch: RequestBatch) -> dict[str, float]:
    """Parameters and forward+backward FLOPs of one training step on ``batch``, total and per real candidate.

    Runs ``model.training_loss(batch)`` (or the sum of ``model(batch)["logits"]`` when the batch has no labels) and
    its backward under ``FlopCounterMode``; the model's gradients are cleared afterwards.

    Returns:
        ``params_total``, ``params_embedding``, ``params_dense``, ``flops_forward``, ``flops_total``
        (forward + backward), ``flops_per_sample`` (``flops_total`` / real candidates) and ``samples``.
    """
    samples = int(batch.cand_mask.sum())
    if samples == 0:
        raise DataError("the batch has no real candidate to count FLOPs on", column="cand_mask")
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as fwd:
        out = model(batch)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as full:
        out = model(batch)
        loss = model.loss(out, batch) if batch.labels is not None and hasattr(model, "loss") else out["logits"].sum()
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    total = full.get_total_flops()
    return {**count_params(model), "flops_forward": float(forward), "flops_total": float(total),
            "flops_per_sample": total / samples, "samples": samples}
