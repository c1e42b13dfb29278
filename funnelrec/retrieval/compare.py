"""Compare the retrievers on one data source: ``python -m funnelrec.retrieval.compare --data sim:small``.

The comparison behind ``funnelrec bench retrieval-baselines`` (:mod:`funnelrec.bench.retrieval_baselines`), also
runnable on its own. For every requested retriever:

* **Tuning on valid only, the same trial budget for every trained model.** Each learning rate of the grid
  (``lr_grid``, default 1e-3 and 3e-3) trains the model with seed 0 (AdamW, early stopping on validation
  Recall@50, the best epoch kept; ``funnelrec.retrieval.training.fit_retriever``); the rate with the best
  validation Recall@50 is chosen (ties: the first in grid order). The seed-0 model of that rate is kept, and seeds
  1 .. S-1 train with the chosen rate. The test split is never read for a choice. Models without parameters
  (popularity) are deterministic: one run, no tuning.
* **Test report** from one full-corpus pass per model over the leave-last-out test targets
  (:func:`top_items`: every item scored, the target's whole history excluded, the top ``curve_k`` kept):
  Recall@10/50, NDCG@10, MRR@10, coverage@50 (:func:`list_metrics`, the definitions of
  ``funnelrec.retrieval.evaluate.evaluate_retriever``), the Recall@K curve for K = 1 .. ``curve_k``, and on a
  simulated world ``true_recall@K``: the share of the oracle's top K (items ranked by the world's true click
  probability for that user on the test day, history excluded; ``funnelrec.retrieval.evaluate.oracle_scores``)
  that the model's top K contains (:func:`true_recall_curve`). The oracle's top lists are computed once and
  shared by every model (the oracle is slow: one pass costs about as much as an epoch of training).
* **The oracle row** (simulated worlds only): the oracle's own ranking scored like a model against the actual
  held-out items, the reference of ``gap_closed`` (DESIGN §7).

``compare`` returns a :class:`Comparison`; :func:`flat_results` turns it into the flat ``{"model.metric": mean,
"model.metric.std": std, ...}`` dict; with ``--json`` the CLI prints that dict as the last stdout line.

Example:
    python -m funnelrec.retrieval.compare --data "sim:small" --seeds 3
    python -m funnelrec.retrieval.compare --data movielens:tests/fixtures/ml-100k --models popularity,sasrec
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.sources import Source, load_source
from funnelrec.errors import ConfigError
from funnelrec.retrieval import RETRIEVERS, RetrievalData, build_retriever, fit_retriever
from funnelrec.retrieval.base import NEG_INF
from funnelrec.retrieval.evaluate import _device, oracle_scores

__all__ = [
    "DEFAULTS", "LR_GRID", "REPORT", "Plan", "RunReport", "ModelRows", "Comparison", "compare", "load_data",
    "subsample_users", "top_items", "list_metrics", "recall_curve", "true_recall_curve", "flat_results",
    "mean_std", "main",
]

#: Per-model defaults of the comparison: (config overrides, trainer settings).
DEFAULTS: dict[str, tuple[dict, dict]] = {
    "popularity": ({}, {}),
    "two_tower": ({}, dict(epochs=30, batch_size=512, lr=2e-3, patience=3)),
    "sasrec": ({}, dict(epochs=40, batch_size=128, lr=2e-3, patience=4)),
}
#: The learning rates every trained model is tuned over (on the valid split, seed 0).
LR_GRID: tuple[float, ...] = (1e-3, 3e-3)
#: The test figures of the report, in table order.
REPORT = ("recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@50", "true_recall@50")
#: Cut-offs of the reported metrics.
KS = (10, 50)
#: The metric early stopping and the grid choice maximise on the valid split.
VALID_METRIC = "recall@50"


@dataclass(frozen=True)
class Plan:
    """How much work a comparison does.

    Args:
        lr_grid: learning rates tried per trained model (seed 0, valid split).
        epochs: per-model epoch caps overriding :data:`DEFAULTS` (e.g. ``{"sasrec": 12}``); None keeps them.
        patience: early-stopping patience (epochs without a better valid Recall@50) for every trained model;
            None keeps :data:`DEFAULTS`.
        max_users: keep a random subset of this many users of the log (seeded by ``user_seed``, every row of a
            kept user; the corpus and the item table stay whole); None keeps every user.
        user_seed: seed of that subset.
        max_len: N, the history length of every model.
        curve_k: the longest cut-off of the Recall@K curves (and of the oracle's top lists).
        batch_size: requests scored at once in the test passes.
    """

    lr_grid: tuple[float, ...] = LR_GRID
    epochs: dict[str, int] | None = None
    patience: int | None = None
    max_users: int | None = None
    user_seed: int = 0
    max_len: int = 50
    curve_k: int = 100
    batch_size: int = 512

    def __post_init__(self) -> None:
        if not self.lr_grid or not all(isinstance(x, (int, float)) and x > 0 for x in self.lr_grid):
            raise ConfigError(f"lr_grid must hold positive learning rates, got {self.lr_grid!r}")
        if self.max_users is not None and self.max_users < 3:
            raise ConfigError(f"max_users must be >= 3 (or None), got {self.max_users}")
        for name, value in (("max_len", self.max_len), ("curve_k", self.curve_k), ("batch_size", self.batch_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")

    def fit_settings(self, name: str) -> tuple[dict, dict]:
        """(config overrides, trainer settings) of model ``name`` under this plan."""
        overrides, fit = DEFAULTS.get(name, ({}, dict(epochs=10, batch_size=256, patience=2)))
        overrides, fit = dict(overrides), dict(fit)
        if name == "sasrec":
            overrides = {"max_len": self.max_len, **overrides}
        if self.epochs and name in self.epochs:
            fit["epochs"] = int(self.epochs[name])
        if self.patience is not None:
            fit["patience"] = int(self.patience)
        fit.pop("lr", None)
        return overrides, fit


@dataclass
class RunReport:
    """One model (one seed) on the test split: ``metrics`` (floats), the Recall@K curve [curve_k] and the
    true-Recall@K curve [curve_k] (None without an oracle)."""

    metrics: dict[str, float]
    curve: np.ndarray
    true_curve: np.ndarray | None


@dataclass
class ModelRows:
    """Every run of one model.

    Attributes:
        runs: one :class:`RunReport` per seed (one for deterministic rows).
        seconds: training wall time per run (0 for models without parameters; for the oracle: its test pass).
        best_epoch: the kept epoch of each run (nan for untrained rows).
        chosen: the settings picked on the valid split (``lr``), empty when nothing was tuned.
        tuning: one row per grid point: ``lr``, ``valid_recall@50``, ``best_epoch``, ``epochs``, ``seconds``.
    """

    runs: list[RunReport] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_epoch: list[float] = field(default_factory=list)
    chosen: dict[str, float] = field(default_factory=dict)
    tuning: list[dict[str, float]] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        """The test value of ``metric`` of every run (empty when the runs lack it)."""
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]


@dataclass
class Comparison:
    """What :func:`compare` measured.

    Attributes:
        data_spec: the source spec.
        kind: ``"sim"``, ``"kuairand"`` or ``"movielens"``.
        sizes: ``users`` (of the log used), ``users_total`` (before any subset), ``items`` (corpus, no padding),
            ``train_positives``, ``valid_targets``, ``test_targets``.
        rows: model name → :class:`ModelRows`, plus ``"oracle"`` on a simulated world.
        seeds: seeds of the trained models.
        plan: the :class:`Plan`.
        seconds: wall time of the whole comparison (loading included).
    """

    data_spec: str
    kind: str
    sizes: dict[str, int]
    rows: dict[str, ModelRows]
    seeds: int
    plan: Plan
    seconds: float = 0.0

    @property
    def has_oracle(self) -> bool:
        return "oracle" in self.rows


# ------------------------------------------------------------------------------------------------------- data


def subsample_users(src: Source, max_users: int | None, seed: int = 0) -> Source:
    """``src`` restricted to a random subset of ``max_users`` of its log's users (every row of a kept user, the
    oracle table row-aligned); the side tables, and so the corpus, stay whole. ``src`` itself when it has no more
    users than that."""
    if max_users is None:
        return src
    users = src.log.get_column("user_id").unique().sort().to_numpy()
    if len(users) <= max_users:
        return src
    keep = np.sort(np.random.default_rng(seed).choice(users, size=int(max_users), replace=False))
    mask = src.log.select(pl.col("user_id").is_in(keep.tolist())).to_series()
    oracle = src.oracle.filter(mask) if src.oracle is not None else None
    return dataclasses.replace(src, log=src.log.filter(mask), oracle=oracle)


def load_data(data_spec: str, plan: Plan = Plan(), cache_dir=None, progress: bool = False
              ) -> tuple[Source, RetrievalData, dict[str, int]]:
    """Load a source, keep the plan's user subset, build its leave-last-out data; returns ``(source, data,
    sizes)`` (see :class:`Comparison` for ``sizes``)."""
    full = load_source(data_spec, cache_dir=cache_dir, progress=progress)
    src = subsample_users(full, plan.max_users, plan.user_seed)
    data = RetrievalData.from_source(src, max_len=plan.max_len)
    sizes = {"users": int(src.log.get_column("user_id").n_unique()),
             "users_total": int(full.log.get_column("user_id").n_unique()),
             "items": data.num_items - 1, "train_positives": data.num_examples("train"),
             "valid_targets": data.num_examples("valid"), "test_targets": data.num_examples("test")}
    return src, data, sizes


# ------------------------------------------------------------------------------------------- top lists, metrics


@torch.no_grad()
def top_items(score_fn: Callable, data: RetrievalData, split: str, k: int, batch_size: int = 512) -> Tensor:
    """[Q, k] int64 the top ``k`` item indices of every target of ``split`` under ``score_fn(batch) -> [B, I]``,
    best first, the target's whole history excluded (``RetrievalData.exclude_mask``); ``-1`` where fewer than
    ``k`` items are left (excluded items and padding never appear)."""
    k = min(int(k), data.num_items - 1)
    out = []
    for batch in data.batches(split, batch_size):
        scores = score_fn(batch).float().cpu().masked_fill(data.exclude_mask(batch), NEG_INF)
        top_s, top_i = scores.topk(k, dim=1)
        out.append(top_i.masked_fill(top_s == NEG_INF, -1))
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.int64)


def model_scores(model) -> Callable[[object], Tensor]:
    """``score_fn`` of a retriever for :func:`top_items` (eval mode, on the model's device)."""
    device = _device(model)
    model.eval()
    return lambda batch: model.score_all(batch.to(device))


def _target_rank(top: Tensor, targets: Tensor) -> Tensor:
    """[Q] 0-based rank of each target in its top list; ``K`` (the list length) when absent."""
    hit = top == targets.unsqueeze(1)
    return torch.where(hit.any(1), hit.int().argmax(1), torch.tensor(top.shape[1]))


def list_metrics(top: Tensor, targets: Tensor, ks: Sequence[int], num_items: int) -> dict[str, float]:
    """Recall / NDCG / MRR / coverage at each k of top lists [Q, K] against one target per row [Q].

    The definitions of ``evaluate_retriever``: a target outside the top k (or excluded as history) is a miss,
    NDCG@k = 1/log2(rank + 2), MRR@k = 1/(rank + 1) (0-based rank), averaged over all Q targets; coverage@k = the
    share of the corpus's ``num_items - 1`` items in at least one top-k list. ``k`` above K is read as K.
    """
    rank = _target_rank(top, targets).double()
    q = max(1, top.shape[0])
    out: dict[str, float] = {}
    for k in ks:
        kk = min(int(k), top.shape[1])
        hit = rank < kk
        out[f"recall@{k}"] = float(hit.sum()) / q
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(rank + 2), 0.0).sum()) / q
        out[f"mrr@{k}"] = float(torch.where(hit, 1.0 / (rank + 1), 0.0).sum()) / q
        seen = torch.zeros(num_items, dtype=torch.bool)
        seen[top[:, :kk].clamp(min=0).reshape(-1)] = True  # -1 (nothing left) lands on padding 0
        seen[0] = False
        out[f"coverage@{k}"] = float(seen.sum()) / max(1, num_items - 1)
    if top.shape[0] == 0:
        out = {key: math.nan for key in out}
    return out


