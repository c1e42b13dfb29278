"""``funnelrec bench rerank``: generator–evaluator re-ranking — list value, Hit@1 and forward time against K.

Every request (a user of the world with a pool of 60 candidates, noisy per-task predictions and a fused score,
:mod:`funnelrec.rerank.data`) gets K candidate lists of 6 items from the generators (greedy, beam, MMR,
sampling,
random swaps: :mod:`funnelrec.rerank.generators`); each method picks one. Under the oracle's expected list
value V (never seen in training):

* **regret-normalised value** = Σ_requests (V_chosen − V̄) / Σ_requests (V_best − V̄), V̄ the mean over the K
  lists: 0 = a random pick among the K, 1 = always the best (summed before dividing, so requests whose lists
  are all alike do not blow up the figure);
* **Hit@1** = share of requests whose chosen list has the best value (ties count).

Rows: ``greedy`` (the top 6 by fused score; list 0), ``independent_pointwise`` / ``independent_listwise`` (the
PIER-like evaluator, MSE / listwise softmax CE), ``flash`` / ``flash_pointwise`` (FlashEvaluator with the
paper's listwise softmax CE / the MSE option), ``flash_no_cross_list`` (without cross-list attention, listwise), ``item_sum`` (ours: the list-blind control, Σ of learned item values, same data and
loss), ``greedy_learned`` (ours: the top 6 by item_sum's learned item values — greedy with a learned
point-wise score; its list need not be one of the K, so its value may exceed 1) and ``oracle`` (the best of
the K; 1 by definition).

Protocol per seed: users split into training, validation (``valid_users``) and test (``test_users``) users;
the evaluators train on ``train_requests`` requests of training users with ``k_train`` lists each, every
list's target being **one simulated showing** of it (the world's sampled response,
:meth:`RerankData.outcomes`); early stopping on the validation loss (validation users' requests and outcomes);
then one request per test user is scored for every K in ``ks`` (lists generated afresh for each K). Mean ± std
over seeds of the per-seed figures.

**The claim** (``flash_minus_independent`` ≥ 0, mean over K and seeds, paired per seed): each family —
FlashEvaluator {listwise, pointwise} and the independent evaluator {pointwise, listwise} — is represented by
its loss with the higher **validation value** (regret-normalised value at K = 50 on fresh requests of the
validation users, mean over seeds; ``*.valid_value``); the test users never pick anything. Both variants'
differences are reported (``flash_listwise_minus_independent``, ``flash_pointwise_minus_independent``).

**Switch test.** The same protocol in the world with its list effects off (``lists.cascade_enabled=false``,
``lists.saturation_enabled=false``, ``lists.similarity_enabled=false``: a list's value is then the sum of its
items' values) for the rows greedy, item_sum, greedy_learned, independent_listwise, flash, flash_pointwise and
oracle. The
evaluators' edge over greedy-by-fused-score does *not* vanish there — part of it is a better item-level value
estimate (the evaluators denoise the ranker's noisy predictions and read the user's history), which no list
effect causes; so the benchmark reports that edge as measured and puts the target on the **list edge**: an
evaluator's value minus the list-blind item_sum's (mean over K and seeds), which must vanish:
``switch_off.list_edge_share`` = the largest, over flash, flash_pointwise and independent_listwise, of (list
edge with effects off) ÷ (list edge with effects on), target ≤ 0.25. ``evaluators_beating_item_sum`` counts the evaluators whose
paired per-seed difference exceeds 2 std, in each world.

**Timing.** Forward time per request of flash, flash_no_cross_list and independent_listwise on the same batch
of ``timing_batch`` test requests (their real histories, padded to the longest), one torch thread,
``inference_mode``, for every K; the methods alternate within each K and each figure is the minimum over
``timing_rounds`` × ``timing_repeats`` calls (robust on a shared machine). ``time_ratio_k50`` = flash ÷
independent at K = 50; the growth exponent is the least-squares slope of log time against log K.

Sizing (:data:`FULL_PLAN`): ``sim:bench-v1``, 3 seeds × (6,000 training requests × 20 lists, 1,000 validation
requests, 2,000 test requests × K ∈ {5, 10, 20, 50, 100}) for 5 trained models, and 3 switch-test seeds of 3
trained models. A trial of 1 seed + 1 switch-test seed took 10.6 min on one torch thread while other jobs kept
the 2 cores at a load of ~5; the full run is about 3× that (~30 min under such load, less on an idle machine).
``--quick`` runs a 200-user world with tiny sizes in ~15 s and writes nothing.

Example:
    funnelrec bench rerank --json
    funnelrec bench rerank --quick --json
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from funnelrec.bench.harness import BenchResult, Target, beats, fix_threads, mean_std, register_benchmark, time_it
from funnelrec.errors import ConfigError
from funnelrec.rerank.data import (VALUE_WEIGHTS, RerankData, RerankDataConfig, RerankRequests,
                                   split_request_users)
from funnelrec.rerank.flash_evaluator import FlashEvaluator
from funnelrec.rerank.generators import GeneratorConfig, generate_lists
from funnelrec.rerank.independent import IndependentEvaluator
from funnelrec.rerank.item_sum import ItemSumEvaluator
from funnelrec.rerank.layers import EvaluatorConfig
from funnelrec.rerank.training import ListData, RewardScale, TrainConfig, train_evaluator

__all__ = ["RerankPlan", "FULL_PLAN", "QUICK_PLAN", "ROWS", "MODELS", "SWITCH_ROWS", "SWITCH_OFF",
           "bench_rerank", "run_seed", "regret_normalised", "growth_exponent"]

#: Trained rows: name → (evaluator class, config overrides).
MODELS = {
    "independent_pointwise": (IndependentEvaluator, {"loss": "pointwise"}),
    "independent_listwise": (IndependentEvaluator, {"loss": "listwise"}),
    "flash": (FlashEvaluator, {"loss": "listwise"}),
    "flash_pointwise": (FlashEvaluator, {"loss": "pointwise"}),
    "flash_no_cross_list": (FlashEvaluator, {"loss": "listwise", "cross_list": False}),
    "item_sum": (ItemSumEvaluator, {"loss": "listwise"}),
}
ROWS = ("greedy", "greedy_learned", "item_sum", "independent_pointwise", "independent_listwise", "flash",
        "flash_pointwise", "flash_no_cross_list", "oracle")
SWITCH_ROWS = ("greedy", "greedy_learned", "item_sum", "independent_listwise", "flash", "flash_pointwise",
               "oracle")
#: The list evaluators whose edge the switch test checks.
LIST_EVALUATORS = ("independent_listwise", "flash", "flash_pointwise")
#: The two families of the main claim; each is represented by its variant with the best validation value.
INDEPENDENT = ("independent_pointwise", "independent_listwise")
FLASH = ("flash", "flash_pointwise")
#: Figure-name stems of the FlashEvaluator variants in ``*_minus_independent``.
_VARIANT_KEYS = {"flash": "flash_listwise", "flash_pointwise": "flash_pointwise"}
#: World overrides that switch every list effect off.
SWITCH_OFF = ("lists.cascade_enabled=false", "lists.saturation_enabled=false",
              "lists.similarity_enabled=false")
TIMED = ("flash", "flash_no_cross_list", "independent_listwise")

_LABELS = {"greedy": "greedy by fused score", "greedy_learned": "greedy by learned item value (ours)",
           "item_sum": "item-sum, list-blind (ours)",
           "independent_pointwise": "independent (PIER-like), pointwise",
           "independent_listwise": "independent (PIER-like), listwise", "flash": "FlashEvaluator",
           "flash_pointwise": "FlashEvaluator, pointwise (MSE)",
           "flash_no_cross_list": "FlashEvaluator w/o cross-list attention", "oracle": "oracle (best of K)"}


@dataclass
class RerankPlan:
    """Sizes of a re-ranking benchmark run.

    Args:
        data: the data source (``sim:PROFILE[?k=v]``: a simulated world and its log, the users' histories).
        seeds: seeds.
        switch_seeds: seeds of the switch test (list effects off).
        valid_users, test_users: users held out per seed for validation and test.
        train_requests: training requests per seed (users drawn with replacement from the training users).
        valid_requests: validation requests.
        test_requests: test requests (one per test user, at most ``test_users``).
        k_train: K of the training requests.
        ks: the K of the evaluation (and timing).
        outcome_draws: simulated showings averaged into one training target (1 = a single logged outcome).
        data_config: pool size, history length, prediction noise.
        generator: generator settings.
        dim, heads: evaluator width and heads.
        train: training settings (its ``seed`` is replaced per seed).
        eval_chunk: list occurrences (requests × K) per scoring call.
        timing_batch: requests per timed forward.
        timing_rounds, timing_repeats: timing rounds (methods alternate) × timed calls per method and round.
    """

    data: str = "sim:bench-v1"
    seeds: int = 3
    switch_seeds: int = 3
    valid_users: int = 1500
    test_users: int = 2000
    train_requests: int = 6000
    valid_requests: int = 1000
    test_requests: int = 2000
    k_train: int = 20
    ks: tuple[int, ...] = (5, 10, 20, 50, 100)
    outcome_draws: int = 1
    data_config: RerankDataConfig = field(default_factory=RerankDataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    dim: int = 32
    heads: int = 2
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=64, lr=3e-3,
                                                                   patience=2))
    eval_chunk: int = 20_000
    timing_batch: int = 32
    timing_rounds: int = 5
    timing_repeats: int = 5

    def validate(self) -> "RerankPlan":
        """Raise ``ConfigError`` naming the bad field; returns self."""
        ints = {"seeds": 1, "switch_seeds": 0, "valid_users": 1, "test_users": 1, "train_requests": 1,
                "valid_requests": 1, "test_requests": 1, "k_train": 1, "outcome_draws": 1, "dim": 1,
                "heads": 1, "eval_chunk": 1, "timing_batch": 1, "timing_rounds": 1, "timing_repeats": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"rerank plan: {name}={v!r} must be an integer >= {low}")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"rerank plan: ks={self.ks!r} must be positive integers")
        if self.test_requests > self.test_users:
            raise ConfigError(f"rerank plan: test_requests={self.test_requests} exceeds test_users="
                              f"{self.test_users} (one request per test user)")
        return self


FULL_PLAN = RerankPlan()
QUICK_PLAN = RerankPlan(data="sim:small?num_users=200&days=4", seeds=1, switch_seeds=1, valid_users=30,
                        test_users=40, train_requests=160, valid_requests=40, test_requests=40, k_train=8,
                        ks=(5, 10, 20), data_config=RerankDataConfig(pool_size=40, history_len=200), dim=16,
                        train=TrainConfig(epochs=1, batch_size=40, lr=3e-3), eval_chunk=4000, timing_batch=8,
                        timing_rounds=1, timing_repeats=2)


# ------------------------------------------------------------------------------------------------ metrics


def regret_normalised(values: Tensor, chosen: Tensor) -> tuple[float, float]:
    """Regret-normalised value and Hit@1 of the chosen values.

    Args:
        values: [B, K] the oracle's value of every candidate list.
        chosen: [B] the oracle's value of each request's chosen list.

    Returns:
        ``(Σ (chosen − mean) / Σ (best − mean), share of requests with chosen ≥ best)`` (ties count as hits).

    Example:
        >>> values = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0]])
        >>> v, hit = regret_normalised(values, torch.tensor([2.0, 4.0]))
        >>> round(v, 4), hit                      # (0 + 2) / (1 + 2); the second request hits
        (0.6667, 0.5)
    """
    best = values.max(1).values
    mean = values.mean(1)
    gap = float((best - mean).double().sum())
    value = float((chosen - mean).double().sum()) / gap if gap > 0 else math.nan
    tol = 1e-5 * best.abs().clamp(min=1.0)
    return value, float((chosen >= best - tol).float().mean())


def _k_ref(plan: "RerankPlan") -> int:
    """The K of the headline figures (50 when evaluated, else the largest K)."""
    return 50 if 50 in plan.ks else plan.ks[-1]


def growth_exponent(ks, times) -> float:
    """Least-squares slope of log time against log K (1 = linear growth; < 1 sublinear).

    Example:
        >>> round(growth_exponent([1, 2, 4], [3.0, 6.0, 12.0]), 6)
        1.0
    """
    x = torch.tensor([math.log(k) for k in ks], dtype=torch.float64)
    y = torch.tensor([math.log(t) for t in times], dtype=torch.float64)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


# ----------------------------------------------------------------------------------------------- one seed


def _lists(data: RerankData, req: RerankRequests, k: int, plan: RerankPlan, seed: int) -> Tensor:
    side = data.features.lookup(req.pool.items)
    return generate_lists(req.pool, k, side[..., 0], side[..., 1], plan.generator,
                          torch.Generator().manual_seed(seed))


def _draw_users(users: Tensor, n: int, seed: int) -> Tensor:
    return users[torch.randint(0, users.numel(), (n,), generator=torch.Generator().manual_seed(seed))]


def _list_data(data: RerankData, users: Tensor, plan: RerankPlan, seed: int) -> ListData:
    req = data.requests(users, seed=seed)
    lists = _lists(data, req, plan.k_train, plan, seed + 1)
    rewards = data.outcomes(req, lists, torch.Generator().manual_seed(seed + 2), draws=plan.outcome_draws)
    return ListData(req, lists, rewards)


def _scores(model, req: RerankRequests, lists: Tensor, chunk: int) -> Tensor:
    """[B, K] scores in chunks of requests (inference mode)."""
    b, k, _ = lists.shape
    step = max(1, chunk // k)
    out = []
    model.eval()
    with torch.inference_mode():
        for lo in range(0, b, step):
            idx = torch.arange(lo, min(lo + step, b))
            sub = req.select(idx)
            out.append(model(sub.batch, sub.pool, lists[idx]))
    return torch.cat(out)


def _learned_greedy(model: ItemSumEvaluator, req: RerankRequests, length: int, chunk: int) -> Tensor:
    """[B, 1, L] the top L pool positions by the item-sum model's learned item values."""
    out = []
    step = max(1, chunk // req.pool.num_candidates)
    with torch.inference_mode():
        for lo in range(0, len(req), step):
            sub = req.select(torch.arange(lo, min(lo + step, len(req))))
            v = model.item_values(sub.batch, sub.pool).masked_fill(~sub.pool.mask, float("-inf"))
            out.append(v.topk(length, dim=1).indices)
    return torch.cat(out).unsqueeze(1)


def run_seed(data: RerankData, plan: RerankPlan, seed: int, rows=ROWS, progress: bool = False) -> dict:
    """Train the models of ``rows`` and evaluate every row at every K for one seed.

    Returns:
        ``{"rows": {row: {K: (value, hit1)}}, "models": {name: model}, "test": RerankRequests, "train_s":
        {...}, "epochs": {...}}``.
    """
    def log(msg):
        if progress:
            print(f"  seed {seed}: {msg}", file=sys.stderr, flush=True)

    n_users = data.world.population.num_users
    train_u, valid_u, test_u = split_request_users(n_users, plan.valid_users, plan.test_users, seed)
    base = 100_000 * (seed + 1)
    train = _list_data(data, _draw_users(train_u, plan.train_requests, base + 1), plan, base + 10)
    valid = _list_data(data, _draw_users(valid_u, plan.valid_requests, base + 2), plan, base + 20)
    scale = RewardScale.fit(train.rewards)
    test = data.requests(test_u[: plan.test_requests], seed=base + 30)
    test_lists = {k: _lists(data, test, k, plan, base + 40 + k) for k in plan.ks}
    values = {k: data.oracle_values(test, test_lists[k]) for k in plan.ks}
    out: dict = {"rows": {}, "models": {}, "test": test, "train_s": {}, "epochs": {}}
    k_ref = _k_ref(plan)
    # Fresh requests of the validation users (other draws than the early-stopping ones): the validation value
    # that picks each family's loss; the test users are never looked at for a choice.
    vreq = data.requests(valid_u[: plan.valid_requests], seed=base + 50)
    vlists = _lists(data, vreq, k_ref, plan, base + 51)
    vvalues = data.oracle_values(vreq, vlists)
    out["valid_value"] = {}
    tcfg = dataclasses.replace(plan.train, seed=seed)
    for name in rows:
        if name not in MODELS:
            continue
        cls, kw = MODELS[name]
        cfg = EvaluatorConfig.for_features(data.features, dim=plan.dim, heads=plan.heads, seed=seed, **kw)
        model = cls(cfg, data.features.table)
        res = train_evaluator(model, train, valid, tcfg, scale=scale, log=(lambda s, n=name: log(f"{n} {s}")))
        out["models"][name], out["train_s"][name], out["epochs"][name] = model, res.wall_s, res.best_epoch
        s = _scores(model, vreq, vlists, plan.eval_chunk)
        out["valid_value"][name] = regret_normalised(vvalues, vvalues.gather(1, s.argmax(1, keepdim=True))
                                                     .squeeze(1))[0]
        log(f"{name}: trained in {res.wall_s:.0f} s (best epoch {res.best_epoch}), validation value "
            f"K={k_ref} {out['valid_value'][name]:.3f}")
    learned = None
    if "greedy_learned" in rows:
        lst = _learned_greedy(out["models"]["item_sum"], test, plan.generator.list_len, plan.eval_chunk)
        learned = data.oracle_values(test, lst)[:, 0]
    for name in rows:
        per_k = {}
        for k in plan.ks:
            v = values[k]
            if name == "greedy":
                chosen = v[:, 0]
            elif name == "oracle":
                chosen = v.max(1).values
            elif name == "greedy_learned":
                chosen = learned
            else:
                s = _scores(out["models"][name], test, test_lists[k], plan.eval_chunk)
                chosen = v.gather(1, s.argmax(1, keepdim=True)).squeeze(1)
            per_k[k] = regret_normalised(v, chosen) + (float(chosen.mean()),)
        out["rows"][name] = per_k
        log(f"{name}: " + ", ".join(f"K={k} {per_k[k][0]:.3f}" for k in plan.ks))
    out["list_value_mean"] = {k: float(values[k].mean()) for k in plan.ks}
    out["list_value_best"] = {k: float(values[k].max(1).values.mean()) for k in plan.ks}
    return out


# ---------------------------------------------------------------------------------------------- timing


def time_forward(models: dict, data: RerankData, req: RerankRequests, plan: RerankPlan,
                 seed: int = 0) -> dict:
    """Forward time per request (ms) of every model at every K on the same batch: ``{name: {K: ms}}``."""
    sub = req.select(torch.arange(min(plan.timing_batch, len(req))))
    b = len(sub)
    out: dict = {name: {} for name in models}
    all_lists = {k: _lists(data, sub, k, plan, seed + k) for k in plan.ks}
    with torch.inference_mode():  # one untimed pass over every shape first (allocator and kernel warm-up)
        for k in plan.ks:
            for m in models.values():
                m.eval()(sub.batch, sub.pool, all_lists[k])
    for k in plan.ks:
        lists = all_lists[k]
        best = {name: math.inf for name in models}
        with torch.inference_mode():
            for r in range(plan.timing_rounds):  # methods alternate, so a load spike hits them alike
                order = list(models) if r % 2 == 0 else list(models)[::-1]
                for name in order:
                    m = models[name].eval()
                    t = time_it(lambda m=m, lists=lists: m(sub.batch, sub.pool, lists),
                                repeats=plan.timing_repeats, warmup=2)
                    best[name] = min(best[name], t["min_s"])
        for name in models:
            out[name][k] = 1000.0 * best[name] / b
    return out


# ------------------------------------------------------------------------------------------------ figures


def _share(off: float | None, on: float | None) -> float:
    """off / on for a positive on-world edge; NaN otherwise (no edge to vanish: the target cannot be met)."""
    if off is None or on is None or not on > 0:
        return math.nan
    return off / on


def _row_mean_over_k(run: dict, row: str, ks) -> float:
    return sum(run["rows"][row][k][0] for k in ks) / len(ks)


def derived_figures(runs: list[dict], switch_runs: list[dict], plan: RerankPlan) -> dict:
    """Every flat figure from the per-seed runs (see the module docstring)."""
    res: dict = {}
    ks = plan.ks
    k_ref = _k_ref(plan)

    def block(rs: list[dict], prefix: str) -> None:
        rows = [r for r in ROWS if all(r in run["rows"] for run in rs)]
        for row in rows:
            for k in ks:
                for j, what in enumerate(("value", "hit1", "list_value_s")):
                    m, s = mean_std([run["rows"][row][k][j] for run in rs])
                    res[f"{prefix}{row}.k{k}.{what}"], res[f"{prefix}{row}.k{k}.{what}.std"] = m, s
            res[f"{prefix}{row}.value"] = mean_std([_row_mean_over_k(run, row, ks) for run in rs])[0]
        for k in ks:
            res[f"{prefix}lists.k{k}.mean_value_s"] = mean_std([run["list_value_mean"][k] for run in rs])[0]
            res[f"{prefix}lists.k{k}.best_value_s"] = mean_std([run["list_value_best"][k] for run in rs])[0]
        if "flash" in rows and "greedy" in rows:
            edge = res[f"{prefix}flash.value"] - res[f"{prefix}greedy.value"]
            res[f"{prefix}flash_edge_over_greedy"] = edge
        if "item_sum" in rows:
            beating = 0
            for row in LIST_EVALUATORS:
                if row in rows:
                    a = [_row_mean_over_k(run, row, ks) for run in rs]
                    b = [_row_mean_over_k(run, "item_sum", ks) for run in rs]
                    res[f"{prefix}{row}_list_edge"] = mean_std([x - y for x, y in zip(a, b)])[0]
                    beating += beats(a, b)
            res[f"{prefix}evaluators_beating_item_sum"] = beating

    block(runs, "")
    for name in MODELS:
        vals = [run["valid_value"][name] for run in runs if name in run.get("valid_value", {})]
        if vals:
            res[f"{name}.valid_value"] = mean_std(vals)[0]

    def selected(family) -> str | None:
        present = [r for r in family if f"{r}.value" in res and f"{r}.valid_value" in res]
        return max(present, key=lambda r: res[f"{r}.valid_value"]) if present else None

    flash, best = selected(FLASH), selected(INDEPENDENT)
    if flash and best:
        res["selected_flash"], res["best_independent"] = flash, best

        for variant in FLASH:
            if f"{variant}.value" not in res:
                continue
            names = [_VARIANT_KEYS[variant]] + (["flash"] if variant == flash else [])
            diffs = [_row_mean_over_k(run, variant, ks) - _row_mean_over_k(run, best, ks) for run in runs]
            at_k = mean_std([run["rows"][variant][k_ref][0] - run["rows"][best][k_ref][0] for run in runs])[0]
            for name in names:
                res[f"{name}_minus_independent"], res[f"{name}_minus_independent.std"] = mean_std(diffs)
                res[f"{name}_minus_independent_k{k_ref}"] = at_k
        if "flash_no_cross_list.value" in res:
            res["flash_minus_no_cross_list"] = mean_std(
                [_row_mean_over_k(run, "flash", ks) - _row_mean_over_k(run, "flash_no_cross_list", ks)
                 for run in runs])[0]
    if switch_runs:
        block(switch_runs, "switch_off.")
        if "flash_edge_over_greedy" in res and "switch_off.flash_edge_over_greedy" in res:
            res["switch_off.flash_edge_share"] = _share(res["switch_off.flash_edge_over_greedy"],
                                                        res["flash_edge_over_greedy"])
        shares = [_share(res.get(f"switch_off.{r}_list_edge"), res.get(f"{r}_list_edge"))
                  for r in LIST_EVALUATORS]
        res["switch_off.list_edge_share"] = (math.nan if not shares or any(math.isnan(x) for x in shares)
                                             else max(shares))
    for name in TIMED:
        for k in ks:
            res[f"{name}.time_ms.k{k}"] = mean_std([run["timing"][name][k] for run in runs
                                                     if "timing" in run])[0]
    timed = [run for run in runs if "timing" in run]
    if timed:
        t = timed[0]["timing"]
        res[f"time_ratio_k{k_ref}"] = t["flash"][k_ref] / t["independent_listwise"][k_ref]
        for name in TIMED:
            res[f"{name}.time_growth_exponent"] = growth_exponent(ks, [t[name][k] for k in ks])
    for name in MODELS:
        tr = [run["train_s"][name] for run in runs if name in run["train_s"]]
        if tr:
            res[f"{name}.train_s"] = mean_std(tr)[0]
    return res


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_markdown(res: dict, plan: RerankPlan, threads: int, wall_s: float) -> str:
    """The methods × K table, the switch-test table, the timing table and the protocol paragraph."""
    ks = plan.ks

    def cell(key, digits=3):
        m, s = res.get(key), res.get(f"{key}.std")
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return "n/a"
        return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"

    def row_cells(prefix: str, row: str, what: str) -> str:
        return " | ".join(cell(f"{prefix}{row}.k{k}.{what}") for k in ks)

    value_cols = " | ".join(f"value K={k}" for k in ks)
    hit_cols = " | ".join(f"Hit@1 K={k}" for k in ks)
    lines = [f"## Re-ranking on `{plan.data}`", "",
             "Regret-normalised value (Σ(V_chosen − V̄)/Σ(V_best − V̄) under the oracle's expected list value) "
             "and Hit@1, mean ± std over seeds.", "",
             f"| method | {value_cols} | {hit_cols} |", "| --- |" + " ---: |" * (2 * len(ks))]
    for row in ROWS:
        if f"{row}.k{ks[0]}.value" in res:
            lines.append(f"| {_LABELS[row]} | {row_cells('', row, 'value')} | {row_cells('', row, 'hit1')} |")
    if "selected_flash" in res:
        k_ref = _k_ref(plan)
        lines += ["", f"**Choice of loss, on validation users only** (value at K = {k_ref} on fresh requests of "
                  "the validation users, mean over seeds): "
                  + ", ".join(f"{_LABELS[r]} {_fmt(res.get(f'{r}.valid_value'))}" for r in INDEPENDENT + FLASH
                              if f"{r}.valid_value" in res)
                  + f". Selected: **{_LABELS[res['selected_flash']]}** against **"
                  f"{_LABELS[res['best_independent']]}**; flash_minus_independent (test, mean over K) "
                  f"{cell('flash_minus_independent')}."]
    if any(k.startswith("switch_off.") for k in res):
        lines += ["", f"### Switch test: list effects off (`{' '.join(SWITCH_OFF)}`)", "",
                  f"| method | {value_cols} |", "| --- |" + " ---: |" * len(ks)]
        for row in SWITCH_ROWS:
            if f"switch_off.{row}.k{ks[0]}.value" in res:
                lines.append(f"| {_LABELS[row]} | {row_cells('switch_off.', row, 'value')} |")
        lines += ["", "| figure (mean over K) | list effects on | off |", "| --- | ---: | ---: |"]
        for key in ("flash_edge_over_greedy", "flash_list_edge", "independent_listwise_list_edge",
                    "evaluators_beating_item_sum"):
            if key in res:
                lines.append(f"| {key} | {_fmt(res.get(key))} | {_fmt(res.get(f'switch_off.{key}'))} |")
        lines.append(f"| list_edge_share (off ÷ on) | | {_fmt(res.get('switch_off.list_edge_share'))} |")
    if f"flash.time_ms.k{ks[0]}" in res:
        lines += ["", "### Forward time per request (ms, one thread, inference mode)", "",
                  "| method | " + " | ".join(f"K={k}" for k in ks) + " | growth exponent |",
                  "| --- |" + " ---: |" * (len(ks) + 1)]
        for name in TIMED:
            times = " | ".join(f"{res[f'{name}.time_ms.k{k}']:.3f}" for k in ks)
            lines.append(f"| {_LABELS[name]} | {times} | {_fmt(res.get(f'{name}.time_growth_exponent'))} |")
    draws = "" if plan.outcome_draws == 1 else f", mean of {plan.outcome_draws}"
    lines += ["", (
        f"**Protocol.** Per seed: {plan.train_requests:,} training requests × {plan.k_train} lists "
        f"(targets: one simulated showing of each list{draws}), {plan.valid_requests:,} validation requests "
        f"(early stopping on the validation loss), {plan.test_requests:,} test requests (one per held-out "
        f"user) with K ∈ {{{', '.join(map(str, ks))}}} lists of {plan.generator.list_len} from a pool of "
        f"{plan.data_config.pool_size}; {plan.seeds} seed(s), switch test {plan.switch_seeds}. Evaluators: "
        f"width {plan.dim}, {plan.heads} heads, AdamW lr {plan.train.lr}, ≤ {plan.train.epochs} epochs of "
        f"batches of {plan.train.batch_size} requests, listwise temperature {plan.train.temperature}. Timing "
        f"on {plan.timing_batch} test requests, minimum of {plan.timing_rounds} × {plan.timing_repeats} "
        f"calls. Wall time {wall_s / 60:.1f} min on {threads} torch thread(s).")]
    return "\n".join(lines)


def plot_figures(res: dict, plan: RerankPlan, out_dir: Path) -> list[str]:
    """Value against K for every row, and forward time against K; returns the PNG names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ks = list(plan.ks)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in ROWS:
        if f"{row}.k{ks[0]}.value" in res:
            axes[0].errorbar(ks, [res[f"{row}.k{k}.value"] for k in ks],
                             yerr=[res[f"{row}.k{k}.value.std"] for k in ks], label=_LABELS[row], marker="o",
                             ms=3, capsize=2)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("K (candidate lists)")
    axes[0].set_ylabel("regret-normalised value")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    for name in TIMED:
        if f"{name}.time_ms.k{ks[0]}" in res:
            axes[1].plot(ks, [res[f"{name}.time_ms.k{k}"] for k in ks], marker="o", label=_LABELS[name])
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("K (candidate lists)")
    axes[1].set_ylabel("forward ms per request")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    name = "rerank_value_time.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return [name]


# ---------------------------------------------------------------------------------------------- benchmark


@register_benchmark("rerank")
def bench_rerank(quick: bool = False, data: str | None = None, seeds: int | None = None, threads: int = 1,
                 out_dir: str = "docs/results", progress: bool | None = None) -> BenchResult:
    """Run the re-ranking benchmark (see the module doc)."""
    from funnelrec.data.sources import load_source
    from funnelrec.sim.config import apply_overrides
    from funnelrec.sim.world import World

    threads = fix_threads(threads)
    plan = QUICK_PLAN if quick else FULL_PLAN
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
        plan = dataclasses.replace(plan, seeds=seeds, switch_seeds=min(seeds, plan.switch_seeds))
    if data is not None:
        if not data.startswith("sim:"):
            raise ConfigError(f"--data {data!r}: the re-ranking benchmark needs a simulated world, "
                              f"sim:NAME[?k=v]")
        plan = dataclasses.replace(plan, data=data)
    plan.validate()
    progress = (not quick) if progress is None else progress
    start = time.perf_counter()
    source = load_source(plan.data, progress=progress and sys.stderr.isatty())
    rdata = RerankData.from_source(source, plan.data_config)
    n_users = rdata.world.population.num_users
    if plan.valid_users + plan.test_users >= n_users:
        raise ConfigError(f"{plan.data} has {n_users} users, too few for {plan.valid_users} validation and "
                          f"{plan.test_users} test users")
    off = rdata.with_world(World(apply_overrides(rdata.world.cfg, list(SWITCH_OFF))))
    runs, switch_runs = [], []
    for seed in range(plan.seeds):
        if progress:
            print(f"rerank: seed {seed + 1}/{plan.seeds} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
        run = run_seed(rdata, plan, seed, ROWS, progress=progress)
        if seed == 0:
            run["timing"] = time_forward({n: run["models"][n] for n in TIMED}, rdata, run["test"], plan)
        run.pop("models")
        run.pop("test")
        runs.append(run)
    for seed in range(plan.switch_seeds):
        if progress:
            elapsed = time.perf_counter() - start
            print(f"rerank: switch test seed {seed + 1}/{plan.switch_seeds} ({elapsed:.0f} s)",
                  file=sys.stderr, flush=True)
        run = run_seed(off, plan, seed, SWITCH_ROWS, progress=progress)
        run.pop("models")
        run.pop("test")
        switch_runs.append(run)
    res: dict = {"world": plan.data, "seeds": plan.seeds, "switch_seeds": plan.switch_seeds,
                 "train_requests": plan.train_requests, "test_requests": plan.test_requests,
                 "k_train": plan.k_train, "pool_size": plan.data_config.pool_size,
                 "list_len": plan.generator.list_len, "threads": threads}
    res.update(derived_figures(runs, switch_runs, plan))
    wall = time.perf_counter() - start
    res["wall_s"] = wall
    plots = [] if quick else plot_figures(res, plan, Path(out_dir))
    k_ref = _k_ref(plan)
    targets = [Target("flash_minus_independent", ">=", 0.0), Target(f"time_ratio_k{k_ref}", "<=", 0.5),
               Target("flash.time_growth_exponent", "<", 0.5)]
    if switch_runs:
        targets.append(Target("switch_off.list_edge_share", "<=", 0.25))
    config = {"plan": dataclasses.asdict(plan), "rows": list(ROWS), "switch_rows": list(SWITCH_ROWS),
              "switch_off": list(SWITCH_OFF), "value_weights": dict(VALUE_WEIGHTS)}
    return BenchResult("rerank", res, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary_markdown(res, plan, threads, wall))
