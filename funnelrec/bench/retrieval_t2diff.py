"""``funnelrec bench retrieval-t2diff``: T2Diff (a diffusion-generated next intent inside the two-tower user tower)
against mixed attention alone and the plain two-tower; its ablations, the generated target's cosine, and latency.

Rows (one item tower for all: :class:`~funnelrec.retrieval.two_tower.TwoTowerRetriever`'s, the same width, user
features, logQ-corrected mixed-negative softmax, optimiser and training budget; only the user tower differs):

* ``two_tower`` — the registered two-tower (user fields + mean-pooled history → MLP);
* ``ma_only`` — :class:`~funnelrec.retrieval.t2diff.T2Diff` with ``generator="mlp"``: mixed attention (session
  Transformer over ``[session; x̂]``, target attention over the history, time lags) with the target predicted by
  an MLP regressor on the same conditioner;
* ``t2diff`` — T2Diff: the target from a T = 50 step DDPM reverse chain over the interest drift, exponential β
  schedule;
* ``t2diff_ddim10`` — the same trained T2Diff models served with a 10-step DDIM chain (η = 1, seeded noise; no
  retraining);
* ablations (seed 0 only): ``no_drift`` (diffuse the next item's vector itself), ``linear`` (linear β schedule),
  ``t10`` (T = 10 diffusion steps), each trained like ``t2diff``.

What is measured (leave-last-out test targets, full-corpus ranking with the target's history excluded; mean and
``.std`` over seeds):

* ``ROW.recall@K`` and ``ROW.mrr@K`` for K = 2, 20, 50, 100 (:func:`funnelrec.retrieval.compare.list_metrics`),
  and on a simulated world ``ROW.true_recall@100`` (the share of the oracle's top 100 — items by the world's true
  click probability for that user on the test day — that the top 100 holds);
* paired differences over seeds ``t2diff_minus_ma_only.FIG`` and ``ma_only_minus_two_tower.FIG`` (mean,
  ``.std``) and ``…_beats_…`` (mean paired difference above 2 std, DESIGN §7); the issue's targets read
  ``t2diff_minus_ma_only.recall@100.margin_2std`` (= mean − 2 std) > 0 and the same for MA-only over two-tower;
* **cosine of the generated target to the true next item**, on the test targets, in each model's own item space:
  ``t2diff.cosine`` (the T = 50 chain), ``t2diff_ddim10.cosine``, ``ma_only.cosine`` (its MLP target), and
  ``t2diff.regressor_cosine``: an MLP regressor (the ``ma_only`` generator: same conditioner, MSE to the same
  drift) trained on the *frozen* item vectors of each T2Diff model, early-stopped on valid cosine — the
  like-for-like regressor baseline; ``t2diff.last_item_cosine`` (x̂ = the last behaviour) as a floor;
  ``t2diff_cosine_minus_regressor`` (target > 0);
* **latency** (seed-0 models, one request: the test request with the longest history, every row timed turn by
  turn): ``ROW.user_ms`` (p50; ``.p99``) of the user tower, ``ROW.user_flops``
  (``torch.utils.flop_counter.FlopCounterMode``), ``user_latency_ratio.ROW`` against the two-tower; and the
  **end-to-end** request at 100k and 1M items, ``ROW.e2e_ms@N`` = user tower + an
  :class:`~funnelrec.retrieval.ann.AnnIndex` (IVF, nprobe 16, FAISS on 1 thread) top-100 search, where the corpus
  is **random unit vectors of the item tower's width** (the item tower is the two-tower's, so its vectors have that
  shape; the simulated catalogue has only 7,583 items); ``ann_ms@N`` is the search alone;
* training: ``ROW.train_seconds`` and ``ROW.best_epoch`` per seed.

Protocol: the leave-last-out protocol of ``funnelrec bench retrieval-baselines`` (``docs/protocols.md``):
positives are first clicks (every rating on MovieLens), per user the last is test, the one before valid; histories
strictly before the target, the last 50. Every model trains with AdamW at one learning rate, batch size and epoch
cap, early-stopped on valid Recall@50 (one trial each: no model is tuned; test is never read for a choice).

Sizes: the full run keeps a seeded subset of :data:`FULL_USERS` users of ``sim:bench-v1`` (every item stays in the
corpus) and caps training at :data:`FULL_PLAN` ``epochs`` so that 3 seeds × 3 models + 3 ablations on one seed, the
regressor probes, the oracle pass and the latency part fit about 40 minutes on 2 cores. Measured in a sized-down
trial on a shared 2-core machine (one torch thread, the valid pass included), an epoch over the 92,376 training
positives of 5,000 users takes ~13 s for the two-tower, ~30 s for MA-only and ~49 s for T2Diff: ~23 min for the
3 × 3 main runs and ~12 min for the ablations at their 5-epoch caps, plus ~5 min for the oracle, the probes and the
latency part (a 1M-vector IVF build included) — about 40 min on one thread, less on two. ``--quick``: a 150-user,
3-day small world with 1,000 items, one seed, one epoch, a 16-wide model with T = 8, latency corpora of 5k and 20k
items; keys only, nothing written.

Example:
    funnelrec bench retrieval-t2diff --json
    funnelrec bench retrieval-t2diff --quick --json --data movielens:tests/fixtures/ml-100k
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from funnelrec.bench.harness import BenchResult, Target, fix_threads, interleaved_times, register_benchmark
from funnelrec.data.sources import load_source
from funnelrec.errors import ConfigError
from funnelrec.retrieval import RetrievalData, build_retriever, fit_retriever
from funnelrec.retrieval.ann import AnnConfig, AnnIndex
from funnelrec.retrieval.compare import (list_metrics, mean_std, model_scores, subsample_users, top_items,
                                         true_recall_curve)
from funnelrec.retrieval.evaluate import oracle_scores
from funnelrec.retrieval.t2diff import TARGET_KEY, NextIntentGenerator, T2Diff

__all__ = ["bench_retrieval_t2diff", "Plan", "FULL_PLAN", "QUICK_PLAN", "FULL_DATA", "QUICK_DATA", "FULL_USERS",
           "ROWS", "TRAINED", "ABLATIONS", "MODEL_DEFAULTS", "T2DIFF_DEFAULTS", "KS", "row_overrides",
           "target_cosines", "train_regressor", "latency", "summary_markdown"]

FULL_DATA = "sim:bench-v1"
QUICK_DATA = "sim:small?num_users=150&days=3&catalog.num_items=1000"
#: Users kept by the full run (a seeded subset of bench-v1's 27,285).
FULL_USERS = 5_000
#: Rows of the main table, in order (``t2diff_ddim10`` is ``t2diff`` served with DDIM).
ROWS = ("two_tower", "ma_only", "t2diff", "t2diff_ddim10")
#: Rows that are trained (every seed).
TRAINED = ("two_tower", "ma_only", "t2diff")
#: Ablations of T2Diff (seed 0): T2Diff config overrides (``t10``'s steps come from ``Plan.ablation_steps``).
ABLATIONS: dict[str, dict] = {"no_drift": {"drift": False}, "linear": {"schedule": "linear"}, "t10": {}}
#: Settings shared by every row (``TwoTowerConfig`` / ``T2DiffConfig`` fields).
MODEL_DEFAULTS: dict = dict(out_dim=32, embed_dim=16, hidden=(128,), temperature=0.05, negatives="mixed",
                            num_sampled=512, sample_alpha=0.75)
#: T2Diff settings of the ``ma_only`` and ``t2diff`` rows (``T2DiffConfig`` fields).
T2DIFF_DEFAULTS: dict = dict(heads=2, layers=1, session_gap_s=1800.0, session_max=10, steps=50,
                             schedule="exponential", sampler="ddpm", denoiser_hidden=128, attention_hidden=(64,),
                             generator_weight=1.0)
#: Cut-offs of the reported Recall / MRR.
KS = (2, 20, 50, 100)
#: Requests of the batched user-tower timing (cost per request when B requests are served at once).
LATENCY_BATCH = 256
_LABELS = {"two_tower": "Two-tower", "ma_only": "Mixed attention only (MLP target)", "t2diff": "T2Diff (T = 50)",
           "t2diff_ddim10": "T2Diff, served with DDIM-10", "no_drift": "T2Diff − drift preparation",
           "linear": "T2Diff, linear β schedule", "t10": "T2Diff, T = 10"}


@dataclass(frozen=True)
class Plan:
    """How much work a run does.

    Args:
        max_users: keep a seeded random subset of this many users (None: all).
        user_seed: seed of that subset.
        max_len: N, history behaviours read by every model.
        epochs / patience / batch_size / lr: ``fit_retriever`` settings, the same for every model.
        model: overrides of :data:`MODEL_DEFAULTS` (every row).
        t2diff: overrides of :data:`T2DIFF_DEFAULTS` (the T2Diff rows).
        ablations: which of :data:`ABLATIONS` to run (seed 0).
        ablation_steps: T of the ``t10`` ablation.
        ddim_steps: S of the DDIM-served row.
        ddim_eta: its η (1: seeded noise at each of the S steps; η = 0, the deterministic chain, gave a clearly
            worse target in a trial — cosine 0.78 against 0.88 for η = 1 and for the T = 50 DDPM chain).
        probe_epochs: epoch cap of the regressor probe (patience 1 on valid cosine).
        corpus_sizes: item counts of the end-to-end latency corpora (random unit vectors).
        ann: the ANN index of the end-to-end latency.
        latency_repeats: timed calls per latency figure.
        eval_batch_size: requests per evaluation batch.
    """

    max_users: int | None = FULL_USERS
    user_seed: int = 0
    max_len: int = 50
    epochs: int = 5
    patience: int = 2
    batch_size: int = 256
    lr: float = 3e-3
    model: dict = field(default_factory=dict)
    t2diff: dict = field(default_factory=dict)
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    ablation_steps: int = 10
    ddim_steps: int = 10
    ddim_eta: float = 1.0
    probe_epochs: int = 3
    corpus_sizes: tuple[int, ...] = (100_000, 1_000_000)
    ann: AnnConfig = field(default_factory=lambda: AnnConfig(kind="ivf", nprobe=16))
    latency_repeats: int = 50
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        for name in ("max_len", "epochs", "patience", "batch_size", "ablation_steps", "ddim_steps", "probe_epochs",
                     "latency_repeats", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"plan.{name} must be an integer >= 1, got {value!r}")
        if self.max_users is not None and (not isinstance(self.max_users, int) or self.max_users < 3):
            raise ConfigError(f"plan.max_users must be an integer >= 3 or None, got {self.max_users!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"plan.lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.ddim_eta, (int, float)) and self.ddim_eta >= 0):
            raise ConfigError(f"plan.ddim_eta must be >= 0, got {self.ddim_eta!r}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ConfigError(f"plan.ablations: unknown {', '.join(bad)}; choose from {', '.join(ABLATIONS)}")
        if not self.corpus_sizes or any(not isinstance(n, int) or n < 200 for n in self.corpus_sizes):
            raise ConfigError(f"plan.corpus_sizes must hold integers >= 200, got {self.corpus_sizes!r}")


FULL_PLAN = Plan()
QUICK_PLAN = Plan(max_users=None, max_len=20, epochs=1, patience=1, batch_size=256,
                  model=dict(out_dim=16, embed_dim=8, hidden=(32,), num_sampled=128),
                  t2diff=dict(steps=8, denoiser_hidden=32, attention_hidden=(16,)), ablation_steps=4, ddim_steps=4,
                  probe_epochs=1, corpus_sizes=(5_000, 20_000), latency_repeats=5, eval_batch_size=256)


def _log(on: bool, text: str) -> None:
    if on:
        print(f"retrieval-t2diff: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- models


def row_overrides(row: str, plan: Plan) -> tuple[str, dict]:
    """``(registry name, config overrides)`` of a trained row or an ablation."""
    base = {**MODEL_DEFAULTS, **plan.model}
    if row == "two_tower":
        return "two_tower", base
    t2 = {**base, **T2DIFF_DEFAULTS, **plan.t2diff, "max_len": plan.max_len}
    if row == "ma_only":
        return "t2diff", {**t2, "generator": "mlp"}
    if row == "t2diff":
        return "t2diff", t2
    if row in ABLATIONS:
        extra = {"steps": plan.ablation_steps} if row == "t10" else ABLATIONS[row]
        return "t2diff", {**t2, **extra}
    raise ConfigError(f"unknown row {row!r}")


def _train(row: str, data: RetrievalData, plan: Plan, seed: int, progress: bool):
    """Build ``row`` (a trained row or an ablation) with ``seed`` and train it; returns ``(model, FitResult)``."""
    name, overrides = row_overrides(row, plan)
    torch.manual_seed(seed)
    model = build_retriever(name, data.spec, data.item_popularity(), item_features=data.item_features, **overrides)
    fit = fit_retriever(model, data, epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, seed=seed,
                        valid_metric="recall@50", patience=plan.patience, eval_batch_size=plan.eval_batch_size)
    model.eval()
    _log(progress, f"seed {seed} {row}: best epoch {fit.best_epoch + 1} of {len(fit.history)}, valid recall@50 "
                   f"{fit.best_valid.get('recall@50', math.nan):.4f}, {fit.seconds:.0f} s")
    return model, fit


class _Served(torch.nn.Module):
    """A T2Diff model served with another reverse chain (same weights): ``score_all`` / ``user_vectors``."""

    def __init__(self, model: T2Diff, **sample_kw):
        super().__init__()
        self.model, self.kw = model, sample_kw

    def user_vectors(self, batch):
        b, _, _ = self.model._history(batch)
        target = self.model.generated_target(b, **self.kw)
        tb = dataclasses.replace(b, extras={**b.extras, TARGET_KEY: target})
        return self.model.user_vectors(tb)

    def score_all(self, batch):
        scores = self.user_vectors(batch) @ self.model.all_item_vectors().t()
        scores[:, 0] = float("-inf")
        return scores

    def generated_target(self, batch):
        return self.model.generated_target(batch, **self.kw)


def _test_figures(score_fn, data: RetrievalData, oracle_top, plan: Plan) -> dict[str, float]:
    """Recall / MRR at :data:`KS` and true recall@100 of one model on the test targets."""
    k = min(max(KS), data.num_items - 1)
    top = top_items(score_fn, data, "test", k, plan.eval_batch_size)
    m = list_metrics(top, data.targets("test"), KS, data.num_items)
    out = {f"{n}@{kk}": m[f"{n}@{kk}"] for n in ("recall", "mrr") for kk in KS}
    if oracle_top is not None:
        out["true_recall@100"] = float(true_recall_curve(top, oracle_top)[min(100, k) - 1])
    return out


# --------------------------------------------------------------------------------------------------- cosine


@torch.no_grad()
def target_cosines(model, data: RetrievalData, split: str = "test", batch_size: int = 512,
                   generator: NextIntentGenerator | None = None, item_model: T2Diff | None = None) -> dict[str, float]:
    """Mean cosine of a generated next-intent vector to the true next item's item-tower vector over ``split``.

    Args:
        model: a T2Diff (or a :class:`_Served` view): its ``generated_target`` is scored, unless ``generator``.
        data: the data.
        split: ``"valid"`` or ``"test"``.
        batch_size: requests per batch.
        generator: score this generator instead (a regressor probe on ``item_model``'s frozen item vectors).
        item_model: the T2Diff whose item tower defines the space (default: ``model``).

    Returns:
        ``{"cosine", "last_item_cosine"}`` (the second: the last behaviour as the guess; rows with a history).
    """
    base = item_model or (model.model if isinstance(model, _Served) else model)
    base.eval()
    sums, last, rows, rows_h = 0.0, 0.0, 0, 0
    for batch in data.batches(split, batch_size):
        b, valid, length = base._history(batch)
        y = base.item_vectors(b.cand_sparse[:, 0], b.cand_dense[:, 0])
        if generator is not None:
            x = base.behaviour_vectors(b.hist_items, valid)
            t = generator.generate(x, b.hist_gap_s, length)
        else:
            t = model.generated_target(batch)
        sums += float(F.cosine_similarity(t, y, dim=-1).sum())
        rows += b.batch_size
        has = length > 0
        if has.any():
            x = base.behaviour_vectors(b.hist_items, valid)
            last += float(F.cosine_similarity(x[has, -1], y[has], dim=-1).sum())
            rows_h += int(has.sum())
    return {"cosine": sums / max(1, rows), "last_item_cosine": last / max(1, rows_h)}


def train_regressor(model: T2Diff, data: RetrievalData, plan: Plan, seed: int) -> tuple[NextIntentGenerator, dict]:
    """An MLP regressor of the next item (the ``ma_only`` generator: conditioner + MLP, MSE to the scaled drift)
    trained on ``model``'s frozen item vectors; early stopping (patience 1) on valid cosine. Returns the probe and
    ``{"epochs", "valid_cosine", "seconds"}``."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    probe = NextIntentGenerator(dataclasses.replace(model.config, generator="mlp"))
    opt = torch.optim.AdamW(probe.parameters(), lr=plan.lr)
    model.eval()
    best, best_state, epochs = -math.inf, None, 0
    for epoch in range(plan.probe_epochs):
        probe.train()
        for batch in data.batches("train", plan.batch_size, shuffle=True, seed=seed * 100_003 + epoch):
            b, valid, length = model._history(batch)
            with torch.no_grad():
                x = model.behaviour_vectors(b.hist_items, valid)
                y = model.item_vectors(b.cand_sparse[:, 0], b.cand_dense[:, 0])
            loss = probe.loss(x, b.hist_gap_s, length, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        probe.eval()
        epochs += 1
        cos = target_cosines(model, data, "valid", plan.eval_batch_size, generator=probe)["cosine"]
        if cos > best:
            best, best_state = cos, {k: v.clone() for k, v in probe.state_dict().items()}
        else:
            break
    probe.load_state_dict(best_state)
    probe.eval()
    return probe, {"epochs": float(epochs), "valid_cosine": best, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------- latency


@torch.no_grad()
def latency(users: dict[str, object], batch, dim: int, plan: Plan, progress: bool = False, many=None
            ) -> dict[str, float]:
    """User-tower latency and FLOPs of one request (``batch``, one row) per row, the user tower's cost per request
    in a batch (``many``: B requests at once, optional), and the end-to-end request (user tower + top-100 ANN
    search) over random unit-vector corpora of ``plan.corpus_sizes`` items (see the module doc)."""
    out: dict[str, float] = {}
    fns = {}
    for row, m in users.items():
        with FlopCounterMode(display=False) as counter:
            m.user_vectors(batch)
        out[f"{row}.user_flops"] = float(counter.get_total_flops())
        fns[row] = lambda m=m: m.user_vectors(batch)
    for row, t in interleaved_times(fns, plan.latency_repeats).items():
        out[f"{row}.user_ms"] = float(np.median(t) * 1e3)
        out[f"{row}.user_ms.p99"] = float(np.percentile(t, 99) * 1e3)
    if many is not None:
        b = many.batch_size
        fns = {row: (lambda m=m: m.user_vectors(many)) for row, m in users.items()}
        for row, t in interleaved_times(fns, max(3, plan.latency_repeats // 10), warmup=1).items():
            out[f"{row}.user_ms_per_request@{b}"] = float(np.median(t) * 1e3 / b)
    faiss_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        for n in plan.corpus_sizes:
            vectors = rng.standard_normal((n, dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            t0 = time.perf_counter()
            faiss.omp_set_num_threads(faiss_before)
            index = AnnIndex.build(vectors, ids=np.arange(1, n + 1), config=plan.ann)
            faiss.omp_set_num_threads(1)
            out[f"ann_build_s@{n}"] = time.perf_counter() - t0
            del vectors
            query = {row: m.user_vectors(batch).numpy().astype(np.float32) for row, m in users.items()}
            e2e = {row: (lambda m=m: index.search(m.user_vectors(batch).numpy().astype(np.float32), 100))
                   for row, m in users.items()}
            e2e["ann"] = lambda: index.search(query["two_tower"], 100)
            for row, t in interleaved_times(e2e, plan.latency_repeats).items():
                key = f"ann_ms@{n}" if row == "ann" else f"{row}.e2e_ms@{n}"
                out[key] = float(np.median(t) * 1e3)
            _log(progress, f"latency at {n:,} items: ANN {out[f'ann_ms@{n}']:.3f} ms, e2e two-tower "
                           f"{out[f'two_tower.e2e_ms@{n}']:.3f} ms, T2Diff {out[f't2diff.e2e_ms@{n}']:.3f} ms")
            del index
    finally:
        faiss.omp_set_num_threads(faiss_before)
    for row in users:
        out[f"user_latency_ratio.{row}"] = out[f"{row}.user_ms"] / out["two_tower.user_ms"]
        for n in plan.corpus_sizes:
            out[f"e2e_latency_ratio.{row}@{n}"] = out[f"{row}.e2e_ms@{n}"] / out[f"two_tower.e2e_ms@{n}"]
    return out


def _longest_request(data: RetrievalData):
    """The test request with the longest history, as a one-row batch."""
    lengths = torch.cat([b.hist_len for b in data.batches("test", 4096)])
    return data.batch("test", [int(torch.argmax(lengths))])


# --------------------------------------------------------------------------------------------------- report


def _aggregate(runs: list[dict[str, float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        vals = [r[key] for r in runs if r.get(key) is not None and not math.isnan(r[key])]
        m, s = mean_std(vals) if vals else (math.nan, math.nan)
        out[key] = None if math.isnan(m) else m
        out[f"{key}.std"] = None if math.isnan(s) else s
    return out


def _paired(a: list[dict], b: list[dict], figures: Sequence[str], name: str) -> dict:
    out: dict = {}
    for f in figures:
        diffs = [x[f] - y[f] for x, y in zip(a, b) if f in x and f in y]
        m, s = mean_std(diffs) if diffs else (math.nan, math.nan)
        out[f"{name}.{f}"] = None if math.isnan(m) else m
        out[f"{name}.{f}.std"] = None if math.isnan(s) else s
        out[f"{name}.{f}.margin_2std"] = None if math.isnan(m) else m - 2 * s
        out[f"{name}.{f}.beats"] = bool(diffs) and bool(m > 2 * s)
    return out


def _cell(res: dict, key: str, digits: int = 4) -> str:
    m, s = res.get(key), res.get(f"{key}.std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def summary_markdown(res: dict, plan: Plan, data_spec: str, has_oracle: bool) -> str:
    """Main table, ablations, cosine, latency and the protocol paragraph."""
    figs = [f"recall@{k}" for k in KS] + [f"mrr@{k}" for k in KS] + (["true_recall@100"] if has_oracle else [])
    head = [f.replace("recall", "R").replace("mrr", "MRR").replace("true_R", "true R") for f in figs]
    lines = [f"## T2Diff vs mixed attention only vs two-tower on `{data_spec}`", "",
             "Test targets, full-corpus ranking, history excluded; mean ± std over seeds (ablations: seed 0).", "",
             "| model | " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in figs) + " |"]
    for row in ROWS:
        lines.append(f"| {_LABELS[row]} | " + " | ".join(_cell(res, f"{row}.{f}") for f in figs) + " |")
    for row in plan.ablations:
        lines.append(f"| {_LABELS[row]} (seed 0) | " + " | ".join(_cell(res, f"ablation.{row}.{f}") for f in figs)
                     + " |")
    lines += ["", "Paired differences over seeds (mean ± std; **beats** = mean > 2 std):", "",
              "| comparison | R@20 | R@100 | MRR@20 | MRR@100 | beats on R@100 |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, label in (("t2diff_minus_ma_only", "T2Diff − MA only"), ("ma_only_minus_two_tower",
                                                                        "MA only − two-tower"),
                        ("t2diff_minus_two_tower", "T2Diff − two-tower")):
        lines.append(f"| {label} | " + " | ".join(_cell(res, f"{name}.{f}") for f in
                                                  ("recall@20", "recall@100", "mrr@20", "mrr@100"))
                     + f" | {res.get(f'{name}.recall@100.beats')} |")
    lines += ["", "Cosine of the generated next intent to the true next item's vector (test targets, each model's "
              "own item space):", "", "| generator | cosine |", "| --- | ---: |",
              f"| T2Diff, T = 50 DDPM chain | {_cell(res, 't2diff.cosine')} |",
              f"| T2Diff, DDIM-10 | {_cell(res, 't2diff_ddim10.cosine')} |",
              f"| MLP regressor on T2Diff's frozen item vectors | {_cell(res, 't2diff.regressor_cosine')} |",
              f"| the last behaviour (floor) | {_cell(res, 't2diff.last_item_cosine')} |",
              f"| MA-only's own MLP target (its item space) | {_cell(res, 'ma_only.cosine')} |"]
    sizes, lb = plan.corpus_sizes, res["latency_batch"]
    lines += ["", "Latency of one request (the test request with the longest history; p50 over "
              f"{plan.latency_repeats} turns; torch threads {res['threads']}, FAISS 1 thread). End-to-end = user "
              "tower + IVF top-100 search over **random unit vectors of the item tower's width** (not trained "
              "items: the catalogue is small):", "",
              f"| user tower | MFLOPs | user ms | × two-tower | user ms / request in a batch of {lb} | "
              + " | ".join(f"e2e ms @ {n:,}" for n in sizes) + " |",
              "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for row in ROWS:
        if f"{row}.user_ms" not in res:
            continue
        lines.append(f"| {_LABELS[row]} | {res[f'{row}.user_flops'] / 1e6:.2f} | {res[f'{row}.user_ms']:.2f} | "
                     f"{res[f'user_latency_ratio.{row}']:.1f} | "
                     f"{res[f'{row}.user_ms_per_request@{lb}']:.3f} | "
                     + " | ".join(f"{res[f'{row}.e2e_ms@{n}']:.2f}" for n in sizes) + " |")
    lines.append("| ANN search alone | | | | | " + " | ".join(f"{res[f'ann_ms@{n}']:.3f}" for n in sizes) + " |")
    users = f"{res['users']:,} users" + (f" (a seeded random subset of {res['users_total']:,}, user seed "
                                          f"{plan.user_seed}; every item stays in the corpus)"
                                          if res["users"] < res["users_total"] else "")
    lines += ["", f"**Protocol.** `{data_spec}`: {users}, {res['items']:,} items, {res['train_positives']:,} train "
              f"positives, {res['test_targets']:,} test targets. Leave-last-out per user (the last positive test, the "
              "one before valid), histories strictly before the target (the last "
              f"{plan.max_len}), full-corpus ranking with the target's history excluded. Every model: width "
              f"{res['dim']}, the two-tower's item tower and logQ-corrected mixed-negative softmax, AdamW lr "
              f"{plan.lr:g}, batch {plan.batch_size}, ≤ {plan.epochs} epochs with early stopping on valid Recall@50 "
              f"(patience {plan.patience}); one trial per model, none tuned, test never read for a choice. T2Diff: "
              f"T = {res['steps']} DDPM steps in training and serving, exponential β schedule, drift preparation, "
              f"session gap {res['session_gap_s']:.0f} s (≤ {res['session_max']} behaviours). {res['seeds']} seed(s); "
              f"torch threads {res['threads']}; wall time {res['wall_s'] / 60:.1f} min. See `docs/retrieval-t2diff.md` "
              "for the model and what is the paper's."]
    return "\n".join(lines)


def _plot(res: dict, plan: Plan, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [(r, r) for r in ROWS] + [(f"ablation.{a}", a) for a in plan.ablations]
    x = np.arange(len(KS))
    w = 0.8 / len(rows)
    for j, (key, label) in enumerate(rows):
        vals = [res.get(f"{key}.recall@{k}") or 0.0 for k in KS]
        errs = [res.get(f"{key}.recall@{k}.std") or 0.0 for k in KS]
        axes[0].bar(x + (j - (len(rows) - 1) / 2) * w, vals, w, yerr=errs, label=_LABELS[label])
    axes[0].set_xticks(x, [f"R@{k}" for k in KS])
    axes[0].set_ylabel("Recall@K (test)")
    axes[0].legend(fontsize=7)
    sizes = list(plan.corpus_sizes)
    for row in ROWS:
        if f"{row}.e2e_ms@{sizes[0]}" in res:
            axes[1].plot(sizes, [res[f"{row}.e2e_ms@{n}"] for n in sizes], marker="o", label=_LABELS[row])
    axes[1].plot(sizes, [res[f"ann_ms@{n}"] for n in sizes], marker="x", ls="--", color="black", label="ANN alone")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("corpus size (random unit vectors)")
    axes[1].set_ylabel("ms per request (p50)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    name = "retrieval-t2diff.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


# ---------------------------------------------------------------------------------------------------- benchmark


@register_benchmark("retrieval-t2diff")
def bench_retrieval_t2diff(quick: bool = False, data: str | None = None, seeds: int = 3, threads: int = 1,
                           out_dir: str = "docs/results") -> BenchResult:
    """Run the benchmark (module doc); ``--quick`` uses one seed and writes nothing. One torch thread by default
    (these tensors are small: a second thread mostly adds synchronisation, and it keeps the latency figures
    comparable with the other retrieval benchmarks)."""
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
    rd = RetrievalData.from_source(src, max_len=plan.max_len)
    _log(progress, f"{spec}: {rd.num_examples('train'):,} train positives, {rd.num_examples('test'):,} test targets, "
                   f"{rd.num_items - 1:,} items, {seeds} seed(s), {threads} thread(s)")
    oracle_top = None
    if src.world is not None:
        _log(progress, "oracle top lists of the test targets")
        k = min(max(KS), rd.num_items - 1)
        oracle_top = top_items(lambda b: oracle_scores(src.world, b.user_id, b.request_time_ms, rd.num_items), rd,
                               "test", k, plan.eval_batch_size)
    runs: dict[str, list[dict]] = {r: [] for r in (*ROWS, *plan.ablations)}
    seed0: dict[str, object] = {}
    for seed in range(seeds):
        for row in TRAINED:
            model, fit = _train(row, rd, plan, seed, progress)
            figs = _test_figures(model_scores(model), rd, oracle_top, plan)
            figs.update(train_seconds=float(fit.seconds), best_epoch=float(fit.best_epoch + 1))
            if row != "two_tower":
                figs["cosine"] = target_cosines(model, rd, "test", plan.eval_batch_size)["cosine"]
            if row == "t2diff":
                ddim = _Served(model, sampler="ddim", steps=plan.ddim_steps, eta=plan.ddim_eta)
                dfigs = _test_figures(ddim.score_all, rd, oracle_top, plan)
                dfigs["cosine"] = target_cosines(ddim, rd, "test", plan.eval_batch_size)["cosine"]
                runs["t2diff_ddim10"].append(dfigs)
                probe, info = train_regressor(model, rd, plan, seed)
                figs["regressor_cosine"] = target_cosines(model, rd, "test", plan.eval_batch_size,
                                                          generator=probe)["cosine"]
                figs["last_item_cosine"] = target_cosines(model, rd, "test", plan.eval_batch_size)["last_item_cosine"]
                figs["regressor_epochs"] = info["epochs"]
                _log(progress, f"seed {seed}: cosine T2Diff {figs['cosine']:.4f}, DDIM-10 {dfigs['cosine']:.4f}, "
                               f"regressor {figs['regressor_cosine']:.4f}, last item {figs['last_item_cosine']:.4f}")
                if seed == 0:
                    seed0["t2diff_ddim10"] = ddim
            runs[row].append(figs)
            _log(progress, f"seed {seed} {row}: test recall@100 {figs['recall@100']:.4f}, mrr@20 {figs['mrr@20']:.4f}")
            if seed == 0:
                seed0[row] = model
        if seed == 0:
            for ab in plan.ablations:
                model, fit = _train(ab, rd, plan, 0, progress)
                figs = _test_figures(model_scores(model), rd, oracle_top, plan)
                figs.update(train_seconds=float(fit.seconds), best_epoch=float(fit.best_epoch + 1),
                            cosine=target_cosines(model, rd, "test", plan.eval_batch_size)["cosine"])
                runs[ab].append(figs)
                _log(progress, f"ablation {ab}: test recall@100 {figs['recall@100']:.4f}")
    results: dict = {"data": spec, "data_kind": src.kind,
                     "users": int(src.log.get_column("user_id").n_unique()),
                     "users_total": int(full.log.get_column("user_id").n_unique()), "items": rd.num_items - 1,
                     "train_positives": rd.num_examples("train"), "test_targets": rd.num_examples("test"),
                     "seeds": seeds, "threads": threads}
    t2cfg = seed0["t2diff"].config
    results.update(dim=t2cfg.out_dim, steps=t2cfg.steps, session_gap_s=t2cfg.session_gap_s,
                   session_max=t2cfg.session_max)
    for row in ROWS:
        results.update({f"{row}.{k}": v for k, v in _aggregate(runs[row]).items()})
    for ab in plan.ablations:
        results.update({f"ablation.{ab}.{k}": v for k, v in runs[ab][0].items()})
    figures = [f"{n}@{k}" for n in ("recall", "mrr") for k in KS] + (["true_recall@100"] if oracle_top is not None
                                                                     else [])
    results.update(_paired(runs["t2diff"], runs["ma_only"], figures, "t2diff_minus_ma_only"))
    results.update(_paired(runs["ma_only"], runs["two_tower"], figures, "ma_only_minus_two_tower"))
    results.update(_paired(runs["t2diff"], runs["two_tower"], figures, "t2diff_minus_two_tower"))
    cos = [r["cosine"] - r["regressor_cosine"] for r in runs["t2diff"]]
    m, s = mean_std(cos)
    results["t2diff_cosine_minus_regressor"], results["t2diff_cosine_minus_regressor.std"] = m, s
    _log(progress, "latency")
    one = _longest_request(rd)
    many = rd.batch("test", np.arange(min(LATENCY_BATCH, rd.num_examples("test"))))
    users = {"two_tower": seed0["two_tower"], "ma_only": seed0["ma_only"], "t2diff": seed0["t2diff"],
             "t2diff_ddim10": seed0["t2diff_ddim10"]}
    results.update(latency(users, one, t2cfg.out_dim, plan, progress, many=many))
    results["latency_batch"] = many.batch_size
    results["latency_history_len"] = int(one.hist_len[0])
    for row in TRAINED:
        results[f"{row}.params"] = float(sum(p.numel() for p in seed0[row].parameters()))
    results["wall_s"] = time.perf_counter() - start
    plots = [] if quick else _plot(results, plan, Path(out_dir))
    results["wall_s"] = time.perf_counter() - start
    targets = [Target("t2diff_minus_ma_only.recall@100.margin_2std", ">", 0.0),
               Target("ma_only_minus_two_tower.recall@100.margin_2std", ">", 0.0),
               Target("t2diff_cosine_minus_regressor", ">", 0.0)]
    config = {"data": spec, "seeds": seeds, "threads": threads, "plan": dataclasses.asdict(plan),
              "model": {**MODEL_DEFAULTS, **plan.model}, "t2diff": {**T2DIFF_DEFAULTS, **plan.t2diff},
              "ablations": {a: row_overrides(a, plan)[1] for a in plan.ablations},
              "chosen": "no tuning: one trial per model, the same settings for every row"}
    return BenchResult("retrieval-t2diff", results, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary_markdown(results, plan, spec, oracle_top is not None))
