"""SOLAR-style SVD target attention: M candidates of a request attend to an N-long history through a rank-R
decomposition of the history, never forming an [M, N] or [N, N] tensor.

**What is the paper's and what is ours.** SOLAR (Zhang et al., *SOLAR: SVD-Optimized Lifelong Attention for
Recommendation*, arXiv 2603.02561) states only: softmax is kept, "SVD-Attention" is "theoretically lossless on
low-rank matrices", costs O(N·d·r), scores candidates against r principal "interests" in a compact space, and serves
~10k-long histories × thousands of candidates without top-k filtering. Its defining equation is not public. Every
formula below is **our reconstruction** (``/work/shared/papers/solar.md``, section "Reconstruction", tagged [INF]):

* The history X [N, D] is the shared source of keys and values (``K = X W_kᵀ``, ``V = X W_vᵀ``; bias-free
  projections, as a key bias cancels in the softmax). Its decomposition ``X ≈ U_R S_R V_Rᵀ`` is taken from the D×D
  Gram matrix ``G = Xᵀ X`` (padding rows excluded): ``V_R, S_R² = top-R eigenpairs of G``. Building G costs
  O(N·D²) and its eigendecomposition O(D³) — at D = 64 cheaper and simpler than a randomised SVD, and it makes the
  per-user cache *incremental*: ``append`` adds ``X_newᵀ X_new`` (O(k·D²)) and re-solves the D×D problem, with no
  pass over the old events. G is accumulated and solved in **float64** (the Gram squares the condition number).
* **Sign convention** (ours): every right singular vector v_k is flipped so that its largest-|·| entry (first one on
  a tie) is positive. Interest tokens ``z_k = s_k v_k`` therefore do not depend on the solver's arbitrary signs.
* ``mode="svd_compact"`` (the fast, approximate one; the paper's compact-space attention as reconstructed):
  softmax over the R *interest tokens* ``Z = U_Rᵀ X = S_R V_Rᵀ`` [R, D]:
  ``out = softmax(Q (Z W_kᵀ)ᵀ / √d_h) (Z W_vᵀ)``. Cost O(N·D² + D³) for the decomposition (cacheable per user)
  plus O(M·R·D) per request. Tokens with ``s_k ≤ 1e-6·s_1`` (rank below R, empty history) are masked out.
  ``both_signs=True`` uses the 2R tokens ±z_k, which makes the output independent of any sign convention.
  ``normalize=True`` (ours, the default) divides the tokens by √n (n = valid events): s_k grows as √n, so the
  literal ``U_Rᵀ X`` (``normalize=False``) gives keys and values whose size depends on the history length (on
  random histories its output is tens of times larger than full attention's); ``Z/√n`` has the RMS size of one
  event along each principal direction. Either way ``svd_compact`` is
  *not* equal to softmax over the N events, even for a rank-R history: the exp(q·k_n) terms do not factorise
  through R tokens, and exact softmax attention in O(N·D·R) is impossible for general inputs (see the note).
  "Lossless" holds in the sense that X = U_R Z exactly when rank(X) ≤ R.
  Training: U_R is treated as a detached projection and gradients flow through ``Z = U_Rᵀ X`` (the note's advice;
  eigen-solver gradients are unstable near degenerate singular values).
* ``mode="svd_exact"`` (ours: exact, O(M·N·R)): keys and values *through the factors*, ``K = P B_kᵀ`` with
  ``P = X V_R`` [N, R] and ``B_k = W_k V_R`` [D, R]; the scores ``(Q B_k) Pᵀ`` are streamed over N with an
  online (log-sum-exp) softmax, and ``Σ_n w_n p_n`` [M, R] is accumulated before the value map ``B_v``. It equals
  full softmax attention whenever rank(X) ≤ R (then X = P V_Rᵀ), in O(M·N·R) time; on a full-rank history it is
  attention over the rank-R truncation of the history. Two kernels (``exact_kernel``): ``"sdpa"`` hands the
  R-wide queries, keys and values to ``F.scaled_dot_product_attention`` (its fused CPU/GPU kernels stream over N;
  default), ``"streamed"`` is our chunked loop (O(M·chunk) memory; the readable reference).
* Baselines: ``"full"`` (``F.scaled_dot_product_attention``), ``"linear"`` (ELU+1 linear attention, O((N+M)·D²)),
  ``"sim"`` (SIM-style: the top-k events of each candidate by the raw dot product of the candidate and event
  embeddings, selected in chunks of N with a running top-k, then exact softmax attention over the k selected).
  ``sim`` scores every (candidate, event) pair, O(M·N·D), but only chunk by chunk.

Shapes: queries [B, M, D], history [B, N, D], validity mask [B, N] (True = real event; any positions may be
padding); the output is [B, M, D] (heads concatenated, no output projection). A candidate of a request whose
history has no valid event gets a zero output (never NaN).

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> att = SVDTargetAttention(dim=8, heads=2, rank=3, chunk=4)
    >>> q = torch.randn(2, 5, 8)                                                  # [B, M, D] candidates
    >>> x = torch.randn(2, 11, 3) @ torch.randn(2, 3, 8)                         # [B, N, D] history, rank 3
    >>> valid = torch.ones(2, 11, dtype=torch.bool); valid[1, :4] = False         # left padding
    >>> full, exact = att(q, x, valid, mode="full"), att(q, x, valid, mode="svd_exact")
    >>> exact.shape, bool((exact - full).abs().max() < 1e-5)                     # equal on rank-R histories
    (torch.Size([2, 5, 8]), True)
    >>> cache = att.decompose(x, valid)                                           # per-user cache (serving)
    >>> bool(torch.allclose(att(q, cache=cache), att(q, x, valid), atol=1e-6))   # svd_compact, cached = uncached
    True
    >>> grown = cache.append(torch.randn(2, 2, 8))                                # 2 new events, incremental
    >>> grown.count.tolist(), grown.interests.shape                              # [B, R, D] interest tokens
    ([13, 9], torch.Size([2, 3, 8]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnelrec.errors import ConfigError, DataError

MODES = ("full", "svd_exact", "svd_compact", "linear", "sim")
#: Kernels of ``svd_exact`` (same outputs): PyTorch's fused SDPA over the factors, or our streamed online softmax.
EXACT_KERNELS = ("sdpa", "streamed")
#: interest tokens with s_k <= TOKEN_TOL · s_1 are masked out (rank below R, empty history); float64 Grams only,
#: a float32 Gram's round-off needs more (``token_tol``)
TOKEN_TOL = 1e-6


# ------------------------------------------------------------------------------------------- decomposition


def fix_signs(v: Tensor) -> Tensor:
    """The sign convention: flip each column of ``v`` [..., D, R] so its largest-|·| entry (first on ties) is > 0.

    Example:
        >>> fix_signs(torch.tensor([[0.5, -1.0], [-2.0, 0.5]])).tolist()
        [[-0.5, 1.0], [2.0, -0.5]]
    """
    idx = v.abs().argmax(-2, keepdim=True)  # [..., 1, R]
    sign = torch.sign(torch.gather(v, -2, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def _masked_history(x: Tensor, valid: Tensor | None) -> Tensor:
    return x if valid is None else x * valid.unsqueeze(-1).to(x.dtype)


def _check_history(x: Tensor, valid: Tensor | None, what: str = "history") -> None:
    if x.dim() != 3:
        raise DataError(f"{what} must be [B, N, D], got shape {list(x.shape)}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != x.shape[:2]):
        raise DataError(f"valid must be a bool tensor of shape {list(x.shape[:2])} (the {what}'s [B, N]), got "
                        f"{valid.dtype} {list(valid.shape)}")


def token_tol(gram_dtype: torch.dtype) -> float:
    """The relative singular value below which a direction is round-off of a Gram accumulated in ``gram_dtype``:
    ``TOKEN_TOL`` for float64; for float32 the Gram's round-off puts the null directions of a rank-deficient history
    near √eps · s_1, so ten times that."""
    return max(TOKEN_TOL, 10 * math.sqrt(torch.finfo(gram_dtype).eps)) if gram_dtype != torch.float64 else TOKEN_TOL


def top_eig(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-``rank`` singular values and right singular vectors from a Gram matrix ``XᵀX`` [B, D, D].

    Returns:
        ``s`` [B, R] (descending, ≥ 0) and ``v`` [B, D, R] (orthonormal columns, sign-fixed by ``fix_signs``),
        in the Gram's dtype.
    """
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(-1)[..., :rank], evecs.flip(-1)[..., :rank]
    return evals.clamp_min(0).sqrt(), fix_signs(evecs)