def recall_curve(top: Tensor, targets: Tensor) -> np.ndarray:
    """[K] Recall@k for k = 1 .. K of top lists [Q, K] (one target per row)."""
    k = top.shape[1]
    rank = _target_rank(top, targets)
    counts = torch.bincount(rank[rank < k], minlength=k).cumsum(0).double()
    return (counts / max(1, top.shape[0])).numpy()


def true_recall_curve(top: Tensor, oracle_top: Tensor, chunk: int = 1024) -> np.ndarray:
    """[K] true Recall@k for k = 1 .. K: the mean share of the oracle's top k (``oracle_top`` [Q, K]) that the
    model's top k (``top`` [Q, K]) contains (``funnelrec.metrics.true_recall_at_k`` on every prefix).

    An oracle item at oracle rank ``p_o`` and model rank ``p_m`` is in both top-k sets exactly when
    ``max(p_o, p_m) < k``, so one histogram of that maximum gives every k at once.
    """
    if top.shape != oracle_top.shape:
        raise ConfigError(f"top lists must have one shape, got {list(top.shape)} and {list(oracle_top.shape)}")
    q, k = top.shape
    counts = torch.zeros(k, dtype=torch.float64)
    pos = torch.arange(k)
    for lo in range(0, q, chunk):
        m, o = top[lo: lo + chunk], oracle_top[lo: lo + chunk]
        eq = (o.unsqueeze(2) == m.unsqueeze(1)) & (o >= 1).unsqueeze(2)  # [b, K oracle, K model]
        p_m = torch.where(eq.any(2), eq.int().argmax(2), k)
        both = torch.maximum(p_m, pos.unsqueeze(0))
        counts += torch.bincount(both[both < k], minlength=k).double()
    return (counts.cumsum(0) / (max(1, q) * (pos + 1).double())).numpy()


