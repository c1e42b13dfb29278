"""AutoToken: shapes of the three groupings, gradients into the selection matrix, fixed groupings without W, the
initial cover, field order, and the errors."""

from __future__ import annotations

import doctest

import pytest
import torch

import funnelrec.nn.autotoken as autotoken_module
from funnelrec.errors import ConfigError
from funnelrec.nn.autotoken import AutoToken, FieldEncoders, random_groups

FIELDS = {"u0": 4, "u1": 4, "ud": 1, "i0": 4, "i1": 4, "tab": 4, "hour": 4, "dur": 1}  # F = 26, n_f = 8
F = sum(FIELDS.values())
MANUAL = {"user": ["u0", "u1", "ud"], "item": ["i0", "i1", "dur"], "ctx": ["tab", "hour"]}


def field_slice(name: str) -> slice:
    start = 0
    for f, w in FIELDS.items():
        if f == name:
            return slice(start, start + w)
        start += w
    raise KeyError(name)


@pytest.mark.parametrize("grouping", ["auto", "random", "manual"])
def test_shapes_for_every_grouping(grouping):
    torch.manual_seed(0)
    tok = AutoToken(FIELDS, 3, dim=6, field_dim=2, grouping=grouping, groups=MANUAL if grouping == "manual" else None)
    assert tok(torch.randn(F)).shape == (3, 6)
    assert tok(torch.randn(2, 5, F)).shape == (2, 5, 3, 6)
    members = tok.group_members()
    assert len(members) == 3 and all(m and set(m) <= set(FIELDS) for m in members)
    if grouping == "auto":
        assert tok.group_size == 3 and all(len(m) == 3 for m in members)  # ceil(8 / 3)
    else:
        assert sorted(f for m in members for f in m) == sorted(FIELDS)  # a partition


def test_gradients_reach_the_selection_matrix_through_the_softmax_weights():
    torch.manual_seed(0)
    tok = AutoToken(FIELDS, 3, dim=6, field_dim=2, group_size=2)
    tok(torch.randn(7, F)).pow(2).sum().backward()
    grad = tok.selection.grad
    assert grad is not None and grad.abs().sum() > 0
    idx, _ = tok.selection_weights()
    selected = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, idx, True)
    assert (grad[selected] != 0).all()  # every selected weight gets a gradient …
    assert (grad[~selected] == 0).all()  # … the unselected ones none (top-k is not differentiable)
    # a step on W changes the tokens (W is part of the model)
    x = torch.randn(4, F)
    before = tok(x).detach()
    with torch.no_grad():
        tok.selection.sub_(grad)
    assert not torch.allclose(tok(x), before)


@pytest.mark.parametrize("grouping", ["random", "manual"])
def test_fixed_groupings_have_no_learnable_selection(grouping):
    tok = AutoToken(FIELDS, 3, dim=6, grouping=grouping, groups=MANUAL if grouping == "manual" else None)
    assert tok.selection is None
    assert not any("selection" in name for name, _ in tok.named_parameters())
    with pytest.raises(ConfigError, match="grouping='auto'"):
        tok.selection_weights()
    if grouping == "manual":
        assert tok.group_members() == list(MANUAL.values())


def test_random_groups_are_seeded_and_fixed():
    names = list(FIELDS)
    a, b, c = random_groups(names, 3, seed=1), random_groups(names, 3, seed=1), random_groups(names, 3, seed=2)
    assert a == b and a != c
    assert sorted(len(m) for m in a.values()) == [2, 3, 3]
    tok = AutoToken(FIELDS, 3, dim=6, grouping="random", seed=1)
    assert tok.group_members() == list(a.values())
    torch.manual_seed(5)  # the global seed does not move the groups
    assert AutoToken(FIELDS, 3, dim=6, grouping="random", seed=1).group_members() == list(a.values())


def test_auto_starts_from_the_random_grouping_and_covers_every_field():
    for seed in range(3):
        auto = AutoToken(FIELDS, 3, dim=6, seed=seed).group_members()
        rand = AutoToken(FIELDS, 3, dim=6, grouping="random", seed=seed).group_members()
        assert all(set(r) <= set(a) for r, a in zip(rand, auto))
        assert set(f for m in auto for f in m) == set(FIELDS)