@dataclass
class HistorySVD:
    """A per-user cached decomposition of the history, X ≈ U_R diag(s) V_Rᵀ, updated incrementally.

    Args:
        gram: [B, D, D] float64, ``XᵀX`` over the valid events.
        count: [B] number of valid events.
        s: [B, R] singular values, descending (the history's dtype).
        v: [B, D, R] right singular vectors, sign-fixed (the history's dtype).
        history, valid: the events themselves [B, N, D] and [B, N], kept only when ``keep_history`` (``svd_exact``
            needs them; ``svd_compact`` needs only ``s`` and ``v``).

    Example:
        >>> x = torch.randn(1, 6, 4)
        >>> a = HistorySVD.from_history(x[:, :4], rank=2).append(x[:, 4:])
        >>> b = HistorySVD.from_history(x, rank=2)
        >>> bool(torch.allclose(a.s, b.s) and torch.allclose(a.v, b.v, atol=1e-5))
        True
    """

    gram: Tensor
    count: Tensor
    s: Tensor
    v: Tensor
    history: Tensor | None = None
    valid: Tensor | None = None
    tol: float = TOKEN_TOL

    @property
    def rank(self) -> int:
        return self.s.shape[-1]

    @property
    def interests(self) -> Tensor:
        """The interest tokens ``Z = U_Rᵀ X = diag(s) V_Rᵀ`` [B, R, D]."""
        return self.s.unsqueeze(-1) * self.v.transpose(-1, -2)

    @property
    def token_mask(self) -> Tensor:
        """[B, R] bool: tokens with ``s_k > tol · s_1`` (False for every token of an empty history)."""
        return self.s > self.tol * self.s[..., :1]

    @property
    def nbytes(self) -> int:
        """Bytes of the cache (the Gram, counts, factors and, if kept, the history)."""
        ts = [self.gram, self.count, self.s, self.v, self.history, self.valid]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @classmethod
    def from_history(cls, history: Tensor, valid: Tensor | None = None, *, rank: int,
                     keep_history: bool = False, gram_dtype: torch.dtype = torch.float64) -> HistorySVD:
        """Decompose ``history`` [B, N, D] (rows where ``valid`` [B, N] is False are ignored) at rank ``rank``.

        ``gram_dtype``: the dtype the Gram ``XᵀX`` is accumulated in (float64 by default; training may pass the
        history's own dtype to skip the [B, N, D] float64 copy — the D×D eigenproblem is solved in float64 either way).
        """
        _check_history(history, valid)
        d = history.shape[-1]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise ConfigError(f"rank must be an integer in [1, D={d}], got {rank!r}")
        xm = _masked_history(history.detach(), valid).to(gram_dtype)
        gram = (xm.transpose(-1, -2) @ xm).double()
        count = (valid.sum(-1) if valid is not None else
                 torch.full(history.shape[:1], history.shape[1], device=history.device)).long()
        s, v = top_eig(gram, rank)
        kept = (history, valid if valid is not None else torch.ones(history.shape[:2], dtype=torch.bool,
                                                                     device=history.device))
        return cls(gram, count, s.to(history.dtype), v.to(history.dtype), *(kept if keep_history else (None, None)),
                   tol=token_tol(gram_dtype))

    def append(self, new: Tensor, valid: Tensor | None = None) -> HistorySVD:
        """A new cache with the events ``new`` [B, k, D] added: O(k·D²) for the Gram, O(D³) to re-solve it.

        Equal (to float64 round-off, with the same sign convention) to ``from_history`` on the grown history.
        """
        _check_history(new, valid, "new events")
        if new.shape[0] != self.gram.shape[0] or new.shape[-1] != self.gram.shape[-1]:
            raise DataError(f"new events must be [B={self.gram.shape[0]}, k, D={self.gram.shape[-1]}], got "
                            f"{list(new.shape)}")
        xm = _masked_history(new.detach(), valid).double()
        gram = self.gram + xm.transpose(-1, -2) @ xm
        count = self.count + (valid.sum(-1) if valid is not None else new.shape[1])
        s, v = top_eig(gram, self.rank)
        out = replace(self, gram=gram, count=count, s=s.to(self.s.dtype), v=v.to(self.v.dtype))
        if self.history is not None:
            vnew = valid if valid is not None else torch.ones(new.shape[:2], dtype=torch.bool, device=new.device)
            out.history, out.valid = torch.cat([self.history, new], 1), torch.cat([self.valid, vnew], 1)
        return out