def run_report(top: Tensor, data: RetrievalData, oracle_top: Tensor | None, ks: Sequence[int] = KS) -> RunReport:
    """The test figures of one run from its top lists (and the oracle's)."""
    targets = data.targets("test")
    metrics = list_metrics(top, targets, ks, data.num_items)
    true_curve = None
    if oracle_top is not None:
        true_curve = true_recall_curve(top, oracle_top)
        for k in ks:
            metrics[f"true_recall@{k}"] = float(true_curve[min(k, len(true_curve)) - 1])
    return RunReport(metrics, recall_curve(top, targets), true_curve)


# ---------------------------------------------------------------------------------------------------- training


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def train_one(name: str, data: RetrievalData, seed: int, lr: float, plan: Plan, progress: bool = False):
    """Build model ``name`` with seed ``seed`` and train it with learning rate ``lr``; returns ``(model, fit)``."""
    overrides, fit = plan.fit_settings(name)
    torch.manual_seed(seed)
    model = build_retriever(name, data.spec, data.item_popularity(), item_features=data.item_features, **overrides)
    result = fit_retriever(model, data, seed=seed, lr=lr, valid_metric=VALID_METRIC, progress=progress, **fit)
    return model, result


def tune(name: str, data: RetrievalData, plan: Plan, progress: bool = False):
    """Train ``name`` with seed 0 at every rate of ``plan.lr_grid``; keep the best by valid Recall@50.

    Returns:
        ``(model, fit, chosen, tuning)``: the chosen seed-0 model and its ``FitResult``, ``{"lr": rate}``, and
        one row per grid point (``lr``, ``valid_recall@50``, ``best_epoch``, ``epochs``, ``seconds``).
    """
    best, tuning = None, []
    for lr in plan.lr_grid:
        model, fit = train_one(name, data, seed=0, lr=float(lr), plan=plan, progress=progress)
        score = fit.best_valid.get(VALID_METRIC, -math.inf)
        tuning.append({"lr": float(lr), f"valid_{VALID_METRIC}": float(score), "best_epoch": float(fit.best_epoch),
                       "epochs": float(len(fit.history)), "seconds": float(fit.seconds)})
        _log(progress, f"  {name} lr={lr:g} seed 0: valid {VALID_METRIC} {score:.4f} (best epoch "
                       f"{fit.best_epoch + 1} of {len(fit.history)}, {fit.seconds:.0f} s)")
        if best is None or score > best[2]:
            best = (model, fit, score, float(lr))
    model, fit, _, lr = best
    return model, fit, {"lr": lr}, tuning


