"""LONGER: long user sequences in a ranker through global tokens, token merge and causal attention, served with a
per-user K/V cache (Chai et al., *LONGER: Scaling Up Long Sequence Modeling in Industrial Recommenders*,
RecSys'25; notes in ``../shared/papers/longer.md``).

Pipeline, per (request, candidate)::

    global tokens G (m of them): [candidate, CLS, user, cross_1 … cross_c]       (candidate-dependent: cand, cross)
    sequence tokens H (L events): Linear([item emb; action flags; gap-bucket emb]) + position emb
        → token merge (none | concat K | InnerTrans K)  → S = ⌈L / K⌉ tokens
    one cross-causal layer: queries [G; k sampled sequence tokens], keys/values [G; H]      (m + S → m + k)
    N self-causal layers over the m + k tokens
    → RMSNorm(candidate state ‖ CLS state) → T task heads + the watch head

Every layer uses the mask of ``funnelrec.nn.masks``: sequence tokens attend only to sequence tokens at or before
their position and never to a global token; global tokens attend to everything valid; padding is never attended.
So everything on the sequence side is candidate-independent: ``encode_user(batch)`` computes the sequence-side K/V
of every layer once per request (``LongerCache``) and ``score_with_cache(cache, batch)`` runs only the m global
tokens of each candidate against it (serving, ``no_grad``).

``forward`` (training) has two paths, chosen by ``LongerConfig.train_path``:

* ``"per_request"`` (default): the same split as serving, differentiable
  (``CrossCausalEncoder.forward_per_request``): the history is encoded once per request and the M candidates' global
  tokens attend to its K/V without copying it; under autograd the global-token attention is plain matmuls with one
  softmax over [own global keys; sequence keys] (exact backward — the serving kernel's log-sum-exp has no gradient),
  without autograd it is the serving kernel. The sequence work is paid once per request instead of M times.
* ``"per_candidate"``: the naive reference: every (request, candidate) pair is its own token set (the history
  repeated M times), run through ``F.scaled_dot_product_attention`` (``CrossCausalEncoder.forward``).

All paths agree to float32 round-off, outputs and parameter gradients (``tests/ranking/test_longer.py``;
``funnelrec bench longer-kv-cache``). With dropout they differ in the random draws only: per request, the
sequence-side states and their dropout masks are shared by the request's candidates.

What is the paper's and what is ours:

=====================================  =================================================================================
paper (stated)                         ours
=====================================  =================================================================================
global tokens: candidate, CLS, UID,    candidate = Linear(candidate sparse-field embeddings, display position, item
user×item cross features               dense, log duration); CLS = a learned vector; user = Linear(user fields, tab,
                                       hour, user dense); ``cross_tokens`` bilinear crosses
                                       ``(U_j user) ⊙ (V_j candidate)`` (the paper does not say how its crosses are
                                       built)
item + time difference to the target   event token = Linear([item-id embedding (shared table); the A action flags;
(concatenated) + learnable absolute    embedding of ⌊log2(1 + gap_s)⌋]) + a learned position embedding. Positions
position                               count back from the most recent event (recency), so the output does not
                                       depend on how wide the padding is
token merge: concat K (width K·d)      ``merge="concat"``: concat K adjacent tokens then project back to D (the paper
or InnerTrans                          keeps width K·d); ``"innertrans"``: one transformer block inside each group,
                                       then the same concat + projection (the paper does not say how the K outputs
                                       of InnerTrans become one token); ``"none"``. Groups end at the most recent
                                       event
cross-causal layer, queries = global   the same; ``query_sampling="recent"`` (paper's best) / ``"uniform"`` (k
+ k sampled (recent / uniform /        evenly spaced over the valid history; the paper does not say random or
learnable)                             strided) / ``"learnable"`` (k learned query vectors, placed after the whole
                                       history: they see every valid sequence token and stay candidate-independent).
                                       k' = min(k, S) for sampled queries
causal mask (the note's formula looks  sequence query at position i sees sequence keys j ≤ i only, never global
transposed)                            tokens; global queries see all (``funnelrec.nn.masks``)
N self-causal layers, concat → MLP     pre-RMSNorm attention + SiLU FFN blocks; the output is the candidate and CLS
                                       token states (not every token), then the shared ``TaskHeads``
KV cache at serving                    ``encode_user`` / ``score_with_cache`` (above); training shares the sequence
                                       side per request the same way (``train_path``, above)
mixed precision, recomputation,        not here (CPU-first); the model runs in any float dtype
GPU-resident embeddings
=====================================  =================================================================================

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = Longer(LongerConfig(user_vocab=[10], item_vocab=[20], user_dense=0, item_dense=0)).eval()
    >>> batch = RequestBatch.empty(batch_size=2, history=12, candidates=3)
    >>> batch.hist_len[:] = 12
    >>> out = model(batch)
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
    >>> cached = model.score_with_cache(model.encode_user(batch), batch)
    >>> bool((cached["logits"] - out["logits"]).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.data.schema import NUM_TABS
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.seq_attention import MERGE_MODES, QUERY_SAMPLING, CrossCausalEncoder, SeqKVCache, TokenMerge
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads
from funnelrec.ranking.inputs import MAX_POSITIONS, RankingInputs
from funnelrec.ranking.watch_time import WatchTimeDebiaser

TRAIN_PATHS = ("per_request", "per_candidate")


def check_int(name: str, value, lo: int) -> None:
    """``ConfigError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")


