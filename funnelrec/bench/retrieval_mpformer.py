"""``funnelrec bench retrieval-mpformer``: MPFormer (one retriever, K objectives) against K dedicated retrievers,
a shared encoder with K linear heads, and uniform merge quotas.

Rows (every model is :class:`funnelrec.retrieval.mpformer.MPFormer` with the same width, depth, inputs, item
tower, sampler, loss and training budget; only what is named differs):

* ``mpformer`` — K objective tokens, per-objective attention bias, personal gate, q(u) head; merged with
  personalised quotas ``M_k ∝ q_k(u)`` (``value_recall@M``) and, the ablation of q, with uniform quotas
  ``M_k = M / K`` (``value_recall_uniform@M``; the same trained model);
* ``linear_heads`` — one readout token and K linear heads on it (shared encoder, no objective tokens, no
  modulation), with its own q(u) head;
* ``dedicated`` — K separate single-objective retrievers, each the MPFormer architecture with K = 1 trained on its
  objective only (the "parallel multi-path" design); merged with uniform quotas;
* ``popularity`` — each objective's train-target counts (no training; a floor).

What is measured (``sim:bench-v1`` by default; every figure is the mean over seeds, with ``.std``):

* **Per-objective retrieval** on the test day: for each objective, the rows are the users with at least one
  new item with that feedback on the test day (users with none are skipped), the relevant set is those items, the
  history is excluded, the whole corpus is ranked with the objective's user vector
  (``funnelrec.retrieval.mpformer_data.evaluate_objectives``): ``ROW.OBJ.recall@50/100/200``, ``ROW.OBJ.ndcg@50``
  and ``ROW.OBJ.true_recall@100`` (the share of the oracle's top 100 by the true probability of that feedback);
  ``ROW.OBJ.recall@100_ratio_vs_dedicated`` and ``min_recall@100_ratio_vs_dedicated`` (MPFormer's worst
  objective; target ≥ 0.99).
* **Merged value recall**: the K user vectors query an :class:`~funnelrec.retrieval.ann.AnnIndex` (HNSW) of the
  model's item vectors, top M each, history excluded; the K lists are merged with
  :func:`~funnelrec.retrieval.quota_merge.quota_merge`; ``value_recall@M`` = Σ value of the merged list's hits /
  Σ value of the user's test-day targets (an item's value = the sum of the values of its feedback types:
  click 1, long view 2, like 4, follow 8; on MovieLens rating ≥ 1: 1, ≥ 4: 2, = 5: 3), averaged over users.
  ``value_recall@M_personal_minus_uniform`` (target > 0) and ``personal_beats_uniform@M`` (paired difference
  over seeds above 2 std). ``mpformer.value_recall_true_share@M`` merges with quotas ∝ the user's *actual*
  test-day value shares — unknowable at serving time, it shows how much any q(u) could gain over uniform.
* **Serving cost** of one request (the test user with the longest history): ``ROW.user_flops`` — the user side
  (encoder + q head) under ``torch.utils.flop_counter.FlopCounterMode`` (``dedicated`` = K forwards);
  ``ROW.user_latency_ms`` — median wall time of that forward (p99 beside it), measured in this run;
  ``ROW.ann_ms`` — the K ANN searches of that request, timed separately; ``user_flops_ratio_vs_dedicated`` (target
  ≤ 1.5 / K) and ``user_latency_ratio_vs_dedicated``.
* **Training**: ``ROW.train_seconds`` per seed (``dedicated`` = the sum of its K models), ``ROW.best_epoch``.

Protocol (``funnelrec.retrieval.mpformer_data``): requests are (user, day) periods at the user's first positive of
the day; the history is every positive (any objective) before it, its action channels the K feedback flags; the
targets of objective k are the items with that feedback in the period that are new to the user. The last day is
test, the day before valid, earlier days train (on MovieLens: per user, the last active date test, the one
before valid). Every model trains with AdamW, the same learning rate, batch size and epoch cap (one trial each:
no model is tuned; the settings come from sized-down trials read on the valid split), early stopping on a valid
proxy (``evaluate_retriever``'s Recall@50 of each (user, objective)
row's first valid-day item under that objective's vector — the dedicated models on their own objective); test is
never read for a choice. Choices of ours, for the joint models: fixed loss weights ``w_k ∝ n_k`` (n_k = train
targets of objective k, :func:`loss_weights`, i.e. every (request, target) pair weighs the same whatever its
objective; with equal weights the few follow / like pairs drive the shared encoder as hard as the many click pairs,
and a trial's joint models stayed below popularity after 4 epochs while the dedicated click model did not; ``√n_k``
was the first choice — valid-day Recall@100 of seed 0, MPFormer ÷ dedicated click model: 0.970 with √n_k, 0.990
with n_k, and n_k also raised long view, like and follow on the valid day); q(u) learns the user's share of feedback *value* (``q_target="value"``, so
``M_k ∝ q_k(u)`` gives a list the share of value it is expected to carry).

Sizes: the full run uses all 27,285 users of ``sim:bench-v1`` (test users per objective: ~6,700 click, ~6,400
long view, ~1,300 like, ~230 follow) but trains on the last :data:`FULL_TRAIN_DAYS` train days only (~20,000
periods; the earlier days still form the histories), early-stops on a seeded subset of :data:`FULL_VALID` valid
users and reads the last 32 history events. Measured in a 1-seed, 6-epoch trial on one busy core (load ~4 on 2
cores): training 149 s (MPFormer) + 122 s (linear heads) + 207 s (the K dedicated models: click 100, long view 86,
like 17, follow 4), everything else ~130 s, 10.1 min in all; an MPFormer epoch alone took 15 s on a quieter
moment. Three seeds of up to 8 epochs: ~25 min on one torch thread (~35 min when the core is shared as in the
trial; early stopping shortens it when a model stops improving).
``--quick``: a 300-user, 4-day small world with 1,500 videos, one seed, one epoch, a 16-wide model; keys only,
nothing written.

Example:
    funnelrec bench retrieval-mpformer --json
    funnelrec bench retrieval-mpformer --quick --json --data movielens:tests/fixtures/ml-100k
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from funnelrec.bench.harness import BenchResult, Target, fix_threads, interleaved_times, register_benchmark
from funnelrec.data.sources import load_source
from funnelrec.errors import ConfigError
from funnelrec.retrieval.ann import AnnConfig, AnnIndex
from funnelrec.retrieval.compare import mean_std, subsample_users
from funnelrec.retrieval.mpformer import MPFormer, MPFormerConfig
from funnelrec.retrieval.mpformer_data import MPFormerData, evaluate_objectives, value_recall
from funnelrec.retrieval.quota_merge import allocate_quotas, quota_merge, uniform_weights
from funnelrec.retrieval.training import fit_retriever

__all__ = ["bench_retrieval_mpformer", "Plan", "FULL_PLAN", "QUICK_PLAN", "FULL_DATA", "QUICK_DATA", "ROWS",
           "MODEL_DEFAULTS", "row_configs", "loss_weights", "train_rows", "serving_cost", "merged_value_recall",
           "summary_markdown"]

FULL_DATA = "sim:bench-v1"
QUICK_DATA = "sim:small?num_users=300&days=4&catalog.num_items=1500"
#: Train days of the full run (the last ones before the valid day).
FULL_TRAIN_DAYS = 3
#: Valid users the full run early-stops on.
FULL_VALID = 3000
#: Rows with per-objective figures, in table order.
ROWS = ("popularity", "mpformer", "linear_heads", "dedicated")
#: Model settings shared by every trained row (``MPFormerConfig`` fields).
MODEL_DEFAULTS: dict = dict(dim=64, heads=2, layers=2, ffn_mult=2, dropout=0.0, temperature=0.05, num_sampled=1024,
                            sample_alpha=0.75, gap_buckets=16, q_hidden=64, q_target="value")
_LABELS = {"popularity": "Popularity", "mpformer": "MPFormer", "mpformer_uniform": "MPFormer, uniform q",
           "linear_heads": "Shared encoder + K linear heads", "dedicated": "K dedicated (MPFormer, K = 1)"}


@dataclass(frozen=True)
class Plan:
    """How much work a run does.

    Args:
        max_users: keep a seeded random subset of this many users (None: all).
        user_seed: seed of that subset and of the valid subset.
        train_periods: train on the last this many train days (per user's periods on MovieLens); None: all.
        max_valid: early-stop on at most this many valid periods (None: all).
        max_len: N, history events read by every model.
        epochs / patience / batch_size / lr: ``fit_retriever`` settings, the same for every model.
        model: ``MPFormerConfig`` overrides shared by every model (on top of :data:`MODEL_DEFAULTS`).
        loss_weight_power: the fixed loss weight of objective k is ``n_k ** power`` (n_k = its train targets),
            normalised to sum 1 (0 = equal weights). With equal weights the few, noisy follow / like pairs drive
            the shared encoder and item table as hard as the many click pairs, and the joint models learn far
            slower than a dedicated click model (a sized-down trial: Recall@100 below popularity after 4 epochs).
            1 (∝ n: every target pair weighs the same) beat √n (0.5) on every objective's valid-day Recall@100 in a
            seed-0 trial (click 0.597 vs 0.585; the dedicated click model 0.603).
        merge_sizes: merged list lengths M of the value recall (capped at the corpus size).
        ann: the ANN index of the serving path.
        latency_repeats: timed calls per latency figure.
        eval_batch_size: periods per evaluation batch.
    """

    max_users: int | None = None
    user_seed: int = 0
    train_periods: int | None = FULL_TRAIN_DAYS
    max_valid: int | None = FULL_VALID
    max_len: int = 32
    epochs: int = 8
    patience: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    model: dict = field(default_factory=dict)
    loss_weight_power: float = 1.0
    merge_sizes: tuple[int, ...] = (100, 200)
    ann: AnnConfig = field(default_factory=lambda: AnnConfig(kind="hnsw", ef_search=256))
    latency_repeats: int = 50
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("max_len", "epochs", "patience", "batch_size", "latency_repeats", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"plan.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"plan.lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.loss_weight_power, (int, float)) and self.loss_weight_power >= 0):
            raise ConfigError(f"plan.loss_weight_power must be >= 0, got {self.loss_weight_power!r}")
        if not self.merge_sizes or any(not isinstance(m, int) or m < 1 for m in self.merge_sizes):
            raise ConfigError(f"plan.merge_sizes must hold positive integers, got {self.merge_sizes!r}")


FULL_PLAN = Plan()
QUICK_PLAN = Plan(max_users=None, train_periods=None, max_valid=None, max_len=16, epochs=1, patience=1,
                  batch_size=64, model=dict(dim=16, layers=1, num_sampled=128, q_hidden=16), latency_repeats=5,
                  ann=AnnConfig(kind="hnsw", ef_search=64, ef_construction=40))


def _log(on: bool, text: str) -> None:
    if on:
        print(f"retrieval-mpformer: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- models


def row_configs(data: MPFormerData, plan: Plan) -> dict[str, list[MPFormerConfig]]:
    """The config(s) of every trained row: one for ``mpformer`` and ``linear_heads``, K for ``dedicated``."""
    base = {**MODEL_DEFAULTS, **plan.model, "max_len": plan.max_len, "num_actions": len(data.objectives)}
    names = data.objective_names
    make = lambda objs, **kw: MPFormerConfig.from_spec(data.spec, objectives=objs, **{**base, **kw})  # noqa: E731
    base["q_values"] = tuple(float(v) for v in data.values)
    weights = loss_weights(data, plan.loss_weight_power)
    return {"mpformer": [make(names, readout="objective_tokens", modulation="bias", loss_weights=weights)],
            "linear_heads": [make(names, readout="linear_heads", loss_weights=weights)],
            "dedicated": [make((n,), readout="objective_tokens", modulation="bias", q_head=False, q_values=None)
                          for n in names]}


def loss_weights(data: MPFormerData, power: float) -> tuple[float, ...]:
    """Fixed per-objective loss weights ``n_k ** power / Σ_j n_j ** power`` (n_k = train targets of objective k;
    computed once from the train split, then constant)."""
    n = data.num_targets("train").to(torch.float64).clamp(min=1.0) ** float(power)
    return tuple(float(x) for x in n / n.sum())


def train_rows(data: MPFormerData, plan: Plan, seed: int, progress: bool = False) -> dict[str, list]:
    """Train every row with ``seed``; ``{row: [(model, FitResult), ...]}`` (K pairs for ``dedicated``)."""
    out: dict[str, list] = {}
    for row, configs in row_configs(data, plan).items():
        out[row] = []
        for cfg in configs:
            view = data.select(cfg.objectives) if row == "dedicated" else data
            torch.manual_seed(seed)
            model = MPFormer(cfg, *data.item_features, data.item_popularity())
            fit = fit_retriever(model, view, epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
                                valid_metric="recall@50", patience=plan.patience,
                                eval_batch_size=plan.eval_batch_size)
            model.eval()
            out[row].append((model, fit))
            what = row if row != "dedicated" else f"dedicated[{cfg.objectives[0]}]"
            _log(progress, f"seed {seed} {what}: best epoch {fit.best_epoch + 1} of {len(fit.history)}, valid "
                           f"recall@50 {fit.best_valid.get('recall@50', math.nan):.4f}, {fit.seconds:.0f} s")
    return out


def _score_fn(models: list[MPFormer]):
    """``fn(batch) -> [B, K, I]``: one model's K objectives, or the K dedicated models side by side."""
    return lambda b: torch.cat([m.score_objectives(b) for m in models], 1)


def _serve(models: list[MPFormer], batch) -> list:
    """The user side of one request: every model's K vectors and, with a q head, q(u)."""
    out = []
    for m in models:
        user, prof = m.encode(batch)
        out.append(m.target_weights(batch, user) if m.q_net is not None else user)
    return out


# --------------------------------------------------------------------------------------------- value recall


def _index(model: MPFormer, ann: AnnConfig) -> AnnIndex:
    vectors = model.item_vectors().detach().numpy().astype(np.float32)[1:]
    return AnnIndex.build(vectors, ids=np.arange(1, model.config.num_items), config=ann)


def _ann_lists(models: list[MPFormer], indexes: list[AnnIndex], user: list[torch.Tensor], exclude, k: int
               ) -> torch.Tensor:
    """[B, K, k] ANN top-k item indices of every objective vector (-1 where fewer), history excluded."""
    parts = []
    for m, index, u in zip(models, indexes, user):  # one model (K vectors) or K models (one vector each)
        b, kk, d = u.shape
        excl = [e for e in exclude for _ in range(kk)]
        _, ids = index.search(u.reshape(b * kk, d).numpy().astype(np.float32), k, exclude=excl)
        parts.append(torch.from_numpy(ids).view(b, kk, k))
    return torch.cat(parts, 1)


@torch.no_grad()
def merged_value_recall(models: list[MPFormer], indexes: list[AnnIndex], data: MPFormerData, sizes: Sequence[int],
                        personal: bool, batch_size: int = 256) -> dict[str, float]:
    """Merged value recall on the test periods: ``value_recall_uniform@M`` and, with ``personal``,
    ``value_recall@M`` (quotas ∝ q(u)) and ``value_recall_true_share@M`` (quotas ∝ the user's *actual* test-day
    value shares — unknown at serving time: the reference of what perfect target weights would give)."""
    values = data.values
    k_max = min(max(sizes), data.num_items - 1)
    sums: dict[str, float] = {}
    rows = 0
    for batch in data.batches("test", batch_size, mode="period"):
        users = [m.encode(batch)[0] for m in models]
        lists = _ann_lists(models, indexes, users, data.exclude_lists(batch), k_max)
        modes = {"value_recall_uniform": uniform_weights(batch.batch_size, data.num_objectives)}
        if personal:
            modes["value_recall"] = models[0].target_weights(batch, users[0])
            modes["value_recall_true_share"] = batch.extras["objective_counts"] * values  # not known at serving
        targets = batch.extras["targets"]
        n = 0
        for m in sizes:
            mm = min(m, k_max)
            for key, q in modes.items():
                merged, _ = quota_merge(lists[:, :, :mm], allocate_quotas(q, mm))
                v, n = value_recall(merged, targets, values)
                sums[f"{key}@{m}"] = sums.get(f"{key}@{m}", 0.0) + (v * n if n else 0.0)
        rows += n
    return {k: v / rows if rows else math.nan for k, v in sums.items()}


# ------------------------------------------------------------------------------------------------ serving cost


@torch.no_grad()
def serving_cost(rows: dict[str, tuple[list[MPFormer], list[AnnIndex]]], data: MPFormerData, batch, k: int,
                 repeats: int) -> dict[str, dict[str, float]]:
    """User-side FLOPs and latency of one request (``batch`` of one row) for every row, and its K ANN searches
    (timed apart). Rows are timed turn by turn (:func:`interleaved_times`)."""
    out: dict[str, dict[str, float]] = {}
    exclude = data.exclude_lists(batch)
    k = min(k, data.num_items - 1)
    user_fns, ann_fns = {}, {}
    for row, (models, indexes) in rows.items():
        with FlopCounterMode(display=False) as counter:
            _serve(models, batch)
        users = [m.encode(batch)[0] for m in models]
        out[row] = {"user_flops": float(counter.get_total_flops()),
                    "params": float(sum(p.numel() for m in models for p in m.parameters()))}
        user_fns[row] = lambda models=models: _serve(models, batch)
        ann_fns[row] = lambda models=models, indexes=indexes, users=users: _ann_lists(models, indexes, users,
                                                                                       exclude, k)
    for prefix, fns in (("user_latency", user_fns), ("ann", ann_fns)):
        for row, t in interleaved_times(fns, repeats).items():
            if prefix == "ann":
                out[row]["ann_ms"] = float(np.median(t)) * 1e3
            else:
                out[row]["user_latency_ms"] = float(np.median(t)) * 1e3
                out[row]["user_latency_p99_ms"] = float(np.percentile(t, 99)) * 1e3
    return out


# ---------------------------------------------------------------------------------------------------- figures


def _objective_popularity(data: MPFormerData) -> torch.Tensor:
    """[K, I] train targets of each objective per item (the popularity row's scores)."""
    out = torch.zeros(data.num_objectives, data.num_items)
    for j in range(data.num_objectives):
        for batch in data.select([data.objective_names[j]]).batches("train", 4096, mode="period"):
            t = batch.extras["targets"][:, 0].reshape(-1)
            out[j] += torch.bincount(t[t > 0], minlength=data.num_items)[: data.num_items].float()
    return out.log1p()


def _aggregate(per_seed: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in dict.fromkeys(k for r in per_seed for k in r):
        vals = [r[key] for r in per_seed if r.get(key) is not None and not math.isnan(r[key])]
        m, s = mean_std(vals) if vals else (math.nan, math.nan)
        out[key], out[f"{key}.std"] = m, s
    return out


def derived(results: dict, names: Sequence[str], sizes: Sequence[int], k: int,
            paired: dict[int, list[float]]) -> dict:
    """Ratios against the dedicated row, the merged-value differences and the cost ratios."""
    out: dict = {}
    for row in ("mpformer", "linear_heads"):
        ratios = []
        for name in names:
            ded = results.get(f"dedicated.{name}.recall@100")
            mine = results.get(f"{row}.{name}.recall@100")
            r = mine / ded if ded and mine is not None and ded > 0 else math.nan
            out[f"{row}.{name}.recall@100_ratio_vs_dedicated"] = r
            ratios.append(r)
        key = "min_recall@100_ratio_vs_dedicated"
        out[key if row == "mpformer" else f"{row}.{key}"] = min(ratios) if ratios else math.nan
    for m in sizes:
        d_m, d_s = mean_std(paired[m])
        out[f"value_recall@{m}_personal_minus_uniform"] = d_m
        out[f"value_recall@{m}_personal_minus_uniform.std"] = d_s
        out[f"personal_beats_uniform@{m}"] = bool(d_m > 2 * d_s) if paired[m] else False
    ded_f = results.get("dedicated.user_flops")
    for row in ("mpformer", "linear_heads"):
        for fig in ("user_flops", "user_latency_ms", "ann_ms", "train_seconds"):
            a, b = results.get(f"{row}.{fig}"), results.get(f"dedicated.{fig}")
            ratio = a / b if a is not None and b else math.nan
            name = f"{fig.replace('_ms', '').replace('_seconds', '_time')}_ratio_vs_dedicated"
            out[name if row == "mpformer" else f"{row}.{name}"] = ratio
    out["user_flops_target"] = 1.5 / k
    out["dedicated_flops_per_model"] = ded_f / k if ded_f else math.nan
    return out


def _cell(results: dict, key: str, digits: int = 4) -> str:
    m, s = results.get(key), results.get(f"{key}.std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.{digits}f}" if not s else f"{m:.{digits}f} ± {s:.{digits}f}"


def summary_markdown(res: dict, names: Sequence[str], sizes: Sequence[int], plan: Plan, data_spec: str,
                     has_oracle: bool) -> str:
    """The per-objective table, the merged-value table, the cost table and the protocol paragraph."""
    lines = [f"## MPFormer vs K dedicated retrievers on `{data_spec}`", "",
             "Recall@100 (test targets of each objective; mean ± std over seeds):", "",
             "| model | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for row in ROWS:
        lines.append(f"| {_LABELS[row]} | " + " | ".join(_cell(res, f"{row}.{n}.recall@100") for n in names) + " |")
    lines += ["", "| ratio to dedicated | " + " | ".join(names) + " |",
              "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for row in ("mpformer", "linear_heads"):
        lines.append(f"| {_LABELS[row]} | " + " | ".join(
            _cell(res, f"{row}.{n}.recall@100_ratio_vs_dedicated", 3) for n in names) + " |")
    if has_oracle:
        lines += ["", "true Recall@100 (share of the oracle's top 100 by the true probability of that feedback):",
                  "", "| model | " + " | ".join(names) + " |",
                  "| --- | " + " | ".join("---:" for _ in names) + " |"]
        for row in ROWS:
            lines.append(f"| {_LABELS[row]} | " + " | ".join(
                _cell(res, f"{row}.{n}.true_recall@100") for n in names) + " |")
    lines += ["", "Merged value recall (K ANN lists merged with quotas; value-weighted hits):", "",
              "| model | quotas | " + " | ".join(f"value recall@{m}" for m in sizes) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in sizes) + " |"]
    for row, key in (("mpformer", "value_recall"), ("mpformer", "value_recall_uniform"),
                     ("mpformer", "value_recall_true_share"), ("linear_heads", "value_recall"),
                     ("linear_heads", "value_recall_uniform"), ("dedicated", "value_recall_uniform")):
        q = {"value_recall": "q(u)", "value_recall_uniform": "uniform",
             "value_recall_true_share": "actual test-day shares (reference)"}[key]
        cells = " | ".join(_cell(res, f"{row}.{key}@{m}") for m in sizes)
        lines.append(f"| {_LABELS[row]} | {q} | {cells} |")
    lines += ["", "Serving cost of one request (user side; ANN separately) and training:", "",
              "| model | user MFLOPs | user latency ms (p50) | ANN ms (K lists) | params | train s / seed |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in ("mpformer", "linear_heads", "dedicated"):
        f = res.get(f"{row}.user_flops")
        lines.append(f"| {_LABELS[row]} | {f / 1e6:.2f} | {_cell(res, f'{row}.user_latency_ms', 2)} | "
                     f"{_cell(res, f'{row}.ann_ms', 2)} | {res.get(f'{row}.params', 0):,.0f} | "
                     f"{_cell(res, f'{row}.train_seconds', 0)} |" if f is not None else f"| {_LABELS[row]} | n/a |")
    users = f"{res['users']:,} users" + (f" (a seeded subset of {res['users_total']:,})"
                                         if res["users"] < res["users_total"] else "")
    train = (f"the last {plan.train_periods} train day(s) (earlier days only as history)" if plan.train_periods
             else "every train day")
    lines += ["", f"**Protocol.** `{data_spec}`: {users}, {res['items']:,} items, objectives "
              f"{', '.join(names)}. Requests are (user, day) periods; targets are the items with each feedback in "
              "the period that are new to the user; the last day is test, the day before valid; models train on "
              f"{train} ({res['train_rows']:,} periods) and early-stop on {res['valid_rows']:,} valid periods. "
              f"Every model: width {res['dim']}, {res['layers']} layers, history {plan.max_len}, AdamW lr "
              f"{plan.lr:g}, batch {plan.batch_size}, ≤ {plan.epochs} epochs (patience {plan.patience}); no model "
              f"is tuned. {res['seeds']} seed(s); torch threads {res['threads']}; wall time {res['wall_s'] / 60:.1f} "
              "min. See `docs/retrieval-mpformer.md` for the model and what is the paper's."]
    return "\n".join(lines)


def _plot(res: dict, names: Sequence[str], sizes: Sequence[int], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    for j, row in enumerate(ROWS):
        vals = [res.get(f"{row}.{n}.recall@100") or 0.0 for n in names]
        errs = [res.get(f"{row}.{n}.recall@100.std") or 0.0 for n in names]
        axes[0].bar(x + (j - 1.5) * 0.2, vals, 0.2, yerr=errs, label=_LABELS[row])
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("Recall@100 (test)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("per-objective recall", fontsize=10)
    combos = [("mpformer", "value_recall"), ("mpformer", "value_recall_uniform"),
              ("linear_heads", "value_recall"), ("dedicated", "value_recall_uniform")]
    xs = np.arange(len(sizes))
    for j, (row, key) in enumerate(combos):
        vals = [res.get(f"{row}.{key}@{m}") or 0.0 for m in sizes]
        errs = [res.get(f"{row}.{key}@{m}.std") or 0.0 for m in sizes]
        label = f"{_LABELS[row]}, {'q(u)' if key == 'value_recall' else 'uniform'}"
        axes[1].bar(xs + (j - 1.5) * 0.2, vals, 0.2, yerr=errs, label=label)
    axes[1].set_xticks(xs, [f"M = {m}" for m in sizes])
    axes[1].set_ylabel("merged value recall (test)")
    lo = min((res.get(f"{r}.{k}@{m}") or 1.0) for r, k in combos for m in sizes)
    axes[1].set_ylim(max(0.0, lo - 0.05), None)
    axes[1].legend(fontsize=7)
    axes[1].set_title("merged lists: personalised vs uniform quotas", fontsize=10)
    fig.tight_layout()
    name = "retrieval-mpformer.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


# ---------------------------------------------------------------------------------------------------- benchmark


@register_benchmark("retrieval-mpformer")
def bench_retrieval_mpformer(quick: bool = False, data: str | None = None, seeds: int = 3, threads: int = 1,
                             out_dir: str = "docs/results") -> BenchResult:
    """Run the benchmark (module doc); ``--quick`` uses one seed and writes nothing. One torch thread by default:
    these small models gain little from a second one, and on a shared machine two threads ran an epoch 10× slower
    than one (146 s against 15 s)."""
    start = time.perf_counter()
    threads = fix_threads(threads)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    plan = QUICK_PLAN if quick else FULL_PLAN
    spec = data or (QUICK_DATA if quick else FULL_DATA)
    seeds = 1 if quick else int(seeds)
    progress = not quick
    full = load_source(spec, progress=progress)
    src = subsample_users(full, plan.max_users, plan.user_seed)
    mp = MPFormerData.from_source(src, max_len=plan.max_len, train_periods=plan.train_periods,
                                  max_valid=plan.max_valid, seed=plan.user_seed)
    names, k = mp.objective_names, mp.num_objectives
    sizes = tuple(plan.merge_sizes)
    _log(progress, f"{spec}: {mp.num_rows('train'):,} train / {mp.num_rows('valid'):,} valid / "
                   f"{mp.num_rows('test'):,} test periods, objectives {', '.join(names)}, {seeds} seed(s)")
    pop = _objective_popularity(mp)
    oracle = src.world
    trained: list[dict] = []
    per_seed: dict[str, list[dict]] = {r: [] for r in ("mpformer", "linear_heads", "dedicated")}
    paired: dict[int, list[float]] = {m: [] for m in sizes}
    one = _longest_request(mp)
    for seed in range(seeds):
        rows = train_rows(mp, plan, seed, progress)
        trained.append(rows)
        served = {}
        for row, pairs in rows.items():
            models = [m for m, _ in pairs]
            fits = [f for _, f in pairs]
            indexes = [_index(m, plan.ann) for m in models]
            served[row] = (models, indexes)
            vr = merged_value_recall(models, indexes, mp, sizes, personal=row != "dedicated",
                                     batch_size=plan.eval_batch_size)
            per_seed[row].append({"train_seconds": float(sum(f.seconds for f in fits)),
                                  "best_epoch": float(np.mean([f.best_epoch + 1 for f in fits])), **vr})
        if seed == 0:  # serving cost: measured once, on the seed-0 models, every row in the same loop
            _log(progress, "serving cost")
            for row, cost in serving_cost(served, mp, one, max(sizes), plan.latency_repeats).items():
                per_seed[row][0].update(cost)
        last = per_seed["mpformer"][-1]
        for m in sizes:
            paired[m].append(last[f"value_recall@{m}"] - last[f"value_recall_uniform@{m}"])
        _log(progress, f"seed {seed}: value recall@{max(sizes)} personal "
                       f"{per_seed['mpformer'][-1][f'value_recall@{max(sizes)}']:.4f} vs uniform "
                       f"{per_seed['mpformer'][-1][f'value_recall_uniform@{max(sizes)}']:.4f}")
    # one test pass for every model of every seed (the oracle is computed once per batch)
    fns = {"popularity": lambda b: pop.unsqueeze(0).expand(b.batch_size, -1, -1).clone()}
    for seed, rows in enumerate(trained):
        for row, pairs in rows.items():
            fns[f"{row}/{seed}"] = _score_fn([m for m, _ in pairs])
    _log(progress, "test pass" + (" with the oracle" if oracle is not None else ""))
    metrics = evaluate_objectives(fns, mp, "test", ks=(50, 100, 200), ndcg_ks=(50,), true_k=100, oracle=oracle,
                                  batch_size=plan.eval_batch_size)
    results: dict = {"data": spec, "data_kind": src.kind, "objectives": ",".join(names), "K": k,
                     "users": int(src.log.get_column("user_id").n_unique()),
                     "users_total": int(full.log.get_column("user_id").n_unique()), "items": mp.num_items - 1,
                     "train_rows": mp.num_rows("train"), "valid_rows": mp.num_rows("valid"),
                     "test_rows": mp.num_rows("test"), "seeds": seeds, "threads": threads,
                     "dim": row_configs(mp, plan)["mpformer"][0].dim,
                     "layers": row_configs(mp, plan)["mpformer"][0].layers}
    for j, n in enumerate(names):
        results[f"test_users.{n}"] = float(metrics["popularity"][f"{n}.users"])
    figures = [f"{n}.{f}" for n in names for f in ("recall@50", "recall@100", "recall@200", "ndcg@50")]
    figures += [f"{n}.true_recall@100" for n in names]
    for row in ROWS:
        runs = [metrics["popularity"]] if row == "popularity" else [metrics[f"{row}/{s}"] for s in range(seeds)]
        agg = _aggregate([{f: r.get(f, math.nan) for f in figures} for r in runs])
        results.update({f"{row}.{key}": (None if isinstance(v, float) and math.isnan(v) else v)
                        for key, v in agg.items()})
        if row != "popularity":
            once = ("user_", "ann_", "params")  # measured on seed 0 only: no std
            results.update({f"{row}.{key}": v for key, v in _aggregate(per_seed[row]).items()
                            if not (key.startswith(once) and key.endswith(".std"))})
    results.update(derived(results, names, sizes, k, paired))
    results["wall_s"] = time.perf_counter() - start
    plots = [] if quick else _plot(results, names, sizes, Path(out_dir))
    results["wall_s"] = time.perf_counter() - start
    targets = [Target("min_recall@100_ratio_vs_dedicated", ">=", 0.99),
               Target("user_flops_ratio_vs_dedicated", "<=", 1.5 / k),
               Target(f"value_recall@{max(sizes)}_personal_minus_uniform", ">", 0.0)]
    config = {"data": spec, "seeds": seeds, "threads": threads, "plan": dataclasses.asdict(plan),
              "loss_weights": dict(zip(names, loss_weights(mp, plan.loss_weight_power))),
              "model": {**MODEL_DEFAULTS, **plan.model},
              "objectives": [dataclasses.asdict(o) for o in mp.objectives],
              "split": mp.split_rule,
              "chosen": "no tuning: one trial per model, the same settings for every row"}
    return BenchResult("retrieval-mpformer", results, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary_markdown(results, names, sizes, plan, spec, oracle is not None))


def _longest_request(data: MPFormerData):
    """The test period with the longest history, as a one-row batch (the serving-cost request)."""
    lengths = []
    for batch in data.batches("test", 4096, mode="period"):
        lengths.append(batch.hist_len)
    row = int(torch.argmax(torch.cat(lengths)))
    return data.period_batch("test", [row])