def _run_model(name: str, data: RetrievalData, seeds: int, plan: Plan, oracle_top: Tensor | None,
               progress: bool) -> ModelRows:
    """Tune (trained models), train the remaining seeds and report every run on the test split."""
    rows = ModelRows()
    k = min(plan.curve_k, data.num_items - 1)
    overrides, _ = plan.fit_settings(name)
    probe = build_retriever(name, data.spec, data.item_popularity(), item_features=data.item_features, **overrides)
    if not probe.trainable:  # deterministic: one run, nothing to tune
        top = top_items(model_scores(probe), data, "test", k, plan.batch_size)
        rows.runs.append(run_report(top, data, oracle_top))
        rows.seconds.append(0.0)
        rows.best_epoch.append(math.nan)
        return rows
    del probe
    model, fit, rows.chosen, rows.tuning = tune(name, data, plan, progress)
    for seed in range(seeds):
        if seed > 0:
            model, fit = train_one(name, data, seed, rows.chosen["lr"], plan, progress)
        top = top_items(model_scores(model), data, "test", k, plan.batch_size)
        rows.runs.append(run_report(top, data, oracle_top))
        rows.seconds.append(float(fit.seconds))
        rows.best_epoch.append(float(fit.best_epoch))
        _log(progress, f"  {name} seed {seed}: test recall@50 {rows.runs[-1].metrics['recall@50']:.4f} "
                       f"({fit.seconds:.0f} s)")
    return rows


