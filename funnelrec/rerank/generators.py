"""List generators: K candidate lists of L items from a pool of M, for an evaluator to choose from.

The generator–evaluator split and the generator families (greedy by a point-wise score, beam search, MMR
diversity re-ranking, sampling, random swaps) follow the FlashEvaluator paper's setting ("MultG" = several
generators whose lists overlap, which is what makes encoding each pool item once pay off). The concrete
heuristics are ours:

* ``greedy`` — the top L by fused score, in score order (always list 0 when ``include_greedy``);
* ``beam`` — beam search on a hand-made list objective: Σ_pos γ^pos·z_item − β·(earlier items of the same
  primary tag + same creator), the top beams of width ``max(beam_width, n)``;
* ``mmr`` — maximal marginal relevance: repeatedly the item maximising z − α·max-similarity to the items
  already picked (similarity ½·same tag + ½·same creator), α spread over ``mmr_alpha``, z jittered by Gumbel
  noise so that lists with equal α differ;
* ``sample`` — Plackett–Luce samples of softmax(z / τ) (Gumbel top-L);
* ``swap`` — the greedy list with 1…``max_swaps`` random edits: two positions swapped, or one item replaced by
  a random pool item not in the list.

z is the fused score standardised over the request's real candidates; padding and duplicate candidates
(``pool.mask`` False) are never chosen, and no list holds an item twice (``tests/rerank/test_generators.py``).
Every function is vectorised over requests and lists; the only Python loops run over the L positions of a
list.

Example:
    >>> import torch
    >>> from funnelrec.rerank.data import RerankPool
    >>> b, m = 2, 12
    >>> pool = RerankPool(items=torch.arange(1, m + 1).repeat(b, 1), mask=torch.ones(b, m, dtype=torch.bool),
    ...                   pxtr=torch.rand(b, m, 7), score=torch.randn(b, m))
    >>> tags, creators = torch.randint(1, 4, (b, m)), torch.arange(1, m + 1).repeat(b, 1)
    >>> lists = generate_lists(pool, 10, tags, creators, GeneratorConfig(list_len=4), torch.Generator())
    >>> lists.shape                                             # [B, K, L] pool positions
    torch.Size([2, 10, 4])
    >>> bool((lists[:, 0] == pool.score.topk(4).indices).all())  # list 0 is greedy
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from funnelrec.errors import ConfigError, DataError
from funnelrec.rerank.data import RerankPool

__all__ = ["GeneratorConfig", "GENERATORS", "generate_lists", "allocate", "standardized_scores",
           "greedy_lists", "beam_lists", "mmr_lists", "sample_lists", "swap_lists"]

#: Generator families after the greedy list, in the order their lists appear.
GENERATORS = ("beam", "mmr", "sample", "swap")
NEG_INF = float("-inf")


@dataclass
class GeneratorConfig:
    """Settings of :func:`generate_lists`.

    Args:
        list_len: L.
        include_greedy: make list 0 the greedy list.
        shares: share of the other K − 1 lists per family (``beam``, ``mmr``, ``sample``, ``swap``).
        beam_width: minimum beam width (the width is ``max(beam_width, n)`` for n beam lists).
        beam_discount: γ, position discount of the beam objective.
        beam_repeat_penalty: β, penalty (in score std units) per earlier item of the same tag or creator.
        mmr_alpha: (low, high) range of the MMR diversity weights α.
        mmr_jitter: scale of the Gumbel jitter on z in MMR.
        sample_temperature: τ of the Plackett–Luce sampler (in score std units).
        max_swaps: most edits of a swap list.
    """

    list_len: int = 6
    include_greedy: bool = True
    shares: dict[str, float] = field(default_factory=lambda: {"beam": 0.15, "mmr": 0.2, "sample": 0.35,
                                                             "swap": 0.3})
    beam_width: int = 8
    beam_discount: float = 0.9
    beam_repeat_penalty: float = 0.5
    mmr_alpha: tuple[float, float] = (0.25, 2.0)
    mmr_jitter: float = 0.3
    sample_temperature: float = 0.7
    max_swaps: int = 2

    def validate(self) -> "GeneratorConfig":
        """Raise ``ConfigError`` naming the bad field."""
        checks = [("list_len", self.list_len, isinstance(self.list_len, int) and self.list_len >= 1),
                  ("beam_width", self.beam_width, isinstance(self.beam_width, int) and self.beam_width >= 1),
                  ("beam_discount", self.beam_discount, 0 < self.beam_discount <= 1),
                  ("beam_repeat_penalty", self.beam_repeat_penalty, self.beam_repeat_penalty >= 0),
                  ("mmr_alpha", self.mmr_alpha, len(self.mmr_alpha) == 2 and 0 <= self.mmr_alpha[0]
                   <= self.mmr_alpha[1]),
                  ("mmr_jitter", self.mmr_jitter, self.mmr_jitter >= 0),
                  ("sample_temperature", self.sample_temperature, self.sample_temperature > 0),
                  ("max_swaps", self.max_swaps, isinstance(self.max_swaps, int) and self.max_swaps >= 1)]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"generator config: {name}={value!r} is out of range")
        unknown = set(self.shares) - set(GENERATORS)
        if unknown:
            raise ConfigError(f"generator config: unknown generator {sorted(unknown)[0]!r} in shares; choose "
                              f"from {', '.join(GENERATORS)}")
        if any(v < 0 for v in self.shares.values()) or not sum(self.shares.values()) > 0:
            raise ConfigError(f"generator config: shares={self.shares!r} must be >= 0 with a positive sum")
        return self


def allocate(k: int, config: GeneratorConfig) -> dict[str, int]:
    """How many of the K lists each family makes (largest remainders; ``greedy`` first).

    Example:
        >>> allocate(11, GeneratorConfig())
        {'greedy': 1, 'beam': 2, 'mmr': 2, 'sample': 3, 'swap': 3}
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"number of lists K must be a positive integer, got {k!r}")
    counts = {"greedy": 1 if config.include_greedy else 0}
    rest = k - counts["greedy"]
    total = sum(config.shares.get(g, 0.0) for g in GENERATORS)
    exact = {g: rest * config.shares.get(g, 0.0) / total for g in GENERATORS}
    base = {g: int(exact[g]) for g in GENERATORS}
    left = rest - sum(base.values())
    order = sorted(GENERATORS, key=lambda g: (-(exact[g] - base[g]), GENERATORS.index(g)))
    for g in order[:left]:
        base[g] += 1
    counts.update(base)
    return counts


