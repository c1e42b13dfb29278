"""Attention kernels over a set of global + sequence tokens, and LONGER's cross-/self-causal encoder with a
candidate-independent K/V cache.

Pieces, smallest first:

* ``masked_attention(q, k, v, mask)``: ``F.scaled_dot_product_attention`` with a boolean mask [B, Q, K]
  (``funnelrec.nn.masks``); a query row with no allowed key gets a zero output instead of NaN.
* ``split_key_attention``: the per-request kernel. Per-candidate queries [B, h, M, G, dh] attend to their own
  keys [B, h, M, G', dh] *and* to keys shared by all M candidates of a request [B, h, S, dh] (the user sequence),
  with one softmax over both, without copying the shared keys M times. Two implementations, chosen per call:
  without autograd (serving, ``no_grad`` / ``inference_mode``) the M·G queries of a request run against the shared
  keys in one flash-attention call (``attention_with_lse``) and the two partial softmaxes are merged through their
  log-sum-exps; that private kernel returns a log-sum-exp without a gradient, so whenever a gradient is needed (or
  attention dropout is on) ``split_key_attention_autograd`` runs instead: plain matmuls, the own and shared scores
  concatenated into one masked softmax — built from differentiable ops only, so its backward is exact.
* ``SeqAttentionLayer``: a pre-norm (RMSNorm) multi-head attention + SiLU FFN block whose queries and keys may be
  different token sets (cross attention) and which exposes its ``queries`` / ``keys_values`` / ``finish`` steps,
  so a cached path can run the same weights in a different order.
* ``TokenMerge``: LONGER's token merge: ``"none"``, ``"concat"`` (K adjacent tokens concatenated, then projected
  back to D) or ``"innertrans"`` (one ``SeqAttentionLayer`` inside each group of K, then the same concat +
  projection). Groups are aligned to the most recent event (left-padded histories), padding is zeroed first.
* ``sample_query_index``: which k sequence tokens become queries of the cross-causal layer (``"recent"`` or
  ``"uniform"``; ``"learnable"`` queries are parameters, in ``CrossCausalEncoder``).
* ``CrossCausalEncoder``: LONGER's stack: one cross-causal layer (queries = global tokens + k sampled sequence
  tokens; keys = global + all sequence tokens), then N self-causal layers over the m + k tokens. Mask rule of
  ``funnelrec.nn.masks`` in every layer: sequence tokens see only earlier-or-equal sequence tokens, never a global
  token; global tokens see everything valid. Because the sequence side never reads a global token it is
  candidate-independent, and there are two ways to run the stack:

  - ``forward``, *per candidate* (the naive reference): one full token set ``[G; S]`` per (request, candidate) row,
    SDPA; the sequence work is repeated M times.
  - *per request*: ``encode`` runs the sequence side once per request and returns the sequence-side K/V of every
    layer (``SeqKVCache``); ``decode`` runs only the m global tokens of each candidate against them
    (``SeqAttentionLayer.forward_split``). ``forward_per_request = decode ∘ encode`` is differentiable (the
    serving path is the same two calls under ``no_grad``, where ``split_key_attention`` takes the flash kernel);
    it equals ``forward`` to float round-off, outputs and gradients
    (``tests/nn/test_seq_attention.py``). With dropout the two differ in the draws only: per request, the
    sequence-side states (and their dropout masks) are shared by the M candidates of a request.

FLOP counting: PyTorch's ``FlopCounterMode`` knows the CUDA attention kernels but counts the CPU flash-attention
kernel (what SDPA runs on CPU) as zero. Importing this module registers the standard SDPA formulas (forward and
backward, dense Q×K, masks not discounted) for ``aten._scaled_dot_product_flash_attention_for_cpu``, so FLOP ratios
between an SDPA path and a plain-matmul path are honest.

Example:
    >>> import torch
    >>> enc = CrossCausalEncoder(dim=8, heads=2, num_self_layers=1, num_queries=3).eval()
    >>> glob, seq = torch.randn(2, 4, 2, 8), torch.randn(2, 6, 8)      # [B, M, G, D] globals, [B, S, D] sequence
    >>> valid = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])    # left-padded
    >>> out = enc(glob, seq, valid)                                      # per candidate: [B, M, G, D]
    >>> shared = enc.forward_per_request(glob, seq, valid)               # per request, differentiable
    >>> with torch.no_grad():
    ...     cached = enc.decode(glob, enc.encode(seq, valid))            # serving path, same weights
    >>> out.shape, bool((out - shared).abs().max() < 1e-5), bool((out - cached).abs().max() < 1e-5)
    (torch.Size([2, 4, 2, 8]), True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter

from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.masks import TokenLayout, attention_mask, key_padding_mask

MERGE_MODES = ("none", "concat", "innertrans")
QUERY_SAMPLING = ("recent", "uniform", "learnable")


def _register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernel (module docstring); idempotent."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    registry = flop_counter.flop_registry
    if fwd is not None and fwd not in registry:
        flop_counter.register_flop_formula(fwd)(
            lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v))
    if bwd is not None and bwd not in registry:
        flop_counter.register_flop_formula(bwd)(
            lambda g, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v))


_register_cpu_sdpa_flops()


# --------------------------------------------------------------------------------------------------- kernels


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """SDPA with a boolean mask; query rows that may attend to nothing give zeros.

    Args:
        q: [B, h, Q, dh].  k, v: [B, h, K, dh].
        mask: [B, Q, K] bool, True where the query may attend to the key (shared by the heads).
        dropout_p: attention dropout (training only).

    Returns:
        [B, h, Q, dh].

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
        >>> mask = torch.ones(1, 3, 5, dtype=torch.bool); mask[0, 1] = False
        >>> out = masked_attention(q, k, k, mask)
        >>> out.shape, bool(out[0, :, 1].eq(0).all())
        (torch.Size([1, 2, 3, 4]), True)
    """
    ok = mask.any(-1)  # [B, Q]
    empty = not bool(ok.all())
    if empty:
        mask = mask | ~ok.unsqueeze(-1)  # any finite row; zeroed below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), dropout_p=dropout_p)
    if empty:
        out = out * ok[:, None, :, None].to(out.dtype)
    return out


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention over the valid keys, and the log-sum-exp of each query's scaled scores.

    On CPU this is PyTorch's flash-attention kernel (the one ``F.scaled_dot_product_attention`` runs, called
    directly because the public function does not return the log-sum-exp); elsewhere a plain matmul reference.
    The private kernel's log-sum-exp carries **no gradient** (autograd treats it as a constant), so this is a
    forward-only building block: ``split_key_attention`` does not use it when a gradient is needed.

    Args:
        q: [B, h, Q, dh].  k, v: [B, h, S, dh].
        valid: [B, S] bool key validity.

    Returns:
        out [B, h, Q, dh] (zeros where a request has no valid key) and lse [B, h, Q] (−inf there).

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
        >>> out, lse = attention_with_lse(q, k, k, torch.ones(1, 5, dtype=torch.bool))
        >>> torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 2, -1), atol=1e-5)
        True
    """
    b, s = valid.shape
    any_key = valid.any(1).view(b, 1, 1)
    if s == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), q.new_full(q.shape[:-1], float("-inf"))
    bias = torch.zeros(b, 1, 1, s, dtype=q.dtype, device=q.device).masked_fill(~valid.view(b, 1, 1, s),
                                                                               float("-inf"))
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        out, lse = _FLASH_CPU(q, k, v, attn_mask=bias)
        lse = lse.to(q.dtype)
    else:  # reference path
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + bias
        lse = torch.logsumexp(scores, -1)
        out = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0) @ v
    return out * any_key.unsqueeze(-1).to(out.dtype), lse.masked_fill(~any_key, float("-inf"))


