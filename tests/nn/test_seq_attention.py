"""Attention kernels over global + sequence tokens: masked SDPA, the log-sum-exp kernel and the split-key
(KV-cache) kernel against plain references (forward, and gradients of its autograd branch), the pre-norm layer,
token merge, query sampling, and LONGER's cross-/self-causal encoder (cache parity, the per-request path against the
per-candidate one with gradients, the mask rule in every layer, FLOP counting)."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from funnelrec.errors import ConfigError, DataError
from funnelrec.nn import seq_attention
from funnelrec.nn.masks import TokenLayout, attention_mask, key_padding_mask
from funnelrec.nn.seq_attention import (
    CrossCausalEncoder,
    SeqAttentionLayer,
    TokenMerge,
    attention_with_lse,
    masked_attention,
    sample_query_index,
    split_key_attention,
    split_key_attention_autograd,
)


def reference_attention(q, k, v, mask):
    """Plain softmax attention; rows without a key give zeros."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def left_padded(lengths, s):
    lengths = torch.as_tensor(lengths).view(-1, 1)
    return torch.arange(s).expand(len(lengths), s) >= s - lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_attention_matches_the_reference_and_zeroes_empty_rows(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.rand(2, 4, 4, generator=g) < 0.6
    mask[0, 1] = False  # a query with no key
    mask[1, 2] = True
    out = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask))
    assert out[0, :, 1].eq(0).all()
    q.requires_grad_(True)
    masked_attention(q, k, v, mask).sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("flash", [True, False])
def test_attention_with_lse(flash, monkeypatch):
    if not flash:
        monkeypatch.setattr(seq_attention, "_FLASH_CPU", None)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 6, 4, generator=g)
    valid = left_padded([6, 2, 0], 6)
    out, lse = attention_with_lse(q, k, k, valid)
    ref = reference_attention(q, k, k, valid.unsqueeze(1).expand(3, 5, 6))
    torch.testing.assert_close(out, ref)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~valid.view(3, 1, 1, 6), float("-inf"))
    torch.testing.assert_close(lse[:2], torch.logsumexp(scores, -1)[:2])
    assert torch.isneginf(lse[2]).all() and out[2].eq(0).all()  # a request without any valid key