def standardized_scores(score: Tensor, mask: Tensor) -> Tensor:
    """[B, M] the score standardised over each request's real candidates; ``-inf`` at the others."""
    m = mask.float()
    n = m.sum(1, keepdim=True).clamp(min=1)
    s = torch.where(mask, score, 0.0)
    mean = s.sum(1, keepdim=True) / n
    var = (torch.where(mask, score - mean, 0.0) ** 2).sum(1, keepdim=True) / n
    z = (score - mean) / var.sqrt().clamp(min=1e-6)
    return z.masked_fill(~mask, NEG_INF)


def _gumbel(shape, g: torch.Generator) -> Tensor:
    u = torch.rand(shape, generator=g).clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


def greedy_lists(z: Tensor, length: int) -> Tensor:
    """[B, 1, L] the top L candidates by ``z`` ([B, M], ``-inf`` at invalid ones), best first."""
    return z.topk(length, dim=1).indices.unsqueeze(1)


def sample_lists(z: Tensor, n: int, length: int, temperature: float, g: torch.Generator) -> Tensor:
    """[B, n, L] Plackett–Luce samples of softmax(z / τ) (Gumbel top-L; invalid candidates never drawn)."""
    b, m = z.shape
    keys = z.unsqueeze(1) / temperature + _gumbel((b, n, m), g)
    return keys.topk(length, dim=2).indices