def _oracle_row(world, data: RetrievalData, plan: Plan) -> tuple[ModelRows, Tensor]:
    """The oracle's top lists on the test targets and its row (true recall 1 by definition)."""
    t0 = time.perf_counter()
    k = min(plan.curve_k, data.num_items - 1)
    top = top_items(lambda b: oracle_scores(world, b.user_id, b.request_time_ms, data.num_items), data, "test", k,
                    plan.batch_size)
    rows = ModelRows(runs=[run_report(top, data, top)], seconds=[time.perf_counter() - t0], best_epoch=[math.nan])
    return rows, top


def compare(data_spec: str, models: Sequence[str], seeds: int = 3, plan: Plan | None = None, cache_dir=None,
            progress: bool = False, max_len: int | None = None) -> Comparison:
    """Tune, train and test every model (see the module doc); the oracle row too on a simulated world.

    Args:
        data_spec: a ``load_source`` spec (``sim:...``, ``kuairand:PATH``, ``movielens:PATH``).
        models: retriever names (keys of ``RETRIEVERS``).
        seeds: seeds per trained model (seed 0 is the tuning seed).
        plan: the :class:`Plan` (default ``Plan()``).
        cache_dir: the simulated-world cache.
        progress: log progress on stderr.
        max_len: shorthand for ``plan.max_len``.

    Raises:
        ConfigError: ``seeds < 1``, an unknown model name, a bad plan.
        DataError: bad data (from the loaders and ``RetrievalData``).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    names = [str(m).strip().lower().replace("-", "_") for m in models]
    unknown = [m for m in names if m not in RETRIEVERS]
    if unknown or not names:
        raise ConfigError(f"unknown retriever(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(RETRIEVERS)}")
    plan = plan or Plan()
    if max_len is not None:
        plan = dataclasses.replace(plan, max_len=max_len)
    t0 = time.perf_counter()
    src, data, sizes = load_data(data_spec, plan, cache_dir=cache_dir, progress=progress)
    _log(progress, f"{data_spec}: {sizes['users']:,} users, {sizes['items']:,} items, "
                   f"{sizes['train_positives']:,} train positives, {sizes['test_targets']:,} test targets")
    rows: dict[str, ModelRows] = {}
    oracle_top = None
    if src.world is not None:
        _log(progress, "oracle: ranking the corpus by true click probability for every test target")
        rows["oracle"], oracle_top = _oracle_row(src.world, data, plan)
    for name in names:
        _log(progress, f"{name}:")
        rows[name] = _run_model(name, data, seeds, plan, oracle_top, progress)
    order = [*names, *(["oracle"] if "oracle" in rows else [])]
    return Comparison(data_spec, src.kind, sizes, {n: rows[n] for n in order}, seeds, plan,
                      time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------ report


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value, nan for none)."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def flat_results(cmp: Comparison, report: Sequence[str] = REPORT) -> dict[str, float | int | None]:
    """``{"model.metric": mean, "model.metric.std": std, "model.seconds", "model.runs", "model.lr", ...}`` of every
    row; a metric a row lacks (true recall without an oracle) is None."""
    flat: dict[str, float | int | None] = {}
    for name, rows in cmp.rows.items():
        for metric in report:
            vals = rows.values(metric)
            m, s = mean_std(vals) if vals else (None, None)
            flat[f"{name}.{metric}"], flat[f"{name}.{metric}.std"] = m, s
        flat[f"{name}.seconds"] = mean_std(rows.seconds)[0]
        flat[f"{name}.runs"] = len(rows.runs)
        for key, value in rows.chosen.items():
            flat[f"{name}.{key}"] = value
    return flat


def _print_table(cmp: Comparison, cols: Sequence[str]) -> None:
    s = cmp.sizes
    print(f"{cmp.data_spec}: {s['train_positives']:,} train positives, {s['test_targets']:,} test targets, "
          f"{s['items']:,} items; mean ± std over {cmp.seeds} seed(s); threads {torch.get_num_threads()}")
    print(f"{'model':<12}" + "".join(f"{c:>18}" for c in cols) + f"{'s/seed':>9}")
    for name, rows in cmp.rows.items():
        cells = []
        for c in cols:
            vals = rows.values(c)
            m, sd = mean_std(vals)
            cells.append(f"{m:.4f} ± {sd:.4f}" if vals else "n/a")
        print(f"{name:<12}" + "".join(f"{x:>18}" for x in cells) + f"{mean_std(rows.seconds)[0]:>9.1f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="sim:small", help="data source (sim:NAME[?k=v], kuairand:PATH, movielens:PATH)")
    p.add_argument("--models", default=",".join(RETRIEVERS), help="comma-separated retriever names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in LR_GRID),
                   help="comma-separated learning rates tried on the valid split (seed 0)")
    p.add_argument("--epochs", type=int, default=None, help="epoch cap of every trained model (default: theirs)")
    p.add_argument("--max-users", type=int, default=None, help="keep a seeded random subset of this many users")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print one flat JSON object as the last line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    epochs = {m: args.epochs for m in RETRIEVERS} if args.epochs else None
    plan = Plan(lr_grid=tuple(float(x) for x in args.lr_grid.split(",") if x.strip()), epochs=epochs,
                max_users=args.max_users, max_len=args.max_len)
    cmp = compare(args.data, models, seeds=args.seeds, plan=plan, cache_dir=args.cache_dir, progress=True)
    cols = [c for c in REPORT if any(rows.values(c) for rows in cmp.rows.values())]
    _print_table(cmp, cols)
    flat = flat_results(cmp, cols)
    if args.json:
        print(json.dumps(flat))
    return flat


if __name__ == "__main__":
    main()
