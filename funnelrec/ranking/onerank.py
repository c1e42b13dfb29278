"""OneRank: task-private token channels in one Transformer-native ranker (Tang et al., *Unified Transformer-Native
Ranking Architecture for Multi-Task Recommendation*, KDD 2026, arXiv 2606.16838; notes, abstract-level only, in
``../shared/papers/onerank.md``).

A non-sequence model, like RankMixer: the history reaches it through ``RankingInputs``' pooled history features.
Per candidate, with K = T + 1 task channels (the T binary tasks and the watch head, which is a task channel of its
own here: its own token, its own private weights, its own score)::

    shared tokens  X_s = [NS tokens (RankMixer semantic groups of the RankingInputs features, width D);
                          situational descriptor σ(candidate | its request's candidate set)]      [B, M, S, D]
    task tokens    X_t = [τ_1 … τ_K]  (learned embeddings, one per channel)                     [B, M, K, D]
    injection stage, inject_layers × (pre-norm attention + FFN, mask below):
        shared tokens read shared tokens only (they stay task-agnostic);
        τ_k reads the shared tokens and itself, never τ_j (mutual invisibility)
    cross-task relational layer, cross_layers × (pre-norm attention + FFN over the task tokens):
        τ_k reads [τ_k; stop_grad(τ_j) for j ≠ k]  (the other tasks as read-only memory)
    scoring: h_cand = mean of the final shared tokens;
        s_k = ⟨n(W_k h_τk), n(g(h_cand))⟩ / temperature + b_k   (n = L2 normalisation, ``match_normalize``)
    → logits = s_1 … s_T, watch = s_K

Gradient routes. ``detach_cross``: the memory of the cross-task layer is detached (its keys and values, computed
by task j's own weights, reach reader k ≠ j as constants), so ∂L_k/∂θ_j = 0 exactly for every parameter θ_j that
produces τ_j (τ_j's embedding and task j's slice of every task-private weight; ``OneRank.task_private_parameters``),
provided the mask is on. ``detach_shared``: task tokens read the shared tokens' keys and values through a detach,
so the task-private channels never write into the shared extractor (the ``RankingInputs`` tables, the tokenizer,
the situational descriptor, the shared-token attention and FFNs); the shared extractor learns from every task only
through the one shared path of the scoring, g(h_cand). Both off = the "without detachment" ablation.

What is the paper's and what is ours:

* **Paper** (the stated mechanisms): task tokens injected into the token sequence with mutual invisibility
  (``task_mask``); candidate-aware situational descriptors computed identically in training and serving
  (``situational``); cross-task relational attention as read-only memory with gradient detachment
  (``detach_cross``); cross-task gradient detachment of the task-private channels from the shared extractor
  (``detach_shared``); dynamic matching-based scoring with a temperature instead of per-task MLP heads
  (``scoring="matching"``; ``"mlp"`` is the ablation).
* **Ours** (every concrete form; the paper's equations are not public): the NS tokens are RankMixer's semantic
  groups (``NSTokenGroups``); the watch head is a (K-th) task channel; the situational descriptor is ONE token
  ``LN(W [x − μ; μ; σ])`` where x is the candidate's item-side input (its item field embeddings, item dense
  values and log duration; never the display position, never a label), μ and σ the mean and standard deviation
  of x over the request's real candidates (``cand_mask``: padded candidates never enter μ, σ) — one function,
  the same in training and serving, which makes a candidate's score depend on the other real candidates of its
  request (not on padding, not on other requests); shared tokens share the attention weights and have a
  per-token FFN (RankMixer's PFFN), every task token has its own weights (task-private Q/K/V/O, RMSNorm
  scales and FFN: ``GroupedLinear`` / ``PerTokenFFN`` slices); the mask lets a task token read itself;
  ``task_mask=False`` is full attention among all tokens (shared tokens then read task tokens too);
  ``detach_shared`` detaches the shared keys/values as the task tokens read them (the shared-side projections
  still learn from the shared tokens' own attention) and does not touch the no-mask ablation's shared-reads-task
  path; the cross-task layer reads task tokens only; g is a two-layer MLP and the matching
  is cosine / temperature + a per-channel bias (``match_normalize=False``: a plain dot product / temperature);
  ``scoring="mlp"`` puts ``TaskHeads`` towers on ``[h_τk; h_cand]`` (the same inputs as the matching, so the
  shared path stays); the sizes (D = 32, 2 heads, one injection and one cross-task layer, FFN width 2·D,
  temperature 0.1) are chosen to match MMoE's and PLE's forward+backward FLOPs per sample (~1.3M), not the
  paper's.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = OneRank(OneRankConfig(user_vocab=[10, 3], item_vocab=[20], user_dense=0, item_dense=0)).eval()
    >>> batch = RequestBatch.empty(batch_size=2, history=5, candidates=3, user_fields=2)
    >>> out = model(batch)
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
    >>> model.num_shared_tokens, model.num_channels       # 6 NS tokens + 1 situational; 6 tasks + watch
    (7, 7)
    >>> states = model.encode(batch)
    >>> states["injected"].shape, states["tasks"].shape
    (torch.Size([2, 3, 7, 32]), torch.Size([2, 3, 7, 32]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn import GroupedLinear
from funnelrec.nn.seq_attention import masked_attention
from funnelrec.nn.token_mixing import PerTokenFFN
from funnelrec.nn.tokenizers import SemanticTokenizer
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads
from funnelrec.ranking.hyformer import NSTokenGroups
from funnelrec.ranking.inputs import RankingFeatures
from funnelrec.ranking.watch_time import WatchTimeDebiaser

SCORINGS = ("matching", "mlp")


# ---------------------------------------------------------------------------------------------- the config


@dataclass
class OneRankConfig(NSTokenGroups, RankerConfig):
    """Sizes and switches of ``OneRank`` (the common fields are documented on ``RankerConfig``).

    Args:
        dim: D, the width of every token.
        heads: attention heads (D divisible by it).
        inject_layers: layers of the injection stage (>= 1).
        cross_layers: cross-task relational layers (0: the task tokens never meet).
        ffn_mult: every FFN has hidden width ``ffn_mult · D``.
        situational: add the situational-descriptor token (False: NS tokens only, candidate-independent scores).
        task_mask: mutual invisibility in the injection stage (False: full attention, the "without the mask"
            ablation).
        detach_cross: the cross-task layer reads the other tasks through a stop-gradient (read-only memory).
        detach_shared: task tokens read the shared tokens through a stop-gradient (the shared extractor learns only
            through the scoring's shared path). Both detach switches off = the "without detachment" ablation.
        scoring: ``"matching"`` (⟨W_k h_τk, g(h_cand)⟩ / temperature) or ``"mlp"`` (per-task MLP towers on
            ``[h_τk; h_cand]``, the ablation).
        temperature: the matching temperature (> 0).
        match_normalize: L2-normalise both sides of the matching (cosine); False: a plain dot product.
        token_groups: NS token name → input field names (``RankMixerConfig``'s fields); None for the six defaults.
    """

    dim: int = 32
    heads: int = 2
    inject_layers: int = 1
    cross_layers: int = 1
    ffn_mult: int = 2
    situational: bool = True
    task_mask: bool = True
    detach_cross: bool = True
    detach_shared: bool = True
    scoring: str = "matching"
    temperature: float = 0.1
    match_normalize: bool = True
    token_groups: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "OneRankConfig"
        for key, low in (("dim", 1), ("heads", 1), ("inject_layers", 1), ("cross_layers", 0), ("ffn_mult", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}.{key} must be an int >= {low}, got {value!r}")
        if self.dim % self.heads:
            raise ConfigError(f"{name}.heads ({self.heads}) must divide dim ({self.dim})")
        for key in ("situational", "task_mask", "detach_cross", "detach_shared", "match_normalize"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{name}.{key} must be a bool, got {getattr(self, key)!r}")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"{name}.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"{name}.temperature must be a finite number > 0, got {self.temperature!r}")
        self.check_token_groups()


# ---------------------------------------------------------------------------------------------------- layers


class TaskNorm(nn.Module):
    """RMSNorm with its own scale per token slot: x [..., K, D] → [..., K, D] (slot k scaled by ``weight[k]``).

    Example:
        >>> norm = TaskNorm(3, 4)
        >>> norm(torch.randn(2, 3, 4)).shape, norm.weight.shape
        (torch.Size([2, 3, 4]), torch.Size([3, 4]))
    """

    def __init__(self, slots: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(slots, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def situational_features(features: RankingFeatures, num_user_fields: int, num_item_fields: int,
                         user_dense: int) -> Tensor:
    """The item-side inputs of every candidate: its item field embeddings, item dense values and log duration
    (never the position): [B, M, Fi·E + Di + 1]."""
    items = features.tokens[..., num_user_fields:num_user_fields + num_item_fields, :].flatten(-2)
    return torch.cat([items, features.dense[..., user_dense:]], -1)


class SituationalDescriptor(nn.Module):
    """One candidate-aware context token per candidate from its request's candidate set:
    ``LN(W [x − μ; μ; σ])``, μ, σ the mean and standard deviation of x over the request's real candidates.

    Args:
        in_dim: F, the width of a candidate's input x.
        dim: D.

    ``forward(x, mask)``: x [B, M, F], mask [B, M] bool (``cand_mask``) → [B, M, D]. Padded candidates never enter
    μ or σ (their values are replaced by zeros before the sums, so not even a NaN there leaks); a request without
    a real candidate gets μ = 0. The one function of training and serving (no label, no position).

    Example:
        >>> desc = SituationalDescriptor(in_dim=3, dim=4)
        >>> x, mask = torch.randn(2, 5, 3), torch.tensor([[True] * 5, [True, True, False, False, False]])
        >>> y = desc(x, mask)
        >>> x2 = x.clone(); x2[1, 3] = 100.0                      # a padded candidate of request 1
        >>> y.shape, torch.equal(desc(x2, mask)[:, :3], y[:, :3])
        (torch.Size([2, 5, 4]), True)
    """

    def __init__(self, in_dim: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Linear(3 * in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.eps = eps

    def stats(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """μ, σ [B, 1, F] over the real candidates of each request."""
        m = mask.unsqueeze(-1)
        count = m.to(x.dtype).sum(1, keepdim=True).clamp(min=1.0)
        mean = torch.where(m, x, 0.0).sum(1, keepdim=True) / count
        var = torch.where(m, (x - mean) ** 2, 0.0).sum(1, keepdim=True) / count
        return mean, torch.sqrt(var + self.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mean, std = self.stats(x, mask)
        return self.norm(self.proj(torch.cat([x - mean, mean.expand_as(x), std.expand_as(x)], -1)))


def _heads(x: Tensor, heads: int) -> Tensor:
    """[N, S, D] → [N, h, S, dh]."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[N, h, S, dh] → [N, S, D]."""
    return x.transpose(1, 2).flatten(-2)


class InjectionLayer(nn.Module):
    """One injection layer: pre-norm attention + FFN over [S shared tokens; K task tokens].

    Shared tokens share the attention weights (``s_*``) and have a per-token FFN (RankMixer's), task token k has
    its own slice of every task weight (``t_*``, dim 0 = the task). Mask: shared queries read the shared keys;
    task query k reads the shared keys and key k (``task_mask=True``); with ``task_mask=False`` every query
    reads every key. ``detach_shared``: the task queries read the shared keys/values through a stop-gradient.

    ``forward(xs, xt)``: xs [N, S, D], xt [N, K, D] → (xs', xt'); with the mask on, xs' does not depend on xt and
    xt'[:, k] depends on xt[:, k] only.
    """

    def __init__(self, num_shared: int, num_tasks: int, dim: int, heads: int, ffn_mult: int,
                 task_mask: bool = True, detach_shared: bool = True, dropout: float = 0.0):
        super().__init__()
        self.heads, self.task_mask, self.detach_shared = heads, task_mask, detach_shared
        self.s_norm1, self.s_norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.s_qkv, self.s_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.s_ffn = PerTokenFFN(num_shared, dim, ffn_mult * dim)
        self.t_norm1, self.t_norm2 = TaskNorm(num_tasks, dim), TaskNorm(num_tasks, dim)
        self.t_qkv, self.t_out = GroupedLinear(num_tasks, dim, 3 * dim), GroupedLinear(num_tasks, dim, dim)
        self.t_ffn = PerTokenFFN(num_tasks, dim, ffn_mult * dim)
        self.drop = nn.Dropout(dropout)
        s, k = num_shared, num_tasks
        task_keys = torch.eye(k, dtype=torch.bool) if task_mask else torch.ones(k, k, dtype=torch.bool)
        self.register_buffer("task_mask_", torch.cat([torch.ones(k, s, dtype=torch.bool), task_keys], 1),
                             persistent=False)  # [K, S + K]

    def forward(self, xs: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        n, h = xs.shape[0], self.heads
        qs, ks, vs = (_heads(t, h) for t in self.s_qkv(self.s_norm1(xs)).chunk(3, -1))  # [N, h, S, dh]
        qt, kt, vt = (_heads(t, h) for t in self.t_qkv(self.t_norm1(xt), grouped=True).chunk(3, -1))
        if self.task_mask:  # shared tokens read shared tokens only
            s_att = F.scaled_dot_product_attention(qs, ks, vs)
        else:
            s_att = F.scaled_dot_product_attention(qs, torch.cat([ks, kt], 2), torch.cat([vs, vt], 2))
        ks_t, vs_t = (ks.detach(), vs.detach()) if self.detach_shared else (ks, vs)
        mask = self.task_mask_.expand(n, -1, -1)
        t_att = masked_attention(qt, torch.cat([ks_t, kt], 2), torch.cat([vs_t, vt], 2), mask)
        xs = xs + self.drop(self.s_out(_merge(s_att)))
        xs = xs + self.drop(self.s_ffn(self.s_norm2(xs)))
        xt = xt + self.drop(self.t_out(_merge(t_att), grouped=True))
        xt = xt + self.drop(self.t_ffn(self.t_norm2(xt)))
        return xs, xt


class CrossTaskLayer(nn.Module):
    """Cross-task relational attention + a per-task FFN over K task tokens (every weight task-private).

    Query k reads key/value j of every task, computed by task j's own weights; with ``detach`` the keys and
    values of j ≠ k reach query k through a stop-gradient (read-only memory), its own (j = k) stay attached.

    ``forward(xt)``: xt [N, K, D] → [N, K, D].

    Example:
        >>> layer = CrossTaskLayer(num_tasks=3, dim=4, heads=2, ffn_mult=2)
        >>> layer(torch.randn(5, 3, 4)).shape
        torch.Size([5, 3, 4])
    """

    def __init__(self, num_tasks: int, dim: int, heads: int, ffn_mult: int, detach: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.heads, self.detach = heads, detach
        self.norm1, self.norm2 = TaskNorm(num_tasks, dim), TaskNorm(num_tasks, dim)
        self.qkv, self.out = GroupedLinear(num_tasks, dim, 3 * dim), GroupedLinear(num_tasks, dim, dim)
        self.ffn = PerTokenFFN(num_tasks, dim, ffn_mult * dim)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("eye", torch.eye(num_tasks, dtype=torch.bool), persistent=False)

    def forward(self, xt: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.norm1(xt), grouped=True).chunk(3, -1))
        scale = q.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) * scale  # [N, h, K, K]
        if self.detach:
            scores = torch.where(self.eye, scores, q @ k.detach().transpose(-1, -2) * scale)
        p = scores.softmax(-1)
        if self.detach:
            att = (p * ~self.eye) @ v.detach() + p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v
        else:
            att = p @ v
        xt = xt + self.drop(self.out(_merge(att), grouped=True))
        return xt + self.drop(self.ffn(self.norm2(xt)))


class MatchingHeads(nn.Module):
    """Dynamic matching scores: ``s_k = ⟨n(W_k h_k), n(g(c))⟩ / temperature + b_k`` (n = L2 normalisation when
    ``normalize``), W_k = ``out.weight[k]``, g a two-layer MLP shared by every channel.

    Args:
        dim: D.  hidden: g's hidden width.  num_heads: K channels.  temperature: > 0.  normalize: cosine matching.

    ``forward(h, c)``: h [..., K, D] task states, c [..., D] the candidate representation → [..., K].

    Example:
        >>> heads = MatchingHeads(dim=4, hidden=8, num_heads=3)
        >>> heads(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, dim: int, hidden: int, num_heads: int, temperature: float = 0.1, normalize: bool = True):
        super().__init__()
        self.out = GroupedLinear(num_heads, dim, dim)
        self.cand = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads))
        self.temperature, self.normalize = temperature, normalize

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        u, g = self.out(h, grouped=True), self.cand(c).unsqueeze(-2)
        if self.normalize:
            u, g = F.normalize(u, dim=-1), F.normalize(g, dim=-1)
        return (u * g).sum(-1) / self.temperature + self.bias


# ------------------------------------------------------------------------------------------------------ model


class OneRank(MultiTaskRanker):
    """OneRank multi-task ranker (see the module docstring).

    Args:
        config: a ``OneRankConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: OneRankConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        d, k = c.dim, self.num_heads
        self.tokenizer = SemanticTokenizer(c.input_fields(), c.groups(), d)
        self.situational = None
        if c.situational:
            sit_in = len(c.item_vocab) * c.embed_dim + c.item_dense + 1
            self.situational = SituationalDescriptor(sit_in, d)
        s = self.num_shared_tokens
        self.task_tokens = nn.Parameter(torch.randn(k, d))
        self.inject = nn.ModuleList(InjectionLayer(s, k, d, c.heads, c.ffn_mult, c.task_mask, c.detach_shared,
                                                   c.dropout) for _ in range(c.inject_layers))
        self.cross = nn.ModuleList(CrossTaskLayer(k, d, c.heads, c.ffn_mult, c.detach_cross, c.dropout)
                                   for _ in range(c.cross_layers))
        self.shared_norm, self.task_norm = nn.LayerNorm(d), TaskNorm(k, d)
        if c.scoring == "matching":
            self.heads: nn.Module = MatchingHeads(d, c.head, k, c.temperature, c.match_normalize)
        else:
            self.heads = TaskHeads(2 * d, c.head, k)

    @property
    def num_channels(self) -> int:
        """K = T + 1 task tokens (the watch head is a channel)."""
        return self.num_heads

    @property
    def num_shared_tokens(self) -> int:
        """S: the NS tokens (+ the situational token)."""
        return self.tokenizer.num_tokens + int(self.situational is not None)

    def task_private_parameters(self) -> dict[str, Tensor]:
        """Name → parameter of every task-private parameter: dim 0 indexes the K channels (τ_k's embedding and
        task k's slice of every task-token weight, the heads' ``W_k`` included); ``p[j]`` produces τ_j only."""
        k = self.num_channels
        skip = ("tokenizer.", "situational.", "inputs.", "shared_norm.", "heads.cand.")
        out = {}
        for name, p in self.named_parameters():
            if name.startswith(skip) or ".s_" in name or p.dim() == 0 or p.shape[0] != k:
                continue
            out[name] = p
        return out

    def encode(self, batch: RequestBatch) -> dict[str, Tensor]:
        """The token states of every candidate: ``shared`` [B, M, S, D] (final shared tokens), ``injected``
        [B, M, K, D] (task tokens after the injection stage), ``tasks`` [B, M, K, D] (after the cross-task
        layers)."""
        c = self.config
        f = self.features(batch)
        x = self.tokenizer(f.flat)  # [B, M, T_ns, D]
        if self.situational is not None:
            sit_x = situational_features(f, len(c.user_vocab), len(c.item_vocab), c.user_dense)
            x = torch.cat([x, self.situational(sit_x, batch.cand_mask).unsqueeze(-2)], -2)
        b, m, s, d = x.shape
        xs = x.reshape(b * m, s, d)
        xt = self.task_tokens.expand(b * m, -1, -1)
        for layer in self.inject:
            xs, xt = layer(xs, xt)
        injected = xt
        for layer in self.cross:
            xt = layer(xt)
        k = xt.shape[1]
        return {"shared": xs.view(b, m, s, d), "injected": injected.reshape(b, m, k, d),
                "tasks": xt.reshape(b, m, k, d)}

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        states = self.encode(batch)
        cand = self.shared_norm(states["shared"].mean(-2))  # [B, M, D]
        tasks = self.task_norm(states["tasks"])  # [B, M, K, D]
        if self.config.scoring == "matching":
            y = self.heads(tasks, cand)
        else:
            y = self.heads(torch.cat([tasks, cand.unsqueeze(-2).expand_as(tasks)], -1), grouped=True)
        return self.split_heads(y)