def _similarity(tags: Tensor, creators: Tensor) -> Tensor:
    """[B, M, M] ½·same tag + ½·same creator."""
    return 0.5 * (tags.unsqueeze(2) == tags.unsqueeze(1)).float() + \
        0.5 * (creators.unsqueeze(2) == creators.unsqueeze(1)).float()


def mmr_lists(z: Tensor, tags: Tensor, creators: Tensor, n: int, length: int, alpha: tuple[float, float],
              jitter: float, g: torch.Generator) -> Tensor:
    """[B, n, L] MMR lists: step by step the item maximising z − α·max-similarity to the picked ones.

    Args:
        z: [B, M] standardised scores (``-inf`` at invalid candidates).
        tags, creators: [B, M] int64 tag and creator ids of the candidates.
        n: lists per request; their α are spread evenly over ``alpha``.
        jitter: scale of the Gumbel noise added to z (per list).
    """
    b, m = z.shape
    sim = _similarity(tags, creators)
    a = torch.linspace(alpha[0], alpha[1], n) if n > 1 else torch.tensor([sum(alpha) / 2])
    zz = z.unsqueeze(1) + jitter * _gumbel((b, n, m), g)
    used = torch.zeros(b, n, m, dtype=torch.bool)
    maxsim = torch.zeros(b, n, m)
    picks = []
    for _ in range(length):  # over list positions only; vectorised over requests and lists
        val = (zz - a.view(1, n, 1) * maxsim).masked_fill(used, NEG_INF)
        pick = val.argmax(-1)  # [B, n]
        picks.append(pick)
        used.scatter_(2, pick.unsqueeze(-1), True)
        maxsim = torch.maximum(maxsim, sim.gather(1, pick.unsqueeze(-1).expand(b, n, m)))
    return torch.stack(picks, -1)


def beam_lists(z: Tensor, tags: Tensor, creators: Tensor, n: int, length: int, width: int, discount: float,
               penalty: float) -> Tensor:
    """[B, n, L] the best n beams of a beam search on Σ_pos γ^pos·z − β·(earlier same tag/creator items).

    Args:
        z: [B, M] standardised scores (``-inf`` at invalid candidates).
        tags, creators: [B, M] int64.
        n: lists per request.
        width: minimum beam width (the width is ``max(width, n)``, capped by the fewest real candidates).
        discount: γ.  penalty: β.
    """
    b, m = z.shape
    n_valid = int(torch.isfinite(z).sum(1).min())
    w = max(1, min(max(width, n), n_valid))
    same = (tags.unsqueeze(2) == tags.unsqueeze(1)).float() + \
        (creators.unsqueeze(2) == creators.unsqueeze(1)).float()
    score = torch.full((b, w), NEG_INF)
    score[:, 0] = 0.0
    beams = torch.zeros(b, w, 0, dtype=torch.int64)
    used = torch.zeros(b, w, m, dtype=torch.bool)
    repeats = torch.zeros(b, w, m)  # per beam and candidate: earlier items of the same tag / creator
    for t in range(length):  # over list positions only
        gain = (discount ** t) * z.unsqueeze(1) - penalty * repeats
        total = (score.unsqueeze(2) + gain).masked_fill(used, NEG_INF)
        top = total.view(b, w * m).topk(w, dim=1)
        src, item = top.indices // m, top.indices % m
        score = top.values
        beams = torch.cat([beams.gather(1, src.unsqueeze(-1).expand(b, w, t)), item.unsqueeze(-1)], 2)
        used = used.gather(1, src.unsqueeze(-1).expand(b, w, m)).scatter(2, item.unsqueeze(-1), True)
        repeats = repeats.gather(1, src.unsqueeze(-1).expand(b, w, m)) + \
            same.gather(1, item.unsqueeze(-1).expand(b, w, m))
    return beams[:, torch.arange(n) % w]