@pytest.mark.parametrize("seed", range(3))
def test_split_key_attention_equals_attention_over_concatenated_keys(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, m, gq, gk, s, dh = 3, 2, 4, 3, 3, 7, 5
    q = torch.randn(b, h, m, gq, dh, generator=g, dtype=torch.float64)
    ko, vo = (torch.randn(b, h, m, gk, dh, generator=g, dtype=torch.float64) for _ in range(2))
    ks, vs = (torch.randn(b, h, s, dh, generator=g, dtype=torch.float64) for _ in range(2))
    valid = left_padded([7, 3, 0], s)
    out = split_key_attention(q, ko, vo, ks, vs, valid)
    keys = torch.cat([ko, ks.unsqueeze(2).expand(b, h, m, s, dh)], 3).transpose(1, 2).reshape(b * m, h, gk + s, dh)
    vals = torch.cat([vo, vs.unsqueeze(2).expand(b, h, m, s, dh)], 3).transpose(1, 2).reshape(b * m, h, gk + s, dh)
    mask = torch.cat([torch.ones(b, gk, dtype=torch.bool), valid], 1).repeat_interleave(m, 0)
    ref = reference_attention(q.transpose(1, 2).reshape(b * m, h, gq, dh), keys, vals,
                              mask.unsqueeze(1).expand(b * m, gq, gk + s))
    torch.testing.assert_close(out.transpose(1, 2).reshape(b * m, h, gq, dh), ref, rtol=0, atol=1e-12)


def _split_inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b, h, m, gq, gk, s, dh = 3, 2, 4, 3, 3, 7, 5
    q = torch.randn(b, h, m, gq, dh, generator=g, dtype=dtype)
    ko, vo = (torch.randn(b, h, m, gk, dh, generator=g, dtype=dtype) for _ in range(2))
    ks, vs = (torch.randn(b, h, s, dh, generator=g, dtype=dtype) for _ in range(2))
    return [q, ko, vo, ks, vs], left_padded([7, 3, 0], s)


def test_split_key_attention_gradients_are_exact():
    """Under autograd ``split_key_attention`` takes its differentiable branch: gradcheck against finite differences
    for every input (padded shared keys, a request with no valid shared key), and the same forward as the
    flash / log-sum-exp branch it takes without autograd. (The flash kernel's log-sum-exp has no gradient: the
    log-sum-exp merge under autograd gave gradients wrong by ~24% — the reason for the two branches.)"""
    inputs, valid = _split_inputs()
    with torch.no_grad():
        fast = split_key_attention(*inputs, valid)
    args = [t.clone().requires_grad_(True) for t in inputs]
    exact = split_key_attention(*args, valid)
    assert exact.requires_grad
    torch.testing.assert_close(exact.detach(), fast, rtol=0, atol=1e-12)
    torch.testing.assert_close(split_key_attention_autograd(*inputs, valid), fast, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: split_key_attention(*t, valid), tuple(args))
    # gradient of the padded shared keys / values is exactly zero
    exact.square().sum().backward()
    assert args[3].grad[1, :, :4].eq(0).all() and args[4].grad[2].eq(0).all()


def test_split_key_attention_dropout_drops_attention_weights():
    inputs, valid = _split_inputs(dtype=torch.float32)
    torch.manual_seed(0)
    a = split_key_attention(*inputs, valid, dropout_p=0.5)
    b = split_key_attention(*inputs, valid, dropout_p=0.5)
    assert not torch.allclose(a, b) and torch.isfinite(a).all()
    torch.testing.assert_close(split_key_attention(*inputs, valid, dropout_p=0.0), split_key_attention(*inputs, valid))


def test_layer_split_path_equals_the_full_path():
    torch.manual_seed(0)
    layer = SeqAttentionLayer(8, heads=2).double().eval()
    b, m, g, s = 2, 3, 2, 5
    glob = torch.randn(b, m, g, 8, dtype=torch.float64)
    seq = torch.randn(b, s, 8, dtype=torch.float64)
    valid = left_padded([5, 2], s)
    k, v = layer.keys_values(seq)
    split = layer.forward_split(glob, k, v, valid)
    ctx = torch.cat([glob, seq.unsqueeze(1).expand(b, m, s, 8)], 2).reshape(b * m, g + s, 8)
    mask = key_padding_mask(torch.cat([torch.ones(b, g, dtype=torch.bool), valid], 1).repeat_interleave(m, 0), g)
    full = layer(glob.reshape(b * m, g, 8), mask, context=ctx)
    torch.testing.assert_close(split.reshape(b * m, g, 8), full, rtol=0, atol=1e-12)


def test_layer_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="divisible"):
        SeqAttentionLayer(10, heads=4)
    with pytest.raises(ConfigError, match="ffn_mult"):
        SeqAttentionLayer(8, heads=2, ffn_mult=0)


