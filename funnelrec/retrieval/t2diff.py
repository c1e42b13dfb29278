"""T2Diff (Wang et al., WWW 2025, arXiv 2502.20687): a two-tower retriever whose user tower generates the user's
next positive item with a diffusion model and lets it interact with the behaviour sequence.

The item tower, the score and the loss are the two-tower's (:class:`~funnelrec.retrieval.two_tower.
TwoTowerRetriever`, which this class extends): items stay one vector each, ANN-indexable, and the user vector meets
them in a dot product. Only the user tower changes: the two-tower's mean-pooled history is replaced by the
mixed-attention summary ``[h_l, h_s]`` of the behaviour sequence and a generated next-intent vector ``x̂_{n+1}``.

**What is the paper's and what is ours** (``shared/papers/t2diff.md``; the diffusion module is known from a summary
only):

* paper: the session / history split of the behaviour sequence (the last behaviours = the current intent); the
  diffusion module that generates ``x̂_{n+1}``: it diffuses the **interest drift** (differences of adjacent
  behaviours, "drift preparation") with an **exponential β schedule** and T reverse steps (T = 50), with a
  denoiser conditioned on the behaviour sequence, and "drift utilisation" ``x̂_{n+1} = x_n + ẑ`` (the note's
  inference); the mixed attention: a Transformer over ``[session; x̂_{n+1}]`` averaged into ``h_s`` (Eq. 19),
  DIN-style target attention of ``h_s`` over the history, normalised over the history (ours: a softmax, i.e. exp
  of the activation unit's score divided by the sum over j), ``h_l = Σ_j a_j x_j``
  (Eqs. 20–21), ``e_u = FFN([h_l, h_s])`` (Eq. 22), the time lag to each behaviour as a feature; the loss
  ``L_tower + λ L_diff`` with a stop-gradient between the diffusion module and the towers.
* ours: the behaviour vectors ``x_j`` are the **item-tower vectors** of the history items (so ``x̂_{n+1}`` lives
  where the item vectors live, and its cosine to the true next item's vector is meaningful); the split rule (the
  session is the trailing run of behaviours with gaps ≤ ``session_gap_s``, at most ``session_max`` of them); the
  conditioner (a causal Transformer over the detached behaviour vectors plus log2 time-gap buckets; the state
  after behaviour t, plus a bucket of the time to the next behaviour, conditions the drift ``x_{t+1} − x_t``);
  the denoiser (a small MLP U-Net, :class:`~funnelrec.retrieval.diffusion.MLPDenoiser`); the continuous-time β
  schedules (:mod:`funnelrec.retrieval.diffusion`); ε-prediction; the drift scale (``√(D/2)``, so drift
  components have about unit variance; ``√D`` without drift); a unit-normalised ``x̂`` as the target token; the
  user's own features (the two-tower's user fields) beside ``[h_l, h_s]`` in the final FFN; the time lag as a
  log2-bucket embedding added to every behaviour token; the logQ-corrected mixed-negative softmax (the
  two-tower's).

**No label leakage** (the method note's [INF] warning, the issue's rule). The label item never enters the user
tower: in training *and* serving ``x̂_{n+1}`` comes from a reverse chain started from pure noise and conditioned
on the history alone (the conditioner is causal: its state after behaviour n reads behaviours 1..n only). The label
enters only the diffusion loss, as the clean drift ``x_{n+1} − x_n`` to denoise. Tested: changing the label item's
embedding leaves the user vector bit-identical.

**Stop-gradient.** The diffusion module (conditioner + denoiser) reads detached item vectors and its sample is
produced without a graph, so the retrieval loss trains the towers and the attention only, and the diffusion loss
trains the diffusion module only (tested both ways).

**Serving.** ``user_vectors`` runs the reverse chain once per request (``sampler="ddpm"``: all T steps;
``"ddim"`` with ``sample_steps`` S < T: fewer). In eval mode the chain's noise comes from a generator seeded with
``sample_seed`` and is shared by the rows of a batch, so a user's vector does not depend on the batch it is scored
in; in training mode it is fresh noise.

**Ablations** (config switches): ``generator="mlp"`` — mixed attention only, the target predicted by an MLP on the
same conditioner, trained by MSE to the same (scaled) drift (a point regressor of the next item; the "MA-only"
row and the regressor the generated target's cosine is compared with); ``drift=False`` — diffuse the next item's
vector itself; ``schedule="linear"``; ``steps=T``.

Shapes: B requests, N history length, D width (``out_dim``), I items, P drift positions of a batch.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> cfg = T2DiffConfig(user_vocab=[10], item_vocab=[12, 3], num_items=12, out_dim=8, hidden=(16,), steps=5,
    ...                    heads=2, num_sampled=8, max_len=4, denoiser_hidden=16, attention_hidden=(8,))
    >>> model = T2Diff(cfg, item_sparse=torch.stack([torch.arange(12), torch.arange(12) % 3], 1))
    >>> b = RequestBatch.empty(2, history=4, candidates=1, item_fields=2)
    >>> b.hist_items[:] = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]]); b.hist_len[:] = torch.tensor([3, 4])
    >>> b.hist_gap_s[:] = torch.tensor([[0.0, 300.0, 200.0, 100.0], [9e4, 400.0, 200.0, 60.0]])
    >>> b.cand_items[:, 0] = torch.tensor([6, 7]); b.cand_sparse[:, 0] = model.item_sparse[b.cand_items[:, 0]]
    >>> model.user_vectors(b).shape, model.score_all(b).shape, model.training_loss(b).shape
    (torch.Size([2, 8]), torch.Size([2, 12]), torch.Size([]))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.attention import TargetAttention
from funnelrec.nn.embedding import MLP, take
from funnelrec.retrieval.diffusion import (PREDICTS, SAMPLERS, SCHEDULES, DiffusionConfig, GaussianDiffusion,
                                           MLPDenoiser)
from funnelrec.retrieval.mpformer import gap_bucket
from funnelrec.retrieval.two_tower import NEGATIVES, TwoTowerConfig, TwoTowerRetriever

__all__ = ["T2DiffConfig", "T2Diff", "NextIntentGenerator", "split_session", "right_align", "GENERATORS",
           "DRIFT_POSITIONS", "TARGET_KEY", "FROM_SPEC", "build_t2diff"]

GENERATORS = ("diffusion", "mlp")
DRIFT_POSITIONS = ("all", "last")
#: ``batch.extras`` key of a [B, D] target generated alongside the diffusion loss (training only; see
#: :meth:`T2Diff.losses`). Serving leaves it out and the user tower generates the target itself.
TARGET_KEY = "t2diff_target"
#: Config keys the registry builder takes from the feature spec.
FROM_SPEC = ("user_vocab", "item_vocab", "num_items", "user_dense", "item_dense")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class T2DiffConfig:
    """T2Diff (see the module doc). The first block of fields is the two-tower's (same meaning, same defaults).

    Args:
        user_vocab / item_vocab / num_items / user_dense / item_dense: from the feature spec (``from_spec``).
        embed_dim: width of every sparse-field embedding (both towers).
        hidden: hidden widths of the item-tower MLP and of the final user FFN.
        out_dim: D, the width of user and item vectors (and of the behaviour vectors, the attention and the
            diffusion).
        temperature / negatives / num_sampled / sample_alpha / logq: the two-tower's softmax with logQ correction.
        dropout: dropout in the tower MLPs and the session Transformer.
        max_len: N, the most recent behaviours read.
        session_gap_s: a gap longer than this between adjacent behaviours ends the session (seconds).
        session_max: at most this many behaviours in the session (the last ones); at least the last behaviour.
        heads / layers / ffn_mult: the session Transformer (``out_dim`` divisible by ``heads``).
        attention_hidden: hidden widths of the target-attention activation unit.
        gap_buckets / gap_unit_s: log2 time-gap buckets ``floor(log2(1 + gap / unit))`` (time-lag features).
        generator: ``"diffusion"`` (T2Diff) or ``"mlp"`` (mixed attention only: an MLP-predicted target).
        drift: diffuse (or regress) the drift ``x_{t+1} − x_t`` (True) or the next behaviour itself (False).
        steps: T, diffusion steps.
        schedule: ``"exponential"`` or ``"linear"`` β schedule.
        beta_min / beta_max: the continuous β rate at the start and the end of the schedule.
        predict: the denoiser's output, ``"eps"`` or ``"x0"``.
        sampler: the serving (eval-mode) reverse chain: ``"ddpm"`` (all T steps) or ``"ddim"``.
        sample_steps: S, DDIM steps when serving (None: T).
        eta: DDIM's η when serving (0 deterministic).
        train_sampler / train_sample_steps / train_eta: the chain that makes the training-time target (None: the
            serving ones).
        denoiser_hidden: H of the MLP U-Net (and of the MLP generator).
        drift_positions: the diffusion loss's positions: ``"all"`` (every transition of the history and the label)
            or ``"last"`` (the label's only).
        generator_weight: λ of ``L_tower + λ L_diff``.
        sample_seed: seed of the serving chain's noise.
    """

    user_vocab: list[int]
    item_vocab: list[int]
    num_items: int
    user_dense: int = 0
    item_dense: int = 0
    embed_dim: int = 16
    hidden: tuple[int, ...] = (128,)
    out_dim: int = 32
    temperature: float = 0.05
    negatives: str = "mixed"
    num_sampled: int = 512
    sample_alpha: float = 0.75
    logq: bool = True
    dropout: float = 0.0
    max_len: int = 50
    session_gap_s: float = 1800.0
    session_max: int = 10
    heads: int = 2
    layers: int = 1
    ffn_mult: int = 2
    attention_hidden: tuple[int, ...] = (64,)
    gap_buckets: int = 16
    gap_unit_s: float = 60.0
    generator: str = "diffusion"
    drift: bool = True
    steps: int = 50
    schedule: str = "exponential"
    beta_min: float = 0.1
    beta_max: float = 40.0
    predict: str = "eps"
    sampler: str = "ddpm"
    sample_steps: int | None = None
    eta: float = 0.0
    train_sampler: str | None = None
    train_sample_steps: int | None = None
    train_eta: float | None = None
    denoiser_hidden: int = 128
    drift_positions: str = "all"
    generator_weight: float = 1.0
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ConfigError(f"t2diff: negatives must be one of {', '.join(NEGATIVES)}, got {self.negatives!r}")
        for name in ("out_dim", "embed_dim", "num_sampled", "max_len", "session_max", "heads", "layers", "ffn_mult",
                     "gap_buckets", "steps", "denoiser_hidden"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"t2diff: {name} must be an integer >= 1, got {value!r}")
        if self.denoiser_hidden < 2:
            raise ConfigError(f"t2diff: denoiser_hidden must be >= 2, got {self.denoiser_hidden}")
        if self.out_dim % self.heads:
            raise ConfigError(f"t2diff: out_dim={self.out_dim} must be divisible by heads={self.heads}")
        for name in ("temperature", "gap_unit_s", "session_gap_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"t2diff: {name} must be > 0, got {value!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"t2diff: dropout must lie in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.generator_weight, (int, float)) and self.generator_weight >= 0):
            raise ConfigError(f"t2diff: generator_weight must be >= 0, got {self.generator_weight!r}")
        for name, allowed in (("generator", GENERATORS), ("schedule", SCHEDULES), ("predict", PREDICTS),
                              ("sampler", SAMPLERS), ("drift_positions", DRIFT_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"t2diff: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.train_sampler is not None and self.train_sampler not in SAMPLERS:
            raise ConfigError(f"t2diff: train_sampler must be one of {', '.join(SAMPLERS)} or None, got "
                              f"{self.train_sampler!r}")
        for name in ("sample_steps", "train_sample_steps"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 1 <= value <= self.steps):
                raise ConfigError(f"t2diff: {name} must be an integer in [1, steps={self.steps}] or None, got "
                                  f"{value!r}")
        for name in ("eta", "train_eta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"t2diff: {name} must be >= 0, got {value!r}")
        if not self.attention_hidden or any(not _is_int(h) or h < 1 for h in self.attention_hidden):
            raise ConfigError(f"t2diff: attention_hidden must hold positive widths, got {self.attention_hidden!r}")
        self.attention_hidden = tuple(self.attention_hidden)
        self.hidden = tuple(self.hidden)
        DiffusionConfig(steps=self.steps, schedule=self.schedule, beta_min=self.beta_min, beta_max=self.beta_max,
                        predict=self.predict)  # validates the schedule
        try:
            self.tower_config()
        except ConfigError as err:
            raise ConfigError(str(err).replace("two_tower:", "t2diff:")) from None

    @classmethod
    def from_spec(cls, spec, **overrides) -> "T2DiffConfig":
        """The config of a fitted ``FeatureSpec``, with keyword overrides."""
        return cls(user_vocab=spec.vocab_sizes("user_sparse"), item_vocab=spec.vocab_sizes("item_sparse"),
                   num_items=spec.num_items, user_dense=spec.num_user_dense, item_dense=spec.num_item_dense,
                   **overrides)

    def tower_config(self) -> TwoTowerConfig:
        """The two-tower config of the towers (its history mean-pool is off: the mixed attention replaces it)."""
        return TwoTowerConfig(user_vocab=list(self.user_vocab), item_vocab=list(self.item_vocab),
                              num_items=self.num_items, user_dense=self.user_dense, item_dense=self.item_dense,
                              embed_dim=self.embed_dim, hidden=tuple(self.hidden), out_dim=self.out_dim,
                              temperature=self.temperature, negatives=self.negatives, num_sampled=self.num_sampled,
                              sample_alpha=self.sample_alpha, logq=self.logq, history_pool=False,
                              dropout=self.dropout)

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(steps=self.steps, schedule=self.schedule, beta_min=self.beta_min,
                               beta_max=self.beta_max, predict=self.predict)


# ------------------------------------------------------------------------------------------------ sequence helpers


def split_session(gap_s: Tensor, valid: Tensor, session_gap_s: float, session_max: int) -> tuple[Tensor, Tensor]:
    """Split left-padded histories into the session (the current intent) and the earlier history, by time gap.

    The session is the trailing run of behaviours in which every two adjacent behaviours are at most
    ``session_gap_s`` apart, cut to the last ``session_max``; it always holds the last behaviour (when there is
    one). Everything valid before it is the history.

    Args:
        gap_s: [B, N] seconds from each behaviour to the request (``RequestBatch.hist_gap_s``, non-increasing along
            the valid positions).
        valid: [B, N] bool, True at valid (right-most ``hist_len``) positions.
        session_gap_s: the largest gap inside a session.
        session_max: the most behaviours in a session (≥ 1).

    Returns:
        ``(session [B, N] bool, history [B, N] bool)``, disjoint, their union ``valid``.

    Example:
        >>> gap = torch.tensor([[0.0, 9000.0, 5000.0, 100.0, 50.0]])
        >>> s, h = split_session(gap, torch.tensor([[False, True, True, True, True]]), 1800.0, 10)
        >>> s.int().tolist(), h.int().tolist()
        ([[0, 0, 0, 1, 1]], [[0, 1, 1, 0, 0]])
    """
    if gap_s.shape != valid.shape or gap_s.dim() != 2:
        raise DataError(f"gap_s and valid must both be [B, N], got {list(gap_s.shape)} and {list(valid.shape)}",
                        column="hist_gap_s")
    if not _is_int(session_max) or session_max < 1:
        raise ConfigError(f"session_max must be an integer >= 1, got {session_max!r}")
    b, n = gap_s.shape
    pos = torch.arange(n, device=gap_s.device)
    # a break at position j: behaviours j-1 and j (both valid) are more than session_gap_s apart
    brk = torch.zeros(b, n, dtype=torch.bool, device=gap_s.device)
    if n > 1:
        brk[:, 1:] = ((gap_s[:, :-1] - gap_s[:, 1:]) > session_gap_s) & valid[:, :-1] & valid[:, 1:]
    start = (brk * pos).amax(1) if n else torch.zeros(b, dtype=torch.int64, device=gap_s.device)
    start = torch.maximum(start, torch.full_like(start, n - session_max))
    session = valid & (pos.unsqueeze(0) >= start.unsqueeze(1))
    return session, valid & ~session


def right_align(x: Tensor, length: Tensor) -> Tensor:
    """Move the valid tail of left-padded rows to the front: x [B, N, ...] with ``length`` [B] valid positions at
    the end → [B, N, ...] with them at positions ``0 .. length-1`` (zeros after).

    Example:
        >>> right_align(torch.tensor([[0, 0, 7, 8], [1, 2, 3, 4]]), torch.tensor([2, 4])).tolist()
        [[7, 8, 0, 0], [1, 2, 3, 4]]
    """
    b, n = x.shape[:2]
    pos = torch.arange(n, device=x.device)
    src = (pos.unsqueeze(0) + (n - length).unsqueeze(1)).clamp(max=max(n - 1, 0))  # [B, N]
    keep = pos.unsqueeze(0) < length.unsqueeze(1)
    idx = src.reshape(b, n, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.gather(1, idx)
    return torch.where(keep.reshape(b, n, *([1] * (x.dim() - 2))), out, torch.zeros((), dtype=x.dtype,
                                                                                        device=x.device))


class _EncoderBlock(nn.Module):
    """Pre-norm Transformer block (``F.scaled_dot_product_attention``): bidirectional with a key mask, or causal."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_ok: Tensor | None) -> Tensor:
        """x [B, S, D], key_ok [B, S] bool (every row has one True; None: causal attention) → [B, S, D]."""
        b, s, d = x.shape
        h = self.heads
        q, k, v = (t.view(b, s, h, d // h).transpose(1, 2) for t in self.qkv(self.norm1(x)).split(d, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_ok is None else key_ok[:, None, None, :],
                                           is_causal=key_ok is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


# ------------------------------------------------------------------------------------------------ diffusion module


class NextIntentGenerator(nn.Module):
    """The diffusion module: a causal conditioner over the behaviour vectors and a generator of the next one.

    Conditioner (ours): a causal Transformer (``layers`` blocks) over ``[start, x_1 .. x_n]`` (right-aligned, with
    position embeddings; each input the behaviour vector plus an embedding of the log2 bucket of the gap to the
    previous behaviour). The state after behaviour t, plus an embedding of the bucket of the time to the *next*
    behaviour (for t = n: to the request), is the condition ``c_t`` [D] of the step from behaviour t to t + 1
    (t = 0: the empty prefix).

    Generator: ``generator="diffusion"`` — :class:`~funnelrec.retrieval.diffusion.GaussianDiffusion` with an
    :class:`~funnelrec.retrieval.diffusion.MLPDenoiser` conditioned on ``c_t``; ``"mlp"`` — ``MLP(c_t)``. Both model
    ``z_t = scale · (x_{t+1} − x_t)`` (drift, ``x_0 = 0``) or ``scale · x_{t+1}`` (``drift=False``), and the next
    behaviour is ``x̂_{t+1} = x_t + ẑ / scale`` (drift utilisation) or ``ẑ / scale``.

    Args:
        config: :class:`T2DiffConfig` (``out_dim``, ``gap_*``, ``generator``, ``drift``, the diffusion and sampler
            fields, ``denoiser_hidden``, ``drift_positions``, ``sample_seed``).

    Example:
        >>> cfg = T2DiffConfig(user_vocab=[3], item_vocab=[9], num_items=9, out_dim=4, heads=1, steps=4,
        ...                    denoiser_hidden=8)
        >>> gen = NextIntentGenerator(cfg)
        >>> x, gap = torch.randn(2, 3, 4), torch.tensor([[0.0, 50.0, 10.0], [90.0, 50.0, 10.0]])
        >>> gen.generate(x, gap, torch.tensor([2, 3])).shape, gen.loss(x, gap, torch.tensor([2, 3]),
        ...                                                         torch.randn(2, 4)).shape
        (torch.Size([2, 4]), torch.Size([]))
    """

    def __init__(self, config: T2DiffConfig):
        super().__init__()
        c = self.config = config
        d = c.out_dim
        self.scale = math.sqrt(d / 2.0) if c.drift else math.sqrt(d)
        self.start = nn.Parameter(torch.zeros(d))
        self.prev_gap = nn.Embedding(c.gap_buckets + 1, d)  # + 1: "no previous behaviour"
        self.next_gap = nn.Embedding(c.gap_buckets + 1, d)
        for emb in (self.prev_gap, self.next_gap):
            nn.init.normal_(emb.weight, std=0.02)
        self.pos_emb = nn.Embedding(c.max_len + 1, d)  # position 0 = the start token
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.encoder = nn.ModuleList(_EncoderBlock(d, c.heads, c.ffn_mult, 0.0) for _ in range(c.layers))
        self.norm = nn.LayerNorm(d)
        if c.generator == "diffusion":
            self.diffusion = GaussianDiffusion(c.diffusion_config())
            self.net: nn.Module = MLPDenoiser(d, d, c.denoiser_hidden)
        else:
            self.diffusion = None
            self.net = MLP(d, [c.denoiser_hidden, d])

    # ------------------------------------------------------------------ conditioner
    def conditions(self, x: Tensor, gap_s: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        """``(c [B, N+1, D], seq [B, N+1, D])``, right-aligned: ``c[:, t]`` conditions the step from behaviour t to
        t + 1 (valid for t ≤ length; t = length is the next, unseen one), ``seq[:, t]`` = behaviour t (``seq[:, 0]``
        = 0, the empty prefix).

        Args:
            x: [B, N, D] left-padded behaviour vectors (detach them first: this module must not train them).
            gap_s: [B, N] seconds from each behaviour to the request.
            length: [B] valid behaviours per row.
        """
        b, n, d = x.shape
        nb = self.config.gap_buckets
        length = length.clamp(max=n)
        xr = right_align(x, length)  # [B, N, D]
        gr = right_align(gap_s.to(torch.float32), length)  # [B, N]
        pos = torch.arange(n, device=x.device)
        has_prev = (pos.unsqueeze(0) >= 1) & (pos.unsqueeze(0) < length.unsqueeze(1))
        between = torch.zeros_like(gr)
        if n > 1:
            between[:, 1:] = gr[:, :-1] - gr[:, 1:]  # behaviour j-1 → j
        none = torch.full_like(length.unsqueeze(1).expand(b, n), nb)
        prev_b = torch.where(has_prev, gap_bucket(between, nb, self.config.gap_unit_s), none)  # [B, N]
        h = torch.cat([self.start.expand(b, 1, d), xr + self.prev_gap(prev_b)], 1)  # [B, N+1, D]
        h = h + self.pos_emb.weight[: n + 1]
        for block in self.encoder:  # causal: state t reads start, x_1 .. x_t only (padding comes after them)
            h = block(h, None)
        states = self.norm(h)
        # time to the next behaviour: state t (1 ≤ t < len) → behaviour t+1; t = len → the request; t = 0 → none
        last_gap = gap_s[:, -1] if n else torch.zeros(b, device=x.device)
        nxt = torch.full((b, n + 1), nb, dtype=torch.int64, device=x.device)
        if n > 1:
            nxt[:, 1:n] = torch.where(has_prev[:, 1:], prev_b[:, 1:], nb)
        req = torch.where(length > 0, gap_bucket(last_gap, nb, self.config.gap_unit_s), nb)
        nxt.scatter_(1, length.unsqueeze(1), req.unsqueeze(1))
        seq = torch.cat([torch.zeros(b, 1, d, dtype=x.dtype, device=x.device), xr], 1)
        return states + self.next_gap(nxt), seq

    def _encode_target(self, nxt: Tensor, cur: Tensor) -> Tensor:
        return self.scale * (nxt - cur if self.config.drift else nxt)

    def _decode_target(self, z: Tensor, cur: Tensor) -> Tensor:
        return cur + z / self.scale if self.config.drift else z / self.scale

    # ------------------------------------------------------------------ loss
    def loss(self, x: Tensor, gap_s: Tensor, length: Tensor, label: Tensor) -> Tensor:
        """Scalar loss of the generator (:meth:`loss_and_target` without the target)."""
        return self.loss_and_target(x, gap_s, length, label, sample=False)[0]

    def loss_and_target(self, x: Tensor, gap_s: Tensor, length: Tensor, label: Tensor, sample: bool = True
                        ) -> tuple[Tensor, Tensor | None]:
        """``(loss, x̂ [B, D] or None)``: the scalar loss of the generator — the diffusion loss (or the MLP's MSE)
        of the (scaled) drift to every next behaviour (``drift_positions="all"``: the history's own transitions and
        the label's) or to the label only — and the generated next behaviour.

        Args:
            x: [B, N, D] left-padded behaviour vectors (detached).
            gap_s: [B, N] seconds from each behaviour to the request.
            length: [B] valid behaviours.
            label: [B, D] the label item's vector (detached): the behaviour after the history.
            sample: also generate ``x̂_{n+1}`` (:meth:`sample`) from the condition after the history — which the
                label does not reach (it is only the clean target of the loss).
        """
        b, n, d = x.shape
        length = length.clamp(max=n)
        cond, seq = self.conditions(x, gap_s, length)  # [B, N+1, D] each
        rows = torch.arange(b, device=x.device)
        nxt = torch.cat([seq[:, 1:], torch.zeros(b, 1, d, dtype=x.dtype, device=x.device)], 1)  # behaviour t+1
        nxt[rows, length] = label
        z = self._encode_target(nxt, seq)  # [B, N+1, D]
        pos = torch.arange(n + 1, device=x.device).unsqueeze(0)
        keep = pos <= length.unsqueeze(1) if self.config.drift_positions == "all" else pos == length.unsqueeze(1)
        target = self.sample(cond[rows, length].detach(), seq[rows, length]) if sample else None
        z, c = z[keep], cond[keep]  # [P, D]
        if self.diffusion is None:
            return F.mse_loss(self.net(c), z), target
        return self.diffusion.training_loss(self.net, z, c), target

    # ------------------------------------------------------------------ generation
    def sample(self, cond: Tensor, cur: Tensor, sampler: str | None = None, steps: int | None = None,
               eta: float | None = None, shared_noise: bool | None = None) -> Tensor:
        """[B, D] the generated next behaviour from conditions [B, D] and the current behaviour ``cur`` [B, D]
        (zeros for an empty history); no gradient.

        Args:
            cond: [B, D] condition (``c_n``).
            cur: [B, D] the last behaviour's vector.
            sampler / steps / eta: the reverse chain (default: the config's serving or training one, by
                ``self.training``).
            shared_noise: a seeded noise sequence shared by the rows (default: in eval mode) instead of fresh
                per-row noise from torch's global generator.
        """
        c = self.config
        with torch.no_grad():
            if self.diffusion is None:
                z = self.net(cond)
            else:
                train = self.training
                sampler = sampler or ((c.train_sampler or c.sampler) if train else c.sampler)
                if steps is None:
                    steps = (c.train_sample_steps or c.sample_steps) if train else c.sample_steps
                if eta is None:
                    eta = (c.train_eta if c.train_eta is not None else c.eta) if train else c.eta
                shared = (not train) if shared_noise is None else shared_noise
                gen = torch.Generator(device=cond.device).manual_seed(c.sample_seed) if shared else None
                z = self.diffusion.sample(self.net, cond, sampler=sampler, steps=steps, eta=eta, generator=gen,
                                          noise_shape=(1, cond.shape[-1]) if shared else None)
            return self._decode_target(z, cur)

    def generate(self, x: Tensor, gap_s: Tensor, length: Tensor, **kw) -> Tensor:
        """[B, D] ``x̂_{n+1}`` of left-padded histories (x [B, N, D], gap_s [B, N], length [B]); no gradient.
        Keyword arguments go to :meth:`sample`."""
        with torch.no_grad():
            length = length.clamp(max=x.shape[1])
            cond, seq = self.conditions(x, gap_s, length)
            rows = torch.arange(x.shape[0], device=x.device)
            return self.sample(cond[rows, length], seq[rows, length], **kw)


# ------------------------------------------------------------------------------------------------ the model


class T2Diff(TwoTowerRetriever):
    """Two-tower retriever with a diffusion-generated next intent and mixed attention in the user tower (module
    doc). The item tower, ``score_all`` and the retrieval loss are :class:`TwoTowerRetriever`'s.

    Args:
        config: :class:`T2DiffConfig`.
        item_sparse: [I, Fi] int64 sparse features of every item index (``RetrievalData.item_sparse_table``).
        item_dense: [I, Di] float32 dense features of every item index.
        item_popularity: [I] training-positive counts (logQ and the negative sampler); None = uniform.
    """

    train_mode = "example"

    def __init__(self, config: T2DiffConfig, item_sparse: Tensor, item_dense: Tensor | None = None,
                 item_popularity: Tensor | None = None):
        super().__init__(config.tower_config(), item_sparse, item_dense, item_popularity)
        c = self.config = config  # the parent's loss reads the softmax fields, which T2DiffConfig shares
        d = c.out_dim
        # final user FFN over [user fields, user dense, h_l, h_s] (replaces the two-tower's user MLP)
        self.user_mlp = MLP(len(c.user_vocab) * c.embed_dim + c.user_dense + 2 * d, [*c.hidden, d],
                            dropout=c.dropout)
        self.lag_emb = nn.Embedding(c.gap_buckets + 1, d)  # + 1: the generated target's token
        nn.init.normal_(self.lag_emb.weight, std=0.02)
        self.blocks = nn.ModuleList(_EncoderBlock(d, c.heads, c.ffn_mult, c.dropout) for _ in range(c.layers))
        self.norm_s = nn.LayerNorm(d)
        self.target_attention = TargetAttention(d, hidden=c.attention_hidden, normalize="softmax")
        self.generator = NextIntentGenerator(c)

    # ------------------------------------------------------------------ pieces
    def _history(self, batch: RequestBatch) -> tuple[RequestBatch, Tensor, Tensor]:
        """(batch cut to ``max_len``, valid [B, N], length [B])."""
        if batch.hist_items.shape[1] > self.config.max_len:
            batch = batch.truncate_history(self.config.max_len)
        n = batch.hist_items.shape[1]
        length = batch.hist_len.clamp(min=0, max=n)
        if batch.hist_gap_s.shape != batch.hist_items.shape:
            raise DataError(f"hist_gap_s must be [B, N] = {list(batch.hist_items.shape)}, got "
                            f"{list(batch.hist_gap_s.shape)}", column="hist_gap_s")
        valid = torch.arange(n, device=length.device).unsqueeze(0) >= (n - length).unsqueeze(1)
        return batch, valid, length

    def behaviour_vectors(self, items: Tensor, valid: Tensor) -> Tensor:
        """[B, N, D] item-tower vectors of the history items (zero at padding), the tower run once per distinct
        item of the batch."""
        uniq, inverse = torch.unique(items, return_inverse=True)
        x = take(self.item_vectors(self.item_sparse[uniq], self.item_dense[uniq]), 0, inverse)  # not [inverse]
        return x * valid.unsqueeze(-1).to(x.dtype)

    def generated_target(self, batch: RequestBatch, **kw) -> Tensor:
        """[B, D] the generated next intent ``x̂_{n+1}`` (before normalisation); no gradient. Keyword arguments go
        to :meth:`NextIntentGenerator.sample` (e.g. ``sampler="ddim", steps=10``)."""
        batch, valid, length = self._history(batch)
        with torch.no_grad():
            x = self.behaviour_vectors(batch.hist_items, valid)
            return self.generator.generate(x, batch.hist_gap_s, length, **kw)

    def mixed_attention(self, batch: RequestBatch, x: Tensor, valid: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_l [B, D], h_s [B, D])``: the session Transformer over ``[session; target]`` averaged (Eq. 19) and the
        target attention of ``h_s`` over the history (Eqs. 20–21).

        Args:
            batch: the (max_len-cut) batch: ``hist_gap_s`` gives the time lags.
            x: [B, N, D] behaviour vectors (zero at padding).
            valid: [B, N] bool.
            target: [B, D] the generated target (its unit vector is the target token).
        """
        c = self.config
        b, n, d = x.shape
        session, history = split_session(batch.hist_gap_s, valid, c.session_gap_s, c.session_max)
        lag = gap_bucket(batch.hist_gap_s, c.gap_buckets, c.gap_unit_s)  # time lag to the request (= the target)
        tok = x + self.lag_emb(lag) * valid.unsqueeze(-1)  # [B, N, D]
        ks = min(c.session_max, n)
        tgt = F.normalize(target.detach(), dim=-1) + self.lag_emb.weight[c.gap_buckets]
        s_tok = torch.cat([tok[:, n - ks:], tgt.unsqueeze(1)], 1)  # [B, ks+1, D]
        s_ok = torch.cat([session[:, n - ks:], torch.ones(b, 1, dtype=torch.bool, device=x.device)], 1)
        for block in self.blocks:
            s_tok = block(s_tok, s_ok)
        s_tok = self.norm_s(s_tok)
        w = s_ok.to(s_tok.dtype).unsqueeze(-1)
        h_s = (s_tok * w).sum(1) / w.sum(1)  # Eq. 19: the average over the valid tokens
        h_l = self.target_attention(h_s.unsqueeze(1), tok, history, values=x).squeeze(1)  # Eqs. 20-21
        return h_l, h_s

    # ------------------------------------------------------------------ towers
    def user_vectors(self, batch: RequestBatch) -> Tensor:
        """[B, D] L2-normalised user vectors: ``FFN([user fields, user dense, h_l, h_s])`` (Eq. 22). The target is
        ``batch.extras[TARGET_KEY]`` when given (training, see :meth:`losses`), else generated from the history."""
        batch, valid, length = self._history(batch)
        x = self.behaviour_vectors(batch.hist_items, valid)
        target = batch.extras.get(TARGET_KEY)
        if target is None:
            target = self.generator.generate(x.detach(), batch.hist_gap_s, length)
        elif tuple(target.shape) != (batch.batch_size, self.config.out_dim):
            raise DataError(f"extras[{TARGET_KEY!r}] must be [B, D] = [{batch.batch_size}, {self.config.out_dim}], "
                            f"got {list(target.shape)}", column=TARGET_KEY)
        h_l, h_s = self.mixed_attention(batch, x, valid, target)
        parts = [self.user_emb(batch.user_sparse).flatten(1), batch.user_dense, h_l, h_s]
        return F.normalize(self.user_mlp(torch.cat(parts, -1)), dim=-1)

    # ------------------------------------------------------------------ protocol
    def losses(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``{"retrieval", "generator", "target"}`` of a training batch (example mode: ``cand_items[:, 0]`` is the
        label).

        The generator's loss reads detached item vectors of the history and of the label; the target ``x̂`` the
        user tower reads is sampled (no graph) from the conditioner's state after the history — never from the
        label — and passed to the two-tower loss in ``extras[TARGET_KEY]``.
        """
        b, valid, length = self._history(batch)
        with torch.no_grad():
            x = self.behaviour_vectors(b.hist_items, valid)
            label = self.item_vectors(b.cand_sparse[:, 0], b.cand_dense[:, 0])
        gen_loss, target = self.generator.loss_and_target(x, b.hist_gap_s, length, label)
        tower_batch = dataclasses.replace(batch, extras={**batch.extras, TARGET_KEY: target})
        retrieval = TwoTowerRetriever.training_loss(self, tower_batch)
        return {"retrieval": retrieval, "generator": gen_loss, "target": target}

    def training_loss(self, batch: RequestBatch) -> Tensor:
        """``L_tower + λ L_diff`` (the two losses reach disjoint parameters: see the module doc)."""
        out = self.losses(batch)
        return out["retrieval"] + self.config.generator_weight * out["generator"]


def build_t2diff(spec, item_popularity, item_features, overrides) -> T2Diff:
    """Registry builder (``funnelrec.retrieval.build_retriever("t2diff", ...)``)."""
    if item_features is None:
        raise ConfigError("t2diff needs item_features=(item_sparse [I, Fi], item_dense [I, Di]) "
                          "(RetrievalData.item_features)")
    sparse, dense = item_features
    return T2Diff(T2DiffConfig.from_spec(spec, **overrides), sparse, dense, item_popularity)
