"""HyFormer: query decoding over behaviour sequences alternating with RankMixer-style query boosting (Huang et al.,
*HyFormer: Revisiting the Roles of Sequence Modeling and Feature Interaction in CTR Prediction*, arXiv 2601.12681;
notes in ``../shared/papers/hyformer.md``).

Pipeline, per request (sequence side, candidate-independent) and per candidate (query side)::

    NS tokens F (T_ns of them): RankMixer semantic groups of the RankingInputs features       [B, M, T_ns, D]
    K behaviour sequences from the one history (click / long view / like events, or all events merged):
        S_k = SequenceTokens(events of behaviour k, the most recent seq_len)                  [B, L_k, D]
    query generation (first layer only): Q_k = [FFN_k,1(G_k) … FFN_k,Nq(G_k)],
        G_k = concat(F_1 … F_T_ns, MeanPool(S_k))                                            [B, M, Nq, D]
    per layer l = 1 … num_layers, for every sequence k (its own weights):
        H_k,l = SeqEncoder_l,k(H_k,l−1)  (full causal attention | LONGER cross attention | SwiGLU), H_k,0 = S_k
        K_k,l, V_k,l = projections of H_k,l                                                    once per request
        Q̃_k = Q_k + MultiHeadCrossAttn(Q_k, K_k,l, V_k,l)                                     per candidate
    query boosting: X = [Q̃_1 … Q̃_K; F; g_1,l … g_K,l]  (g = MeanPool(H_k,l), the "global tokens")
        X' = LN(X + PerTokenFFN(Mix(X)));  the boosted queries Q_k ← X'[queries of k] go to the next layer
    → mean over the last layer's X' → T task heads + the watch head

The sequences meet only in the boosting; the sequence side never reads a candidate, so ``encode_user(batch)``
computes every layer's K/V (and the global tokens) once per request (``HyFormerCache``) and
``score_with_cache(cache, batch)`` runs only the queries of each candidate against it. ``forward`` is the same two
steps, differentiable: the history is encoded once per request in training too (never per candidate).

What is the paper's and what is ours:

* **Paper**: NS tokens by RankMixer semantic grouping; one query set per sequence, generated once (first layer)
  by N_q FFNs of ``concat(NS tokens, MeanPool(sequence))`` and reused (boosted, never regenerated) by deeper
  layers; a sequence encoder per layer with the three options (``seq_encoder="full"`` Transformer,
  ``"longer"`` ``CrossAttn(S_short, S, S)``, ``"swiglu"``), K/V recomputed every layer; multi-head cross-attention
  query decoding; query boosting = RankMixer's parameter-free token mixing over [decoded queries; NS tokens] +
  per-token FFN + residual; one global token per sequence among the mixer tokens; sequences never concatenated;
  the ablations as switches: ``sequences="merged"`` (one sequence, one query set), ``pooled_query=False`` (queries
  from the NS tokens only), ``global_tokens=False``.
* **Ours**: the sequences are views of the one KuaiRand history: for each behaviour (``behaviours``, by default
  click, long view, like = ``hist_actions`` channels ``is_click``, ``long_view``, ``is_like``) the most recent
  ``seq_len`` events with that action bit, compacted with a cumsum + sort (``behaviour_index``);
  ``"merged"`` = every event of the last ``history_pool`` (not only the flagged ones); the event tokens are
  LONGER's (``funnelrec.ranking.longer.SequenceTokens``, one tokenizer per sequence; recency = rank inside the
  behaviour sequence); the query generator of sequence k reads the NS tokens and the pool of sequence k only
  (so the sequences meet nowhere but in the boosting); the encoders are stacked (layer l reads layer l − 1's
  output, as in the public ``lswhim/rankmixer`` code), with a causal mask in ``"full"`` and ``"longer"`` (``"longer"``: layer 1 keeps the
  ``short_len`` most recent tokens as queries, later layers attend among those, as LONGER's stack does); each
  sequence side is pre-norm (RMSNorm); query decoding has a residual and no FFN of its own; the global token of
  sequence k in layer l is the masked mean of H_k,l; the NS tokens enter every layer's boosting unchanged (only
  the queries are carried, as the paper's formula says); the boosting norm is a post-LN
  ``LN(X + drop(PFFN(Mix(X))))``; the mixing uses H = T heads when T divides D (RankMixer's rule), else the
  largest divisor H of D below T, and the mixed [H, T·D/H] is re-cut into T tokens of width D
  (``shuffle_tokens``, still a parameter-free permutation; T = 15 and D = 32 by default, so H = 8); the output is
  the mean of all final tokens; the sizes (D = 32, N_q = 2 per sequence, two layers, ``seq_len`` 48,
  ``short_len`` 16, sequence FFN width 2·D, matched to ``LongerRankMixer``'s forward+backward FLOPs per sample at
  history 128: 11.0M vs 10.6M).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = HyFormer(HyFormerConfig(user_vocab=[10, 3], item_vocab=[20], user_dense=0, item_dense=0)).eval()
    >>> batch = RequestBatch.empty(batch_size=2, history=12, candidates=3, user_fields=2)
    >>> batch.hist_len[:] = 12
    >>> batch.hist_actions[..., 0] = 1.0                        # every event was clicked
    >>> out = model(batch)
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
    >>> model.num_tokens, model.config.sequence_names          # 3 × 2 queries + 6 NS tokens + 3 global tokens
    (15, ['click', 'long_view', 'like'])
    >>> cached = model.score_with_cache(model.encode_user(batch), batch)
    >>> bool((cached["logits"] - out["logits"]).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import GroupedLinear, masked_mean
from funnelrec.nn.masks import TokenLayout, attention_mask
from funnelrec.nn.seq_attention import SeqAttentionLayer, masked_attention, sample_query_index
from funnelrec.nn.token_mixing import PerTokenFFN, token_mixing
from funnelrec.nn.tokenizers import SemanticTokenizer, check_groups
from funnelrec.ranking.base import MultiTaskRanker, TaskHeads
from funnelrec.ranking.longer import SequenceModelConfig, SequenceTokens, check_int, history_events
from funnelrec.ranking.rankmixer import RankMixerConfig
from funnelrec.ranking.watch_time import WatchTimeDebiaser

SEQUENCE_MODES = ("separate", "merged")
SEQ_ENCODERS = ("full", "longer", "swiglu")
#: behaviour name → the ``hist_actions`` channel (``funnelrec.data.objectives.ACTION_COLUMNS``) that selects it.
BEHAVIOURS = {"click": "is_click", "long_view": "long_view", "like": "is_like", "follow": "is_follow",
              "comment": "is_comment", "forward": "is_forward", "hate": "is_hate"}


# ----------------------------------------------------------------------------------------------- NS tokens


class NSTokenGroups:
    """RankMixer's input fields and semantic token groups on any ranker config with a ``token_groups`` field
    (the very methods of ``RankMixerConfig``; see ``funnelrec.ranking.rankmixer`` for the fields and the six
    default groups)."""

    input_fields = RankMixerConfig.input_fields
    default_token_groups = RankMixerConfig.default_token_groups
    groups = RankMixerConfig.groups

    def check_token_groups(self) -> None:
        """``ConfigError`` naming ``<Config>.token_groups`` unless the groups partition the input fields."""
        name = f"{type(self).__name__}.token_groups"
        groups = self.groups()
        if self.token_groups is None:
            empty = [g for g, members in groups.items() if not members]
            if empty:
                raise ConfigError(f"{name}: the default group {empty[0]!r} has no input field for this feature "
                                  f"spec; pass token_groups explicitly")
        check_groups(self.input_fields(), groups, name)


# ---------------------------------------------------------------------------------------------- the config


@dataclass
class HyFormerConfig(NSTokenGroups, SequenceModelConfig):
    """Sizes and switches of ``HyFormer`` (the common fields are on ``SequenceModelConfig`` and ``RankerConfig``;
    ``history_pool`` is the history events read).

    Args:
        ffn_mult: the sequence encoders' FFN hidden width is ``ffn_mult · dim`` (2 here, 4 in ``Longer``).
        sequences: ``"separate"`` (one sequence per behaviour, each with its own queries) or ``"merged"`` (one
            sequence of every history event, one query set: the paper's "merging sequences" ablation).
        behaviours: the behaviour sequences (``"separate"``), names of ``BEHAVIOURS``.
        seq_len: L, the most recent events kept per behaviour sequence (``"separate"``; ``"merged"`` keeps the
            whole ``history_pool``).
        num_queries: N_q query tokens per sequence.
        query_hidden: hidden width of each query-generation FFN.
        pooled_query: feed MeanPool(sequence) to the query generators (False: the NS tokens only, the ablation).
        seq_encoder: per-layer sequence encoder: ``"full"`` (causal self-attention over the whole sequence),
            ``"longer"`` (cross-attention from the ``short_len`` most recent tokens) or ``"swiglu"``.
        short_len: L_H, the recent tokens kept as queries by ``seq_encoder="longer"``.
        num_layers: HyFormer layers (sequence encoding + query decoding + query boosting).
        global_tokens: one mean-pool token per sequence among the mixer tokens (False: the ablation).
        mixer_mult: the per-token FFN of the boosting has hidden width ``mixer_mult · dim``.
        token_groups: NS token name → input field names (``RankMixerConfig``'s fields); None for the six defaults.
    """

    ffn_mult: int = 2
    sequences: str = "separate"
    behaviours: list[str] = field(default_factory=lambda: ["click", "long_view", "like"])
    seq_len: int = 48
    num_queries: int = 2
    query_hidden: int = 32
    pooled_query: bool = True
    seq_encoder: str = "longer"
    short_len: int = 16
    num_layers: int = 2
    global_tokens: bool = True
    mixer_mult: int = 2
    token_groups: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "HyFormerConfig"
        if self.sequences not in SEQUENCE_MODES:
            raise ConfigError(f"{name}.sequences must be one of {SEQUENCE_MODES}, got {self.sequences!r}")
        if self.seq_encoder not in SEQ_ENCODERS:
            raise ConfigError(f"{name}.seq_encoder must be one of {SEQ_ENCODERS}, got {self.seq_encoder!r}")
        if isinstance(self.behaviours, str) or not isinstance(self.behaviours, (list, tuple)) or not self.behaviours:
            raise ConfigError(f"{name}.behaviours must be a non-empty list of names from {sorted(BEHAVIOURS)}, "
                              f"got {self.behaviours!r}")
        for b in self.behaviours:
            if b not in BEHAVIOURS:
                raise ConfigError(f"{name}.behaviours: unknown behaviour {b!r}; valid: {', '.join(BEHAVIOURS)}")
            if ACTION_COLUMNS.index(BEHAVIOURS[b]) >= self.num_actions:
                raise ConfigError(f"{name}.behaviours: {b!r} reads action channel "
                                  f"{ACTION_COLUMNS.index(BEHAVIOURS[b])}, beyond num_actions={self.num_actions}")
        if len(set(self.behaviours)) != len(self.behaviours):
            raise ConfigError(f"{name}.behaviours has a duplicate: {self.behaviours!r}")
        for key in ("seq_len", "num_queries", "query_hidden", "short_len", "num_layers", "mixer_mult"):
            check_int(f"{name}.{key}", getattr(self, key), 1)
        for key in ("pooled_query", "global_tokens"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{name}.{key} must be a bool, got {getattr(self, key)!r}")
        self.check_token_groups()

    @property
    def sequence_names(self) -> list[str]:
        """The K sequences: the behaviours, or ``["all"]`` when merged."""
        return list(self.behaviours) if self.sequences == "separate" else ["all"]

    @property
    def action_columns(self) -> list[int]:
        """The ``hist_actions`` channel of every behaviour."""
        return [ACTION_COLUMNS.index(BEHAVIOURS[b]) for b in self.behaviours]

    @property
    def tokens(self) -> int:
        """T, the mixer tokens: K·N_q queries + the NS tokens (+ K global tokens)."""
        k = len(self.sequence_names)
        return k * self.num_queries + len(self.groups()) + k * int(self.global_tokens)


# ------------------------------------------------------------------------------------------------ sequences


def behaviour_index(actions: Tensor, valid: Tensor, columns: Sequence[int], length: int) -> tuple[Tensor, Tensor]:
    """Where the behaviour sequences sit in a left-padded history, vectorised (a cumsum and a sort, no loop).

    For each action channel c of ``columns``, the positions of the ``length`` most recent valid events whose
    channel c is set, in time order and left-padded (the most recent at slot ``length − 1``).

    Args:
        actions: [B, N, A] action flags (set where > 0).
        valid: [B, N] bool history validity.
        columns: K action channels.
        length: L slots per sequence.

    Returns:
        index [B, K, L] int64 history positions (0 at padding) and valid [B, K, L] bool.

    Example:
        >>> acts = torch.tensor([[[1., 0.], [0., 0.], [1., 1.], [1., 0.]]])       # 4 events, 2 channels
        >>> idx, ok = behaviour_index(acts, torch.tensor([[False, True, True, True]]), [0, 1], 3)
        >>> idx.tolist(), ok.tolist()                                          # event 0 is padding
        ([[[0, 2, 3], [0, 0, 2]]], [[[False, True, True], [False, False, True]]])
    """
    b, n = valid.shape
    cols = torch.as_tensor(list(columns), dtype=torch.long, device=actions.device)
    bit = (actions.index_select(-1, cols) > 0).transpose(1, 2) & valid.unsqueeze(1)  # [B, K, N]
    after = bit.flip(-1).long().cumsum(-1).flip(-1)  # flagged events at or after each position
    pos = torch.arange(n, device=actions.device).expand_as(bit)
    key = torch.where(bit & (after <= length), pos, -1)  # the kept positions, −1 elsewhere
    index = key.sort(-1).values[..., max(n - length, 0):]  # kept ones last, in time order
    if length > n:
        index = F.pad(index, (length - n, 0), value=-1)
    return index.clamp(min=0), index >= 0


def _gather_events(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, ...] gathered at index [B, K, L] → [B, K, L, ...]."""
    b, k, length = index.shape
    flat = index.reshape(b, k * length)
    if x.dim() == 2:
        return x.gather(1, flat).view(b, k, length)
    return x.gather(1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1])).view(b, k, length, x.shape[-1])


