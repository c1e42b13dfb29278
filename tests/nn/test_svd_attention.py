"""SVD target attention (SOLAR, reconstructed): exactness of ``svd_exact``, no [M, N] tensor, the per-user cache and
its incremental update, the sign convention, the baselines and gradients of ``svd_compact``."""

from __future__ import annotations

import doctest

import pytest
import torch

import funnelrec.nn.svd_attention as svd_mod
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.svd_attention import (EXACT_KERNELS, TOKEN_TOL, HistorySVD, SVDTargetAttention, chunked_topk,
                                        fix_signs)
from funnelrec.utils.probes import ShapeProbe

M, N, D, R = 13, 37, 8, 3  # distinct primes for M and N (the shape probe below)


def low_rank(b: int, n: int, d: int, r: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, r, generator=g, dtype=torch.float64)
            @ torch.randn(b, r, d, generator=g, dtype=torch.float64)).to(dtype)


def make(dtype=torch.float32, heads: int = 2, rank: int = R, **kw) -> SVDTargetAttention:
    torch.manual_seed(0)
    return SVDTargetAttention(dim=D, heads=heads, rank=rank, chunk=8, **kw).to(dtype)


def inputs(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(2, M, D, generator=g, dtype=torch.float64).to(dtype)
    x = low_rank(2, N, D, R, seed, dtype)
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1, :10] = False  # left padding
    valid[1, 20] = False   # and a hole
    return q, x, valid



def test_docstring_examples_run():
    result = doctest.testmod(svd_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_svd_exact_equals_full_softmax_on_rank_r_histories(dtype, tol):
    att = make(dtype)
    q, x, valid = inputs(dtype)
    full = att(q, x, valid, mode="full")
    exact = att(q, x, valid, mode="svd_exact")
    assert (exact - full).abs().max() < tol
    # a history of rank > R is NOT reproduced (the check can fail)
    x_full_rank = torch.randn(2, N, D, dtype=dtype)
    diff = att(q, x_full_rank, valid, mode="svd_exact") - att(q, x_full_rank, valid, mode="full")
    assert diff.abs().max() > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_exact_kernels_agree_in_outputs_and_gradients(dtype, tol):
    """The fused SDPA kernel of svd_exact against our streamed one, on a full-rank history (attention over its
    rank-R truncation), with padding, a hole and a request without any valid event."""
    q, _, valid = inputs(dtype)
    x = torch.randn(2, N, D, dtype=dtype)
    valid = torch.cat([valid, torch.zeros(1, N, dtype=torch.bool)])
    q, x = torch.cat([q, q[:1]]), torch.cat([x, x[:1]])
    outs, grads = [], []
    for kernel in EXACT_KERNELS:
        att = make(dtype, exact_kernel=kernel)
        qq, xx = q.clone().requires_grad_(), x.clone().requires_grad_()
        out = att(qq, xx, valid, mode="svd_exact")
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append((qq.grad, xx.grad, att.k.weight.grad))
    assert outs[0][2].abs().max() == 0 and torch.isfinite(outs[0]).all()
    assert (outs[0] - outs[1]).abs().max() < tol
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=tol * 10, rtol=tol * 10)


def test_padding_is_ignored_and_empty_history_gives_zeros():
    att = make()
    q, x, valid = inputs()
    garbage = x.clone()
    garbage[~valid] = 1e3  # padded events must not matter
    for mode in svd_mod.MODES:
        a, b = att(q, x, valid, mode=mode), att(q, garbage, valid, mode=mode)
        assert torch.allclose(a, b, atol=1e-5), mode
    none = torch.zeros(2, N, dtype=torch.bool)
    for mode in svd_mod.MODES:
        out = att(q, x, none, mode=mode)
        assert torch.isfinite(out).all() and out.abs().max() == 0, mode
    empty = att(q, x[:, :0], valid[:, :0], mode="svd_exact")
    assert empty.shape == (2, M, D) and empty.abs().max() == 0


@pytest.mark.parametrize("mode,kernel", [("svd_exact", "sdpa"), ("svd_exact", "streamed"), ("svd_compact", "sdpa"),
                                         ("linear", "sdpa"), ("sim", "sdpa")])
def test_no_m_by_n_tensor_is_allocated(mode, kernel):
    att = make(topk=5, exact_kernel=kernel)
    q, x, valid = inputs()
    q.requires_grad_(), x.requires_grad_()
    with ShapeProbe() as probe:  # training too: the backward pass must not build one either
        att(q, x, valid, mode=mode).sum().backward()
    assert probe.shapes
    bad = [s for s in probe.shapes if M in s and N in s]
    assert not bad, bad
    assert not [s for s in probe.shapes if s.count(N) >= 2]  # no [N, N] either