def test_a_field_reaches_only_the_tokens_that_read_it():
    torch.manual_seed(0)
    for grouping in ("auto", "manual"):
        tok = AutoToken(FIELDS, 3, dim=6, field_dim=2, grouping=grouping, group_size=2,
                        groups=MANUAL if grouping == "manual" else None).eval()
        x = torch.randn(4, F)
        base = tok(x)
        for field in FIELDS:
            y = x.clone()
            y[:, field_slice(field)] += 1.0
            changed = (tok(y) - base).abs().sum((0, 2)) > 0
            assert changed.tolist() == [field in m for m in tok.group_members()], (grouping, field)


def test_field_encoders_keep_the_field_order():
    torch.manual_seed(0)
    enc = FieldEncoders(FIELDS, out_dim=3, hidden=5)
    x = torch.randn(2, F)
    base = enc(x)
    assert base.shape == (2, 8, 3) and enc.num_fields == 8 and len(enc.first) == 2  # widths 4 and 1
    for j, field in enumerate(FIELDS):
        y = x.clone()
        y[:, field_slice(field)] += 1.0
        changed = (enc(y) - base).abs().sum((0, 2)) > 0
        assert changed.nonzero().flatten().tolist() == [j]


def test_identity_init_passes_each_field_through():
    x = torch.randn(2, F)
    wide = FieldEncoders(FIELDS, out_dim=4, init="identity")  # e = the widest field: every field read unchanged
    out = wide(x)
    for j, field in enumerate(FIELDS):
        part = x[:, field_slice(field)]
        torch.testing.assert_close(out[:, j, : part.shape[1]], part, rtol=0, atol=0)
        assert (out[:, j, part.shape[1]:] == 0).all()  # a width-1 field is zero-padded
    narrow = FieldEncoders(FIELDS, out_dim=2, init="identity")(x)  # e < w: the first e coordinates
    torch.testing.assert_close(narrow[:, 0], x[:, :2], rtol=0, atol=0)
    assert not torch.equal(FieldEncoders(FIELDS, out_dim=4)(x)[:, 0], x[:, :4])  # the default init is random
    tok = AutoToken(FIELDS, 3, dim=6, field_dim=4, field_init="identity")
    tok(x).sum().backward()
    assert all(lin.weight.grad is not None for lin in tok.encoders.first)  # a start, not a frozen map


@pytest.mark.parametrize("kwargs,match", [({"init": "eye"}, "FieldEncoders.init"),
                                          ({"init": "identity", "hidden": 5}, "init='identity' needs linear")])
def test_field_encoder_init_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FieldEncoders(FIELDS, out_dim=3, **kwargs)


def test_temperature_sharpens_the_selection_weights():
    warm = AutoToken(FIELDS, 3, dim=6, seed=0, temperature=1.0)
    cold = AutoToken(FIELDS, 3, dim=6, seed=0, temperature=0.01)
    with torch.no_grad():
        cold.selection.copy_(warm.selection + torch.linspace(0, 0.5, 8))
        warm.selection.copy_(cold.selection)
    assert cold.selection_weights()[1].max(-1).values.min() > warm.selection_weights()[1].max(-1).values.max()


def test_deterministic_for_a_seed():
    torch.manual_seed(3)
    a = AutoToken(FIELDS, 3, dim=6)
    torch.manual_seed(3)
    b = AutoToken(FIELDS, 3, dim=6)
    x = torch.randn(4, F)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kwargs,match", [
    ({"grouping": "learned"}, "AutoToken.grouping"),
    ({"num_tokens": 9}, "AutoToken.num_tokens"),
    ({"num_tokens": 0}, "AutoToken.num_tokens"),
    ({"dim": 0}, "AutoToken.dim"),
    ({"field_dim": 0}, "AutoToken.field_dim"),
    ({"group_size": 9}, "AutoToken.group_size"),
    ({"temperature": 0.0}, "AutoToken.temperature"),
    ({"grouping": "manual"}, "AutoToken.groups"),
    ({"grouping": "manual", "groups": {"a": ["u0"]}}, "AutoToken.groups.*not placed"),
    ({"grouping": "manual", "groups": {"a": list(FIELDS)}}, "AutoToken.num_tokens"),
    ({"grouping": "random", "groups": MANUAL}, "AutoToken.groups"),
])
def test_errors_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AutoToken(FIELDS, **{"num_tokens": 3, "dim": 6, **kwargs})


def test_wrong_input_width_is_named():
    with pytest.raises(ConfigError, match=r"FieldEncoders expects \[..., 26\]"):
        AutoToken(FIELDS, 3, dim=6)(torch.randn(2, 25))


def test_docstring_examples_run():
    result = doctest.testmod(autotoken_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