# ---------------------------------------------------------------------------------------------------- layers


def mixing_heads(tokens: int, dim: int) -> int:
    """H of the token mixing: T when T divides D (RankMixer's rule), else the largest divisor of D below T.

    Example:
        >>> mixing_heads(8, 32), mixing_heads(15, 32), mixing_heads(40, 32)
        (8, 8, 32)
    """
    if dim % tokens == 0:
        return tokens
    return max(h for h in range(1, min(tokens, dim) + 1) if dim % h == 0)


def shuffle_tokens(x: Tensor, heads: int) -> Tensor:
    """RankMixer's token mixing with H heads, re-cut into T tokens: x [..., T, D] → [..., T, D] (a permutation;
    ``funnelrec.nn.token_mixing.token_mixing`` itself when H = T).

    Example:
        >>> x = torch.randn(2, 15, 32)
        >>> torch.equal(shuffle_tokens(x[:, :8], 8), token_mixing(x[:, :8]))
        True
        >>> torch.equal(shuffle_tokens(x, 8).flatten(-2).sort(-1).values, x.flatten(-2).sort(-1).values)
        True
    """
    return token_mixing(x, heads).reshape(x.shape)


class SwiGLU(nn.Module):
    """``W3 (SiLU(W1 x) ⊙ W2 x)``: x [..., D] → [..., D] (hidden width ``hidden``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(a) * g)


class SequenceEncoderLayer(nn.Module):
    """One layer of one sequence's encoder (candidate-independent): h [B, L, D], valid [B, L] → (h', valid').

    Args:
        kind: ``"full"`` (pre-norm causal self-attention + FFN over every token), ``"longer"`` (the ``short_len``
            most recent tokens attend causally to the whole sequence; L' = min(short_len, L)) or ``"swiglu"``
            (``h + SwiGLU(RMSNorm(h))``).
        dim, heads, ffn_mult, dropout: as ``SeqAttentionLayer``.
        short_len: L_H of ``"longer"``.

    Padding positions of the output are zero.
    """

    def __init__(self, kind: str, dim: int, heads: int, ffn_mult: int, short_len: int, dropout: float = 0.0):
        super().__init__()
        if kind not in SEQ_ENCODERS:
            raise ConfigError(f"seq_encoder must be one of {SEQ_ENCODERS}, got {kind!r}")
        self.kind, self.short_len = kind, short_len
        if kind == "swiglu":
            self.norm, self.ffn = nn.RMSNorm(dim), SwiGLU(dim, ffn_mult * dim)
            self.drop = nn.Dropout(dropout)
        else:
            self.attn = SeqAttentionLayer(dim, heads, ffn_mult, dropout)

    def forward(self, h: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """h [B, L, D], valid [B, L] → h' [B, L', D], valid' [B, L']."""
        if self.kind == "swiglu":
            return (h + self.drop(self.ffn(self.norm(h)))) * valid.unsqueeze(-1).to(h.dtype), valid
        length = h.shape[1]
        if self.kind == "longer" and self.short_len < length:
            idx = sample_query_index(valid, self.short_len, "recent")  # [B, L_H]
            x, q_valid = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1])), valid.gather(1, idx)
        else:
            idx, x, q_valid = None, h, valid
        mask = attention_mask(TokenLayout.sequence(q_valid, idx), TokenLayout.sequence(valid))
        return self.attn(x, mask, context=h) * q_valid.unsqueeze(-1).to(h.dtype), q_valid


class QueryDecoder(nn.Module):
    """Multi-head cross-attention of the queries of every candidate to one request's sequence K/V, with a residual:
    ``Q̃ = Q + Wo · MHA(W_q RMSNorm(Q), K, V)``, ``K = W_k RMSNorm(H)``, ``V = W_v RMSNorm(H)``.

    Args:
        dim: D.  heads: h.  dropout: on the attention weights and the output (training only).

    ``keys_values(h)``: h [B, L, D] → K, V [B, h, L, dh] (once per request; what the cache holds).
    ``forward(q, k, v, valid)``: q [B, M, N_q, D], valid [B, L] → [B, M, N_q, D]; the M·N_q queries of a request
    read its K/V once (no copy per candidate); a request without a valid event decodes a zero update (no NaN).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_norm, self.kv_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        """[B, S, D] → [B, h, S, dh]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, h: Tensor) -> tuple[Tensor, Tensor]:
        n = self.kv_norm(h)
        return self._split(self.k_proj(n)), self._split(self.v_proj(n))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
        b, m, nq, d = q.shape
        qh = self._split(self.q_proj(self.q_norm(q)).reshape(b, m * nq, d))  # [B, h, M·N_q, dh]
        mask = valid.unsqueeze(1).expand(b, m * nq, valid.shape[1])
        p = self.dropout.p if self.training else 0.0
        out = masked_attention(qh, k, v, mask, dropout_p=p).transpose(1, 2).reshape(b, m, nq, d)
        return q + self.dropout(self.out_proj(out))


class QueryGenerator(nn.Module):
    """N_q FFNs of one global-info vector (first layer only): g [..., F] → queries [..., N_q, D]
    (``Linear → SiLU → Linear`` each, all in two batched matmuls)."""

    def __init__(self, in_dim: int, num_queries: int, hidden: int, dim: int):
        super().__init__()
        self.first = GroupedLinear(num_queries, in_dim, hidden)
        self.second = GroupedLinear(num_queries, hidden, dim)
        self.act = nn.SiLU()

    def forward(self, g: Tensor) -> Tensor:
        return self.second(self.act(self.first(g)), grouped=True)


class QueryBoost(nn.Module):
    """Query boosting on T tokens: ``X' = LN(X + drop(PerTokenFFN(Mix(X))))`` (``shuffle_tokens`` with
    ``mixing_heads(T, D)`` heads), x [..., T, D] → [..., T, D]."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.mix_heads = mixing_heads(num_tokens, dim)
        self.ffn = PerTokenFFN(num_tokens, dim, hidden)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.ffn(shuffle_tokens(x, self.mix_heads))))