def history_svd(history: Tensor, valid: Tensor | None = None, rank: int = 32,
                keep_history: bool = False) -> HistorySVD:
    """``HistorySVD.from_history`` as a function."""
    return HistorySVD.from_history(history, valid, rank=rank, keep_history=keep_history)


def interest_tokens(history: Tensor, valid: Tensor | None, svd: HistorySVD) -> Tensor:
    """``Z = U_Rᵀ X`` [B, R, D] with gradient through ``history`` (U_R = X V_R / s detached, as the note advises);
    without autograd it is just ``svd.interests``."""
    if not (torch.is_grad_enabled() and history.requires_grad):
        return svd.interests
    xm = _masked_history(history, valid)
    with torch.no_grad():
        u = (xm @ svd.v) / torch.where(svd.token_mask, svd.s, torch.ones_like(svd.s)).unsqueeze(1)  # [B, N, R]
        u = u * svd.token_mask.unsqueeze(1).to(u.dtype)
    return u.transpose(-1, -2) @ xm


# ------------------------------------------------------------------------------------------------- kernels


def _heads(t: Tensor, h: int) -> Tensor:
    """[B, L, D] → [B, h, L, D/h]."""
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """[B, h, L, dh] → [B, L, h·dh]."""
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


def full_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float | None = None) -> Tensor:
    """SDPA over the valid keys (the reference). q [B, h, M, dk], k [B, h, N, dk], v [B, h, N, dv], valid [B, N]
    or None; ``scale`` of the scores (default 1/√dk). Rows of a request with no valid key are zero."""
    if valid is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    any_key = valid.any(-1)
    mask = (valid | ~any_key.unsqueeze(-1))[:, None, None, :]  # [B, 1, 1, N], broadcast over heads and queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * any_key.view(-1, 1, 1, 1).to(out.dtype)