@pytest.mark.parametrize("mode", ["none", "concat", "innertrans"])
def test_token_merge_groups_from_the_most_recent_event_and_ignores_padding(mode):
    torch.manual_seed(0)
    k = 1 if mode == "none" else 3
    merge = TokenMerge(8, k, mode, heads=2).eval()
    x = torch.randn(3, 7, 8)
    valid = left_padded([7, 4, 0], 7)
    out, out_valid = merge(x, valid)
    s = -(-7 // k)
    assert out.shape == (3, s, 8) and out_valid.shape == (3, s)
    if mode != "none":
        assert out_valid.tolist() == [[True] * 3, [False, True, True], [False] * 3]
        noisy = torch.where(valid.unsqueeze(-1), x, torch.randn(3, 7, 8) * 100)
        torch.testing.assert_close(merge(noisy, valid)[0], out, rtol=0, atol=0)
        # the most recent group holds exactly the K most recent events
        changed = x.clone()
        changed[:, 3] += 1.0  # event 3 of 7 sits in group 1 (events 1-3), not in group 2 (events 4-6)
        moved = merge(changed, valid)[0]
        torch.testing.assert_close(moved[:, 2], out[:, 2], rtol=0, atol=0)
        assert not torch.allclose(moved[0, 1], out[0, 1])
    else:
        assert torch.equal(out, x)
    with pytest.raises(ConfigError, match="merge mode"):
        TokenMerge(8, 2, "sum")
    with pytest.raises(ConfigError, match="merge k"):
        TokenMerge(8, 0, "concat")


def test_token_merge_of_an_empty_history():
    out, valid = TokenMerge(4, 2, "innertrans", heads=1)(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 0, 4) and valid.shape == (2, 0)


def test_query_sampling():
    valid = left_padded([10, 4, 0], 10)
    recent = sample_query_index(valid, 4, "recent")
    assert recent.tolist() == [[6, 7, 8, 9]] * 3
    uniform = sample_query_index(valid, 4, "uniform")
    assert uniform[0].tolist() == [2, 4, 7, 9]  # spread over all 10, the most recent included
    assert uniform[1].tolist() == [6, 7, 8, 9] and uniform[2].tolist() == [6, 7, 8, 9]
    for idx in (recent, uniform):
        assert (idx.diff(dim=1) > 0).all()  # ascending, distinct
    assert sample_query_index(valid, 50, "recent").shape == (3, 10)  # k' = min(k, S)
    with pytest.raises(ConfigError):
        sample_query_index(valid, 3, "learnable")


def _encoder_inputs(seed=0, b=3, m=4, g=3, s=9, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    glob = torch.randn(b, m, g, 8, generator=gen, dtype=dtype)
    seq = torch.randn(b, s, 8, generator=gen, dtype=dtype)
    return glob, seq, left_padded([s, 4, 0][:b], s)


@pytest.mark.parametrize("sampling", ["recent", "uniform", "learnable"])
@pytest.mark.parametrize("layers", [0, 2])
def test_encoder_cache_path_equals_the_training_path(sampling, layers):
    torch.manual_seed(0)
    enc = CrossCausalEncoder(8, heads=2, num_self_layers=layers, num_queries=5, sampling=sampling).eval()
    glob, seq, valid = _encoder_inputs()
    full = enc(glob, seq, valid)
    cache = enc.encode(seq, valid)
    assert len(cache.keys) == layers + 1 and cache.batch_size == 3 and cache.nbytes > 0
    torch.testing.assert_close(enc.decode(glob, cache), full, rtol=0, atol=1e-5)
    # the same cache serves another candidate set
    other = torch.randn(3, 2, 3, 8)
    torch.testing.assert_close(enc.decode(other, cache), enc(other, seq, valid), rtol=0, atol=1e-5)
    with pytest.raises(DataError, match="cache"):
        enc.decode(glob[:2], cache)


def _encoder_grads(enc, fn, glob, seq, valid, weight):
    glob, seq = glob.clone().requires_grad_(True), seq.clone().requires_grad_(True)
    enc.zero_grad(set_to_none=True)
    out = fn(glob, seq, valid)
    (out * weight).sum().backward()
    # (with no self layer the learned queries' states are never read: no gradient on one path, zeros on the other)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in enc.named_parameters()}
    return out.detach(), glob.grad, seq.grad, grads


@pytest.mark.parametrize("sampling", ["recent", "uniform", "learnable"])
@pytest.mark.parametrize("layers", [0, 2])
def test_encoder_per_request_path_equals_the_per_candidate_path(sampling, layers):
    """``forward_per_request`` (sequence once per request) vs ``forward`` (sequence per candidate), float64: the
    same outputs and the same gradients for every parameter and both inputs (padding, an empty history)."""
    torch.manual_seed(0)
    enc = CrossCausalEncoder(8, heads=2, num_self_layers=layers, num_queries=5, sampling=sampling).double()
    glob, seq, valid = _encoder_inputs(dtype=torch.float64)
    weight = torch.randn(glob.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out_n, dglob_n, dseq_n, grads_n = _encoder_grads(enc, enc.forward, glob, seq, valid, weight)
    out_s, dglob_s, dseq_s, grads_s = _encoder_grads(enc, enc.forward_per_request, glob, seq, valid, weight)
    torch.testing.assert_close(out_s, out_n, rtol=0, atol=1e-12)
    torch.testing.assert_close(dglob_s, dglob_n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dseq_s, dseq_n, rtol=1e-10, atol=1e-12)
    assert grads_s.keys() == grads_n.keys()
    for name, g in grads_n.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(DataError):
        enc.forward_per_request(glob, seq[:2], valid[:2])


def _layer_outputs(enc, glob, seq, valid):
    """Outputs [R, G + k', D] of every layer of the training path."""
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone()))
             for layer in [enc.cross, *enc.layers]]
    try:
        enc(glob, seq, valid)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("sampling", ["recent", "uniform"])
