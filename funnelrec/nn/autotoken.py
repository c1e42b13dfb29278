"""AutoToken: learned feature grouping into tokens (Qi et al., *MTmixAtt*, arXiv 2510.15286, §AutoToken).

The input is one flat feature vector x [..., F] laid out as named fields (``fields``: name → width, in order, as
``funnelrec.ranking.rankmixer.RankMixerConfig.input_fields`` gives them). ``AutoToken`` turns it into T tokens:

1. every field i gets its own small encoder → x̂_i ∈ R^e (``field_dim``), giving [..., n_f, e];
2. ``grouping="auto"``: a learnable selection matrix W [T, n_f]; token g reads the top-k fields of row W_g, weights
   them by k × the softmax of their k selection weights (÷ ``temperature``), flattens the k weighted vectors [k·e] and
   projects them to D with its own linear map. Top-k is not differentiable, but the softmax weights are, so W
   gets gradients through them (for the selected entries) and is learned end to end;
3. ``grouping="random"``: the fields are dealt into T fixed groups by a seeded permutation (not learned, no W);
   ``grouping="manual"``: the given semantic groups (RankMixer's six by default in ``MTmixAtt``; no W). Both
   concatenate a group's encoded fields and project them to D (``funnelrec.nn.SemanticTokenizer`` over x̂).

What is the paper's and what is ours:

* **Paper** ([SRC] in the method note): the per-field encoders to width e; the selection matrix W [n_g, n_f]; top-k
  of each row, softmax over the k selected weights, weighted + flattened → linear → token; gradients reach W through
  the softmax weights; the random / manual grouping ablations.
* **Ours**: the field encoders are one linear map per field (``field_hidden`` adds a GELU hidden layer, an MLP as in
  the paper's wording); fields of equal width share one batched matmul; the initialisation of W (a seeded random
  permutation dealt round-robin to the T groups gets +1, plus N(0, 0.01²) noise to break ties), so that at the
  start every field is in some group when ``T·k ≥ n_f`` and auto grouping starts exactly from the ``"random"``
  grouping of the same seed (auto = random + learning); the selected fields are flattened in field order (not in
  rank order), so the projection slot of a field changes only when the membership changes; ``group_size`` k
  defaults to ceil(n_f / T) (the smallest k that can cover every field); the selected features are weighted by
  k × softmax (uniform weights leave them unscaled, as in the fixed groupings; with plain softmax weights the
  tokens start k times smaller and learned clearly slower on the test world); the softmax ``temperature`` knob;
  the random groups are ``torch.tensor_split`` chunks of the permutation (sizes differ by at most one); the
  ``field_init="identity"`` switch (encoders start by passing each field through), a diagnostic.

Example:
    >>> import torch
    >>> fields = {"user_id": 4, "age": 1, "item_id": 4, "tab": 4, "hour": 4}
    >>> tok = AutoToken(fields, num_tokens=3, dim=8, field_dim=2)
    >>> tok(torch.randn(5, 17)).shape                    # [..., T, D]
    torch.Size([5, 3, 8])
    >>> tok.group_size, tuple(tok.selection.shape)        # k = ceil(5 / 3); W [T, n_f]
    (2, (3, 5))
    >>> tok.group_members()                               # the fields each token reads now
    [['user_id', 'hour'], ['age', 'tab'], ['item_id', 'tab']]
    >>> AutoToken(fields, 3, 8, grouping="random").selection is None
    True
    >>> manual = AutoToken(fields, 2, 8, grouping="manual", groups={"u": ["user_id", "age"],
    ...                                                             "i": ["item_id", "tab", "hour"]})
    >>> manual(torch.randn(5, 17)).shape, manual.group_members()
    (torch.Size([5, 2, 8]), [['user_id', 'age'], ['item_id', 'tab', 'hour']])
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from funnelrec.errors import ConfigError
from funnelrec.nn.embedding import take
from funnelrec.nn.experts import GroupedLinear
from funnelrec.nn.tokenizers import SemanticTokenizer, check_groups

GROUPINGS = ("auto", "random", "manual")
FIELD_INITS = ("default", "identity")


def random_groups(names: Sequence[str], num_tokens: int, seed: int = 0) -> dict[str, list[str]]:
    """T fixed random groups of ``names``: a seeded permutation cut into ``torch.tensor_split`` chunks (sizes differ
    by at most one; field order kept inside a group). Group names are ``"random_0"`` … .

    Example:
        >>> random_groups(["a", "b", "c", "d", "e"], 2, seed=0)
        {'random_0': ['a', 'b', 'e'], 'random_1': ['c', 'd']}
    """
    n = len(names)
    if not isinstance(num_tokens, int) or not 1 <= num_tokens <= n:
        raise ConfigError(f"random_groups needs 1 <= num_tokens <= {n} fields, got {num_tokens!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {f"random_{g}": [names[i] for i in sorted(chunk.tolist())]
            for g, chunk in enumerate(torch.tensor_split(perm, num_tokens))}


class FieldEncoders(nn.Module):
    """One small encoder per field: x [..., F] (fields laid out in order) → x̂ [..., n_f, e].

    Fields of equal width run as one ``GroupedLinear`` (a batched matmul per width).

    Args:
        fields: ordered mapping field name → width.
        out_dim: e.
        hidden: None for a linear encoder, else the hidden width of a ``Linear → GELU → Linear`` MLP per field.
        init: ``"default"`` (``GroupedLinear``'s random init) or ``"identity"`` (linear encoders only: a field of
            width w starts as x̂ = its first min(w, e) coordinates, zero-padded, with zero bias — with e equal to
            the embedding width every sparse field starts as its own embedding, as a plain tokenizer reads it).

    Example:
        >>> import torch
        >>> FieldEncoders({"a": 3, "b": 1, "c": 3}, out_dim=2)(torch.randn(4, 7)).shape
        torch.Size([4, 3, 2])
    """

    def __init__(self, fields: Mapping[str, int], out_dim: int, hidden: int | None = None, init: str = "default"):
        super().__init__()
        if init not in FIELD_INITS:
            raise ConfigError(f"FieldEncoders.init must be one of {FIELD_INITS}, got {init!r}")
        if init == "identity" and hidden is not None:
            raise ConfigError(f"FieldEncoders.init='identity' needs linear encoders (hidden=None), got hidden={hidden}")
        bad = [f"{k}={w!r}" for k, w in fields.items() if not isinstance(w, int) or isinstance(w, bool) or w < 1]
        if not fields or bad:
            raise ConfigError(f"FieldEncoders.fields must map names to widths >= 1, got {bad or dict(fields)!r}")
        for key, value in (("out_dim", out_dim), ("hidden", hidden)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"FieldEncoders.{key} must be an int >= 1, got {value!r}")
        self.names = list(fields)
        self.in_dim = sum(fields.values())
        self.out_dim = out_dim
        starts, offset = [], 0
        for w in fields.values():
            starts.append(offset)
            offset += w
        by_width: dict[int, list[int]] = {}
        for i, w in enumerate(fields.values()):
            by_width.setdefault(w, []).append(i)
        self.widths = list(by_width)
        self.first = nn.ModuleList()
        self.second = nn.ModuleList() if hidden is not None else None
        order = []
        for j, (w, idx) in enumerate(by_width.items()):
            cols = torch.tensor([starts[i] + c for i in idx for c in range(w)], dtype=torch.int64)
            self.register_buffer(f"cols_{j}", cols, persistent=False)
            self.first.append(GroupedLinear(len(idx), w, hidden or out_dim))
            if self.second is not None:
                self.second.append(GroupedLinear(len(idx), hidden, out_dim))
            order += idx
        if init == "identity":
            with torch.no_grad():
                for linear in self.first:
                    groups, width, out = linear.weight.shape
                    linear.weight.copy_(torch.eye(width, out).expand(groups, width, out))
                    linear.bias.zero_()
        # the encoders' outputs come width bucket by width bucket; this puts them back in field order
        self.register_buffer("field_order", torch.argsort(torch.tensor(order)), persistent=False)
        self.act = nn.GELU()

    @property
    def num_fields(self) -> int:
        """n_f."""
        return len(self.names)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., F] → [..., n_f, e]."""
        if x.shape[-1] != self.in_dim:
            raise ConfigError(f"FieldEncoders expects [..., {self.in_dim}] inputs, got {list(x.shape)}")
        parts = []
        for j, (w, first) in enumerate(zip(self.widths, self.first)):
            cols = getattr(self, f"cols_{j}")
            h = first(x.index_select(-1, cols).unflatten(-1, (cols.numel() // w, w)), grouped=True)
            if self.second is not None:
                h = self.second[j](self.act(h), grouped=True)
            parts.append(h)
        return torch.cat(parts, -2).index_select(-2, self.field_order)


class AutoToken(nn.Module):
    """Learned (or fixed random / manual) grouping of fields into T tokens of width D (see the module docstring).

    Args:
        fields: ordered mapping field name → width: the layout of the flat input x [..., F].
        num_tokens: T (n_g). With ``grouping="manual"`` it must equal ``len(groups)``.
        dim: D, the token width.
        field_dim: e, the width of every encoded field.
        group_size: k, the fields each token reads (``"auto"`` only); None means ceil(n_f / T).
        grouping: ``"auto"`` (learnable W), ``"random"`` (fixed seeded groups) or ``"manual"`` (``groups``).
        groups: token name → field names, a partition of ``fields`` (``"manual"`` only).
        seed: seed of the random permutation (``"random"`` groups, and the initial W of ``"auto"``).
        temperature: τ of the softmax over the k selected weights (``"auto"`` only).
        field_hidden: None for linear field encoders, else the hidden width of a per-field MLP.
        field_init: ``"default"`` or ``"identity"`` (see ``FieldEncoders``).

    ``forward(x)``: x [..., F] → tokens [..., T, D]. ``selection`` is W [T, n_f] (None unless ``"auto"``).

    Example:
        >>> import torch
        >>> tok = AutoToken({"a": 4, "b": 4, "c": 1, "d": 1}, num_tokens=2, dim=6, field_dim=3, group_size=3)
        >>> tok(torch.randn(2, 7, 10)).shape, tok.selection_weights()[1].shape   # indices and weights [T, k]
        (torch.Size([2, 7, 2, 6]), torch.Size([2, 3]))
    """

    def __init__(self, fields: Mapping[str, int], num_tokens: int, dim: int, field_dim: int = 8,
                 group_size: int | None = None, grouping: str = "auto",
                 groups: Mapping[str, Sequence[str]] | None = None, seed: int = 0, temperature: float = 1.0,
                 field_hidden: int | None = None, field_init: str = "default"):
        super().__init__()
        if grouping not in GROUPINGS:
            raise ConfigError(f"AutoToken.grouping must be one of {GROUPINGS}, got {grouping!r}")
        for key, value in (("num_tokens", num_tokens), ("dim", dim), ("field_dim", field_dim),
                           ("group_size", group_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"AutoToken.{key} must be an int >= 1, got {value!r}")
        if not temperature > 0:
            raise ConfigError(f"AutoToken.temperature must be > 0, got {temperature!r}")
        self.encoders = FieldEncoders(fields, field_dim, field_hidden, field_init)
        n_f, t = self.encoders.num_fields, num_tokens
        names = self.encoders.names
        if t > n_f:
            raise ConfigError(f"AutoToken.num_tokens ({t}) exceeds the {n_f} input fields")
        self.grouping, self.num_tokens, self.dim, self.temperature = grouping, t, dim, float(temperature)
        self.field_names = names
        self.selection: nn.Parameter | None = None
        self.tokenizer: SemanticTokenizer | None = None
        self.group_size = 0
        if grouping == "auto":
            k = group_size if group_size is not None else math.ceil(n_f / t)
            if k > n_f:
                raise ConfigError(f"AutoToken.group_size ({k}) exceeds the {n_f} input fields")
            self.group_size = k
            g = torch.Generator().manual_seed(seed)
            init = 0.01 * torch.randn(t, n_f, generator=g)
            # the same permutation and chunks as random_groups(seed): auto starts from the random grouping
            perm = torch.randperm(n_f, generator=g.manual_seed(seed))
            for gi, chunk in enumerate(torch.tensor_split(perm, t)):
                init[gi, chunk] += 1.0
            self.selection = nn.Parameter(init)
            self.proj = GroupedLinear(t, k * field_dim, dim)
        else:
            if grouping == "random":
                if groups is not None:
                    raise ConfigError("AutoToken.groups is only read with grouping='manual'")
                groups = random_groups(names, t, seed)
            elif groups is None:
                raise ConfigError("AutoToken.groups must be given with grouping='manual'")
            check_groups({n: field_dim for n in names}, groups, "AutoToken.groups")
            if len(groups) != t:
                raise ConfigError(f"AutoToken.num_tokens ({t}) must equal the number of groups ({len(groups)}) with "
                                  f"grouping='manual'")
            self.tokenizer = SemanticTokenizer({n: field_dim for n in names}, groups, dim)

    def selection_weights(self) -> tuple[Tensor, Tensor]:
        """``"auto"`` only: the selected field indices [T, k] (in field order) and their softmax weights [T, k]
        (the features are multiplied by k × these)."""
        if self.selection is None:
            raise ConfigError(f"AutoToken.selection_weights needs grouping='auto', got {self.grouping!r}")
        idx = torch.topk(self.selection, self.group_size, dim=-1).indices.sort(-1).values
        return idx, torch.softmax(self.selection.gather(-1, idx) / self.temperature, -1)

    def group_members(self) -> list[list[str]]:
        """The field names each token reads now (to log how stable the learned groups are)."""
        if self.tokenizer is not None:
            return [[self.field_names[int(c) // self.encoders.out_dim] for c in getattr(self.tokenizer, f"cols_{i}")
                     [:: self.encoders.out_dim]] for i in range(self.num_tokens)]
        idx, _ = self.selection_weights()
        return [[self.field_names[i] for i in row] for row in idx.tolist()]

    def forward(self, x: Tensor) -> Tensor:
        """x [..., F] → tokens [..., T, D]."""
        e = self.encoders(x)  # [..., n_f, e]
        if self.tokenizer is not None:
            return self.tokenizer(e.flatten(-2))
        idx, w = self.selection_weights()  # [T, k]
        picked = take(e, -2, idx)  # [..., T, k, e]
        return self.proj((picked * (w * self.group_size).unsqueeze(-1)).flatten(-2), grouped=True)