def split_key_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor,
                        shared_valid: Tensor, dropout_p: float = 0.0) -> Tensor:
    """One softmax over per-candidate keys and keys shared by the request's candidates (the per-request kernel).

    Equal to ``masked_attention`` over the concatenated keys ``[own; shared]`` of every candidate (own keys always
    valid, shared keys valid where ``shared_valid``), but the shared keys are read once per request, never copied
    M times. Two implementations:

    * no gradient needed (no autograd, or no input requiring one) and no dropout — serving: all M·G queries of a
      request attend to the shared keys in one flash-attention call (``attention_with_lse``), the few own keys are
      a small batched matmul, and the two partial softmaxes are merged by their log-sum-exps. Fast, but the private
      kernel's log-sum-exp has no gradient, so this branch is never taken under autograd.
    * otherwise ``split_key_attention_autograd`` (plain matmuls, one softmax over the concatenated scores; exact
      backward).

    Args:
        q: [B, h, M, G, dh] queries of the M candidates.
        k_own, v_own: [B, h, M, G', dh] each candidate's own keys and values (G' ≥ 1).
        k_shared, v_shared: [B, h, S, dh] keys and values shared by all M candidates.
        shared_valid: [B, S] bool.
        dropout_p: dropout on the attention weights (training), as SDPA's ``dropout_p``.

    Returns:
        [B, h, M, G, dh].

    Example:
        >>> import torch
        >>> q, ko = torch.randn(1, 2, 3, 2, 4), torch.randn(1, 2, 3, 2, 4)
        >>> ks, valid = torch.randn(1, 2, 5, 4), torch.tensor([[False, True, True, True, True]])
        >>> out = split_key_attention(q, ko, ko, ks, ks, valid)
        >>> keys = torch.cat([ko, ks.unsqueeze(2).expand(1, 2, 3, 5, 4)], 3)          # [own; shared] per candidate
        >>> mask = torch.cat([torch.ones(1, 2, dtype=torch.bool), valid], 1)
        >>> ref = torch.softmax((q @ keys.transpose(-1, -2) / 2).masked_fill(~mask.view(1, 1, 1, 1, 7), -1e9), -1)
        >>> out.shape, torch.allclose(out, ref @ keys, atol=1e-5)
        (torch.Size([1, 2, 3, 2, 4]), True)
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_own, v_own, k_shared, v_shared))
    if needs_grad or dropout_p > 0:
        return split_key_attention_autograd(q, k_own, v_own, k_shared, v_shared, shared_valid, dropout_p)
    b, h, m, g, dh = q.shape
    out_sh, lse_sh = attention_with_lse(q.reshape(b, h, m * g, dh), k_shared, v_shared, shared_valid)
    out_sh, lse_sh = out_sh.view(b, h, m, g, -1), lse_sh.view(b, h, m, g)
    s_own = (q @ k_own.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # [B, h, M, G, G']
    lse_own = torch.logsumexp(s_own, -1)
    out_own = torch.exp(s_own - lse_own.unsqueeze(-1)) @ v_own
    lse = torch.logaddexp(lse_sh, lse_own)
    return out_sh * torch.exp(lse_sh - lse).unsqueeze(-1) + out_own * torch.exp(lse_own - lse).unsqueeze(-1)


def split_key_attention_autograd(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor,
                                 shared_valid: Tensor, dropout_p: float = 0.0) -> Tensor:
    """``split_key_attention`` from differentiable ops only (the training kernel of the per-request path).

    The scores of the own keys [B, h, M, G, G'] and of the shared keys (one [B, h, M·G, S] matmul per request, the
    shared keys read once) are concatenated, masked (padding of the shared keys) and go through one softmax; the
    weights are split again and multiply the own and the shared values. The own keys are always valid, so every
    row has a key and nothing becomes NaN; padded shared keys get weight 0 and gradient 0.

    Args: as ``split_key_attention``; ``dropout_p`` drops attention weights (as SDPA does).

    Example:
        >>> import torch
        >>> q, ko = torch.randn(1, 2, 3, 2, 4, requires_grad=True), torch.randn(1, 2, 3, 2, 4)
        >>> ks, valid = torch.randn(1, 2, 5, 4), torch.tensor([[False, True, True, True, True]])
        >>> out = split_key_attention_autograd(q, ko, ko, ks, ks, valid)
        >>> with torch.no_grad():
        ...     fast = split_key_attention(q, ko, ko, ks, ks, valid)
        >>> out.requires_grad, torch.allclose(out, fast, atol=1e-5)
        (True, True)
    """
    b, h, m, g, dh = q.shape
    s, g_own = k_shared.shape[-2], k_own.shape[-2]
    scale = 1.0 / math.sqrt(dh)
    s_own = (q @ k_own.transpose(-1, -2)) * scale  # [B, h, M, G, G']
    bias = torch.zeros(b, 1, 1, 1, s, dtype=q.dtype, device=q.device).masked_fill(
        ~shared_valid.view(b, 1, 1, 1, s), float("-inf"))  # padding of the shared keys (an add: cheap backward)
    s_sh = (q.reshape(b, h, m * g, dh) @ k_shared.transpose(-1, -2)).view(b, h, m, g, s) * scale + bias
    p = torch.softmax(torch.cat([s_own, s_sh], -1), -1)  # [B, h, M, G, G' + S]
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out_sh = (p[..., g_own:].reshape(b, h, m * g, s) @ v_shared).view(b, h, m, g, v_shared.shape[-1])
    return p[..., :g_own] @ v_own + out_sh


# ---------------------------------------------------------------------------------------------------- layers


class SeqAttentionLayer(nn.Module):
    """Pre-norm attention + FFN: ``x ← x + Wo·Attn(norm(x), norm(ctx)); x ← x + FFN(norm(x))``.

    Args:
        dim: D.
        heads: h (D must be divisible by h).
        ffn_mult: FFN hidden width = ``ffn_mult · D`` (SiLU).
        dropout: dropout on the attention and FFN outputs (training only).

    ``forward(x, mask, context=None)``: x [B, Q, D] queries, ``context`` [B, K, D] keys/values (default x),
    ``mask`` [B, Q, K] bool → [B, Q, D]. ``forward_split(x, k_shared, v_shared, shared_valid)`` runs the global
    tokens x [B, M, G, D] of M candidates against their own K/V and the request's shared (sequence-side) K/V —
    differentiable, with the same attention dropout as ``forward`` in training mode.

    Example:
        >>> import torch
        >>> layer = SeqAttentionLayer(8, heads=2)
        >>> layer(torch.randn(3, 5, 8), torch.ones(3, 5, 5, dtype=torch.bool)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise ConfigError(f"SeqAttentionLayer needs dim divisible by heads, got dim={dim} heads={heads}")
        if ffn_mult < 1:
            raise ConfigError(f"ffn_mult must be >= 1, got {ffn_mult}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.SiLU(), nn.Linear(ffn_mult * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        """[..., S, D] → [..., h, S, dh]."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def queries(self, x: Tensor) -> Tensor:
        """[..., Q, D] → [..., h, Q, dh]."""
        return self._split(self.q_proj(self.norm1(x)))

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[..., K, D] → keys and values [..., h, K, dh] (what a cache stores)."""
        n = self.norm1(x)
        return self._split(self.k_proj(n)), self._split(self.v_proj(n))

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Residual + output projection of ``attn`` [..., h, Q, dh], then the FFN block: → [..., Q, D]."""
        x = x + self.dropout(self.out_proj(attn.transpose(-3, -2).flatten(-2)))
        return x + self.dropout(self.ffn(self.norm2(x)))

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        """x [B, Q, D], mask [B, Q, K] (context [B, K, D]) → [B, Q, D]."""
        k, v = self.keys_values(x if context is None else context)
        p = self.dropout.p if self.training else 0.0
        return self.finish(x, masked_attention(self.queries(x), k, v, mask, dropout_p=p))

    def forward_split(self, x: Tensor, k_shared: Tensor, v_shared: Tensor, shared_valid: Tensor) -> Tensor:
        """x [B, M, G, D] global tokens of M candidates; shared K/V [B, h, S, dh] and validity [B, S] → [B, M, G, D].

        The global tokens attend to each other (within their candidate) and to every valid shared key
        (``split_key_attention``: the flash kernel when no gradient is needed, the autograd one otherwise)."""
        q = self.queries(x).transpose(1, 2)  # [B, h, M, G, dh]
        k, v = (t.transpose(1, 2) for t in self.keys_values(x))
        p = self.dropout.p if self.training else 0.0
        out = split_key_attention(q, k, v, k_shared, v_shared, shared_valid, dropout_p=p)  # [B, h, M, G, dh]
        return self.finish(x, out.transpose(1, 2))


class TokenMerge(nn.Module):
    """LONGER's token merge: every K adjacent sequence tokens become one (see the module docstring).

    Args:
        dim: D of the input and output tokens.
        k: K, tokens per group (``mode="none"`` needs K = 1).
        mode: ``"none"``, ``"concat"`` or ``"innertrans"``.
        heads, ffn_mult: of the inner transformer (``"innertrans"``).

    ``forward(x, valid)``: x [B, N, D], valid [B, N] (left-padded) → merged tokens [B, ⌈N/K⌉, D] and their validity
    (a group is valid when any of its events is). The history is left-padded to a multiple of K first, so the
    most recent group holds the K most recent events; padded events are zeroed (and masked inside InnerTrans), so
    their content never reaches a valid token.

    Example:
        >>> import torch
        >>> merge = TokenMerge(8, k=4, mode="innertrans", heads=2)
        >>> x, valid = torch.randn(2, 10, 8), torch.arange(10).expand(2, 10) >= torch.tensor([[0], [7]])
        >>> out, out_valid = merge(x, valid)
        >>> out.shape, out_valid.tolist()
        (torch.Size([2, 3, 8]), [[True, True, True], [False, False, True]])
    """

    def __init__(self, dim: int, k: int = 1, mode: str = "none", heads: int = 1, ffn_mult: int = 2):
        super().__init__()
        if mode not in MERGE_MODES:
            raise ConfigError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
        if not isinstance(k, int) or k < 1 or (mode == "none" and k != 1):
            raise ConfigError(f"merge k must be an int >= 1 (1 for mode 'none'), got {k!r}")
        self.dim, self.k, self.mode = dim, k, mode
        self.inner = SeqAttentionLayer(dim, heads, ffn_mult) if mode == "innertrans" else None
        self.proj = nn.Linear(k * dim, dim) if mode != "none" else None

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, N, D], valid [B, N] → ([B, S, D], [B, S]) with S = ⌈N / K⌉."""
        if self.mode == "none":
            return x, valid
        b, n, d = x.shape
        k = self.k
        pad = (-n) % k
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
            valid = F.pad(valid, (pad, 0), value=False)
        s = (n + pad) // k
        x = x * valid.unsqueeze(-1).to(x.dtype)
        groups, gvalid = x.view(b * s, k, d), valid.reshape(b * s, k)
        if self.inner is not None:
            groups = self.inner(groups, key_padding_mask(gvalid, k)) * gvalid.unsqueeze(-1).to(x.dtype)
        return self.proj(groups.reshape(b, s, k * d)), gvalid.view(b, s, k).any(-1)


def sample_query_index(seq_valid: Tensor, k: int, mode: str = "recent") -> Tensor:
    """[B, k'] positions (ascending) of the sequence tokens that become cross-attention queries, k' = min(k, S).

    * ``"recent"``: the last k' positions (the most recent tokens of a left-padded sequence).
    * ``"uniform"``: k' positions evenly spread over each row's valid part, the most recent one included
      (rows with fewer than k valid tokens take the recent ones, which then cover the whole history).

    Example:
        >>> import torch
        >>> valid = torch.arange(8).expand(2, 8) >= torch.tensor([[0], [6]])
        >>> sample_query_index(valid, 3, "recent").tolist()
        [[5, 6, 7], [5, 6, 7]]
        >>> sample_query_index(valid, 3, "uniform").tolist()
        [[2, 5, 7], [5, 6, 7]]
    """
    if mode not in ("recent", "uniform"):
        raise ConfigError(f"query sampling for an index must be 'recent' or 'uniform', got {mode!r}")
    b, s = seq_valid.shape
    k = min(k, s)
    dev = seq_valid.device
    recent = torch.arange(s - k, s, device=dev).expand(b, k)
    if mode == "recent" or k == 0:
        return recent
    length = seq_valid.sum(1, keepdim=True)  # [B, 1]
    back = torch.arange(k - 1, -1, -1, device=dev)  # k-1 … 0
    uniform = (s - 1) - torch.div(back * length, k, rounding_mode="floor")
    return torch.where(length >= k, uniform, recent)


# ---------------------------------------------------------------------------------------------------- encoder


@dataclass
class SeqKVCache:
    """The candidate-independent part of a ``CrossCausalEncoder`` for B requests.

    Args:
        keys: per layer (the cross layer, then each self layer) the sequence-side keys [B, h, S_l, dh]: all S
            sequence tokens for the cross layer, the k' query tokens' states for the self layers.
        values: the matching values.
        valid: per layer [B, S_l] bool.
    """

    keys: list[Tensor]
    values: list[Tensor]
    valid: list[Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.valid[0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self.valid))


class CrossCausalEncoder(nn.Module):
    """LONGER's encoder: one cross-causal layer with k sampled sequence queries, then N self-causal layers.

    Args:
        dim: D.
        heads: h.
        num_self_layers: N.
        num_queries: k, sequence tokens kept as queries by the cross layer (k' = min(k, S) for ``"recent"`` and
            ``"uniform"``; always k for ``"learnable"``).
        sampling: ``"recent"``, ``"uniform"`` or ``"learnable"`` (k learned query vectors, treated as sequence
            tokens placed after the whole history: they see every valid sequence token, are causal among
            themselves and never see a global token, so they are candidate-independent too).
        ffn_mult: FFN width multiplier.
        dropout: dropout inside the layers.

    Example: see the module docstring.
    """

    def __init__(self, dim: int, heads: int, num_self_layers: int, num_queries: int, sampling: str = "recent",
                 ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        if sampling not in QUERY_SAMPLING:
            raise ConfigError(f"query sampling must be one of {QUERY_SAMPLING}, got {sampling!r}")
        if num_queries < 1 or num_self_layers < 0:
            raise ConfigError(f"CrossCausalEncoder needs num_queries >= 1 and num_self_layers >= 0, got "
                              f"{num_queries} and {num_self_layers}")
        self.dim, self.num_queries, self.sampling = dim, num_queries, sampling
        self.cross = SeqAttentionLayer(dim, heads, ffn_mult, dropout)
        self.layers = nn.ModuleList(SeqAttentionLayer(dim, heads, ffn_mult, dropout) for _ in range(num_self_layers))
        self.learned = nn.Parameter(torch.randn(num_queries, dim) * 0.02) if sampling == "learnable" else None

    def sequence_queries(self, seq: Tensor, seq_valid: Tensor) -> tuple[Tensor, TokenLayout]:
        """The sequence-side query tokens [B, k', D] of the cross layer and their layout."""
        b, s, _ = seq.shape
        if self.learned is not None:
            k = self.num_queries
            x = self.learned.to(seq.dtype).expand(b, k, -1)
            pos = torch.arange(s, s + k, device=seq.device).expand(b, k)
            return x, TokenLayout.sequence(torch.ones(b, k, dtype=torch.bool, device=seq.device), pos)
        idx = sample_query_index(seq_valid, self.num_queries, self.sampling)  # [B, k']
        x = seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
        return x, TokenLayout.sequence(seq_valid.gather(1, idx), idx)

    def forward(self, glob: Tensor, seq: Tensor, seq_valid: Tensor) -> Tensor:
        """Per-candidate path (the naive reference): glob [B, M, G, D], seq [B, S, D], seq_valid [B, S] → glob
        [B, M, G, D].

        Every (request, candidate) pair is its own token set ``[G; S]`` (the sequence is repeated M times), run with
        SDPA under the masks of ``funnelrec.nn.masks``. ``forward_per_request`` computes the same, once per
        request."""
        b, m, g, d = glob.shape
        s = seq.shape[1]
        self._check_inputs(glob, seq, seq_valid)
        q_seq, q_layout = self.sequence_queries(seq, seq_valid)
        r = b * m
        rows = lambda t: t.unsqueeze(1).expand(b, m, *t.shape[1:]).reshape(r, *t.shape[1:])  # noqa: E731
        glob = glob.reshape(r, g, d)
        kv_tokens = torch.cat([glob, rows(seq)], 1)  # [R, G + S, D]
        x = torch.cat([glob, rows(q_seq)], 1)  # [R, G + k', D]
        key_layout = TokenLayout.of(g, seq_valid).repeat_interleave(m)
        query_layout = TokenLayout.cat(TokenLayout.globals(b, g, seq.device), q_layout).repeat_interleave(m)
        x = self.cross(x, attention_mask(query_layout, key_layout), context=kv_tokens)
        self_mask = attention_mask(query_layout, query_layout)
        for layer in self.layers:
            x = layer(x, self_mask)
        return x[:, :g].view(b, m, g, d)

    @staticmethod
    def _check_inputs(glob: Tensor, seq: Tensor, seq_valid: Tensor) -> None:
        b = glob.shape[0]
        if glob.dim() != 4 or seq.dim() != 3 or seq.shape[0] != b or seq_valid.shape != seq.shape[:2]:
            raise DataError(f"expected glob [B, M, G, D], seq [B={b}, S, D] and seq_valid [B, S], got "
                            f"{list(glob.shape)}, {list(seq.shape)} and {list(seq_valid.shape)}", column="seq")

    def forward_per_request(self, glob: Tensor, seq: Tensor, seq_valid: Tensor) -> Tensor:
        """Per-request path, differentiable: the same inputs and output as ``forward``, but the sequence side runs
        once per request (``encode``) and only the M·G global tokens per request run against it (``decode``).

        Under autograd the global tokens use ``split_key_attention_autograd`` (exact backward); without it this is
        the serving computation."""
        self._check_inputs(glob, seq, seq_valid)
        return self.decode(glob, self.encode(seq, seq_valid))

    def encode(self, seq: Tensor, seq_valid: Tensor) -> SeqKVCache:
        """Once per request: seq [B, S, D], seq_valid [B, S] → the sequence-side K/V of every layer (differentiable;
        serving calls it under ``no_grad`` and keeps the result as the cache)."""
        k0, v0 = self.cross.keys_values(seq)
        keys, values, valid = [k0], [v0], [seq_valid]
        x, q_layout = self.sequence_queries(seq, seq_valid)
        x = self.cross(x, attention_mask(q_layout, TokenLayout.sequence(seq_valid)), context=seq)
        self_mask = attention_mask(q_layout, q_layout)
        for i, layer in enumerate(self.layers):
            k, v = layer.keys_values(x)
            keys.append(k)
            values.append(v)
            valid.append(q_layout.valid)
            if i < len(self.layers) - 1:  # the last layer's sequence outputs are never read
                x = layer(x, self_mask)
        return SeqKVCache(keys, values, valid)

    def decode(self, glob: Tensor, cache: SeqKVCache) -> Tensor:
        """Per candidate: glob [B, M, G, D] → [B, M, G, D], reading the sequence side from ``cache``
        (differentiable with respect to both)."""
        if cache.batch_size != glob.shape[0] or len(cache.keys) != len(self.layers) + 1:
            raise DataError(f"the cache holds {cache.batch_size} requests and {len(cache.keys)} layers; the "
                            f"candidates have {glob.shape[0]} requests and the encoder {len(self.layers) + 1} "
                            f"layers", column="cache")
        for layer, k, v, valid in zip([self.cross, *self.layers], cache.keys, cache.values, cache.valid):
            glob = layer.forward_split(glob, k, v, valid)
        return glob


__all__ = ["MERGE_MODES", "QUERY_SAMPLING", "masked_attention", "attention_with_lse", "split_key_attention",
           "split_key_attention_autograd",
           "SeqAttentionLayer", "TokenMerge", "sample_query_index", "SeqKVCache", "CrossCausalEncoder"]