def test_shape_probe_catches_full_scores():
    q, x, _ = inputs()
    with ShapeProbe() as probe:
        torch.softmax(q @ x.transpose(-1, -2), -1)
    assert any(M in s and N in s for s in probe.shapes)


@pytest.mark.parametrize("mode", ["svd_compact", "svd_exact"])
def test_cached_and_uncached_paths_agree(mode):
    att = make()
    q, x, valid = inputs()
    cache = att.decompose(x, valid, keep_history=True)
    assert torch.allclose(att(q, cache=cache, mode=mode), att(q, x, valid, mode=mode), atol=1e-6)
    assert torch.allclose(att(q, x, valid, cache=cache, mode=mode), att(q, x, valid, mode=mode), atol=1e-6)


def test_incremental_append_equals_from_scratch():
    q, x, valid = inputs()
    base = HistorySVD.from_history(x[:, :30], valid[:, :30], rank=R, keep_history=True)
    grown = base.append(x[:, 30:33], valid[:, 30:33]).append(x[:, 33:], valid[:, 33:])
    ref = HistorySVD.from_history(x, valid, rank=R, keep_history=True)
    assert torch.equal(grown.count, ref.count) and grown.count.tolist() == [N, N - 11]
    assert torch.allclose(grown.gram, ref.gram, rtol=1e-12, atol=1e-10)
    assert torch.allclose(grown.s, ref.s, rtol=1e-5) and torch.allclose(grown.v, ref.v, atol=1e-5)
    assert torch.equal(grown.history, ref.history) and torch.equal(grown.valid, ref.valid)
    att = make()
    assert torch.allclose(att(q, cache=grown, mode="svd_exact"), att(q, x, valid, mode="full"), atol=1e-5)
    assert not torch.allclose(base.s, ref.s)  # the appended events changed the factors


def test_low_rank_reconstruction_is_exact():
    x = low_rank(2, N, D, R, seed=3)
    svd = HistorySVD.from_history(x, rank=R)
    u = (x @ svd.v) / svd.s.unsqueeze(1)
    assert torch.allclose(u.transpose(-1, -2) @ u, torch.eye(R).expand(2, R, R), atol=1e-4)  # orthonormal U
    assert torch.allclose(u @ svd.interests, x, atol=1e-5)  # X = U_R Z: "lossless on low-rank matrices"


def test_sign_convention_is_deterministic():
    x = torch.randn(2, N, D)
    svd = HistorySVD.from_history(x, rank=4)
    top = svd.v.gather(-2, svd.v.abs().argmax(-2, keepdim=True))
    assert (top > 0).all()
    flipped = svd.v * torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert torch.equal(fix_signs(flipped), svd.v)
    again = HistorySVD.from_history(x.flip(1), rank=4)  # same events, other order: same Gram up to round-off
    assert torch.allclose(again.v, svd.v, atol=1e-5)
    assert torch.allclose(again.interests, svd.interests, atol=1e-4)


def test_compact_tokens_beyond_the_rank_are_masked():
    """``svd_compact`` is an approximation: it is not full softmax even for R ≥ rank (softmax over R tokens is not
    softmax over N events); beyond the rank of the history the extra (zero) tokens are masked, so the output stops
    changing with R."""
    q, x, valid = inputs()
    outs = {r: make(rank=r, heads=1)(q, x, valid, mode="svd_compact") for r in (R, R + 2, D)}
    assert torch.allclose(outs[R], outs[R + 2], atol=1e-5) and torch.allclose(outs[R], outs[D], atol=1e-5)
    assert not torch.allclose(outs[R], make(rank=R, heads=1)(q, x, valid, mode="full"), atol=1e-3)
    svd = HistorySVD.from_history(x, valid, rank=D)
    assert svd.token_mask.sum(-1).tolist() == [R, R]


def test_both_signs_is_sign_free():
    q, x, valid = inputs()
    att = make(both_signs=True)
    svd = att.decompose(x, valid)
    flipped = HistorySVD(svd.gram, svd.count, svd.s, -svd.v)
    assert torch.allclose(att(q, cache=svd), att(q, cache=flipped), atol=1e-6)
    plain = make()
    assert not torch.allclose(plain(q, cache=svd), plain(q, cache=flipped), atol=1e-4)


def test_baselines_shapes_and_sim_with_k_equal_n_is_full():
    q, x, valid = inputs()
    full = make()(q, x, valid, mode="full")
    for mode in ("linear", "sim"):
        assert make(topk=5)(q, x, valid, mode=mode).shape == (2, M, D)
    assert torch.allclose(make(topk=N)(q, x, valid, mode="sim"), full, atol=1e-5)
    assert torch.allclose(make(topk=10 * N)(q, x, valid, mode="sim"), full, atol=1e-5)
    assert not torch.allclose(make(topk=3)(q, x, valid, mode="sim"), full, atol=1e-3)