def compact_attention(q: Tensor, kz: Tensor, vz: Tensor, token_mask: Tensor) -> Tensor:
    """Softmax over R interest tokens. q [B, h, M, dh], kz, vz [B, h, R, dh], token_mask [B, R] → [B, h, M, dh];
    zero for a request without any token. SDPA's fused kernel, as :func:`full_attention` (15 % faster here than
    the plain scores–softmax–matmul)."""
    return full_attention(q, kz, vz, token_mask)


def svd_exact_attention(q: Tensor, history: Tensor, valid: Tensor | None, v_r: Tensor, w_k: Tensor, w_v: Tensor,
                        heads: int, chunk: int) -> Tensor:
    """Softmax attention with keys/values through the factors, streamed over N (module docstring).

    Args:
        q: [B, h, M, dh] projected queries.  history: [B, N, D].  valid: [B, N] or None.
        v_r: [B, D, R] right singular vectors.  w_k, w_v: [D, D] projection weights (``nn.Linear`` layout).
        heads: h.  chunk: events per step (memory O(M·chunk)).

    Returns:
        [B, h, M, dh]; zero for a request without valid events.
    """
    b, h, m, dh = q.shape
    n = history.shape[1]
    r = v_r.shape[-1]
    bk = (w_k @ v_r).view(b, h, dh, r)  # K = P B_kᵀ, per head
    bv = (w_v @ v_r).view(b, h, dh, r)
    a = (q @ bk) * (1.0 / math.sqrt(dh))  # [B, h, M, R]
    run_max = q.new_full((b, h, m, 1), float("-inf"))
    run_sum = q.new_zeros((b, h, m, 1))
    acc = q.new_zeros((b, h, m, r))
    for start in range(0, n, chunk):
        p = (history[:, start:start + chunk] @ v_r).unsqueeze(1)  # [B, 1, c, R]
        s = a @ p.transpose(-1, -2)  # [B, h, M, c]
        if valid is not None:
            s = s.masked_fill(~valid[:, None, None, start:start + chunk], float("-inf"))
        new_max = torch.maximum(run_max, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        w = torch.exp(s - safe)
        scale = torch.exp(run_max - safe)
        run_sum = run_sum * scale + w.sum(-1, keepdim=True)
        acc = acc * scale + w @ p
        run_max = new_max
    pooled = acc / torch.where(run_sum > 0, run_sum, torch.ones_like(run_sum))  # Σ_n w_n p_n, [B, h, M, R]
    return pooled @ bv.transpose(-1, -2)


def svd_exact_sdpa(q: Tensor, history: Tensor, valid: Tensor | None, v_r: Tensor, w_k: Tensor,
                   w_v: Tensor) -> Tensor:
    """``svd_exact`` through SDPA: the same attention as :func:`svd_exact_attention` (queries ``Q B_k`` [M, R] over
    keys = values = ``P`` [N, R], then the value map ``B_v``), with PyTorch's fused kernel doing the streaming, so the
    score width is R instead of D/h. Shapes as :func:`svd_exact_attention`."""
    b, h, m, dh = q.shape
    r = v_r.shape[-1]
    bk = (w_k @ v_r).view(b, h, dh, r)
    bv = (w_v @ v_r).view(b, h, dh, r)
    p = (history @ v_r).unsqueeze(1).expand(b, h, -1, r)  # [B, h, N, R], one copy shared by the heads
    pooled = full_attention(q @ bk, p, p, valid, scale=1.0 / math.sqrt(dh))  # Σ_n w_n p_n, [B, h, M, R]
    return pooled @ bv.transpose(-1, -2)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, eps: float = 1e-6) -> Tensor:
    """ELU+1 linear attention (Katharopoulos et al. 2020): ``φ(q)ᵀ Σ φ(k_n) v_nᵀ / φ(q)ᵀ Σ φ(k_n)``.
    q [B, h, M, dh], k, v [B, h, N, dh] → [B, h, M, dh]; zero without valid keys."""
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    if valid is not None:
        fk = fk * valid[:, None, :, None].to(fk.dtype)
    kv = fk.transpose(-1, -2) @ v  # [B, h, dh, dh]
    den = fq @ fk.sum(-2).unsqueeze(-1)  # [B, h, M, 1]
    return (fq @ kv) / den.clamp_min(eps)


