"""Target attention (DIN): each candidate pools the history with weights its own activation unit gives.

DIN (Zhou et al., *Deep Interest Network for Click-Through Rate Prediction*, KDD'18) scores every history event
``k_n`` against the candidate ``q`` with a small MLP over ``[q, k, q − k, q ⊙ k]`` (the *activation unit*) and sums
the events with those scores **without** softmax normalisation, so the pooled vector keeps the intensity of the
user's interest in the candidate (many related events give a larger vector). ``normalize="softmax"`` gives the
usual normalised attention instead.

Vectorised over candidates: the activation unit's first layer ``W [H, 4D]`` splits into four blocks,
``W·[q, k, q−k, q⊙k] = (W_q + W_d)·q + (W_k − W_d)·k + W_p·(q ⊙ k)``, so the q- and k-terms are computed once per
candidate and once per event, and only the product term runs over all (candidate, event) pairs ``[B, M, N, D]``.
``tests/nn/test_attention.py`` checks this against a plain per-candidate loop over the concatenation.

Example:
    >>> import torch
    >>> att = TargetAttention(dim=8, hidden=(16,))
    >>> q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)        # [B, M, D] candidates, [B, N, D] history
    >>> mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    >>> att(q, k, mask).shape                                      # [B, M, D]
    torch.Size([2, 3, 8])
    >>> att.scores(q, k).shape                                     # [B, M, N]
    torch.Size([2, 3, 5])
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.embedding import MLP

_NORMALIZE = (None, "softmax")


class ActivationUnit(nn.Module):
    """DIN's activation unit: ``MLP([q, k, q − k, q ⊙ k]) → score``, for every (candidate, event) pair at once.

    Args:
        dim: D, the width of queries and keys.
        hidden: hidden widths of the MLP (the output width is 1).
        activation: module class of the hidden activations.

    Example:
        >>> import torch
        >>> unit = ActivationUnit(4, hidden=(8,))
        >>> unit(torch.randn(2, 3, 4), torch.randn(2, 6, 4)).shape   # [B, M, N]
        torch.Size([2, 3, 6])
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (36,), activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if dim < 1 or not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"ActivationUnit needs dim >= 1 and positive hidden widths, got {dim} and {hidden}")
        self.dim = dim
        self.first = nn.Linear(4 * dim, hidden[0])  # over [q, k, q - k, q * k]
        self.act = activation()
        self.rest = MLP(hidden[0], [*hidden[1:], 1], activation=activation)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """query [B, M, D], keys [B, N, D] → scores [B, M, N] (unmasked)."""
        w_q, w_k, w_d, w_p = self.first.weight.split(self.dim, dim=1)  # each [H, D]
        hq = query @ (w_q + w_d).T + self.first.bias  # [B, M, H]
        hk = keys @ (w_k - w_d).T  # [B, N, H]
        hp = (query.unsqueeze(2) * keys.unsqueeze(1)) @ w_p.T  # [B, M, N, H]
        h = self.act(hq.unsqueeze(2) + hk.unsqueeze(1) + hp)
        return self.rest(h).squeeze(-1)


def target_attention(query: Tensor, keys: Tensor, mask: Tensor, unit: ActivationUnit, *,
                     values: Tensor | None = None, normalize: str | None = None) -> Tensor:
    """Pool the history for every candidate with the activation unit's scores.

    Args:
        query: [B, M, D] candidate vectors.
        keys: [B, N, D] history event vectors.
        mask: [B, N] bool, True at valid events (or [B, M, N] for a per-candidate mask).
        unit: the ``ActivationUnit`` that scores (query, key) pairs.
        values: [B, N, Dv] vectors to pool (default: ``keys``).
        normalize: None (DIN: raw scores, masked) or ``"softmax"`` (masked softmax over N; a candidate with no
            valid event gets zeros).

    Returns:
        [B, M, Dv]: ``Σ_n w[b, m, n] · values[b, n]`` with ``w`` zero at masked events.

    Example:
        >>> import torch
        >>> unit = ActivationUnit(4, hidden=(8,))
        >>> q, k = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
        >>> out = target_attention(q, k, torch.tensor([[False, True, True]]), unit, normalize="softmax")
        >>> out.shape
        torch.Size([1, 2, 4])
    """
    if normalize not in _NORMALIZE:
        raise ConfigError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    values = keys if values is None else values
    mask = mask if mask.dim() == 3 else mask.unsqueeze(1)  # [B, 1 or M, N]
    scores = unit(query, keys)  # [B, M, N]
    if normalize == "softmax":
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        weights = weights.masked_fill(~mask, 0.0)  # rows with no valid event: NaN -> 0
    else:
        weights = scores.masked_fill(~mask, 0.0)
    return weights @ values


class TargetAttention(nn.Module):
    """An ``ActivationUnit`` plus its pooling rule: ``target_attention`` as a module.

    Args:
        dim: D of queries and keys.
        hidden: hidden widths of the activation unit.
        normalize: None (DIN, unnormalised) or ``"softmax"``.
        activation: module class of the hidden activations.

    Example:
        >>> import torch
        >>> att = TargetAttention(4, hidden=(8,), normalize="softmax")
        >>> att(torch.randn(2, 1, 4), torch.randn(2, 7, 4), torch.ones(2, 7, dtype=torch.bool)).shape
        torch.Size([2, 1, 4])
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (36,), normalize: str | None = None,
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if normalize not in _NORMALIZE:
            raise ConfigError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.unit = ActivationUnit(dim, hidden, activation)
        self.normalize = normalize

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """[B, M, N] raw activation-unit scores."""
        return self.unit(query, keys)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor, values: Tensor | None = None) -> Tensor:
        """query [B, M, D], keys [B, N, D], mask [B, N] (values [B, N, Dv]) → [B, M, Dv]."""
        return target_attention(query, keys, mask, self.unit, values=values, normalize=self.normalize)
