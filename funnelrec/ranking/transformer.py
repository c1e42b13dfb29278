"""A plain Transformer-encoder ranker: full attention over [candidate, user, every history event] per candidate.

The "Transformer" baseline of the LONGER paper (its table: Transformer 0.85111 vs LONGER 0.85290 AUC, at about twice
LONGER's FLOPs), and the strongest plain code for the comparison (DESIGN §7): every (request, candidate) pair is one
token set ``[candidate, user, h_1 … h_L]``, run through ``num_layers`` pre-norm blocks of full (non-causal) multi-head
attention with ``F.scaled_dot_product_attention`` (only padding is masked) and a SiLU FFN; the output is
RMSNorm(candidate state ‖ user state) → T task heads + the watch head.

It shares its tokenizers with ``funnelrec.ranking.longer`` (same global candidate/user tokens, same event tokens:
item embedding + action flags + time-gap bucket + recency position) and its blocks with LONGER's
(``funnelrec.nn.seq_attention.SeqAttentionLayer``), so the two models differ only in what LONGER adds: no CLS or
cross tokens here, **no causal mask** (history tokens read the candidate, so nothing can be cached per user and
everything is recomputed for every candidate), **no token merge**, **no query sampling** (all L + 2 tokens go
through every layer).

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = TransformerRanker(TransformerRankerConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.nn.masks import key_padding_mask
from funnelrec.nn.seq_attention import SeqAttentionLayer
from funnelrec.ranking.base import MultiTaskRanker, TaskHeads
from funnelrec.ranking.longer import GlobalTokens, SequenceModelConfig, SequenceTokens, check_int, history_events
from funnelrec.ranking.watch_time import WatchTimeDebiaser


@dataclass
class TransformerRankerConfig(SequenceModelConfig):
    """Sizes of ``TransformerRanker`` (the common fields are on ``SequenceModelConfig`` and ``RankerConfig``).

    Args:
        num_layers: full-attention blocks (3 = LONGER's 1 cross + 2 self layers by default).
    """

    num_layers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("TransformerRankerConfig.num_layers", self.num_layers, 1)


class TransformerRanker(MultiTaskRanker):
    """Full-attention Transformer encoder over [candidate, user, history] (see the module docstring).

    Args:
        config: a ``TransformerRankerConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: TransformerRankerConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        self.seq_tokens = SequenceTokens(c.embed_dim, c.num_actions, c.dim, c.history_pool, c.gap_buckets)
        self.global_tokens = GlobalTokens(self.inputs, c.dim, cls=False, cross_tokens=0)
        self.layers = nn.ModuleList(SeqAttentionLayer(c.dim, c.heads, c.ffn_mult, c.dropout)
                                    for _ in range(c.num_layers))
        self.out_norm = nn.RMSNorm(c.dim)
        self.heads = TaskHeads(2 * c.dim, c.head, self.num_heads)

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        c = self.config
        glob = self.global_tokens(self.inputs, batch)  # [B, M, 2, dim]: candidate, user
        hist, items, valid = history_events(self.inputs, batch, c.history_pool, c.num_actions)
        seq = self.seq_tokens(items, hist.hist_actions, hist.hist_gap_s, valid)  # [B, N, dim]
        b, m, g, d = glob.shape
        n = seq.shape[1]
        x = torch.cat([glob, seq.unsqueeze(1).expand(b, m, n, d)], 2).reshape(b * m, g + n, d)
        token_valid = torch.cat([torch.ones(b, g, dtype=torch.bool, device=valid.device), valid], 1)
        mask = key_padding_mask(token_valid.repeat_interleave(m, 0), g + n)  # [B·M, G + N, G + N]
        for layer in self.layers:
            x = layer(x, mask)
        h = self.out_norm(x[:, :g]).flatten(-2).view(b, m, g * d)
        return self.split_heads(self.heads(h))


__all__ = ["TransformerRankerConfig", "TransformerRanker"]