def chunked_topk(queries: Tensor, history: Tensor, valid: Tensor | None, k: int,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` events per candidate by the raw dot product, kept as a running top-k over chunks of N.

    Returns:
        idx [B, M, k'] (k' = min(k, N)) and ``ok`` [B, M, k'] (False where fewer than k' events are valid).
    """
    b, m, _ = queries.shape
    n = history.shape[1]
    vals = queries.new_empty((b, m, 0))
    idx = torch.empty((b, m, 0), dtype=torch.long, device=queries.device)
    for start in range(0, n, chunk):
        s = queries @ history[:, start:start + chunk].transpose(-1, -2)  # [B, M, c]
        if valid is not None:
            s = s.masked_fill(~valid[:, None, start:start + chunk], float("-inf"))
        pos = torch.arange(start, start + s.shape[-1], device=queries.device).expand(b, m, -1)
        vals, sel = torch.cat([vals, s], -1).topk(min(k, vals.shape[-1] + s.shape[-1]), -1)
        idx = torch.gather(torch.cat([idx, pos], -1), -1, sel)
    return idx, torch.isfinite(vals)


def sim_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, ok: Tensor) -> Tensor:
    """Exact softmax over each candidate's selected events. q [B, h, M, dh], k, v [B, h, N, dh], idx/ok [B, M, k]."""
    b, h, m, dh = q.shape
    kk = idx.shape[-1]
    flat = idx.reshape(b, 1, m * kk, 1).expand(b, h, m * kk, dh)
    ks = torch.gather(k, 2, flat).view(b, h, m, kk, dh)
    vs = torch.gather(v, 2, flat).view(b, h, m, kk, dh)
    scores = (q.unsqueeze(-2) @ ks.transpose(-1, -2)).squeeze(-2) * (1.0 / math.sqrt(dh))  # [B, h, M, k]
    any_ok = ok.any(-1, keepdim=True)
    mask = (ok | ~any_ok).unsqueeze(1)
    w = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return (w.unsqueeze(-2) @ vs).squeeze(-2) * any_ok.unsqueeze(1).to(q.dtype)


# -------------------------------------------------------------------------------------------------- module


class SVDTargetAttention(nn.Module):
    """Target attention of M candidates over an N-long history, in one of ``MODES`` (module docstring).

    Args:
        dim: D (queries and history events have width D).
        heads: h (D divisible by h); outputs are the concatenated heads, no output projection.
        mode: default mode, one of ``"full"``, ``"svd_exact"``, ``"svd_compact"``, ``"linear"``, ``"sim"``.
        rank: R of the decomposition (1 ≤ R ≤ D).
        chunk: events per streamed step of ``sim`` and of the streamed ``svd_exact`` kernel (memory O(M·chunk)).
        exact_kernel: ``svd_exact``'s kernel: ``"sdpa"`` (default; PyTorch's fused attention over the R-wide
            factors) or ``"streamed"`` (:func:`svd_exact_attention`, our chunked online softmax: the readable
            reference, same outputs).
        topk: k of ``sim``.
        both_signs: ``svd_compact`` attends to the 2R tokens ±z_k (sign-convention free).
        normalize: ``svd_compact`` uses ``Z / √n`` (n = valid events; ours, default) instead of ``Z = U_Rᵀ X``.
        gram_dtype: the dtype the Gram ``XᵀX`` is accumulated in at inference (None: the history's dtype, at least
            float32 — a third of float64's cost on CPU, and its round-off stays far below float32 outputs' own;
            ``torch.float64`` for the most exact factors). The D×D eigenproblem is solved in float64 either way.
        train_gram_dtype: the same under autograd (None: as ``gram_dtype``).
        device, dtype: of the projection weights.

    Example:
        >>> att = SVDTargetAttention(dim=8, rank=4)
        >>> att(torch.randn(2, 3, 8), torch.randn(2, 10, 8)).shape    # [B, M, D]
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, heads: int = 1, mode: str = "svd_compact", rank: int = 32, chunk: int = 1024,
                 topk: int = 100, both_signs: bool = False, normalize: bool = True, gram_dtype=None,
                 train_gram_dtype=None, exact_kernel: str = "sdpa", device=None, dtype=None):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads), ("rank", rank), ("chunk", chunk), ("topk", topk)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ConfigError(f"SVDTargetAttention: {name} must be a positive integer, got {val!r}")
        if dim % heads:
            raise ConfigError(f"SVDTargetAttention: dim={dim} is not divisible by heads={heads}")
        if rank > dim:
            raise ConfigError(f"SVDTargetAttention: rank={rank} exceeds dim={dim}")
        self.dim, self.heads, self.mode, self.rank = dim, heads, self._check_mode(mode), rank
        self.chunk, self.topk, self.both_signs, self.normalize = chunk, topk, bool(both_signs), bool(normalize)
        for name, val in (("gram_dtype", gram_dtype), ("train_gram_dtype", train_gram_dtype)):
            if val is not None and not (isinstance(val, torch.dtype) and val.is_floating_point):
                raise ConfigError(f"SVDTargetAttention: {name} must be a floating torch dtype or None, got {val!r}")
        self.gram_dtype, self.train_gram_dtype = gram_dtype, train_gram_dtype
        if exact_kernel not in EXACT_KERNELS:
            raise ConfigError(f"SVDTargetAttention: exact_kernel must be one of {EXACT_KERNELS}, got {exact_kernel!r}")
        self.exact_kernel = exact_kernel
        kw = {"device": device, "dtype": dtype}
        self.q = nn.Linear(dim, dim, bias=False, **kw)
        self.k = nn.Linear(dim, dim, bias=False, **kw)
        self.v = nn.Linear(dim, dim, bias=False, **kw)

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in MODES:
            raise ConfigError(f"unknown attention mode {mode!r}; expected one of {MODES}")
        return mode

    def decompose(self, history: Tensor, valid: Tensor | None = None, keep_history: bool = False) -> HistorySVD:
        """The per-user cache of ``history`` [B, N, D] at this module's rank (``keep_history`` for svd_exact)."""
        if history.dim() == 3 and history.shape[-1] != self.dim:
            raise DataError(f"history must be [B, N, D={self.dim}], got {list(history.shape)}")
        gram_dtype = self.gram_dtype or torch.promote_types(history.dtype, torch.float32)
        if self.train_gram_dtype is not None and torch.is_grad_enabled() and history.requires_grad:
            gram_dtype = self.train_gram_dtype
        return HistorySVD.from_history(history, valid, rank=self.rank, keep_history=keep_history,
                                       gram_dtype=gram_dtype)

    def forward(self, queries: Tensor, history: Tensor | None = None, valid: Tensor | None = None,
                cache: HistorySVD | None = None, mode: str | None = None) -> Tensor:
        """Attend.

        Args:
            queries: [B, M, D] candidates.
            history: [B, N, D] events (may be omitted with a ``cache``: ``svd_compact`` needs only the factors,
                ``svd_exact`` a cache made with ``keep_history=True``).
            valid: [B, N] bool, True for real events (default: all).
            cache: a ``HistorySVD`` of this history at this rank (skips the decomposition).
            mode: overrides the module's mode for this call.

        Returns:
            [B, M, D].
        """
        mode = self._check_mode(mode or self.mode)
        if queries.dim() != 3 or queries.shape[-1] != self.dim:
            raise DataError(f"queries must be [B, M, D={self.dim}], got {list(queries.shape)}")
        if cache is not None:
            if cache.rank != self.rank or cache.v.shape[-2] != self.dim or cache.v.shape[0] != queries.shape[0]:
                raise DataError(f"cache has rank {cache.rank}, D={cache.v.shape[-2]}, B={cache.v.shape[0]}; "
                                f"expected rank {self.rank}, D={self.dim}, B={queries.shape[0]}")
            if history is None:
                if cache.history is None and mode != "svd_compact":
                    raise DataError(f"mode {mode!r} needs the history: pass it or a cache made with keep_history")
                history, valid = cache.history, cache.valid
        elif history is None:
            raise DataError("pass a history [B, N, D] or a cache")
        if history is not None:
            _check_history(history, valid)
            if history.shape[0] != queries.shape[0] or history.shape[-1] != self.dim:
                raise DataError(f"history must be [B={queries.shape[0]}, N, D={self.dim}], got "
                                f"{list(history.shape)}")
        h = self.heads
        q = _heads(self.q(queries), h)
        if mode == "svd_compact":
            svd = cache if cache is not None else self.decompose(history, valid)
            z = interest_tokens(history, valid, svd) if history is not None else svd.interests  # [B, R, D]
            if self.normalize:  # RMS scale: s_k grows as √n, a token should look like an event
                z = z / svd.count.clamp_min(1).to(z.dtype).sqrt().view(-1, 1, 1)
            tok = svd.token_mask
            if self.both_signs:
                z, tok = torch.cat([z, -z], 1), torch.cat([tok, tok], 1)
            return _merge(compact_attention(q, _heads(self.k(z), h), _heads(self.v(z), h), tok))
        if mode == "svd_exact":
            svd = cache if cache is not None else self.decompose(history, valid)
            if self.exact_kernel == "sdpa":
                return _merge(svd_exact_sdpa(q, history, valid, svd.v, self.k.weight, self.v.weight))
            return _merge(svd_exact_attention(q, history, valid, svd.v, self.k.weight, self.v.weight, h,
                                              self.chunk))
        k, v = _heads(self.k(history), h), _heads(self.v(history), h)
        if mode == "full":
            return _merge(full_attention(q, k, v, valid))
        if mode == "linear":
            return _merge(linear_attention(q, k, v, valid))
        idx, ok = chunked_topk(queries, history, valid, self.topk, self.chunk)
        return _merge(sim_attention(q, k, v, idx, ok))


__all__ = ["EXACT_KERNELS", "MODES", "TOKEN_TOL", "HistorySVD", "SVDTargetAttention", "chunked_topk", "compact_attention",
           "fix_signs", "full_attention", "history_svd", "interest_tokens", "linear_attention", "sim_attention",
           "svd_exact_attention", "svd_exact_sdpa", "token_tol", "top_eig"]
