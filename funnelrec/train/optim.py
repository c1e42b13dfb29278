"""Optimisers of the trainer: AdamW for dense parameters, and a sparse-friendly option for embedding tables.

``split_parameters(model)`` separates the weights of every ``nn.Embedding`` / ``nn.EmbeddingBag`` (the embedding
tables) from the other trainable parameters (dense). ``build_optimizers(model, config)`` returns the optimisers the
``TrainConfig`` asks for:

* ``adamw``: one AdamW over everything (embedding group at ``sparse_lr``);
* ``rowwise_adagrad``: AdamW over dense parameters + ``RowWiseAdagrad`` over the tables — one squared-gradient
  accumulator per *row* (as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``), and only rows whose gradient is nonzero are read
  or written, so a step costs O(rows touched), and untouched rows never move (no weight decay drift);
* ``sparse_adam``: AdamW over dense parameters + ``LazySparseAdam`` over the tables (``torch.optim.SparseAdam``:
  moments and updates of touched rows only). Dense gradients of the tables are turned into row-sparse ones first,
  so the tables need not be declared ``sparse=True``.

Tables may have dense gradients (the default: they all-reduce under DDP with NCCL or gloo) or sparse ones
(``nn.Embedding(sparse=True)``: one process, or gloo); ``clip_grad_norm`` handles both.

Example:
    >>> import torch
    >>> emb = torch.nn.Embedding(4, 2)
    >>> opt = RowWiseAdagrad([emb.weight], lr=0.1)
    >>> before = emb.weight.detach().clone()
    >>> emb(torch.tensor([1, 1, 3])).sum().backward()
    >>> opt.step()
    >>> (emb.weight.detach() != before).any(1).tolist()   # only rows 1 and 3 had a gradient
    [False, True, False, True]
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(embedding_tables, dense)``: trainable weights of ``nn.Embedding``/``nn.EmbeddingBag`` modules, and every
    other trainable parameter (each parameter once, in ``model.parameters()`` order)."""
    table_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    tables, dense, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (tables if id(p) in table_ids else dense).append(p)
    return tables, dense


def _row_grads(p: Tensor) -> tuple[Tensor, Tensor]:
    """(rows [K] int64, their gradients [K, D]) of a 2-D parameter: the coalesced rows of a sparse gradient, or the
    rows with any nonzero entry of a dense one."""
    g = p.grad
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0], g.values().reshape(g.values().shape[0], -1)
    g2 = g.reshape(g.shape[0], -1)
    rows = torch.nonzero((g2 != 0).any(1)).squeeze(1)
    return rows, g2.index_select(0, rows)


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for embedding tables: per row r, ``G_r += mean(g_r²)``, ``w_r -= lr · g_r / (√G_r + eps)``.

    Only rows with a nonzero gradient are updated (their accumulators too); weight decay (L2 added to the gradient)
    also applies to those rows only. Parameters must be at least 2-D (rows first). State: ``sum`` [rows] float32.

    Args:
        params: the embedding weights.
        lr: learning rate (row-wise Adagrad usually wants 0.01–0.1).
        eps: added to √G.
        weight_decay: L2 on touched rows.
        initial_accumulator_value: starting G.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, eps: float = 1e-8, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or initial_accumulator_value < 0:
            raise ConfigError(f"RowWiseAdagrad: bad lr={lr}, eps={eps}, weight_decay={weight_decay} or "
                              f"initial_accumulator_value={initial_accumulator_value}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ConfigError(f"RowWiseAdagrad needs parameters with rows (>= 2-D), got shape "
                                      f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full((p.shape[0],), float(group["initial_accumulator_value"]),
                                              dtype=torch.float32, device=p.device)
                rows, g = _row_grads(p)
                if rows.numel() == 0:
                    continue
                w = p.view(p.shape[0], -1)
                g = g.float()
                if wd:
                    g = g + wd * w.index_select(0, rows).float()
                acc = state["sum"]
                acc.index_add_(0, rows, g.pow(2).mean(1))
                denom = acc.index_select(0, rows).sqrt_().add_(eps)
                w.index_add_(0, rows, (g / denom.unsqueeze(1)).mul_(-lr).to(w.dtype))
        return loss


class LazySparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` that also takes dense gradients: they are made row-sparse (rows with a nonzero
    entry) before the step, so only those rows' moments and weights change."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    p.grad = p.grad.to_sparse(1)
        return super().step(closure)


def build_optimizers(model: nn.Module, lr: float, weight_decay: float = 0.0, sparse_lr: float | None = None,
                     embedding_optimizer: str = "adamw") -> list[torch.optim.Optimizer]:
    """The optimisers of ``model`` (see the module doc); empty groups get no optimiser."""
    tables, dense = split_parameters(model)
    slr = lr if sparse_lr is None else sparse_lr
    opts: list[torch.optim.Optimizer] = []
    if embedding_optimizer == "adamw":
        groups = [g for g in ({"params": dense, "lr": lr}, {"params": tables, "lr": slr}) if g["params"]]
        if groups:
            opts.append(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay))
        return opts
    if embedding_optimizer not in ("rowwise_adagrad", "sparse_adam"):
        raise ConfigError(f"unknown embedding optimizer {embedding_optimizer!r}")
    if dense:
        opts.append(torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay))
    if tables:
        opts.append(RowWiseAdagrad(tables, lr=slr) if embedding_optimizer == "rowwise_adagrad"
                    else LazySparseAdam(tables, lr=slr))
    return opts


@torch.no_grad()
def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale every gradient so that their global L2 norm is at most ``max_norm`` (``torch.nn.utils.
    clip_grad_norm_`` where every gradient is dense; sparse gradients handled too). Returns the norm before
    clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if not any(p.grad.is_sparse for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sq = [(p.grad.coalesce().values() if p.grad.is_sparse else p.grad).float().pow(2).sum() for p in params]
    total = float(torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt())
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return total


__all__ = ["LazySparseAdam", "RowWiseAdagrad", "build_optimizers", "clip_grad_norm", "split_parameters"]