def test_mask_rule_holds_in_every_layer_of_the_training_path(sampling):
    """All S tokens are queries (k >= S), so every sequence token is visible in every layer's output."""
    torch.manual_seed(1)
    enc = CrossCausalEncoder(8, heads=2, num_self_layers=2, num_queries=9, sampling=sampling).eval()
    glob, seq, valid = _encoder_inputs(b=2)
    g = glob.shape[2]
    base = _layer_outputs(enc, glob, seq, valid)
    assert len(base) == 3
    # 1. the candidate (global tokens) changes: no sequence token changes, in any layer
    for a, b in zip(base, _layer_outputs(enc, torch.randn_like(glob), seq, valid)):
        torch.testing.assert_close(a[:, g:], b[:, g:], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, :g], b[:, :g])
    # 2. a later sequence token changes: earlier ones do not change, in any layer (row 0: all 9 real)
    later = seq.clone()
    later[0, 6] += 1.0
    for a, b in zip(base, _layer_outputs(enc, glob, later, valid)):
        rows = slice(0, glob.shape[1])  # request 0's M rows
        torch.testing.assert_close(a[rows, g:g + 6], b[rows, g:g + 6], rtol=0, atol=1e-6)
        assert not torch.allclose(a[rows, g + 6:], b[rows, g + 6:])
    # 3. padding content changes nothing anywhere a valid token can see
    noisy = torch.where(valid.unsqueeze(-1), seq, torch.randn_like(seq) * 50)
    for a, b in zip(base, _layer_outputs(enc, glob, noisy, valid)):
        real = torch.cat([torch.ones(2, g, dtype=torch.bool), valid], 1).repeat_interleave(glob.shape[1], 0)
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)


def test_encoder_gradients_flow_everywhere():
    torch.manual_seed(0)
    enc = CrossCausalEncoder(8, heads=2, num_self_layers=1, num_queries=3, sampling="learnable")
    glob, seq, valid = _encoder_inputs()
    glob.requires_grad_(True)
    seq.requires_grad_(True)
    enc(glob, seq, valid).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.learned.grad.abs().sum() > 0
    assert seq.grad[0].abs().sum() > 0 and torch.isfinite(seq.grad).all()


def test_encoder_rejects_bad_settings():
    with pytest.raises(ConfigError, match="sampling"):
        CrossCausalEncoder(8, 2, 1, 4, sampling="random")
    with pytest.raises(ConfigError, match="num_queries"):
        CrossCausalEncoder(8, 2, 1, 0)
    enc = CrossCausalEncoder(8, 2, 1, 4)
    glob, seq, valid = _encoder_inputs()
    with pytest.raises(DataError):
        enc(glob, seq[:2], valid[:2])


def test_flop_counter_sees_cpu_attention():
    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    k = torch.randn(2, 2, 32, 8)
    mask = torch.ones(2, 16, 32, dtype=torch.bool)
    with FlopCounterMode(display=False) as fwd:
        out = masked_attention(q, k, k, mask)
    assert fwd.get_total_flops() == 2 * (2 * 2 * 16 * 32 * 8 * 2)  # QK^T and PV
    with FlopCounterMode(display=False) as both:
        masked_attention(q, k, k, mask).sum().backward()
    assert both.get_total_flops() > 2 * fwd.get_total_flops()
    assert out.shape == (2, 2, 16, 8)


def test_training_path_layouts_agree_with_the_mask_builder():
    """The encoder's cross-layer mask is the builder's: sampled queries see keys at or before them."""
    valid = left_padded([5], 5)
    idx = sample_query_index(valid, 2, "recent")
    q = TokenLayout.cat(TokenLayout.globals(1, 1), TokenLayout.sequence(valid.gather(1, idx), idx))
    mask = attention_mask(q, TokenLayout.of(1, valid))[0].int().tolist()
    assert mask == [[1] * 6, [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("funnelrec.nn.seq_attention"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