# ------------------------------------------------------------------------------------------------------ model


@dataclass
class HyFormerCache:
    """What ``HyFormer.encode_user`` keeps per request (everything candidate-independent).

    Args:
        keys: ``keys[l][k]`` the K of layer l, sequence k: [B, h, L_l, dh].
        values: the matching V.
        valid: ``valid[l][k]`` [B, L_l] bool.
        pooled: [B, K, D] MeanPool of every sequence's tokens (query generation).
        global_tokens: ``global_tokens[l]`` [B, K, D], MeanPool of every sequence's layer-l states.
    """

    keys: list[list[Tensor]]
    values: list[list[Tensor]]
    valid: list[list[Tensor]]
    pooled: Tensor
    global_tokens: list[Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.pooled.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        ts = [t for group in (self.keys, self.values, self.valid) for layer in group for t in layer]
        ts += [self.pooled, *self.global_tokens]
        return sum(t.numel() * t.element_size() for t in ts)


class HyFormer(MultiTaskRanker):
    """HyFormer with a per-request K/V cache (see the module docstring).

    Args:
        config: a ``HyFormerConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: HyFormerConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        d, k = c.dim, len(c.sequence_names)
        self.tokenizer = SemanticTokenizer(c.input_fields(), c.groups(), d)
        t_ns = self.tokenizer.num_tokens
        self.seq_tokens = nn.ModuleList(SequenceTokens(c.embed_dim, c.num_actions, d, c.history_pool, c.gap_buckets)
                                        for _ in range(k))
        gen_in = t_ns * d + d * int(c.pooled_query)
        self.generators = nn.ModuleList(QueryGenerator(gen_in, c.num_queries, c.query_hidden, d) for _ in range(k))
        self.encoders = nn.ModuleList(
            nn.ModuleList(SequenceEncoderLayer(c.seq_encoder, d, c.heads, c.ffn_mult, c.short_len, c.dropout)
                          for _ in range(k)) for _ in range(c.num_layers))
        self.decoders = nn.ModuleList(nn.ModuleList(QueryDecoder(d, c.heads, c.dropout) for _ in range(k))
                                      for _ in range(c.num_layers))
        self.boosts = nn.ModuleList(QueryBoost(c.tokens, d, c.mixer_mult * d, c.dropout)
                                    for _ in range(c.num_layers))
        self.heads = TaskHeads(d, c.head, self.num_heads)

    @property
    def num_sequences(self) -> int:
        """K."""
        return len(self.seq_tokens)

    @property
    def num_tokens(self) -> int:
        """T, the mixer tokens of every layer."""
        return self.config.tokens

    # ------------------------------------------------------------------ sequence side (once per request)
    def sequences(self, batch: RequestBatch) -> tuple[list[Tensor], list[Tensor]]:
        """The K sequences' tokens [B, L_k, D] and validity [B, L_k] (candidate-independent)."""
        c = self.config
        hist, items, valid = history_events(self.inputs, batch, c.history_pool, c.num_actions)
        actions, gap = hist.hist_actions, hist.hist_gap_s
        if valid.shape[1] == 0:  # no history column at all: one padding event keeps every shape non-empty
            items, actions, gap = F.pad(items, (0, 0, 1, 0)), F.pad(actions, (0, 0, 1, 0)), F.pad(gap, (1, 0))
            valid = F.pad(valid, (1, 0), value=False)
        b, n = valid.shape
        if c.sequences == "merged":
            index, seq_valid = torch.arange(n, device=valid.device).expand(b, 1, n), valid.unsqueeze(1)
        else:
            index, seq_valid = behaviour_index(actions, valid, c.action_columns, min(c.seq_len, n))
        items, actions, gap = (_gather_events(x, index) for x in (items, actions, gap))
        tokens = [tok(items[:, i], actions[:, i], gap[:, i], seq_valid[:, i]) for i, tok in enumerate(self.seq_tokens)]
        return tokens, list(seq_valid.unbind(1))

    def encode(self, batch: RequestBatch) -> HyFormerCache:
        """The sequence side of every layer, once per request (differentiable; ``encode_user`` runs it under
        ``no_grad``). Reads only the user, context and history fields of ``batch``."""
        hs, valids = self.sequences(batch)
        pooled = torch.stack([masked_mean(h, v) for h, v in zip(hs, valids)], 1)  # [B, K, D]
        keys, values, valid, glob = [], [], [], []
        for encoders, decoders in zip(self.encoders, self.decoders):
            hs, valids = map(list, zip(*(enc(h, v) for enc, h, v in zip(encoders, hs, valids))))
            kv = [dec.keys_values(h) for dec, h in zip(decoders, hs)]
            keys.append([k for k, _ in kv])
            values.append([v for _, v in kv])
            valid.append(list(valids))
            glob.append(torch.stack([masked_mean(h, v) for h, v in zip(hs, valids)], 1))
        return HyFormerCache(keys, values, valid, pooled, glob)

    # ------------------------------------------------------------------ query side (per candidate)
    def decode(self, cache: HyFormerCache, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M] of every candidate of ``batch`` against the sequence side in
        ``cache`` (differentiable with respect to both)."""
        c = self.config
        if cache.batch_size != batch.batch_size or len(cache.keys) != c.num_layers:
            raise DataError(f"the cache holds {cache.batch_size} requests and {len(cache.keys)} layers; the batch "
                            f"has {batch.batch_size} requests and the model {c.num_layers} layers", column="cache")
        ns = self.tokenizer(self.features(batch).flat)  # [B, M, T_ns, D]
        b, m, t_ns, d = ns.shape
        info = ns.flatten(-2)
        queries = []
        for i, gen in enumerate(self.generators):
            g = torch.cat([info, cache.pooled[:, i].unsqueeze(1).expand(b, m, d)], -1) if c.pooled_query else info
            queries.append(gen(g))  # [B, M, N_q, D]
        nq, x = c.num_queries, ns
        for layer, (decoders, boost) in enumerate(zip(self.decoders, self.boosts)):
            decoded = [dec(q, k, v, valid) for dec, q, k, v, valid in
                       zip(decoders, queries, cache.keys[layer], cache.values[layer], cache.valid[layer])]
            parts = [*decoded, ns]
            if c.global_tokens:
                parts.append(cache.global_tokens[layer].unsqueeze(1).expand(b, m, -1, d))
            x = boost(torch.cat(parts, 2))  # [B, M, T, D]
            queries = list(x[:, :, : len(decoded) * nq].split(nq, 2))
        return self.split_heads(self.heads(x.mean(-2)))

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """Training path: ``logits`` [B, M, T] and ``watch`` [B, M]; the sequence side runs once per request."""
        return self.decode(self.encode(batch), batch)

    @torch.no_grad()
    def encode_user(self, batch: RequestBatch) -> HyFormerCache:
        """Serving, once per request: every layer's sequence K/V, the pools and the global tokens. Call it on a
        model in ``eval()`` mode."""
        return self.encode(batch)

    @torch.no_grad()
    def score_with_cache(self, cache: HyFormerCache, batch: RequestBatch) -> dict[str, Tensor]:
        """Serving: ``logits`` [B, M, T] and ``watch`` [B, M] of every candidate of ``batch``, reading the sequence
        side from ``cache`` (built by ``encode_user`` for the same B requests, in the same order)."""
        return self.decode(cache, batch)

    def predict_cached(self, batch: RequestBatch) -> Tensor:
        """[B, M, T] task probabilities through the KV-cache path (``encode_user`` then ``score_with_cache``)."""
        return torch.sigmoid(self.score_with_cache(self.encode_user(batch), batch)["logits"])


__all__ = ["SEQUENCE_MODES", "SEQ_ENCODERS", "BEHAVIOURS", "NSTokenGroups", "HyFormerConfig", "HyFormer",
           "HyFormerCache", "behaviour_index", "mixing_heads", "shuffle_tokens", "SequenceEncoderLayer",
           "QueryDecoder", "QueryGenerator", "QueryBoost", "SwiGLU"]