@dataclass
class SequenceModelConfig(RankerConfig):
    """Fields shared by the sequence rankers (``LongerConfig``, ``TransformerRankerConfig``); see ``RankerConfig`` for the
    rest. ``history_pool`` is L, the most recent events read as tokens.

    Args:
        dim: D_model, the width of every token.
        heads: attention heads (``dim`` must be divisible by it).
        ffn_mult: FFN hidden width = ``ffn_mult · dim``.
        num_actions: A, the action channels of ``hist_actions`` (the 6 tasks + ``is_hate`` by default).
        gap_buckets: buckets of ⌊log2(1 + gap seconds)⌋ (the last bucket takes every longer gap).
    """

    history_pool: int = 256
    dim: int = 32
    heads: int = 2
    ffn_mult: int = 4
    num_actions: int = 7
    gap_buckets: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.history_mode != "pool":
            raise ConfigError(f"{name}.history_mode must be 'pool': the model reads the history as tokens, "
                              f"got {self.history_mode!r}")
        check_int(f"{name}.history_pool", self.history_pool, 1)
        for key in ("dim", "heads", "ffn_mult", "gap_buckets"):
            check_int(f"{name}.{key}", getattr(self, key), 1)
        check_int(f"{name}.num_actions", self.num_actions, 0)
        if self.dim % self.heads:
            raise ConfigError(f"{name}.dim must be divisible by {name}.heads, got dim={self.dim} heads={self.heads}")


@dataclass
class LongerConfig(SequenceModelConfig):
    """Sizes and switches of ``Longer`` (the common fields are on ``SequenceModelConfig`` and ``RankerConfig``).

    Args:
        num_layers: N self-causal layers after the cross-causal layer.
        merge: token merge, ``"none"``, ``"concat"`` or ``"innertrans"``.
        merge_k: K events per merged token (ignored with ``merge="none"``).
        num_queries: k sequence-side queries of the cross-causal layer.
        query_sampling: ``"recent"``, ``"uniform"`` or ``"learnable"``.
        cross_tokens: c user × candidate cross tokens among the global tokens.
        train_path: how ``forward`` runs the encoder: ``"per_request"`` (default; the history once per request,
            differentiable, exact gradients) or ``"per_candidate"`` (the naive reference: the history repeated for
            each of the M candidates). Same outputs and gradients up to round-off; see the module docstring.
    """

    num_layers: int = 2
    merge: str = "concat"
    merge_k: int = 4
    num_queries: int = 32
    query_sampling: str = "recent"
    cross_tokens: int = 1
    train_path: str = "per_request"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_path not in TRAIN_PATHS:
            raise ConfigError(f"LongerConfig.train_path must be one of {TRAIN_PATHS}, got {self.train_path!r}")
        if self.merge not in MERGE_MODES:
            raise ConfigError(f"LongerConfig.merge must be one of {MERGE_MODES}, got {self.merge!r}")
        if self.query_sampling not in QUERY_SAMPLING:
            raise ConfigError(f"LongerConfig.query_sampling must be one of {QUERY_SAMPLING}, got "
                              f"{self.query_sampling!r}")
        check_int("LongerConfig.merge_k", self.merge_k, 1)
        check_int("LongerConfig.num_queries", self.num_queries, 1)
        check_int("LongerConfig.num_layers", self.num_layers, 0)
        check_int("LongerConfig.cross_tokens", self.cross_tokens, 0)

    @property
    def merge_size(self) -> int:
        """The K actually used (1 without merge)."""
        return 1 if self.merge == "none" else self.merge_k


