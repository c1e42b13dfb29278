"""SASRec (Kang & McAuley, ICDM 2018): a causal transformer over the user's item sequence predicts the next item.

The sequence is the user's positive history (item indices). Each position's state is computed from the items up to
and including it (causal self-attention, ``F.scaled_dot_product_attention(..., is_causal=True)``) plus a learned
position embedding; the state at position t scores every item as the next one by a dot product with the (tied)
input item embeddings.

**Layout.** Batches carry left-padded histories (the ``RequestBatch`` convention). The model right-aligns them
internally — valid items at positions ``0 .. len-1``, padding after them — so a causal mask alone keeps every valid
position away from padding (no extra key mask), and position embeddings count from the oldest item of the window
(as in RecBole). Histories longer than ``max_len`` keep their most recent ``max_len`` items.

**Training** (``train_mode = "sequence"``, see ``funnelrec.retrieval.data``): every position of every window is
trained at once, the target at position t being ``extras["seq_targets"][:, t]`` (the next item). ``loss="full"``
is a softmax over the whole corpus; ``loss="sampled"`` a softmax over ``num_sampled`` popularity-sampled items
shared by the batch, with logQ correction (``funnelrec.retrieval.base.softmax_loss_logq``). An example-mode batch
(without ``seq_targets``) trains only the last position, on ``cand_items[:, 0]``.

**Scoring**: ``score_all`` uses the state of the last valid position ([B, I], ``-inf`` at padding index 0).

**Item side features** (``side_features=True``, the default; RecBole's SASRecF does the same): an item's vector is
the sum of the embeddings of all its sparse fields — the id plus, e.g., tags and author on KuaiRand, genres and
year on MovieLens — both as input and as output embedding. Items then share statistical strength through their
features, which matters when most items have few training transitions. ``side_features=False`` is the original
id-only SASRec.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = SASRec(SASRecConfig(num_items=20, max_len=4, dim=8, heads=2, layers=1, side_features=False))
    >>> b = RequestBatch.empty(2, history=4, candidates=1)
    >>> b.hist_items[:] = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]]); b.hist_len[:] = torch.tensor([3, 4])
    >>> b.cand_items[:, 0] = torch.tensor([6, 5])
    >>> model.score_all(b).shape, model.training_loss(b).shape
    (torch.Size([2, 20]), torch.Size([]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.embedding import FieldEmbedding
from funnelrec.retrieval.base import NEG_INF, Retriever, log_sampling_probability, softmax_loss_logq

__all__ = ["SASRecConfig", "SASRec", "LOSSES"]

LOSSES = ("full", "sampled")


@dataclass
class SASRecConfig:
    """SASRec.

    Args:
        num_items: I, item indices including padding 0 (``spec.num_items``).
        max_len: L, the longest sequence the model reads (position-embedding rows).
        dim: D.
        heads: attention heads (``dim`` must be divisible by it).
        layers: transformer blocks.
        ffn_mult: width of the feed-forward layer, as a multiple of D.
        dropout: dropout on embeddings, attention and residual branches.
        loss: ``"full"`` (softmax over the corpus) or ``"sampled"`` (logQ-corrected sampled softmax).
        num_sampled: negatives per batch of ``loss="sampled"``.
        sample_alpha: exponent of the popularity sampling distribution (1 = popularity, 0 = uniform).
        logq: apply the logQ correction to the sampled softmax.
        item_vocab: rows of each item sparse field (``spec.vocab_sizes("item_sparse")``, field 0 = the id);
            needed when ``side_features`` is on.
        side_features: item vectors = sum of the embeddings of all item sparse fields (else the id alone).
    """

    num_items: int
    max_len: int = 50
    dim: int = 64
    heads: int = 2
    layers: int = 2
    ffn_mult: int = 2
    dropout: float = 0.3
    loss: str = "full"
    num_sampled: int = 512
    sample_alpha: float = 0.75
    logq: bool = True
    item_vocab: list[int] | None = None
    side_features: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"sasrec: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("num_items", "max_len", "dim", "heads", "layers", "ffn_mult", "num_sampled"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sasrec: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_items < 2:
            raise ConfigError(f"sasrec: num_items must be >= 2 (padding + one item), got {self.num_items}")
        if self.dim % self.heads:
            raise ConfigError(f"sasrec: dim={self.dim} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sasrec: dropout must lie in [0, 1), got {self.dropout}")
        if self.side_features:
            if not self.item_vocab:
                raise ConfigError("sasrec: side_features needs item_vocab (or set side_features=False)")
            if self.item_vocab[0] != self.num_items:
                raise ConfigError(f"sasrec: item field 0 must be the item id with num_items={self.num_items} rows, "
                                  f"got {self.item_vocab[0]}")

    @classmethod
    def from_spec(cls, spec, **overrides) -> "SASRecConfig":
        """The config of a fitted ``FeatureSpec`` (its item count and item field sizes), with keyword overrides."""
        return cls(num_items=spec.num_items, item_vocab=spec.vocab_sizes("item_sparse"), **overrides)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block with causal ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] → [B, L, D]; position t attends to positions ≤ t only."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(Retriever):
    """Self-attentive sequential recommender (see the module doc).

    Args:
        config: :class:`SASRecConfig`.
        item_popularity: [I] training-positive counts (the sampler of ``loss="sampled"``); None = uniform.
        item_sparse: [I, Fi] int64 sparse features of every item index (``RetrievalData.item_sparse_table``);
            required with ``side_features``.
    """

    train_mode = "sequence"

    def __init__(self, config: SASRecConfig, item_popularity: Tensor | None = None,
                 item_sparse: Tensor | None = None):
        super().__init__()
        c = self.config = config
        counts = torch.zeros(c.num_items) if item_popularity is None else torch.as_tensor(item_popularity,
                                                                                           dtype=torch.float32)
        if counts.shape != (c.num_items,):
            raise DataError(f"item_popularity must be [I] = [{c.num_items}], got {list(counts.shape)}",
                            column="item_popularity")
        self.register_buffer("log_q", log_sampling_probability(counts, alpha=c.sample_alpha))
        self.item_emb = nn.Embedding(c.num_items, c.dim, padding_idx=0)
        self.side_emb: FieldEmbedding | None = None
        if c.side_features:
            fi = len(c.item_vocab)
            if item_sparse is None or tuple(item_sparse.shape) != (c.num_items, fi):
                got = None if item_sparse is None else list(item_sparse.shape)
                raise ConfigError(f"sasrec: side_features needs item_sparse [I, Fi] = [{c.num_items}, {fi}], got "
                                  f"{got} (RetrievalData.item_sparse_table, or side_features=False)")
            if fi > 1:
                self.register_buffer("item_sparse", item_sparse[:, 1:].to(torch.int64).clone())
                self.side_emb = FieldEmbedding(list(c.item_vocab[1:]), c.dim)
        self.pos_emb = nn.Embedding(c.max_len, c.dim)
        self.blocks = nn.ModuleList(_Block(c.dim, c.heads, c.ffn_mult, c.dropout) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.dim)
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # ------------------------------------------------------------------ encoder
    def item_vectors(self) -> Tensor:
        """[I, D] every item's vector (input and output embedding; row 0 = padding = 0)."""
        w = self.item_emb.weight
        if self.side_emb is not None:
            side = self.side_emb(self.item_sparse).sum(1)
            w = w + side * (torch.arange(w.shape[0], device=w.device) > 0).unsqueeze(1).to(w.dtype)
        return w

    def _right_align(self, left: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        """Left-padded [B, N] → right-padded [B, L] (valid at 0..len-1) and the clamped lengths [B]."""
        big_l = self.config.max_len
        n = left.shape[1]
        if n >= big_l:
            left = left[:, n - big_l:]
        else:
            left = F.pad(left, (big_l - n, 0))
        length = length.clamp(max=big_l)
        pos = torch.arange(big_l, device=left.device)
        src = (pos.unsqueeze(0) + (big_l - length).unsqueeze(1)).clamp(max=big_l - 1)
        valid = pos.unsqueeze(0) < length.unsqueeze(1)
        return torch.where(valid, left.gather(1, src), torch.zeros((), dtype=left.dtype, device=left.device)), length

    def sequence_states(self, items: Tensor, length: Tensor | None = None, item_table: Tensor | None = None
                        ) -> Tensor:
        """States of right-padded sequences: items [B, L] (valid items at 0..len-1) → [B, L, D].

        Args:
            items: [B, L] item indices, L ≤ ``max_len``.
            length: [B] valid positions per row (default: the count of non-zero items).
            item_table: [I, D] precomputed ``item_vectors()`` (computed when None).
        """
        b, n = items.shape
        if n > self.config.max_len:
            raise DataError(f"sequence length {n} exceeds max_len={self.config.max_len}", column="hist_items")
        length = (items > 0).sum(1) if length is None else length
        valid = torch.arange(n, device=items.device).unsqueeze(0) < length.unsqueeze(1)
        table = self.item_vectors() if item_table is None else item_table
        # F.embedding, not table[items]: its backward sums repeated items in a fixed order (funnelrec.utils.probes)
        x = F.embedding(items, table) * math.sqrt(self.config.dim) + self.pos_emb.weight[:n]
        x = self.drop(x) * valid.unsqueeze(-1)  # padding sits after every valid position: causality hides it
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def user_state(self, batch: RequestBatch, item_table: Tensor | None = None) -> Tensor:
        """[B, D] the state at the last valid history position (the query of ``score_all``)."""
        items, length = self._right_align(batch.hist_items, batch.hist_len)
        states = self.sequence_states(items, length, item_table)
        last = (length - 1).clamp(min=0)
        return states[torch.arange(states.shape[0], device=states.device), last]

    # ------------------------------------------------------------------ protocol
    def training_loss(self, batch: RequestBatch) -> Tensor:
        """Next-item loss at every valid position (``extras["seq_targets"]``; else the last position only)."""
        c = self.config
        targets = batch.extras.get("seq_targets")
        if targets is None:  # an example batch: the candidate is the next item after the whole history
            targets = torch.zeros_like(batch.hist_items)
            if targets.shape[1]:
                targets[:, -1] = batch.cand_items[:, 0]
        if targets.shape != batch.hist_items.shape:
            raise DataError(f"seq_targets must have the shape of hist_items {list(batch.hist_items.shape)}, got "
                            f"{list(targets.shape)}", column="seq_targets")
        items, length = self._right_align(batch.hist_items, batch.hist_len)
        tgt, _ = self._right_align(targets, batch.hist_len)
        table = self.item_vectors()
        states = self.sequence_states(items, length, table)
        keep = tgt > 0
        if not keep.any():
            return states.sum() * 0.0
        q, t = states[keep], tgt[keep]  # [P, D], [P]
        if c.loss == "full":
            logits = q @ table.t()
            logits[:, 0] = NEG_INF
            return F.cross_entropy(logits, t)
        neg_ids = torch.multinomial(self.log_q.exp(), c.num_sampled, replacement=True)
        lq = self.log_q if c.logq else None
        return softmax_loss_logq(q, table.index_select(0, t), t, table.index_select(0, neg_ids), neg_ids,
                                 lq[t] if lq is not None else None, lq[neg_ids] if lq is not None else None)

    def score_all(self, batch: RequestBatch) -> Tensor:
        """[B, I] dot product of the last state with every item embedding; ``-inf`` at padding index 0."""
        table = self.item_vectors()
        scores = self.user_state(batch, table) @ table.t()
        scores[:, 0] = NEG_INF
        return scores