def swap_lists(base: Tensor, mask: Tensor, n: int, max_swaps: int, g: torch.Generator) -> Tensor:
    """[B, n, L] copies of ``base`` ([B, L]) with 1…``max_swaps`` random edits each.

    The first edit is always made, each further one with probability ½. An edit swaps two positions
    (probability ½, when L ≥ 2) or replaces one position by a uniformly drawn real pool candidate not in the
    list.

    Args:
        base: [B, L] pool positions.
        mask: [B, M] real candidates.
    """
    b, length = base.shape
    m = mask.shape[1]
    lists = base.unsqueeze(1).expand(b, n, length).clone()
    for s in range(max_swaps):  # over edits only
        active = torch.ones(b, n, dtype=torch.bool) if s == 0 else torch.rand(b, n, generator=g) < 0.5
        swap = (torch.rand(b, n, generator=g) < 0.5) & (length >= 2)
        i = torch.randint(0, length, (b, n, 1), generator=g)
        j = torch.randint(0, max(1, length - 1), (b, n, 1), generator=g)
        j = j + (j >= i).long() if length >= 2 else i
        li, lj = lists.gather(2, i), lists.gather(2, j)
        swapped = lists.scatter(2, i, lj).scatter(2, j, li)
        inlist = torch.zeros(b, n, m, dtype=torch.bool).scatter(2, lists, True)
        free = mask.unsqueeze(1) & ~inlist
        new = torch.rand(b, n, m, generator=g).masked_fill(~free, -1.0).argmax(-1, keepdim=True)
        replaced = lists.scatter(2, i, new)
        can_replace = free.any(-1)
        edit = torch.where((active & swap).unsqueeze(-1), swapped,
                           torch.where((active & ~swap & can_replace).unsqueeze(-1), replaced, lists))
        lists = edit
    return lists


def generate_lists(pool: RerankPool, k: int, tags: Tensor, creators: Tensor,
                   config: GeneratorConfig | None = None, generator: torch.Generator | None = None) -> Tensor:
    """K candidate lists per request from every generator family (see the module docstring).

    Args:
        pool: the pool (its ``score`` drives every generator; ``mask`` marks real candidates).
        k: K, lists per request.
        tags: [B, M] int64 primary tag of each candidate (e.g. ``ItemFeatures.lookup(pool.items)[..., 0]``).
        creators: [B, M] int64 creator (bucket) of each candidate.
        config: the generator settings.
        generator: random stream (default: a fresh one seeded 0).

    Returns:
        [B, K, L] int64 pool positions; lists of a family are contiguous, in the order greedy, beam, mmr,
        sample, swap (:func:`allocate` gives the counts).
    """
    cfg = (config or GeneratorConfig()).validate()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    length = cfg.list_len
    pool.validate(min_valid=length)
    b, m = pool.items.shape
    for name, t in (("tags", tags), ("creators", creators)):
        if not isinstance(t, Tensor) or t.shape != (b, m):
            raise DataError(f"expected [{b}, {m}], got {list(getattr(t, 'shape', []))}", column=name)
    counts = allocate(k, cfg)
    z = standardized_scores(pool.score.float(), pool.mask)
    greedy = greedy_lists(z, length)
    parts = [greedy] if counts["greedy"] else []
    if counts["beam"]:
        parts.append(beam_lists(z, tags, creators, counts["beam"], length, cfg.beam_width, cfg.beam_discount,
                                cfg.beam_repeat_penalty))
    if counts["mmr"]:
        parts.append(mmr_lists(z, tags, creators, counts["mmr"], length, cfg.mmr_alpha, cfg.mmr_jitter, g))
    if counts["sample"]:
        parts.append(sample_lists(z, counts["sample"], length, cfg.sample_temperature, g))
    if counts["swap"]:
        parts.append(swap_lists(greedy[:, 0], pool.mask, counts["swap"], cfg.max_swaps, g))
    return torch.cat(parts, 1)
