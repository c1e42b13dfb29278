"""MPFormer (Sun et al., CIKM 2025, arXiv 2508.20400): one causal Transformer retriever for K objectives.

One user forward gives **K user vectors** (click, long view, like, follow, ...), each of which queries the same ANN
index; the K result lists are merged with per-user quotas ``M_k ∝ q_k(u)``
(:mod:`funnelrec.retrieval.quota_merge`). The industrial alternative it replaces is K dedicated single-objective
retrievers, whose training and serving cost grows linearly with K.

**What is the paper's and what is ours.** The paper is known at abstract level only (``shared/papers/mpformer.md``).
From the paper [SRC]: one Transformer retriever for all objectives; objective-conditioned "learnable attention
modulation"; personalised target weights that adjust the retrieval results; user personalisation injected into the
token representations and the Transformer structure; K objective-specific user embeddings; a personalised query
built by sum-pooling demographic embeddings (no user-id / device-id feature). Everything below is a
reconstruction (the design of the method note's recipe, KuaiFormer's lineage, and our own choices):

* **Sequence** (ours, KuaiFormer-style): ``[profile token; N history tokens; K objective tokens]`` through
  pre-norm blocks (``nn.RMSNorm``, multi-head ``F.scaled_dot_product_attention``, SiLU FFN), final RMSNorm.

  - profile token = Σ of the embeddings of the user's sparse fields *except field 0, the user id* + a linear map
    of the user's dense features (sum-pooled demographics, as the paper says; the id is never read);
  - history token j = item vector (id + side fields + dense, shared with the output side) + a linear map of the
    event's action flags ``hist_actions[j]`` (which feedback the user gave) + a time-gap-bucket embedding
    (``floor(log2(1 + gap_s / gap_unit_s))``) + a position embedding counted from the most recent event;
  - objective token k = a learned vector e_k. Its final state, RMS-normalised (and L2-normalised when
    ``normalize``), is the user vector u_k.

* **Mask.** Profile and history positions are causal (position t sees the profile and history positions ≤ t, never
  padding); objective token k sees the profile, every valid history position and itself — not the other objective
  tokens, so the K vectors do not depend on each other's order.

* **Objective-conditioned attention modulation** (``modulation``; the paper's exact form is unknown):
  ``"bias"`` adds, in every layer and head h, ``b_k,h(j) = W_k,h · action_j + G_k,h[gap_bucket_j]`` to the
  attention logit of objective token k on history token j (a like-token can learn to read liked items and old
  events differently from a click-token); ``"film"`` scales and shifts objective token k's attention query,
  ``q ⊙ (1 + γ_k,l) + β_k,l``; ``"both"``; ``"none"``.

* **Personal gate** (PEPNet-style, ``personal_gate``): ``g_l = 2·sigmoid(MLP_l(profile)) ∈ (0, 2)^D`` multiplies
  every token embedding (l = 0) and each layer's FFN output (l = 1..L).

* **Loss** (``train_mode = "example"``): per objective k a sampled softmax with logQ correction
  (:func:`funnelrec.retrieval.base.softmax_loss_logq`) of every (request, objective-k target item) pair against
  ``num_sampled`` negatives drawn from ``q ∝ (count + 1)^sample_alpha`` (shared by the objectives of a batch),
  logits ``cos / temperature − log q``; total ``Σ_k w_k L_k`` with **fixed** weights ``loss_weights`` (the issue's
  choice; the method note's personalised loss weights are not used).

* **Personalised target weights q(u)** (``q_head``): a separate head, ``softmax(MLP(stop_grad(u_1..u_K),
  stop_grad(profile), mean history action flags, log(1 + history length)))``, trained on its own loss: the
  cross-entropy to the user's share of each feedback type in the next period (``extras["objective_counts"]``;
  optionally value-weighted with ``q_values``). Its inputs are detached, so its gradient never reaches the
  encoder, and the retrieval loss never reaches it. Serving uses q(u) for the merge quotas.

* **Readout baseline** (``readout="linear_heads"``): one readout token instead of the K objective tokens, and K
  linear heads on its final state (the "shared encoder with K linear heads" baseline; no modulation). ``K = 1``
  with ``readout="objective_tokens"`` is the dedicated single-objective retriever of the same architecture.

**Batches.** Multi-objective batches (``funnelrec.retrieval.mpformer_data.MPFormerData``) carry
``extras["targets"] [B, K, T]`` (target item indices per objective, 0 = padding) and
``extras["objective_counts"] [B, K]``. A plain leave-last-out batch (``RetrievalData``, one positive
``cand_items[:, 0]`` per row) trains objective ``extras["objective"]`` of each row, or objective 0 — so the model
also runs in ``funnelrec train retrieval`` and the retrieval-baselines comparison. ``score_all`` scores with
``u_k`` for ``k = extras["objective"]`` (per row), else ``score_objective``.

Shapes: B requests, N history length, K objectives, S = 1 + N + K tokens, D width, I items (index 0 = padding).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> cfg = MPFormerConfig(num_items=20, item_vocab=[20], user_vocab=[9, 3], num_actions=7, max_len=4, dim=16,
    ...                      num_sampled=8)
    >>> model = MPFormer(cfg, item_sparse=torch.arange(20).unsqueeze(1))
    >>> b = RequestBatch.empty(2, history=4, candidates=1, user_fields=2)
    >>> b.hist_items[:] = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]]); b.hist_len[:] = torch.tensor([3, 4])
    >>> b.cand_items[:, 0] = torch.tensor([6, 5])
    >>> model.user_vectors(b).shape, model.score_objectives(b).shape, model.training_loss(b).shape
    (torch.Size([2, 4, 16]), torch.Size([2, 4, 20]), torch.Size([]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import funnelrec.nn.seq_attention  # noqa: F401  (teaches FlopCounterMode the CPU attention kernel)
from funnelrec.data.batch import RequestBatch
from funnelrec.data.objectives import ACTION_COLUMNS
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.embedding import MLP, FieldEmbedding, take
from funnelrec.retrieval.base import NEG_INF, Retriever, log_sampling_probability, softmax_loss_logq

__all__ = ["MPFormerConfig", "MPFormer", "objective_losses", "q_loss", "gap_bucket", "READOUTS", "MODULATIONS",
           "Q_TARGETS", "DEFAULT_OBJECTIVES", "build_mpformer", "FROM_SPEC"]

READOUTS = ("objective_tokens", "linear_heads")
MODULATIONS = ("bias", "film", "both", "none")
Q_TARGETS = ("count", "value")
#: The objectives of the simulator / KuaiRand (their log columns).
DEFAULT_OBJECTIVES = ("is_click", "long_view", "is_like", "is_follow")
#: Config keys the registry builder takes from the feature spec.
FROM_SPEC = ("num_items", "item_vocab", "item_dense", "user_vocab", "user_dense")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class MPFormerConfig:
    """MPFormer (see the module doc).

    Args:
        num_items: I, item indices including padding 0 (``spec.num_items``).
        item_vocab: rows of each item sparse field (``spec.vocab_sizes("item_sparse")``; field 0 = the item id).
        item_dense: Di, item dense features (added to the item vector by a linear map).
        user_vocab: rows of each user sparse field (field 0 = the user id, which is **never** embedded); None or
            a single field = no demographic fields.
        user_dense: Du, user dense features (added to the profile token by a linear map).
        objectives: the K objective names, in token order (names only: the data decides what they mean).
        num_actions: A, channels of ``hist_actions`` (7 = ``ACTION_COLUMNS`` of a ``RetrievalData`` batch; K for
            ``MPFormerData``, whose action channels are the objective flags). A batch with 0 channels reads zeros.
        max_len: longest history read (the most recent ``max_len`` events); position-embedding rows.
        dim: D.
        heads: attention heads (``dim`` divisible by it).
        layers: Transformer blocks.
        ffn_mult: FFN width as a multiple of D.
        dropout: dropout on token embeddings, attention and residual branches.
        readout: ``"objective_tokens"`` (MPFormer) or ``"linear_heads"`` (the shared-encoder baseline).
        modulation: ``"bias"``, ``"film"``, ``"both"`` or ``"none"`` (objective tokens only).
        gap_buckets: number of log2 time-gap buckets.
        gap_unit_s: seconds of the first gap bucket.
        personal_gate: the PEPNet-style gate on token embeddings and FFN outputs.
        side_features: item vectors include the item's side fields (else the id alone).
        normalize: L2-normalise user and item vectors (cosine scores, logits = cosine / temperature).
        temperature: τ of the training softmax.
        loss_weights: fixed weight of each objective's loss (None: 1 each).
        num_sampled: negatives per batch, shared by the objectives.
        sample_alpha: exponent of the popularity sampling distribution (1 = popularity, 0 = uniform).
        logq: apply the logQ correction.
        q_head: train the personalised target-weight head q(u).
        q_hidden: hidden width of the q head.
        q_target: ``"count"`` (share of feedback events per type) or ``"value"`` (share of feedback value).
        q_values: the value of each objective's feedback (``q_target="value"``; None: 1 each).
        q_loss_weight: weight of the q head's loss in ``training_loss`` (its gradient only reaches the q head).
        score_objective: the objective ``score_all`` uses when a batch names none.
    """

    num_items: int
    item_vocab: list[int] | None = None
    item_dense: int = 0
    user_vocab: list[int] | None = None
    user_dense: int = 0
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    num_actions: int = len(ACTION_COLUMNS)
    max_len: int = 50
    dim: int = 64
    heads: int = 2
    layers: int = 2
    ffn_mult: int = 2
    dropout: float = 0.1
    readout: str = "objective_tokens"
    modulation: str = "bias"
    gap_buckets: int = 16
    gap_unit_s: float = 60.0
    personal_gate: bool = True
    side_features: bool = True
    normalize: bool = True
    temperature: float = 0.05
    loss_weights: tuple[float, ...] | None = None
    num_sampled: int = 1024
    sample_alpha: float = 0.75
    logq: bool = True
    q_head: bool = True
    q_hidden: int = 64
    q_target: str = "count"
    q_values: tuple[float, ...] | None = None
    q_loss_weight: float = 1.0
    score_objective: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.objectives, str) or not isinstance(self.objectives, Sequence) or not self.objectives:
            raise ConfigError(f"mpformer: objectives must be a non-empty list of names, got {self.objectives!r}")
        self.objectives = tuple(str(o) for o in self.objectives)
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"mpformer: objectives must be distinct, got {self.objectives}")
        k = len(self.objectives)
        for name in ("num_items", "max_len", "dim", "heads", "layers", "ffn_mult", "gap_buckets", "num_sampled",
                     "q_hidden"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"mpformer: {name} must be an integer >= 1, got {value!r}")
        for name in ("num_actions", "item_dense", "user_dense"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"mpformer: {name} must be an integer >= 0, got {value!r}")
        if self.num_items < 2:
            raise ConfigError(f"mpformer: num_items must be >= 2 (padding + one item), got {self.num_items}")
        if self.dim % self.heads:
            raise ConfigError(f"mpformer: dim={self.dim} must be divisible by heads={self.heads}")
        if self.readout not in READOUTS:
            raise ConfigError(f"mpformer: readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if self.modulation not in MODULATIONS:
            raise ConfigError(f"mpformer: modulation must be one of {', '.join(MODULATIONS)}, got "
                              f"{self.modulation!r}")
        if self.q_target not in Q_TARGETS:
            raise ConfigError(f"mpformer: q_target must be one of {', '.join(Q_TARGETS)}, got {self.q_target!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"mpformer: dropout must lie in [0, 1), got {self.dropout!r}")
        for name in ("temperature", "gap_unit_s"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ConfigError(f"mpformer: {name} must be > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.q_loss_weight, (int, float)) and self.q_loss_weight >= 0):
            raise ConfigError(f"mpformer: q_loss_weight must be >= 0, got {self.q_loss_weight!r}")
        if not isinstance(self.sample_alpha, (int, float)) or self.sample_alpha < 0:
            raise ConfigError(f"mpformer: sample_alpha must be >= 0, got {self.sample_alpha!r}")
        for name in ("loss_weights", "q_values"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != k or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                    for w in value):
                raise ConfigError(f"mpformer: {name} must hold {k} finite numbers >= 0 (one per objective), "
                                  f"got {value!r}")
            if not sum(value) > 0:
                raise ConfigError(f"mpformer: {name} must not be all zero, got {value!r}")
            setattr(self, name, tuple(float(w) for w in value))
        if not _is_int(self.score_objective) or not 0 <= self.score_objective < k:
            raise ConfigError(f"mpformer: score_objective must lie in [0, {k}), got {self.score_objective!r}")
        if self.item_vocab is not None:
            self.item_vocab = [int(v) for v in self.item_vocab]
            if not self.item_vocab or self.item_vocab[0] != self.num_items:
                raise ConfigError(f"mpformer: item field 0 must be the item id with num_items={self.num_items} "
                                  f"rows, got {self.item_vocab[:1]}")
        elif self.side_features:
            raise ConfigError("mpformer: side_features needs item_vocab (or set side_features=False)")
        if self.user_vocab is not None:
            self.user_vocab = [int(v) for v in self.user_vocab]

    @property
    def num_objectives(self) -> int:
        """K."""
        return len(self.objectives)

    @classmethod
    def from_spec(cls, spec, **overrides) -> "MPFormerConfig":
        """The config of a fitted ``FeatureSpec`` (item and user field sizes, dense widths), with overrides."""
        return cls(num_items=spec.num_items, item_vocab=spec.vocab_sizes("item_sparse"),
                   item_dense=spec.num_item_dense, user_vocab=spec.vocab_sizes("user_sparse"),
                   user_dense=spec.num_user_dense, **overrides)


def gap_bucket(gap_s: Tensor, buckets: int, unit_s: float = 60.0) -> Tensor:
    """[...] int64 time-gap bucket ``clamp(floor(log2(1 + gap_s / unit_s)), 0, buckets - 1)``.

    Example:
        >>> gap_bucket(torch.tensor([0.0, 59.0, 60.0, 3600.0, 1e9]), buckets=16).tolist()
        [0, 0, 1, 5, 15]
    """
    g = torch.log2(1.0 + gap_s.clamp(min=0).to(torch.float32) / float(unit_s))
    return g.floor().clamp(0, buckets - 1).to(torch.int64)


def objective_losses(user: Tensor, items: Tensor, targets: Tensor, neg_ids: Tensor, log_q: Tensor | None,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-objective sampled softmax with logQ correction (``softmax_loss_logq`` once per objective).

    Every (request b, objective k, target item ``targets[b, k, t] > 0``) pair is one query ``user[b, k]`` with
    positive ``items[target]`` against the shared negatives ``items[neg_ids]``; logits are ``⟨u, v⟩ / τ − log q``.

    Args:
        user: [B, K, D] user vectors.
        items: [I, D] item vectors (index = item index).
        targets: [B, K, T] int64 target item indices (0 = padding).
        neg_ids: [S] int64 sampled negative item indices.
        log_q: [I] log sampling probability of every item (None: no correction).
        temperature: τ.

    Returns:
        ``(losses [K], pairs [K])``: the mean loss of each objective over its pairs (0 where it has none) and the
        number of pairs.

    Example:
        >>> u = torch.randn(2, 3, 4); v = torch.randn(6, 4)
        >>> t = torch.tensor([[[1, 2], [3, 0], [0, 0]], [[4, 0], [0, 0], [5, 0]]])
        >>> losses, pairs = objective_losses(u, v, t, torch.tensor([1, 2, 3]), None)
        >>> losses.shape, pairs.tolist()
        (torch.Size([3]), [3, 1, 1])
    """
    if user.dim() != 3 or targets.dim() != 3 or targets.shape[:2] != user.shape[:2]:
        raise DataError(f"user must be [B, K, D] and targets [B, K, T] with the same B, K, got "
                        f"{list(user.shape)} and {list(targets.shape)}", column="targets")
    k = user.shape[1]
    neg = items.index_select(0, neg_ids)
    lq_neg = log_q[neg_ids] if log_q is not None else None
    losses, pairs = [], []
    for j in range(k):  # K objectives (a handful), not rows
        t = targets[:, j]
        row, col = torch.nonzero(t > 0, as_tuple=True)
        pairs.append(int(row.numel()))
        if row.numel() == 0:
            losses.append(user.sum() * 0.0)
            continue
        ids = t[row, col]
        # index_select, not user[row, j] / items[ids]: a fixed-order backward (funnelrec.utils.probes)
        query, positive = user[:, j].index_select(0, row), items.index_select(0, ids)
        losses.append(softmax_loss_logq(query, positive, ids, neg, neg_ids,
                                        log_q[ids] if log_q is not None else None, lq_neg, temperature))
    return torch.stack(losses), torch.tensor(pairs)