def test_chunked_topk_equals_plain_topk():
    q, x, valid = inputs()
    scores = (q @ x.transpose(-1, -2)).masked_fill(~valid[:, None], float("-inf"))
    idx, ok = chunked_topk(q, x, valid, 5, chunk=8)
    ref_vals, _ = scores.topk(5, -1)
    assert torch.allclose(scores.gather(-1, idx), ref_vals) and ok.all()
    idx, ok = chunked_topk(q, x, valid, 30, chunk=8)  # request 1 has only 26 valid events
    assert ok[0].all() and ok[1].sum(-1).eq(26).all()


def test_linear_attention_matches_its_quadratic_form():
    att = make(heads=1)
    q, x, valid = inputs()
    fq, fk = torch.nn.functional.elu(att.q(q)) + 1, torch.nn.functional.elu(att.k(x)) + 1
    w = (fq @ fk.transpose(-1, -2)) * valid[:, None].float()
    ref = (w / w.sum(-1, keepdim=True)) @ att.v(x)
    assert torch.allclose(att(q, x, valid, mode="linear"), ref, atol=1e-5)


def test_gradients_flow_through_svd_compact():
    att = make()
    q, x, valid = inputs()
    q.requires_grad_(True)
    x = x.clone().requires_grad_(True)
    out = att(q, x, valid, mode="svd_compact")
    out.square().sum().backward()
    for t in (q.grad, x.grad, att.q.weight.grad, att.k.weight.grad, att.v.weight.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0
    assert x.grad[~valid].abs().max() == 0  # padding gets no gradient
    with torch.no_grad():  # the gradient path computes the same value
        assert torch.allclose(att(q, x, valid, mode="svd_compact"), out, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="mode"):
        SVDTargetAttention(dim=D, rank=4, mode="nope")
    with pytest.raises(ConfigError, match="divisible"):
        SVDTargetAttention(dim=D, rank=4, heads=3)
    with pytest.raises(ConfigError, match="rank"):
        SVDTargetAttention(dim=D, rank=D + 1)
    with pytest.raises(ConfigError, match="chunk"):
        SVDTargetAttention(dim=D, rank=4, chunk=0)
    with pytest.raises(ConfigError, match="exact_kernel"):
        SVDTargetAttention(dim=D, rank=4, exact_kernel="flash")
    with pytest.raises(ConfigError, match="gram_dtype"):
        SVDTargetAttention(dim=D, rank=4, gram_dtype="float64")
    att = make()
    q, x, valid = inputs()
    with pytest.raises(DataError, match="queries"):
        att(q[0], x, valid)
    with pytest.raises(DataError, match="valid"):
        att(q, x, valid[:, :5])
    with pytest.raises(DataError, match="or a cache"):
        att(q)
    with pytest.raises(DataError, match="keep_history"):
        att(q, cache=att.decompose(x, valid), mode="full")
    with pytest.raises(DataError, match="rank"):
        att(q, cache=HistorySVD.from_history(x, valid, rank=2))
    with pytest.raises(ConfigError, match="rank"):
        HistorySVD.from_history(x, rank=0)


def test_normalized_tokens_are_the_literal_ones_over_root_n():
    q, x, valid = inputs()
    lit, norm = make(normalize=False), make()
    svd = lit.decompose(x, valid)
    n = valid.sum(-1).float().sqrt().view(-1, 1, 1)
    scaled = HistorySVD(svd.gram, svd.count, svd.s, svd.v)
    scaled.s = svd.s / n.view(-1, 1)  # Z/√n as literal tokens
    scaled.count = torch.ones_like(svd.count)
    assert torch.allclose(norm(q, cache=svd), lit(q, cache=scaled), atol=1e-6)
    assert not torch.allclose(norm(q, cache=svd), lit(q, cache=svd), atol=1e-3)


def test_gram_dtype_sets_the_accumulation_and_the_token_tolerance():
    """The inference Gram accumulates in the history's dtype by default (as in training), float64 on request; the
    rank mask's tolerance follows the Gram's round-off, and both give the same attention on a rank-R history."""
    q, x, valid = inputs()
    default, exact64 = make(), make(gram_dtype=torch.float64)
    assert exact64.decompose(x, valid).tol == TOKEN_TOL < default.decompose(x, valid).tol < 1e-2
    assert default.decompose(x, valid).token_mask.sum(-1).tolist() == [R, R]
    assert (default(q, x, valid, mode="svd_exact") - exact64(q, x, valid, mode="svd_exact")).abs().max() < 1e-5
