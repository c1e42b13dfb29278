"""``funnelrec bench ranking``: every ranking model on long-history request batches, with matched budgets.

The benchmark every ranking model joins (later ranking issues add rows to :data:`ENTRIES`). On ``sim:long`` (3,000
heavy users, 30 days, long histories) by default: the last day is test, the day before valid, and the most recent
``train_rows`` impressions before them are train (the histories reach back over the whole log); valid and test keep
the impressions of ``eval_users`` users drawn once (the same for every model). Per model and task:
test AUC, GAUC, gap closed between the popularity/position floor and the oracle, watch-time XAUC; parameters,
forward+backward FLOPs per sample (``FlopCounterMode``) and training samples/s; mean ± std over seeds.

Rows (:class:`Entry`): the baselines (MMoE, PLE, DIN, DCNv2, a plain full-attention Transformer, the two-stage
LONGER + RankMixer pipeline, RankMixer trained per tab as the single-scenario model), the paper models (RankMixer,
LONGER; HyFormer, MTmixAtt; OneRank) and one-flag ablations (RankMixer without token mixing / with one shared FFN; LONGER
without token merge / with uniformly sampled queries; HyFormer with merged sequences / without the pooled query input /
without global tokens; MTmixAtt with random or manual groups, fixed mixing, zero-initialised mixing, the ReLU-sparse
MoE; OneRank without the task mask, without gradient detachment, with MLP heads instead of matching) and the *lifelong*
rows of Ranking IV (``Entry.lifelong``: histories of ``Sizes.lifelong_len`` events): SOLAR (SVD attention over the
whole lifelong history), softmax target attention over the last 512 events and over the lifelong history, linear
attention and SIM-style top-k attention over the lifelong history (all on SOLAR's backbone, ``funnelrec.ranking.solar``), SOLAR with
``svd_exact``; DIN (the last 100 events) is their short-history baseline. A SOLAR-backbone row also reports the
energy ranks R90/R95/R99 of its learned event tokens (and of the same model at initialisation) over the test users'
lifelong histories — SOLAR's low-rank premise. **Tuning** (valid only, equal budget): every main row gets the same
learning-rate grid with seed 0 and early stopping on the valid mean AUC; an ablation reuses its parent's learning rate
(one flag changes, nothing else). Budgets: the non-sequence models are sized to ~1.2–1.5 MFLOPs/sample (±20 % of
MMoE's, ``tests/ranking/test_ranker_registry.py``); the sequence models read the same history (128 events in the
full run); LONGER is cheaper than the full Transformer by construction (token merge, k sampled queries) — the FLOPs
column shows by how much — and HyFormer matches the two-stage LONGER + RankMixer pipeline's FLOPs (±25 %,
``tests/ranking/test_ranker_registry.py``). MTmixAtt matches RankMixer's FLOPs (its sparse scenario experts give it
about twice the dense parameters).

**The papers' claims as bars** (targets): LONGER's mean test AUC above the full Transformer's at fewer FLOPs;
RankMixer's above DCNv2's and MMoE's at matched FLOPs; HyFormer's at or above LONGER + RankMixer's at matched FLOPs;
MTmixAtt's above RankMixer's on every reported tab and above the single-scenario models' on every non-main tab; and
the *switch tests*: with the long-term interest effect switched off (``interests.long_term_enabled=false``),
LONGER's edge over DIN shrinks; with the tab effect switched off (``responses.tab_effect=false``), MTmixAtt's per-tab
edge over RankMixer shrinks. OneRank against PLE (the seesaw): no task worse by more than 2 std, a gain on every
sparse task (follow, comment, forward), click not worse by more than 2 std, at matched FLOPs. SOLAR above
truncated-512 attention, DIN, linear and SIM-style attention; with the long-term interest effect switched off, its edge
over truncated attention (the value of the lifelong history) shrinks. SOLAR's two attention modes
(:data:`SOLAR_ROWS`: ``svd_compact``, the model's default, and ``svd_exact``) are both trained and reported, each with
its switch test; the mode is a hyperparameter chosen on the valid mean AUC, and the bars are on the chosen one
(``solar_selected_*``).

**Scenarios** (KuaiRand ``tab``): every row also reports its mean test AUC per tab (tabs with at least
``MIN_TAB_ROWS`` test impressions); a *single-scenario* row (``Entry.per_tab``) trains one model per tab on that
tab's impressions only. **Switch tests** (:data:`SWITCHES`): the named rows are trained again, with the same learning
rates, on the world with one effect switched off, and the edge of the first row over the second must shrink.

**Extending** (``--rows A,B --extend``): later ranking issues add rows without re-running the others — the previous
``docs/results/ranking.json`` is read (its sizes must equal this run's), the named rows are trained (again), the
switch rows they need are trained on the switched worlds, and the report is rebuilt over every row. Training is
seeded and deterministic on CPU, so a retrained row reproduces its figures.

**Scenarios at scale** (``funnelrec bench ranking-scenarios``): the per-tab rows (:data:`SCENARIO_ROWS`) and the tab
switch test again, on every train impression of ``sim:bench-v1`` (:func:`scenario_sizes`), reported in
``docs/results/ranking-scenarios.*`` — the main run is too small to decide the per-tab claims.

Example:
    funnelrec bench ranking --json
    funnelrec bench ranking --rows hyformer,longer_rankmixer --extend --json
    funnelrec bench ranking --quick --json
    funnelrec bench ranking-scenarios --json
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from funnelrec.bench.harness import BenchResult, Target, fix_threads, register_benchmark
from funnelrec.bench.ranking_baselines import (
    LR_GRID, RankingData, build_model, fit_model, load_ranking_data, mean_std, oracle_scores, popularity_scores,
    predict_split, score_split,
)
from funnelrec.bench.ranking_report import plot_rows, summary_markdown
from funnelrec.data.dataset import RequestDataset
from funnelrec.errors import ConfigError
from funnelrec.metrics import auc, gap_closed
from funnelrec.ranking.budget import count_params_flops
from funnelrec.ranking.solar import ENERGY_FRACTIONS, energy_ranks


@dataclass(frozen=True)
class Entry:
    """One row of the benchmark.

    Args:
        key: the row name (results keys start with it).
        model: the registry name (``funnelrec.ranking.RANKERS``).
        args: model overrides on top of the defaults.
        parent: for an ablation, the row whose tuned learning rate it reuses (None: tuned itself).
        per_tab: a single-scenario row: one model per tab, each trained (and early-stopped) on its tab's impressions
            only, each tab's test impressions scored by its own model.
        lifelong: the row reads lifelong histories (the last ``Sizes.lifelong_len`` events: 2,048, the whole log of
            a median ``sim:long`` user) instead of the run's ``history_len``; tuned on ``Sizes.lifelong_lr_grid``.
    """

    key: str
    model: str
    args: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    per_tab: bool = False
    lifelong: bool = False


ENTRIES: tuple[Entry, ...] = (
    Entry("mmoe", "mmoe"),
    Entry("ple", "ple"),
    Entry("din", "din"),
    Entry("dcnv2", "dcnv2"),
    Entry("transformer", "transformer"),
    Entry("rankmixer", "rankmixer"),
    Entry("longer", "longer"),
    Entry("rankmixer-no_mixing", "rankmixer", {"mixing": False}, parent="rankmixer"),
    Entry("rankmixer-shared_ffn", "rankmixer", {"ffn": "shared"}, parent="rankmixer"),
    Entry("longer-no_merge", "longer", {"merge": "none"}, parent="longer"),
    Entry("longer-uniform_queries", "longer", {"query_sampling": "uniform"}, parent="longer"),
    Entry("rankmixer-single_scenario", "rankmixer", parent="rankmixer", per_tab=True),
    # Ranking II: HyFormer against the two-stage LONGER + RankMixer pipeline; MTmixAtt against RankMixer per tab
    Entry("longer_rankmixer", "longer_rankmixer"),
    Entry("hyformer", "hyformer"),
    Entry("hyformer-merged", "hyformer", {"sequences": "merged"}, parent="hyformer"),
    Entry("hyformer-no_pooled_query", "hyformer", {"pooled_query": False}, parent="hyformer"),
    Entry("hyformer-no_global_tokens", "hyformer", {"global_tokens": False}, parent="hyformer"),
    Entry("mtmixatt", "mtmixatt"),
    Entry("mtmixatt-random_groups", "mtmixatt", {"grouping": "random"}, parent="mtmixatt"),
    Entry("mtmixatt-manual_groups", "mtmixatt", {"grouping": "manual"}, parent="mtmixatt"),
    Entry("mtmixatt-fixed_mixing", "mtmixatt", {"mixing": "fixed"}, parent="mtmixatt"),
    Entry("mtmixatt-zero_init", "mtmixatt", {"mixing_init": "zero"}, parent="mtmixatt"),
    Entry("mtmixatt-relu_sparse", "mtmixatt", {"moe": "relu_sparse"}, parent="mtmixatt"),
    # Ranking III: OneRank against PLE / MMoE (the seesaw)
    Entry("onerank", "onerank"),
    Entry("onerank-no_mask", "onerank", {"task_mask": False}, parent="onerank"),
    Entry("onerank-no_detach", "onerank", {"detach_cross": False, "detach_shared": False}, parent="onerank"),
    Entry("onerank-mlp_heads", "onerank", {"scoring": "mlp"}, parent="onerank"),
    # Ranking IV: SOLAR on the lifelong history against truncated, linear and SIM-style attention (and DIN above)
    Entry("solar", "solar", lifelong=True),
    Entry("target_attention-last512", "solar", {"attention": "full", "history_pool": 512}, lifelong=True),
    Entry("linear_attention-lifelong", "solar", {"attention": "linear"}, lifelong=True),
    Entry("sim-lifelong", "solar", {"attention": "sim"}, lifelong=True),
    Entry("target_attention-lifelong", "solar", {"attention": "full"}, lifelong=True),
    Entry("solar-svd_exact", "solar", {"attention": "svd_exact"}, parent="solar", lifelong=True),
)


@dataclass(frozen=True)
class Switch:
    """A switch test: ``rows`` = (model, baseline) trained again on the world with ``override``; the model's edge
    over the baseline (over tasks, or averaged over the reported tabs with ``per_tab``) must shrink."""

    name: str
    override: str
    prefix: str
    rows: tuple[str, str]
    per_tab: bool = False

    @property
    def edge_key(self) -> str:
        model, base = self.rows
        return f"{_ident(model)}{'_tab' if self.per_tab else ''}_edge_over_{base}"

    @property
    def shrink_key(self) -> str:
        return f"{_ident(self.rows[0])}{'_tab' if self.per_tab else ''}_edge_shrink_switch_off"


SWITCHES: tuple[Switch, ...] = (
    Switch("long_term", "interests.long_term_enabled=false", "switch.", ("longer", "din")),
    Switch("tab", "responses.tab_effect=false", "switch_tab.", ("mtmixatt", "rankmixer"), per_tab=True),
    Switch("lifelong", "interests.long_term_enabled=false", "switch.", ("solar", "target_attention-last512")),
    Switch("lifelong_exact", "interests.long_term_enabled=false", "switch.",
           ("solar-svd_exact", "target_attention-last512")),
)
#: Backward-compatible names of the long-term switch.
SWITCH_ROWS = SWITCHES[0].rows
SWITCH_OVERRIDE = SWITCHES[0].override
#: Tabs with fewer test impressions get no per-tab figures; tab 1 is the main scenario (45 % of the traffic).
MIN_TAB_ROWS = 1_000
MAIN_TAB = 1
#: Sizes that must match for ``--extend`` to merge a new run into a previous one.
SIZE_KEYS = ("data", "seeds", "lr_grid", "epochs", "batch_size", "history_len", "train_rows", "eval_users")


@dataclass
class Sizes:
    """How big a run is."""

    data: str
    train_rows: int | None
    history_len: int
    epochs: int
    batch_size: int
    lr_grid: tuple[float, ...]
    eval_users: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    seq_args: dict[str, Any] = field(default_factory=dict)
    longer_args: dict[str, Any] = field(default_factory=dict)
    lifelong_len: int = 8192
    lifelong_lr_grid: tuple[float, ...] | None = None
    solar_args: dict[str, Any] = field(default_factory=dict)

    @property
    def lifelong_grid(self) -> tuple[float, ...]:
        return self.lifelong_lr_grid or self.lr_grid


#: Models that read the event sequence as tokens (they take ``seq_args``).
SEQUENCE_MODELS = ("longer", "transformer", "longer_rankmixer", "hyformer")


def sizes(quick: bool, data: str | None) -> Sizes:
    if quick:
        return Sizes(data or "sim:small?num_users=150&days=4", None, 16, 1, 64, (3e-3,),
                     model_args={"embed_dim": 8}, seq_args={"history_pool": 16, "dim": 8},
                     longer_args={"num_queries": 4}, lifelong_len=48, solar_args={"dim": 8, "rank": 4, "topk": 8})
    # Sized for two CPU cores: the full Transformer (every candidate re-encodes the history) trains at ~800 samples/s
    # at 128 events and ~300 at 256, so the run keeps 128 events, 200k train impressions, one epoch, and the valid and
    # test impressions of 1,000 of the 3,000 users (~78k each) — about an hour for every row, 3 seeds, the switch test.
    # The lifelong rows read the last 2,048 events (the whole 30-day log of a median user; the longest histories of
    # sim:long reach 5.3k): at every event, padded to the batch's longest, one fit took ~15 minutes on two cores.
    # They are tuned on one learning rate — the top of LR_GRID, which every main row of the full run chose.
    return Sizes(data or "sim:long", 200_000, 128, 1, 256, LR_GRID, eval_users=1000,
                 seq_args={"history_pool": 128}, longer_args={"num_queries": 16}, lifelong_len=2048,
                 lifelong_lr_grid=(max(LR_GRID),))


#: The rows of ``bench ranking-scenarios``: MTmixAtt against RankMixer (one model for every tab, the tab a feature)
#: and against RankMixer trained per tab; the tab switch test adds both shared models on the world without the tab
#: effect.
SCENARIO_ROWS = ("rankmixer", "mtmixatt", "rankmixer-single_scenario")


def scenario_sizes(quick: bool, data: str | None) -> Sizes:
    """Sizes of ``bench ranking-scenarios``: every train impression of ``sim:bench-v1`` (~2.2M, ~11x the main run's
    200k, over a 7,583-item catalogue whose ids all get trained), two epochs, every valid and test user.

    Why: in the main run the single-scenario models see a few dozen optimiser steps on the small tabs and every
    row stays within ~6 % of the floor-to-oracle gap, so the per-tab claims were decided by noise. RankMixer and
    MTmixAtt train at ~29k and ~15k samples/s on one thread here, so the run (3 rows, 3 seeds, the learning-rate grid
    and the switch test) took 72 minutes on one thread. The history is the main run's 128 events.
    """
    if quick:
        return sizes(True, data)
    return Sizes(data or "sim:bench-v1", None, 128, 2, 256, LR_GRID, eval_users=None,
                 seq_args={"history_pool": 128}, longer_args={"num_queries": 16})


def _with_override(spec: str, override: str) -> str:
    if not spec.startswith("sim:"):
        raise ConfigError(f"the switch test needs a simulated world, got {spec!r}")
    return spec + ("&" if "?" in spec else "?") + override


def _model_args(entry: Entry, size: Sizes) -> dict[str, Any]:
    extra = size.seq_args if entry.model in SEQUENCE_MODELS else {}
    if entry.model in ("longer", "longer_rankmixer"):
        extra = {**extra, **size.longer_args}
    if entry.model == "solar":
        extra = {"history_pool": size.lifelong_len, **size.solar_args}
    return {**size.model_args, **extra, **entry.args}


# ------------------------------------------------------------------------------------------------ scenarios
def report_tabs(rd: RankingData) -> list[int]:
    """The tabs with at least ``MIN_TAB_ROWS`` test impressions (sorted)."""
    counts = rd.parts["test"].group_by("tab").len()
    return sorted(int(t) for t, n in zip(counts["tab"], counts["len"]) if n >= MIN_TAB_ROWS)


def tab_scores(probs: np.ndarray, rd: RankingData, tabs: list[int], split: str = "test") -> dict[str, float]:
    """Per reported tab: AUC per task on that tab's impressions of ``split`` and their mean over tasks."""
    part = rd.parts[split]
    split_tab = part["tab"].to_numpy()
    out: dict[str, float] = {}
    for tab in tabs:
        rows = split_tab == tab
        aucs = []
        for j, task in enumerate(rd.tasks):
            a = auc(probs[rows, j], part[task].to_numpy()[rows])
            out[f"tab{tab}.auc.{task}"] = a
            aucs.append(a)
        out[f"tab{tab}.auc_mean"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan
    return out


def trainable_tabs(rd: RankingData) -> list[int]:
    """Tabs with train and valid impressions (a single-scenario model needs both; other tabs' test rows get 0.5)."""
    have = [set(int(t) for t in rd.parts[k]["tab"].unique()) for k in ("train", "valid")]
    return sorted(have[0] & have[1])


def _rebuild(rd: RankingData, parts: dict[str, pl.DataFrame], history_len: int, note: str) -> RankingData:
    """``rd`` with other impressions and/or another history length (same spec, vocabularies, timelines, debiaser)."""
    ref = rd.datasets["train"]
    datasets = {k: RequestDataset(df, rd.source.users, rd.source.videos, rd.spec, ref.timelines,
                                  history_len=history_len, tasks=rd.tasks)
                for k, df in parts.items() if df.height}
    return RankingData(rd.source, rd.tasks, parts, datasets, rd.spec, rd.watch, rd.protocol + note)


def tab_view(rd: RankingData, tab: int) -> RankingData:
    """``rd`` restricted to the impressions of one tab (same feature spec, vocabularies, histories and debiaser)."""
    parts = {k: df.filter(pl.col("tab") == tab) for k, df in rd.parts.items()}
    empty = [k for k, df in parts.items() if k != "test" and df.height == 0]
    if empty:
        raise ConfigError(f"tab {tab} has no {empty[0]} impressions: a single-scenario model cannot be trained")
    return _rebuild(rd, parts, rd.datasets["train"].history_len, f"; tab {tab} only")


def lifelong_view(rd: RankingData, history_len: int) -> RankingData:
    """``rd`` with histories of ``history_len`` events (the same impressions, in the same order)."""
    return _rebuild(rd, rd.parts, history_len, f"; histories of {history_len} events")


def history_spectrum_figures(model, ds: RequestDataset, batch_size: int = 128) -> dict[str, float]:
    """SOLAR's low-rank premise on learned embeddings: for the last request of every user of ``ds``, the energy
    ranks R90/R95/R99 of the model's event-token matrix (``model.history_spectrum``; ``spectrum.*`` raw, as SOLAR
    decomposes it, ``spectrum_centered.*`` with the mean event removed): median, mean and 90th percentile over
    users, the token width and the median number of events."""
    users = ds.user_ids.numpy()
    last = len(users) - 1 - np.unique(users[::-1], return_index=True)[1]  # requests are in time order
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for prefix, centered in (("spectrum", False), ("spectrum_centered", True)):
            parts = [model.history_spectrum(ds.batch(last[i: i + batch_size]), centered=centered)
                     for i in range(0, len(last), batch_size)]
            s = torch.cat([p[0] for p in parts])
            events = torch.cat([p[1] for p in parts]).double()
            ranks = energy_ranks(s, ENERGY_FRACTIONS).double()
            out.update({f"{prefix}.dim": float(s.shape[-1]), f"{prefix}.users": float(len(last)),
                        f"{prefix}.events_median": float(events.median())})
            for j, frac in enumerate(ENERGY_FRACTIONS):
                r = ranks[:, j]
                name = f"{prefix}.r{round(frac * 100)}"
                out.update({f"{name}.median": float(r.median()), f"{name}.mean": float(r.mean()),
                            f"{name}.p90": float(torch.quantile(r, 0.9))})
    finally:
        model.train(was_training)
    return out


def fit_predict_per_tab(entry: Entry, rd: RankingData, lr: float, size: Sizes, seed: int, args: dict[str, Any],
                        views: dict[int, RankingData]) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """Train one model per tab (``views``), score each tab's test impressions with its model; returns the test
    probabilities and watch predictions in test row order and facts (row-weighted valid AUC, samples/s, epochs)."""
    test_tab = rd.parts["test"]["tab"].to_numpy()
    probs = np.full((len(test_tab), len(rd.tasks)), 0.5)
    watch = np.zeros(len(test_tab)) if rd.has_watch else None
    facts, weights = [], []
    for tab, view in views.items():
        model, f = fit_model(entry.model, view, lr, size.epochs, size.batch_size, seed, args)
        facts.append(f)
        weights.append(view.parts["valid"].height)
        rows = np.flatnonzero(test_tab == tab)
        if len(rows):
            p, w = predict_split(model, view.datasets["test"], len(rows), batch_size=1024, with_watch=rd.has_watch)
            probs[rows] = p
            if watch is not None:
                watch[rows] = w
    w = np.asarray(weights, dtype=float) / sum(weights)
    valid = np.array([f["valid_auc_mean"] for f in facts])
    return probs, watch, {"valid_auc_mean": float(np.nansum(w * valid)),
                          "samples_per_s": float(np.mean([f["samples_per_s"] for f in facts])),
                          "epochs_run": float(np.mean([f["epochs_run"] for f in facts]))}


# ------------------------------------------------------------------------------------------------ training
def run_rows(rd: RankingData, entries: list[Entry], size: Sizes, seeds: int, lrs: dict[str, float] | None = None,
             prefix: str = "") -> tuple[dict[str, Any], dict[str, float]]:
    """Train, test and cost every entry on ``rd``; returns the flat figures and the learning rate of each row."""
    log = lambda msg: print(f"[ranking] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    res: dict[str, Any] = {}
    chosen: dict[str, float] = dict(lrs or {})
    tabs = report_tabs(rd)
    views: dict[int, RankingData] | None = None
    lifelong: RankingData | None = None
    for e in entries:
        args = _model_args(e, size)
        key = prefix + e.key
        if e.key in chosen or e.parent in chosen:
            grid = (chosen.get(e.key, chosen.get(e.parent)),)
        else:
            grid = size.lifelong_grid if e.lifelong else size.lr_grid
        if e.per_tab and views is None:
            views = {t: tab_view(rd, t) for t in trainable_tabs(rd)}
        if e.lifelong and lifelong is None:
            lifelong = lifelong_view(rd, size.lifelong_len)
        data = lifelong if e.lifelong else rd  # same impressions in the same order: scored against rd's labels
        sample = data.datasets["train"].batch(np.arange(min(64, len(data.datasets["train"]))))

        def fit_once(seed: int, lr: float):
            """Train one model (or one per tab: their test predictions, as the models are not kept);
            returns (facts, model or (probs, watch))."""
            log(f"{key}: seed {seed}, lr {lr:g}" + (", one model per tab" if e.per_tab else ""))
            if e.per_tab:
                probs, watch, f = fit_predict_per_tab(e, rd, lr, size, seed, args, views)
                return f, (probs, watch)
            model, f = fit_model(e.model, data, lr, size.epochs, size.batch_size, seed, args)
            return f, model

        def test_predictions(fitted):
            if isinstance(fitted, tuple):
                return fitted
            return predict_split(fitted, data.datasets["test"], rd.parts["test"].height,
                                 batch_size=256 if e.lifelong else 1024, with_watch=rd.has_watch)

        trials = [(lr, *fit_once(0, lr)) for lr in grid]
        best = max(trials, key=lambda t: (np.nan_to_num(t[1]["valid_auc_mean"], nan=-1.0), -t[0]))
        lr = best[0]
        runs = [best[1:]] + [fit_once(seed, lr) for seed in range(1, seeds)]
        facts = [f for f, _ in runs]
        preds = [test_predictions(fitted) for _, fitted in runs]
        # every tab's model has the parent's architecture: cost that on a fresh one
        cost_model = build_model(e.model, rd, args) if e.per_tab else best[2]
        chosen[e.key] = lr
        per_seed = []
        for i, (probs, watch) in enumerate(preds):
            scores = score_split(probs, watch, rd, seed=i)
            scores.update(tab_scores(probs, rd, tabs))
            per_seed.append(scores)
        for k in per_seed[0]:
            res[f"{key}.{k}"], res[f"{key}.{k}.std"] = mean_std([s[k] for s in per_seed])
        auc_means = [float(np.nanmean([s[f"auc.{t}"] for t in rd.tasks])) for s in per_seed]
        res[f"{key}.auc_mean"], res[f"{key}.auc_mean.std"] = mean_std(auc_means)
        res[f"{key}.lr"] = lr
        res[f"{key}.valid_auc_mean"] = best[1]["valid_auc_mean"]
        res[f"{key}.samples_per_s"] = float(np.mean([f["samples_per_s"] for f in facts]))
        res[f"{key}.epochs_run"] = float(np.mean([f["epochs_run"] for f in facts]))
        cost = count_params_flops(cost_model, sample)
        res.update({f"{key}.{k}": cost[k] for k in ("params_dense", "params_embedding", "flops_per_sample")})
        if hasattr(cost_model, "history_spectrum"):  # the low-rank premise: learned vs freshly initialised tokens
            res.update({f"{key}.{k}": v for k, v in history_spectrum_figures(cost_model, data.datasets["test"]).items()})
            torch.manual_seed(0)
            fresh = build_model(e.model, data, args)
            res.update({f"{key}.init_{k}": v for k, v in history_spectrum_figures(fresh, data.datasets["test"]).items()})
    return res, chosen


def _add_references(res: dict[str, Any], rd: RankingData, prefix: str = "") -> None:
    tabs = report_tabs(rd)
    for ref, scorer in (("popularity", popularity_scores), ("oracle", oracle_scores if rd.is_sim else None)):
        if scorer is None:
            continue
        scores, probs = scorer(rd, with_probs=True)
        res.update({f"{prefix}{ref}.{k}": v for k, v in scores.items()})
        res.update({f"{prefix}{ref}.{k}": v for k, v in tab_scores(probs, rd, tabs).items()})
        res[f"{prefix}{ref}.auc_mean"] = float(np.nanmean([scores[f"auc.{t}"] for t in rd.tasks]))


# ------------------------------------------------------------------------------------------------ claims
def _tab_edge(res: dict[str, Any], model: str, base: str, tabs: list[int], prefix: str = "") -> list[float]:
    return [res[f"{prefix}{model}.tab{t}.auc_mean"] - res[f"{prefix}{base}.tab{t}.auc_mean"] for t in tabs
            if f"{prefix}{model}.tab{t}.auc_mean" in res and f"{prefix}{base}.tab{t}.auc_mean" in res]


#: SOLAR's comparisons: truncated full attention, DIN on the last 100 events, linear and SIM-style attention on the
#: lifelong history (bars), and full softmax attention on the lifelong history (the reference it approximates).
SOLAR_BASELINES = ("target_attention-last512", "din", "linear_attention-lifelong", "sim-lifelong",
                   "target_attention-lifelong")
#: SOLAR's two attention modes in the benchmark: ``svd_compact`` (the default, the paper's fast path) and
#: ``svd_exact`` (softmax attention over the rank-R truncation of the history).
SOLAR_ROWS = ("solar", "solar-svd_exact")


def _ident(key: str) -> str:
    return key.replace("-", "_")


#: The sparse tasks of the seesaw claim (OneRank: they gain without the dense task, click, losing).
SPARSE_TASKS = ("is_follow", "is_comment", "is_forward")


def seesaw(res: dict[str, Any], model: str, base: str, tasks: tuple[str, ...]) -> None:
    """The seesaw figures of ``model`` against ``base``: tasks improved / degraded (any margin), tasks worse by more
    than 2 std (std of the difference over seeds: sqrt(std_model² + std_base²)), the smallest gain on the sparse
    tasks and the click difference in units of that std."""
    diffs, stds = {}, {}
    for t in tasks:
        diffs[t] = res[f"{model}.auc.{t}"] - res[f"{base}.auc.{t}"]
        s_m, s_b = res.get(f"{model}.auc.{t}.std"), res.get(f"{base}.auc.{t}.std")
        stds[t] = math.sqrt(np.nan_to_num(s_m) ** 2 + np.nan_to_num(s_b) ** 2)
    res[f"{model}_tasks_improved_vs_{base}"] = float(sum(d > 0 for d in diffs.values()))
    res[f"{model}_tasks_degraded_vs_{base}"] = float(sum(d < 0 for d in diffs.values()))
    res[f"{model}_tasks_worse_than_{base}_by_2std"] = float(sum(diffs[t] < -2 * stds[t] for t in tasks))
    sparse = [t for t in SPARSE_TASKS if t in diffs]
    if sparse:
        res[f"{model}_sparse_gain_min_vs_{base}"] = float(min(diffs[t] for t in sparse))
    if "is_click" in diffs:
        res[f"{model}_click_minus_{base}"] = diffs["is_click"]
        res[f"{model}_click_minus_{base}_in_std"] = (diffs["is_click"] / stds["is_click"] if stds["is_click"] > 0
                                                     else math.nan)  # one seed: no spread to compare with


def claims(res: dict[str, Any], rd: RankingData, keys: list[str], switches: list[Switch]) -> None:
    """Gap closed per row and task, and the figures behind the papers' claims (for the rows present)."""
    for k in keys:
        for t in rd.tasks:
            if rd.is_sim:
                res[f"{k}.gap_closed.{t}"] = gap_closed(res[f"{k}.auc.{t}"], res[f"popularity.auc.{t}"],
                                                        res[f"oracle.auc.{t}"])
    have = set(keys)
    tabs = report_tabs(rd)
    if {"longer", "transformer"} <= have:
        res["longer_minus_transformer_auc_mean"] = res["longer.auc_mean"] - res["transformer.auc_mean"]
        res["longer_flops_vs_transformer"] = res["longer.flops_per_sample"] / res["transformer.flops_per_sample"]
    if {"rankmixer", "dcnv2", "mmoe"} <= have:
        res["rankmixer_minus_best_of_dcnv2_mmoe_auc_mean"] = res["rankmixer.auc_mean"] - max(
            res["dcnv2.auc_mean"], res["mmoe.auc_mean"])
        res["rankmixer_flops_vs_mmoe"] = res["rankmixer.flops_per_sample"] / res["mmoe.flops_per_sample"]
    if {"hyformer", "longer_rankmixer"} <= have:
        res["hyformer_minus_longer_rankmixer_auc_mean"] = res["hyformer.auc_mean"] - res["longer_rankmixer.auc_mean"]
        res["hyformer_flops_vs_longer_rankmixer"] = (res["hyformer.flops_per_sample"]
                                                     / res["longer_rankmixer.flops_per_sample"])
    if {"mtmixatt", "rankmixer"} <= have and (edges := _tab_edge(res, "mtmixatt", "rankmixer", tabs)):
        res["mtmixatt_minus_rankmixer_tab_auc_min"] = float(min(edges))
        res["mtmixatt_tabs_won_vs_rankmixer"] = float(np.mean(np.array(edges) > 0))
        res["mtmixatt_flops_vs_rankmixer"] = res["mtmixatt.flops_per_sample"] / res["rankmixer.flops_per_sample"]
    single = "rankmixer-single_scenario"
    nonmain = [t for t in tabs if t != MAIN_TAB]
    if {"mtmixatt", single} <= have and (edges := _tab_edge(res, "mtmixatt", single, nonmain)):
        res["mtmixatt_minus_single_scenario_nonmain_tab_auc_mean"] = float(np.mean(edges))
        res["mtmixatt_minus_single_scenario_nonmain_tab_auc_min"] = float(min(edges))
    if {"onerank", "ple"} <= have:
        seesaw(res, "onerank", "ple", rd.tasks)
        res["onerank_flops_vs_ple"] = res["onerank.flops_per_sample"] / res["ple.flops_per_sample"]
    for solar, base in itertools.product(SOLAR_ROWS, SOLAR_BASELINES):
        if {solar, base} <= have:
            res[f"{_ident(solar)}_minus_{_ident(base)}_auc_mean"] = res[f"{solar}.auc_mean"] - res[f"{base}.auc_mean"]
            res[f"{_ident(solar)}_flops_vs_{_ident(base)}"] = (res[f"{solar}.flops_per_sample"]
                                                               / res[f"{base}.flops_per_sample"])
    for sw in switches:
        model, base = sw.rows
        if sw.per_tab:
            on = float(np.mean(_tab_edge(res, model, base, tabs)))
            off = float(np.mean(_tab_edge(res, model, base, tabs, prefix=sw.prefix)))
        else:
            on = res[f"{model}.auc_mean"] - res[f"{base}.auc_mean"]
            off = res[f"{sw.prefix}{model}.auc_mean"] - res[f"{sw.prefix}{base}.auc_mean"]
        res[sw.edge_key], res[sw.edge_key + "_switch_off"] = on, off
        res[sw.shrink_key] = on - off
    selected_solar(res, have, switches)


def selected_solar(res: dict[str, Any], have: set[str], switches: list[Switch]) -> None:
    """SOLAR's attention mode as a hyperparameter: the mode of :data:`SOLAR_ROWS` with the best valid mean AUC
    (valid only, as the learning rate) carries SOLAR's claims as ``solar_selected_*`` figures."""
    modes = [s for s in SOLAR_ROWS if s in have and np.isfinite(res.get(f"{s}.valid_auc_mean", np.nan))]
    if not modes:
        return
    pick = max(modes, key=lambda s: res[f"{s}.valid_auc_mean"])
    res["solar_selected_is_svd_exact"] = float(pick == "solar-svd_exact")
    res["solar_selected.auc_mean"], res["solar_selected.valid_auc_mean"] = (res[f"{pick}.auc_mean"],
                                                                            res[f"{pick}.valid_auc_mean"])
    for base in SOLAR_BASELINES:
        for figure in (f"minus_{_ident(base)}_auc_mean", f"flops_vs_{_ident(base)}"):
            if f"{_ident(pick)}_{figure}" in res:
                res[f"solar_selected_{figure}"] = res[f"{_ident(pick)}_{figure}"]
    for sw in switches:
        if sw.rows[0] == pick:
            res["solar_selected_edge_shrink_switch_off"] = res[sw.shrink_key]


def targets_for(res: dict[str, Any], switches: list[Switch]) -> list[Target]:
    """The papers' claims as bars, for the figures a run has."""
    bars = [("longer_minus_transformer_auc_mean", ">", 0.0), ("longer_flops_vs_transformer", "<", 1.0),
            ("rankmixer_minus_best_of_dcnv2_mmoe_auc_mean", ">", 0.0), ("rankmixer_flops_vs_mmoe", "in", (0.8, 1.2)),
            ("hyformer_minus_longer_rankmixer_auc_mean", ">=", 0.0),
            ("hyformer_flops_vs_longer_rankmixer", "in", (0.8, 1.25)),
            ("mtmixatt_minus_rankmixer_tab_auc_min", ">", 0.0), ("mtmixatt_flops_vs_rankmixer", "in", (0.8, 1.2)),
            ("mtmixatt_minus_single_scenario_nonmain_tab_auc_min", ">", 0.0),
            ("onerank_tasks_worse_than_ple_by_2std", "<=", 0.0), ("onerank_sparse_gain_min_vs_ple", ">", 0.0),
            ("onerank_click_minus_ple_in_std", ">=", -2.0), ("onerank_flops_vs_ple", "in", (0.8, 1.2))]
    # SOLAR's bars are on its valid-selected mode; each mode's own figures stay in the results
    bars += [(f"solar_selected_minus_{_ident(b)}_auc_mean", ">", 0.0) for b in SOLAR_BASELINES[:4]]
    bars += [(sw.shrink_key, ">", 0.0) for sw in switches if sw.rows[0] not in SOLAR_ROWS]
    bars += [("solar_selected_edge_shrink_switch_off", ">", 0.0)]
    return [Target(name, op, value) for name, op, value in bars if name in res]


# ------------------------------------------------------------------------------------------------ extending
def previous_run(out_dir: str | Path, size: Sizes, seeds: int,
                 name: str = "ranking") -> tuple[dict[str, Any], dict[str, Any]]:
    """The results and config of ``out_dir/NAME.json``; ``ConfigError`` if missing, quick, or of other sizes."""
    path = Path(out_dir) / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"--extend needs a previous full run in {path} (run `funnelrec bench {name}` first)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        prev_res, prev_cfg = dict(doc["results"]), {**doc["config"], "command": doc.get("command", "")}
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a ranking results document ({err})") from err
    now = {"data": size.data, "seeds": seeds, "lr_grid": list(size.lr_grid), "epochs": size.epochs,
           "batch_size": size.batch_size, "history_len": size.history_len, "train_rows": size.train_rows,
           "eval_users": size.eval_users}
    for k in SIZE_KEYS:
        if prev_cfg.get(k) != now[k]:
            raise ConfigError(f"--extend: {path} was run with {k}={prev_cfg.get(k)!r}, this run has {now[k]!r}; "
                              f"re-run every row instead")
    return {k: (math.nan if v is None else v) for k, v in prev_res.items()}, prev_cfg


@register_benchmark("ranking")
def bench_ranking(quick: bool = False, data: str | None = None, seeds: int | None = None, threads: int = 2,
                  rows: tuple[str, ...] | None = None, extend: bool = False, switch: bool = True,
                  out_dir: str = "docs/results") -> BenchResult:
    """Run the ranking benchmark (see the module docstring); ``rows`` restricts it to some entries, ``extend``
    merges them into the previous full run in ``out_dir``."""
    return run_ranking("ranking", sizes(quick, data), quick, seeds, threads, rows, extend, switch, out_dir)


@register_benchmark("ranking-scenarios")
def bench_ranking_scenarios(quick: bool = False, data: str | None = None, seeds: int | None = None,
                            threads: int = 1, rows: tuple[str, ...] | None = None,
                            out_dir: str = "docs/results") -> BenchResult:
    """The scenario (``tab``) claims of MTmixAtt at ~11x the main benchmark's training data (:func:`scenario_sizes`):
    the rows of :data:`SCENARIO_ROWS` (or ``rows``) and the tab switch test; writes ``ranking-scenarios.*``."""
    return run_ranking("ranking-scenarios", scenario_sizes(quick, data), quick, seeds, threads,
                       tuple(rows or SCENARIO_ROWS), False, True, out_dir)


def run_ranking(name: str, size: Sizes, quick: bool, seeds: int | None, threads: int,
                rows: tuple[str, ...] | None, extend: bool, switch: bool, out_dir: str) -> BenchResult:
    """One ranking run at ``size`` over ``rows`` (every entry if None), reported as benchmark ``name``."""
    wall0 = time.perf_counter()
    seeds = seeds if seeds is not None else (1 if quick else 3)
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if rows is not None and (unknown := set(rows) - {e.key for e in ENTRIES}):
        raise ConfigError(f"unknown ranking rows {sorted(unknown)}; known: {', '.join(e.key for e in ENTRIES)}")
    if extend and (quick or not rows):
        raise ConfigError("--extend adds rows to a previous full run: give --rows and no --quick")
    threads = fix_threads(threads)
    res: dict[str, Any] = {}
    chosen: dict[str, float] = {}
    prev_cfg: dict[str, Any] = {}
    if extend:
        res, prev_cfg = previous_run(out_dir, size, seeds, name)
        done = [e.key for e in ENTRIES if f"{e.key}.auc_mean" in res and e.key not in rows]
        chosen = {k: res[f"{k}.lr"] for k in done}
        for k in rows:  # a retrained row drops its old figures (and those of the switched worlds)
            for stale in [x for x in res if x.startswith((f"{k}.",) + tuple(f"{sw.prefix}{k}." for sw in SWITCHES))]:
                del res[stale]
    train_now = [e for e in ENTRIES if rows is None or e.key in rows]
    rd = load_ranking_data(size.data, history_len=size.history_len, max_train_rows=size.train_rows,
                           eval_users=size.eval_users)
    _add_references(res, rd)
    figures, trained_lrs = run_rows(rd, train_now, size, seeds, lrs=chosen)
    res.update(figures)
    chosen.update(trained_lrs)
    present = [e for e in ENTRIES if f"{e.key}.auc_mean" in res]
    switches = []
    for sw in SWITCHES:
        if not (switch and rd.is_sim and all(k in chosen for k in sw.rows)):
            continue
        missing = [e for e in ENTRIES if e.key in sw.rows and f"{sw.prefix}{e.key}.auc_mean" not in res]
        if missing:
            off = load_ranking_data(_with_override(size.data, sw.override), history_len=size.history_len,
                                    max_train_rows=size.train_rows, eval_users=size.eval_users)
            _add_references(res, off, prefix=sw.prefix)
            figures, _ = run_rows(off, missing, size, seeds, lrs=chosen, prefix=sw.prefix)
            res.update(figures)
        switches.append(sw)
    keys = [e.key for e in present]
    claims(res, rd, keys, switches)
    wall = time.perf_counter() - wall0 + float(res.get("wall_s", 0.0) if extend else 0.0)
    info = {"data": size.data, "seeds": seeds, "epochs": size.epochs, "threads": threads,
            "lr_grid": size.lr_grid, "history_len": size.history_len, "train_rows": rd.parts["train"].height,
            "valid_rows": rd.parts["valid"].height, "test_rows": rd.parts["test"].height, "oracle": rd.is_sim,
            "eval_users": size.eval_users, "wall_s": wall}
    res.update({"data": size.data, "seeds": seeds, "train_impressions": info["train_rows"],
                "test_impressions": info["test_rows"], "wall_s": wall})
    ablations = {e.key for e in present if e.parent is not None}
    plots = [] if quick else plot_rows(res, keys, ablations, Path(out_dir), stem=name.replace("-", "_"))
    config = {"data": size.data, "rows": keys, "seeds": seeds, "lr_grid": list(size.lr_grid),
              "epochs": size.epochs, "batch_size": size.batch_size, "history_len": size.history_len,
              "train_rows": size.train_rows, "eval_users": size.eval_users, "threads": threads,
              "lifelong_len": size.lifelong_len, "lifelong_lr_grid": list(size.lifelong_grid),
              "switches": {sw.name: sw.override for sw in switches},
              "model_args": {e.key: _model_args(e, size) for e in present}}
    if extend:
        config["extended"] = {"rows": list(rows), "previous_command": prev_cfg.get("command", ""),
                              "previous_rows": prev_cfg.get("rows", [])}
    return BenchResult(name, res, config=config, targets=targets_for(res, switches), plots=plots, quick=quick,
                       summary=summary_markdown(res, keys, rd.tasks, report_tabs(rd), info))


__all__ = ["ENTRIES", "Entry", "MIN_TAB_ROWS", "SCENARIO_ROWS", "SWITCHES", "SWITCH_ROWS", "Switch", "bench_ranking",
           "bench_ranking_scenarios", "claims", "report_tabs", "run_ranking", "run_rows", "scenario_sizes", "sizes",
           "tab_scores", "tab_view"]