# ------------------------------------------------------------------------------------------------ tokenizers


def gap_bucket(gap_s: Tensor, buckets: int) -> Tensor:
    """⌊log2(1 + gap seconds)⌋ clamped to ``[0, buckets − 1]`` (int64).

    Example:
        >>> gap_bucket(torch.tensor([0.0, 1.0, 59.0, 1e9]), 16).tolist()
        [0, 1, 5, 15]
    """
    return torch.log2(1.0 + gap_s.clamp(min=0)).floor().long().clamp(0, buckets - 1)


class SequenceTokens(nn.Module):
    """History events → tokens: ``Linear([item emb; action flags; gap-bucket emb]) + position emb``, zero at padding.

    Args:
        embed_dim: D of the item-id embeddings (and of the gap-bucket embedding).
        num_actions: A.
        dim: D_model of the tokens.
        max_len: rows of the position table (recency 0 = the most recent event; older ones share the last row).
        gap_buckets: rows of the gap-bucket table.

    Example:
        >>> tok = SequenceTokens(embed_dim=4, num_actions=7, dim=8, max_len=16, gap_buckets=8)
        >>> valid = torch.tensor([[False, True, True]])
        >>> tok(torch.randn(1, 3, 4), torch.zeros(1, 3, 7), torch.ones(1, 3), valid).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, embed_dim: int, num_actions: int, dim: int, max_len: int, gap_buckets: int):
        super().__init__()
        self.num_actions, self.max_len, self.gap_buckets = num_actions, max_len, gap_buckets
        self.gap_emb = nn.Embedding(gap_buckets, embed_dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.gap_emb.weight, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.proj = nn.Linear(2 * embed_dim + num_actions, dim)

    def forward(self, items: Tensor, actions: Tensor, gap_s: Tensor, valid: Tensor) -> Tensor:
        """items [B, N, D], actions [B, N, A], gap_s [B, N], valid [B, N] → [B, N, dim]."""
        n = items.shape[1]
        recency = torch.arange(n - 1, -1, -1, device=items.device).clamp(max=self.max_len - 1)
        x = torch.cat([items, actions.to(items.dtype), self.gap_emb(gap_bucket(gap_s, self.gap_buckets))], -1)
        x = self.proj(x) + self.pos_emb(recency)
        return x * valid.unsqueeze(-1).to(x.dtype)


class GlobalTokens(nn.Module):
    """The global tokens ``[candidate, (CLS), user, cross_1 … cross_c]`` from the shared ``RankingInputs`` tables.

    Args:
        inputs: the model's ``RankingInputs`` (its embedding tables are read, not copied).
        dim: D_model.
        cls: add a learned CLS token.
        cross_tokens: c bilinear user × candidate tokens ``(U_j u) ⊙ (V_j v)``.

    ``user_state(batch)`` [B, 1 + c, dim] is the candidate-independent part (the user token, then the c user-side
    cross factors); ``assemble(user_state, batch)`` [B, M, G, dim] adds the candidate side.
    """

    def __init__(self, inputs: RankingInputs, dim: int, cls: bool = True, cross_tokens: int = 0):
        super().__init__()
        d = inputs.embed_dim
        self.user_in = inputs.user_emb.num_fields * d + 2 * d + inputs.user_dense
        self.item_in = inputs.item_emb.num_fields * d + d * int(inputs.use_position) + inputs.item_dense + 1
        self.dim, self.cross_tokens = dim, cross_tokens
        self.user_proj = nn.Linear(self.user_in, dim)
        self.item_proj = nn.Linear(self.item_in, dim)
        self.cls = nn.Parameter(torch.randn(dim) * 0.02) if cls else None
        self.cross_user = nn.Linear(self.user_in, cross_tokens * dim) if cross_tokens else None
        self.cross_item = nn.Linear(self.item_in, cross_tokens * dim) if cross_tokens else None

    @property
    def num_tokens(self) -> int:
        """m = G."""
        return 2 + int(self.cls is not None) + self.cross_tokens

    @staticmethod
    def user_vector(inputs: RankingInputs, batch: RequestBatch) -> Tensor:
        """[B, Fu·D + 2D + Du]: user fields, tab, hour, user dense."""
        if batch.user_dense.shape[-1] != inputs.user_dense:
            raise DataError(f"expected {inputs.user_dense} dense features, got {batch.user_dense.shape[-1]}",
                            column="user_dense")
        parts = [inputs.user_emb(batch.user_sparse).flatten(-2), inputs.tab_emb(batch.tab.clamp(0, NUM_TABS - 1)),
                 inputs.hour_emb(batch.hour.clamp(0, 23)), batch.user_dense]
        return torch.cat(parts, -1)

    @staticmethod
    def item_vector(inputs: RankingInputs, batch: RequestBatch) -> Tensor:
        """[B, M, Fi·D (+ D) + Di + 1]: candidate fields, display position, item dense, log duration."""
        if batch.cand_dense.shape[-1] != inputs.item_dense:
            raise DataError(f"expected {inputs.item_dense} dense features, got {batch.cand_dense.shape[-1]}",
                            column="cand_dense")
        parts = [inputs.item_emb(batch.cand_sparse).flatten(-2)]
        if inputs.pos_emb is not None:
            parts.append(inputs.pos_emb(batch.position.clamp(0, MAX_POSITIONS - 1)))
        parts += [batch.cand_dense, (torch.log1p(batch.duration_s.clamp(min=0)) - 4.0).unsqueeze(-1)]
        return torch.cat(parts, -1)

    def user_state(self, inputs: RankingInputs, batch: RequestBatch) -> Tensor:
        """[B, 1 + c, dim] the candidate-independent part."""
        u = self.user_vector(inputs, batch)
        parts = [self.user_proj(u).unsqueeze(1)]
        if self.cross_user is not None:
            parts.append(self.cross_user(u).unflatten(-1, (self.cross_tokens, self.dim)))
        return torch.cat(parts, 1)

    def assemble(self, user_state: Tensor, inputs: RankingInputs, batch: RequestBatch) -> Tensor:
        """[B, M, G, dim] the global tokens of every candidate."""
        v = self.item_vector(inputs, batch)  # [B, M, Fv]
        b, m = v.shape[:2]
        parts = [self.item_proj(v).unsqueeze(2)]
        if self.cls is not None:
            parts.append(self.cls.to(v.dtype).expand(b, m, 1, self.dim))
        parts.append(user_state[:, :1].unsqueeze(1).expand(b, m, 1, self.dim))
        if self.cross_item is not None:
            cross = self.cross_item(v).unflatten(-1, (self.cross_tokens, self.dim))  # [B, M, c, dim]
            parts.append(user_state[:, 1:].unsqueeze(1) * cross)
        return torch.cat(parts, 2)

    def forward(self, inputs: RankingInputs, batch: RequestBatch) -> Tensor:
        """[B, M, G, dim]."""
        return self.assemble(self.user_state(inputs, batch), inputs, batch)


def history_events(inputs: RankingInputs, batch: RequestBatch, length: int,
                   num_actions: int) -> tuple[RequestBatch, Tensor, Tensor]:
    """The last ``length`` history events: (the truncated batch, item-id embeddings [B, N, D], valid [B, N])."""
    hist = batch.truncate_history(length)
    events = inputs.item_emb.lookup(0, hist.hist_items, column="hist_items")
    if hist.hist_actions.shape[-1] != num_actions:
        raise DataError(f"expected {num_actions} action channels, got {hist.hist_actions.shape[-1]}",
                        column="hist_actions")
    return hist, events, hist.history_mask()


# ------------------------------------------------------------------------------------------------------ model


@dataclass
class LongerCache:
    """What ``Longer.encode_user`` keeps per request for ``score_with_cache``.

    Args:
        kv: the sequence-side K/V of every encoder layer (``funnelrec.nn.seq_attention.SeqKVCache``).
        user: [B, 1 + c, dim] the candidate-independent part of the global tokens.
    """

    kv: SeqKVCache
    user: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.user.shape[0])

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.user.numel() * self.user.element_size()


class Longer(MultiTaskRanker):
    """LONGER with a KV-cache serving path (see the module docstring).

    Args:
        config: a ``LongerConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: LongerConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        self.seq_tokens = SequenceTokens(c.embed_dim, c.num_actions, c.dim, c.history_pool, c.gap_buckets)
        self.merge = TokenMerge(c.dim, c.merge_size, c.merge, heads=c.heads, ffn_mult=2)
        self.global_tokens = GlobalTokens(self.inputs, c.dim, cls=True, cross_tokens=c.cross_tokens)
        self.encoder = CrossCausalEncoder(c.dim, c.heads, c.num_layers, c.num_queries, c.query_sampling,
                                          c.ffn_mult, c.dropout)
        self.out_norm = nn.RMSNorm(c.dim)
        self.heads = TaskHeads(2 * c.dim, c.head, self.num_heads)

    @property
    def num_global(self) -> int:
        """m."""
        return self.global_tokens.num_tokens

    def sequence(self, batch: RequestBatch) -> tuple[Tensor, Tensor]:
        """The merged sequence tokens [B, S, dim] and their validity [B, S] (candidate-independent)."""
        c = self.config
        hist, items, valid = history_events(self.inputs, batch, c.history_pool, c.num_actions)
        x = self.seq_tokens(items, hist.hist_actions, hist.hist_gap_s, valid)
        return self.merge(x, valid)

    def _output(self, glob: Tensor) -> dict[str, Tensor]:
        """Final global states [B, M, G, dim] → heads on (candidate ‖ CLS)."""
        h = self.out_norm(glob[:, :, :2]).flatten(-2)  # [B, M, 2·dim]
        return self.split_heads(self.heads(h))

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """Training path: ``logits`` [B, M, T] and ``watch`` [B, M]. ``config.train_path="per_request"``: the
        history is encoded once per request (differentiable); ``"per_candidate"``: every (request, candidate) is its
        own token set."""
        glob = self.global_tokens(self.inputs, batch)  # [B, M, G, dim]
        seq, valid = self.sequence(batch)
        if self.config.train_path == "per_request":
            return self._output(self.encoder.forward_per_request(glob, seq, valid))
        return self._output(self.encoder(glob, seq, valid))

    @torch.no_grad()
    def encode_user(self, batch: RequestBatch) -> LongerCache:
        """Serving, once per request: the sequence-side K/V of every layer and the user-side global state.

        Reads only the user, context and history fields of ``batch``. Call it on a model in ``eval()`` mode (with
        dropout active the two paths draw different masks)."""
        seq, valid = self.sequence(batch)
        return LongerCache(self.encoder.encode(seq, valid), self.global_tokens.user_state(self.inputs, batch))

    @torch.no_grad()
    def score_with_cache(self, cache: LongerCache, batch: RequestBatch) -> dict[str, Tensor]:
        """Serving: ``logits`` [B, M, T] and ``watch`` [B, M] of every candidate of ``batch``, reading the user side
        from ``cache`` (built by ``encode_user`` for the same B requests, in the same order)."""
        if cache.batch_size != batch.batch_size:
            raise DataError(f"the cache holds {cache.batch_size} requests, the batch {batch.batch_size}",
                            column="cache")
        glob = self.global_tokens.assemble(cache.user, self.inputs, batch)
        return self._output(self.encoder.decode(glob, cache.kv))

    def predict_cached(self, batch: RequestBatch) -> Tensor:
        """[B, M, T] task probabilities through the KV-cache path (``encode_user`` then ``score_with_cache``)."""
        return torch.sigmoid(self.score_with_cache(self.encode_user(batch), batch)["logits"])


__all__ = ["TRAIN_PATHS", "SequenceModelConfig", "LongerConfig", "Longer", "LongerCache", "SequenceTokens",
           "GlobalTokens", "gap_bucket", "history_events"]