def q_loss(q_logits: Tensor, counts: Tensor, values: Tensor | None = None) -> Tensor:
    """Cross-entropy of the predicted target weights to the next period's feedback shares.

    Args:
        q_logits: [B, K] logits of q(u).
        counts: [B, K] feedback count per objective in the next period.
        values: [K] value of each feedback type (share of value instead of count), or None.

    Returns:
        Scalar: ``mean_b −Σ_k p_bk log softmax(q_logits)_bk`` over rows with any feedback, ``p = c·v / Σ c·v``
        (0 when no row has feedback).
    """
    c = counts.to(q_logits.dtype).clamp(min=0)
    if values is not None:
        c = c * values.to(c)
    total = c.sum(1)
    keep = total > 0
    if not keep.any():
        return q_logits.sum() * 0.0
    p = c[keep] / total[keep].unsqueeze(1)
    return -(p * F.log_softmax(q_logits[keep], dim=1)).sum(1).mean()


class _Block(nn.Module):
    """Pre-norm (RMSNorm) attention + SiLU FFN block with an additive float mask and optional FiLM / gate."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.SiLU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, film: tuple[Tensor, Tensor] | None = None,
                gate: Tensor | None = None) -> Tensor:
        """x [B, S, D], mask [B, H or 1, S, S] additive (0 / -inf + bias); film = (γ [Q, D], β [Q, D]) applied to
        the queries of the last Q tokens; gate [B, D] multiplies the FFN output. Returns [B, S, D]."""
        b, s, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        if film is not None:
            gamma, beta = film
            n_q = gamma.shape[0]
            q = torch.cat([q[:, : s - n_q], q[:, s - n_q:] * (1.0 + gamma) + beta], 1)
        q, k, v = (t.view(b, s, h, dh).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, s, d)))
        f = self.ffn(self.norm2(x))
        if gate is not None:
            f = f * gate.unsqueeze(1)
        return x + self.drop(f)


class MPFormer(Retriever):
    """Multi-objective causal Transformer retriever (see the module doc).

    Args:
        config: :class:`MPFormerConfig`.
        item_sparse: [I, Fi] int64 sparse features of every item index (``item_features[0]`` of the data);
            required with ``side_features`` (only field 0 is used without).
        item_dense: [I, Di] float32 dense features of every item index (required when ``item_dense > 0``).
        item_popularity: [I] training-positive counts (the negative sampler and logQ); None = uniform.
    """

    train_mode = "example"

    def __init__(self, config: MPFormerConfig, item_sparse: Tensor | None = None, item_dense: Tensor | None = None,
                 item_popularity: Tensor | None = None):
        super().__init__()
        c = self.config = config
        i, d, k = c.num_items, c.dim, c.num_objectives
        counts = (torch.zeros(i) if item_popularity is None
                  else torch.as_tensor(item_popularity, dtype=torch.float32))
        if counts.shape != (i,):
            raise DataError(f"item_popularity must be [I] = [{i}], got {list(counts.shape)}",
                            column="item_popularity")
        self.register_buffer("log_q", log_sampling_probability(counts, alpha=c.sample_alpha))
        # ---- item side: id (+ side fields) (+ dense) → D, shared by the history tokens and the output vectors
        self.item_emb = nn.Embedding(i, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        self.side_emb: FieldEmbedding | None = None
        if c.side_features and len(c.item_vocab) > 1:
            fi = len(c.item_vocab)
            if item_sparse is None or tuple(item_sparse.shape) != (i, fi):
                got = None if item_sparse is None else list(item_sparse.shape)
                raise ConfigError(f"mpformer: side_features needs item_sparse [I, Fi] = [{i}, {fi}], got {got} "
                                  "(the data's item_features, or side_features=False)")
            self.register_buffer("item_sparse", item_sparse[:, 1:].to(torch.int64).clone())
            self.side_emb = FieldEmbedding(list(c.item_vocab[1:]), d)
        self.item_dense_proj: nn.Linear | None = None
        if c.item_dense:
            if item_dense is None or tuple(item_dense.shape) != (i, c.item_dense):
                got = None if item_dense is None else list(item_dense.shape)
                raise ConfigError(f"mpformer: item_dense={c.item_dense} needs item_dense [I, Di] = [{i}, "
                                  f"{c.item_dense}], got {got}")
            self.register_buffer("item_dense", item_dense.to(torch.float32).clone())
            self.item_dense_proj = nn.Linear(c.item_dense, d, bias=False)
        # ---- user side: sum-pooled demographic fields (never field 0, the user id) + dense
        demo = list(c.user_vocab[1:]) if c.user_vocab and len(c.user_vocab) > 1 else []
        self.user_emb = FieldEmbedding(demo, d) if demo else None
        self.user_dense_proj = nn.Linear(c.user_dense, d, bias=False) if c.user_dense else None
        self.profile_bias = nn.Parameter(torch.zeros(d))
        # ---- history token parts
        self.action_proj = nn.Linear(c.num_actions, d, bias=False) if c.num_actions else None
        self.gap_emb = nn.Embedding(c.gap_buckets, d)
        self.pos_emb = nn.Embedding(c.max_len, d)
        for emb in (self.gap_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)
        # ---- readout tokens: K objective tokens, or one readout token + K linear heads
        n_read = k if c.readout == "objective_tokens" else 1
        self.readout_tokens = nn.Parameter(torch.randn(n_read, d) * 0.05)
        self.heads_out = nn.Linear(d, k * d) if c.readout == "linear_heads" else None
        modulate = c.readout == "objective_tokens"
        self.use_bias = modulate and c.modulation in ("bias", "both")
        self.use_film = modulate and c.modulation in ("film", "both")
        if self.use_bias:
            self.action_bias = nn.Parameter(torch.zeros(c.layers, k, c.heads, max(c.num_actions, 1)))
            self.gap_bias = nn.Parameter(torch.zeros(c.layers, k, c.heads, c.gap_buckets))
        if self.use_film:
            self.film_gamma = nn.Parameter(torch.zeros(c.layers, k, d))
            self.film_beta = nn.Parameter(torch.zeros(c.layers, k, d))
        self.gate = MLP(d, [d, (c.layers + 1) * d]) if c.personal_gate else None
        self.blocks = nn.ModuleList(_Block(d, c.heads, c.ffn_mult, c.dropout) for _ in range(c.layers))
        self.norm_f = nn.RMSNorm(d)
        self.drop = nn.Dropout(c.dropout)
        # ---- q(u): personalised target weights, on detached encoder outputs
        self.q_net = (MLP(k * d + d + c.num_actions + 1, [c.q_hidden, k]) if c.q_head and k > 1 else None)
        self.register_buffer("q_value", torch.tensor(c.q_values if c.q_values else [1.0] * k, dtype=torch.float32))
        w = c.loss_weights if c.loss_weights else (1.0,) * k
        self.register_buffer("objective_weight", torch.tensor(w, dtype=torch.float32))

    # ------------------------------------------------------------------ item side
    def item_vectors(self, normalize: bool | None = None, index: Tensor | None = None) -> Tensor:
        """[I, D] every item's vector (row 0 = padding = 0), or [..., D] those of the item indices ``index``;
        L2-normalised when ``config.normalize`` (or ``normalize``)."""
        rows = self.item_emb.weight if index is None else self.item_emb(index)
        if self.side_emb is not None:
            side = self.item_sparse if index is None else self.item_sparse[index]
            rows = rows + self.side_emb(side).sum(-2)
        if self.item_dense_proj is not None:
            rows = rows + self.item_dense_proj(self.item_dense if index is None else self.item_dense[index])
        ids = torch.arange(rows.shape[0], device=rows.device) if index is None else index
        rows = rows * (ids > 0).unsqueeze(-1).to(rows.dtype)
        normalize = self.config.normalize if normalize is None else normalize
        return F.normalize(rows, dim=-1) if normalize else rows

    # ------------------------------------------------------------------ user side
    def profile(self, batch: RequestBatch) -> Tensor:
        """[B, D] the profile token: sum of the demographic field embeddings (user sparse fields 1..; the user id,
        field 0, is never read) + a linear map of the dense features."""
        b = batch.batch_size
        x = self.profile_bias.expand(b, -1)
        if self.user_emb is not None:
            fu = len(self.config.user_vocab)
            if batch.user_sparse.shape[-1] != fu:
                raise DataError(f"user_sparse has {batch.user_sparse.shape[-1]} fields, the config {fu}",
                                column="user_sparse")
            x = x + self.user_emb(batch.user_sparse[:, 1:]).sum(1)
        if self.user_dense_proj is not None:
            if batch.user_dense.shape[-1] != self.config.user_dense:
                raise DataError(f"user_dense has {batch.user_dense.shape[-1]} features, the config "
                                f"{self.config.user_dense}", column="user_dense")
            x = x + self.user_dense_proj(batch.user_dense)
        return x

    def _history(self, batch: RequestBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The most recent ``max_len`` events: items [B, N], actions [B, N, A], gap buckets [B, N] and
        valid [B, N]."""
        c = self.config
        if batch.hist_items.shape[1] > c.max_len:
            batch = batch.truncate_history(c.max_len)
        items, n = batch.hist_items, batch.hist_items.shape[1]
        actions = batch.hist_actions
        if actions.shape[-1] == 0 and c.num_actions:
            actions = torch.zeros(*items.shape, c.num_actions, device=items.device)
        if actions.shape[-1] != c.num_actions:
            raise DataError(f"hist_actions has {actions.shape[-1]} channels, the config num_actions="
                            f"{c.num_actions}", column="hist_actions")
        valid = torch.arange(n, device=items.device).unsqueeze(0) >= (n - batch.hist_len.clamp(max=n)).unsqueeze(1)
        buckets = gap_bucket(batch.hist_gap_s, c.gap_buckets, c.gap_unit_s)
        return items * valid, actions.to(torch.float32) * valid.unsqueeze(-1), buckets, valid

    def _mask(self, valid: Tensor, actions: Tensor, buckets: Tensor, n_read: int) -> list[Tensor]:
        """Per layer, the additive attention mask [B, H or 1, S, S] (0 allowed, -inf not, + modulation bias)."""
        b, n = valid.shape
        s = 1 + n + n_read
        dev = valid.device
        pos = torch.arange(s, device=dev)
        seq = pos < 1 + n
        # causal over profile + history; readout rows see the whole sequence (they come after it) and themselves
        structure = ((pos.unsqueeze(1) >= pos.unsqueeze(0)) & seq.unsqueeze(0)) | torch.eye(s, dtype=torch.bool,
                                                                                             device=dev)
        key_ok = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), valid,
                            torch.ones(b, n_read, dtype=torch.bool, device=dev)], 1)
        allowed = structure.unsqueeze(0) & key_ok.unsqueeze(1)  # [B, S, S]
        base = torch.zeros(b, 1, s, s, device=dev).masked_fill(~allowed.unsqueeze(1), NEG_INF)
        if not self.use_bias:
            return [base] * self.config.layers
        out = []
        for layer in range(self.config.layers):
            a_w = self.action_bias[layer]  # [K, H, A]
            bias = (torch.einsum("bna,kha->bhkn", actions, a_w) if actions.shape[-1]
                    else torch.zeros(b, a_w.shape[1], a_w.shape[0], n, device=dev))
            gap = take(self.gap_bias[layer], 2, buckets)  # [K, H, B, N]; not [:, :, buckets] (see nn.take)
            bias = bias + gap.permute(2, 1, 0, 3)  # [B, H, K, N]
            m = base.expand(b, self.config.heads, s, s).clone()
            m[:, :, 1 + n:, 1: 1 + n] = m[:, :, 1 + n:, 1: 1 + n] + bias
            out.append(m)
        return out

    def states(self, batch: RequestBatch) -> tuple[Tensor, Tensor]:
        """``(x [B, S, D], profile [B, D])``: the final states of every token (profile, N history positions, the
        readout tokens), before the final norm, and the profile token's input vector."""
        c = self.config
        items, actions, buckets, valid = self._history(batch)
        b, n = items.shape
        prof = self.profile(batch)
        tok = self.item_vectors(normalize=False, index=items) + self.gap_emb(buckets)  # history items only
        tok = tok + self.pos_emb.weight[:n].flip(0).unsqueeze(0)  # row 0 of pos_emb = the most recent event
        if self.action_proj is not None:
            tok = tok + self.action_proj(actions)
        tok = tok * valid.unsqueeze(-1)
        n_read = self.readout_tokens.shape[0]
        x = torch.cat([prof.unsqueeze(1), tok, self.readout_tokens.unsqueeze(0).expand(b, -1, -1)], 1)
        gates = None
        if self.gate is not None:
            gates = (2.0 * torch.sigmoid(self.gate(prof))).view(b, c.layers + 1, c.dim)
            x = x * gates[:, 0].unsqueeze(1)
        x = self.drop(x)
        masks = self._mask(valid, actions, buckets, n_read)
        for layer, block in enumerate(self.blocks):
            film = (self.film_gamma[layer], self.film_beta[layer]) if self.use_film else None
            x = block(x, masks[layer], film, gates[:, layer + 1] if gates is not None else None)
        return x, prof

    def encode(self, batch: RequestBatch) -> tuple[Tensor, Tensor]:
        """``(user [B, K, D], profile [B, D])``: the K user vectors (normalised when ``config.normalize``) and the
        profile token's input vector."""
        c = self.config
        x, prof = self.states(batch)
        h = self.norm_f(x[:, x.shape[1] - self.readout_tokens.shape[0]:])  # [B, n_read, D]
        if self.heads_out is not None:
            h = self.heads_out(h[:, 0]).view(x.shape[0], c.num_objectives, c.dim)
        return (F.normalize(h, dim=-1) if c.normalize else h), prof

    def user_vectors(self, batch: RequestBatch) -> Tensor:
        """[B, K, D] the K user vectors (one per objective, ``config.objectives`` order)."""
        return self.encode(batch)[0]

    def _q_logits(self, batch: RequestBatch, user: Tensor, prof: Tensor) -> Tensor:
        _, actions, _, valid = self._history(batch)
        length = valid.sum(1, keepdim=True).to(user.dtype)
        act_mean = actions.sum(1) / length.clamp(min=1.0)
        z = torch.cat([user.detach().flatten(1), prof.detach(), act_mean, torch.log1p(length)], 1)
        return self.q_net(z)

    def target_weights(self, batch: RequestBatch, user: Tensor | None = None) -> Tensor:
        """[B, K] personalised target weights q(u) (rows sum to 1); uniform without a q head (or with K = 1)."""
        if self.q_net is None:
            b, k = batch.batch_size, self.config.num_objectives
            return torch.full((b, k), 1.0 / k, device=batch.hist_items.device)
        if user is None:
            user, prof = self.encode(batch)
        else:
            prof = self.profile(batch)
        return torch.softmax(self._q_logits(batch, user, prof), dim=1)

    # ------------------------------------------------------------------ protocol
    def _targets(self, batch: RequestBatch) -> Tensor:
        """[B, K, T] targets of a multi-objective batch, or the one positive of a leave-last-out row."""
        k = self.config.num_objectives
        t = batch.extras.get("targets")
        if t is not None:
            if t.dim() != 3 or t.shape[:2] != (batch.batch_size, k):
                raise DataError(f"extras['targets'] must be [B, K, T] = [{batch.batch_size}, {k}, T], got "
                                f"{list(t.shape)}", column="targets")
            return t.to(torch.int64)
        obj = batch.extras.get("objective")
        t = torch.zeros(batch.batch_size, k, 1, dtype=torch.int64, device=batch.cand_items.device)
        rows = torch.arange(batch.batch_size, device=t.device)
        col = obj.to(torch.int64) if obj is not None else torch.zeros_like(rows)
        t[rows, col, 0] = batch.cand_items[:, 0]
        return t

    def losses(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``{"retrieval": Σ_k w_k L_k, "per_objective": [K], "pairs": [K], "q": q-head loss}`` of a batch."""
        c = self.config
        user, prof = self.encode(batch)
        neg_ids = torch.multinomial(self.log_q.exp(), c.num_sampled, replacement=True)
        per, pairs = objective_losses(user, self.item_vectors(), self._targets(batch), neg_ids,
                                      self.log_q if c.logq else None, c.temperature)
        out = {"retrieval": (self.objective_weight * per).sum(), "per_objective": per, "pairs": pairs}
        counts = batch.extras.get("objective_counts")
        if self.q_net is not None and counts is not None:
            values = self.q_value if c.q_target == "value" else None
            out["q"] = q_loss(self._q_logits(batch, user, prof), counts, values)
        else:
            out["q"] = user.sum() * 0.0
        return out

    def training_loss(self, batch: RequestBatch) -> Tensor:
        """``Σ_k w_k L_k + q_loss_weight · L_q`` (the q loss only trains the q head: its inputs are detached)."""
        out = self.losses(batch)
        return out["retrieval"] + self.config.q_loss_weight * out["q"]

    def score_objectives(self, batch: RequestBatch) -> Tensor:
        """[B, K, I] score of every item under each objective's user vector; ``-inf`` at padding index 0."""
        scores = torch.einsum("bkd,id->bki", self.user_vectors(batch), self.item_vectors())
        scores[:, :, 0] = NEG_INF
        return scores

    def score_all(self, batch: RequestBatch) -> Tensor:
        """[B, I] scores under objective ``extras["objective"]`` of each row (else ``config.score_objective``)."""
        user = self.user_vectors(batch)
        obj = batch.extras.get("objective")
        rows = torch.arange(user.shape[0], device=user.device)
        col = obj.to(torch.int64) if obj is not None else torch.full_like(rows, self.config.score_objective)
        scores = user[rows, col] @ self.item_vectors().t()
        return self._mask_padding(scores)


def build_mpformer(spec, item_popularity, item_features, overrides) -> MPFormer:
    """Registry builder (``funnelrec.retrieval.build_retriever("mpformer", ...)``)."""
    if item_features is None:
        raise ConfigError("mpformer needs item_features=(item_sparse [I, Fi], item_dense [I, Di]) "
                          "(RetrievalData.item_features / MPFormerData.item_features)")
    sparse, dense = item_features
    return MPFormer(MPFormerConfig.from_spec(spec, **overrides), sparse, dense, item_popularity)
