"""``funnelrec bench ranking``: every ranking model on long-history request batches, with matched budgets.

The benchmark every ranking model joins (later ranking issues add rows to :data:`ENTRIES`). On ``sim:long`` (3,000
heavy users, 30 days, long histories) by default: the last day is test, the day before valid, and the most recent
``train_rows`` impressions before them are train (the histories reach back over the whole log). Per model and task:
test AUC, GAUC, gap closed between the popularity/position floor and the oracle, watch-time XAUC; parameters,
forward+backward FLOPs per sample (``FlopCounterMode``) and training samples/s; mean ± std over seeds.

Rows (:class:`Entry`): the baselines (MMoE, PLE, DIN, DCNv2, a plain full-attention Transformer), the paper models
(RankMixer, LONGER) and one-flag ablations (RankMixer without token mixing / with one shared FFN; LONGER without
token merge / with uniformly sampled queries). **Tuning** (valid only, equal budget): every main row gets the same
learning-rate grid with seed 0 and early stopping on the valid mean AUC; an ablation reuses its parent's learning rate
(one flag changes, nothing else). Budgets: the non-sequence models are sized to ~1.2–1.5 MFLOPs/sample (±20 % of
MMoE's, ``tests/ranking/test_ranker_registry.py``); the two sequence models read 256 events and LONGER is cheaper
than the full Transformer by construction (token merge, k sampled queries) — the FLOPs column shows by how much.

**The papers' claims as bars** (targets): LONGER's mean test AUC above the full Transformer's at fewer FLOPs;
RankMixer's above DCNv2's and MMoE's at matched FLOPs; and the *switch test*: on the same world with the long-term
interest effect switched off (``interests.long_term_enabled=false``), LONGER's edge over DIN shrinks.

Example:
    funnelrec bench ranking --json
    funnelrec bench ranking --quick --json
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from funnelrec.bench.harness import BenchResult, Target, fix_threads, register_benchmark
from funnelrec.bench.ranking_baselines import (
    LR_GRID, RankingData, fit_model, load_ranking_data, mean_std, oracle_scores, popularity_scores, predict_split,
    score_split,
)
from funnelrec.errors import ConfigError
from funnelrec.metrics import gap_closed
from funnelrec.ranking.budget import count_params_flops


@dataclass(frozen=True)
class Entry:
    """One row of the benchmark.

    Args:
        key: the row name (results keys start with it).
        model: the registry name (``funnelrec.ranking.RANKERS``).
        args: model overrides on top of the defaults.
        parent: for an ablation, the row whose tuned learning rate it reuses (None: tuned itself).
    """

    key: str
    model: str
    args: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None


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
)
#: The rows trained again on the world without long-term interests (the switch test).
SWITCH_ROWS = ("din", "longer")
SWITCH_OVERRIDE = "interests.long_term_enabled=false"


@dataclass
class Sizes:
    """How big a run is."""

    data: str
    train_rows: int | None
    history_len: int
    epochs: int
    batch_size: int
    lr_grid: tuple[float, ...]
    model_args: dict[str, Any] = field(default_factory=dict)
    seq_args: dict[str, Any] = field(default_factory=dict)
    longer_args: dict[str, Any] = field(default_factory=dict)


def sizes(quick: bool, data: str | None) -> Sizes:
    if quick:
        return Sizes(data or "sim:small?num_users=150&days=4", None, 16, 1, 64, (3e-3,),
                     model_args={"embed_dim": 8}, seq_args={"history_pool": 16, "dim": 8},
                     longer_args={"num_queries": 4})
    return Sizes(data or "sim:long", 1_000_000, 256, 2, 256, LR_GRID)


def _with_override(spec: str, override: str) -> str:
    if not spec.startswith("sim:"):
        raise ConfigError(f"the switch test needs a simulated world, got {spec!r}")
    return spec + ("&" if "?" in spec else "?") + override


def _model_args(entry: Entry, size: Sizes) -> dict[str, Any]:
    extra = size.seq_args if entry.model in ("longer", "transformer") else {}
    if entry.model == "longer":
        extra = {**extra, **size.longer_args}
    return {**size.model_args, **extra, **entry.args}


def run_rows(rd: RankingData, entries: list[Entry], size: Sizes, seeds: int, lrs: dict[str, float] | None = None,
             prefix: str = "") -> tuple[dict[str, Any], dict[str, float]]:
    """Train, test and cost every entry on ``rd``; returns the flat figures and the learning rate of each row."""
    log = lambda msg: print(f"[ranking] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    res: dict[str, Any] = {}
    chosen: dict[str, float] = dict(lrs or {})
    sample = rd.datasets["train"].batch(np.arange(min(64, len(rd.datasets["train"]))))
    for e in entries:
        args = _model_args(e, size)
        key = prefix + e.key
        if e.key in chosen or e.parent in chosen:
            grid = (chosen.get(e.key, chosen.get(e.parent)),)
        else:
            grid = size.lr_grid
        trials = []
        for lr in grid:
            log(f"{key}: seed 0, lr {lr:g}")
            model, facts = fit_model(e.model, rd, lr, size.epochs, size.batch_size, 0, args)
            trials.append((facts["valid_auc_mean"], lr, model, facts))
        best = max(trials, key=lambda t: (np.nan_to_num(t[0], nan=-1.0), -t[1]))
        runs = [(best[2], best[3])]
        lr = best[1]
        chosen[e.key] = lr
        for seed in range(1, seeds):
            log(f"{key}: seed {seed}, lr {lr:g}")
            runs.append(fit_model(e.model, rd, lr, size.epochs, size.batch_size, seed, args))
        per_seed = [score_split(*predict_split(m, rd.datasets["test"], rd.parts["test"].height,
                                               batch_size=1024, with_watch=rd.has_watch), rd, seed=i)
                    for i, (m, _) in enumerate(runs)]
        for k in per_seed[0]:
            res[f"{key}.{k}"], res[f"{key}.{k}.std"] = mean_std([s[k] for s in per_seed])
        auc_means = [float(np.nanmean([s[f"auc.{t}"] for t in rd.tasks])) for s in per_seed]
        res[f"{key}.auc_mean"], res[f"{key}.auc_mean.std"] = mean_std(auc_means)
        res[f"{key}.lr"] = lr
        res[f"{key}.valid_auc_mean"] = best[0]
        res[f"{key}.samples_per_s"] = float(np.mean([f["samples_per_s"] for _, f in runs]))
        res[f"{key}.epochs_run"] = float(np.mean([f["epochs_run"] for _, f in runs]))
        cost = count_params_flops(best[2], sample)
        res.update({f"{key}.{k}": cost[k] for k in ("params_dense", "params_embedding", "flops_per_sample")})
    return res, chosen


def _add_references(res: dict[str, Any], rd: RankingData, prefix: str = "") -> None:
    res.update({f"{prefix}popularity.{k}": v for k, v in popularity_scores(rd).items()})
    if rd.is_sim:
        res.update({f"{prefix}oracle.{k}": v for k, v in oracle_scores(rd).items()})
    for ref in ("popularity", "oracle"):
        vals = [res.get(f"{prefix}{ref}.auc.{t}") for t in rd.tasks]
        if all(v is not None for v in vals):
            res[f"{prefix}{ref}.auc_mean"] = float(np.nanmean(vals))


def claims(res: dict[str, Any], rd: RankingData, entries: list[Entry], switch: bool) -> None:
    """Gap closed per row and task, and the figures behind the papers' claims."""
    for e in entries:
        for t in rd.tasks:
            if rd.is_sim:
                res[f"{e.key}.gap_closed.{t}"] = gap_closed(res[f"{e.key}.auc.{t}"], res[f"popularity.auc.{t}"],
                                                            res[f"oracle.auc.{t}"])
    have = {e.key for e in entries}
    if {"longer", "transformer"} <= have:
        res["longer_minus_transformer_auc_mean"] = res["longer.auc_mean"] - res["transformer.auc_mean"]
        res["longer_flops_vs_transformer"] = res["longer.flops_per_sample"] / res["transformer.flops_per_sample"]
    if {"rankmixer", "dcnv2", "mmoe"} <= have:
        res["rankmixer_minus_best_of_dcnv2_mmoe_auc_mean"] = res["rankmixer.auc_mean"] - max(
            res["dcnv2.auc_mean"], res["mmoe.auc_mean"])
        res["rankmixer_flops_vs_mmoe"] = res["rankmixer.flops_per_sample"] / res["mmoe.flops_per_sample"]
    if switch:
        on = res["longer.auc_mean"] - res["din.auc_mean"]
        off = res["switch.longer.auc_mean"] - res["switch.din.auc_mean"]
        res["longer_edge_over_din"], res["longer_edge_over_din_switch_off"] = on, off
        res["longer_edge_shrink_switch_off"] = on - off


def summary_markdown(res: dict[str, Any], entries: list[Entry], tasks: tuple[str, ...], info: dict[str, Any]) -> str:
    """Readable tables: per-task AUC, GAUC, gap closed; cost; the claims."""
    short = [t.replace("is_", "") for t in tasks]
    lines = [f"**Data**: `{info['data']}` — {info['train_rows']:,} train (the most recent before valid) / "
             f"{info['valid_rows']:,} valid / {info['test_rows']:,} test impressions, histories of up to "
             f"{info['history_len']} events. Mean ± std over {info['seeds']} seed(s); learning rate per main row from "
             f"{list(info['lr_grid'])} on valid (seed 0), ablations reuse their parent's; at most {info['epochs']} "
             f"epochs, early stopping on valid mean AUC. Wall time {info['wall_s'] / 60:.1f} min on "
             f"{info['threads']} threads.", ""]
    rows = ["popularity", *[e.key for e in entries]] + (["oracle"] if info["oracle"] else [])

    def cell(key: str, std: bool = True) -> str:
        v, s = res.get(key), res.get(key + ".std") if std else None
        if v is None or not np.isfinite(v):
            return "n/a"
        return f"{v:.4f}" + (f" ± {s:.4f}" if s is not None and np.isfinite(s) else "")

    for title, metric in (("Test AUC", "auc"), ("Test GAUC", "gauc")):
        lines += [f"### {title}", "", "| model | mean | " + " | ".join(short) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in short) + " |"]
        for r in rows:
            mean = cell(f"{r}.auc_mean") if metric == "auc" else "—"
            lines.append(f"| {r} | {mean} | " + " | ".join(cell(f"{r}.{metric}.{t}") for t in tasks) + " |")
        lines.append("")
    lines += ["### Cost", "", "| model | params (dense) | FLOPs/sample | samples/s | lr | XAUC watch |",
              "| --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        k = e.key
        lines.append(f"| {k} | {res[f'{k}.params_dense']:,} | {res[f'{k}.flops_per_sample']:,.0f} | "
                     f"{res[f'{k}.samples_per_s']:,.0f} | {res[f'{k}.lr']:g} | {cell(f'{k}.xauc.watch')} |")
    lines.append("")
    claim_keys = [k for k in ("longer_minus_transformer_auc_mean", "longer_flops_vs_transformer",
                              "rankmixer_minus_best_of_dcnv2_mmoe_auc_mean", "rankmixer_flops_vs_mmoe",
                              "longer_edge_over_din", "longer_edge_over_din_switch_off",
                              "longer_edge_shrink_switch_off") if k in res]
    if claim_keys:
        lines += ["### The papers' claims", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {res[k]:.4f} |" for k in claim_keys]
        lines.append("")
    return "\n".join(lines)


def plot_rows(res: dict[str, Any], entries: list[Entry], out_dir: Path, stem: str = "ranking") -> list[str]:
    """Mean test AUC per row (error bars: std over seeds) against FLOPs/sample, floor and oracle as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in entries:
        x, y, s = res[f"{e.key}.flops_per_sample"], res[f"{e.key}.auc_mean"], res[f"{e.key}.auc_mean.std"]
        ax.errorbar(x, y, yerr=s if np.isfinite(s) else None, fmt="o" if e.parent is None else "x", capsize=3)
        ax.annotate(e.key, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for ref, color in (("popularity", "k"), ("oracle", "r")):
        if f"{ref}.auc_mean" in res:
            ax.axhline(res[f"{ref}.auc_mean"], color=color, ls="--", lw=1, label=ref)
    ax.set_xscale("log")
    ax.set_xlabel("forward+backward FLOPs per sample")
    ax.set_ylabel("mean test AUC over tasks")
    ax.set_title("Ranking models: quality against cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{stem}_auc_vs_flops.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


@register_benchmark("ranking")
def bench_ranking(quick: bool = False, data: str | None = None, seeds: int | None = None, threads: int = 2,
                  rows: tuple[str, ...] | None = None, switch: bool = True,
                  out_dir: str = "docs/results") -> BenchResult:
    """Run the ranking benchmark (see the module docstring); ``rows`` restricts it to some entries."""
    wall0 = time.perf_counter()
    seeds = seeds if seeds is not None else (1 if quick else 3)
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if rows is not None and (unknown := set(rows) - {e.key for e in ENTRIES}):
        raise ConfigError(f"unknown ranking rows {sorted(unknown)}; known: {', '.join(e.key for e in ENTRIES)}")
    entries = [e for e in ENTRIES if rows is None or e.key in rows]
    threads = fix_threads(threads)
    size = sizes(quick, data)
    rd = load_ranking_data(size.data, history_len=size.history_len, max_train_rows=size.train_rows)
    res: dict[str, Any] = {}
    _add_references(res, rd)
    figures, chosen = run_rows(rd, entries, size, seeds)
    res.update(figures)
    do_switch = switch and rd.is_sim and all(k in chosen for k in SWITCH_ROWS)
    if do_switch:
        off = load_ranking_data(_with_override(size.data, SWITCH_OVERRIDE), history_len=size.history_len,
                                max_train_rows=size.train_rows)
        _add_references(res, off, prefix="switch.")
        switch_entries = [e for e in ENTRIES if e.key in SWITCH_ROWS]
        figures, _ = run_rows(off, switch_entries, size, seeds, lrs=chosen, prefix="switch.")
        res.update(figures)
    claims(res, rd, entries, do_switch)
    info = {"data": size.data, "seeds": seeds, "epochs": size.epochs, "threads": threads,
            "lr_grid": size.lr_grid, "history_len": size.history_len, "train_rows": rd.parts["train"].height,
            "valid_rows": rd.parts["valid"].height, "test_rows": rd.parts["test"].height, "oracle": rd.is_sim,
            "wall_s": time.perf_counter() - wall0}
    res.update({"data": size.data, "seeds": seeds, "train_impressions": info["train_rows"],
                "test_impressions": info["test_rows"], "wall_s": info["wall_s"]})
    targets = []
    if "longer_minus_transformer_auc_mean" in res:
        targets += [Target("longer_minus_transformer_auc_mean", ">", 0.0),
                    Target("longer_flops_vs_transformer", "<", 1.0)]
    if "rankmixer_minus_best_of_dcnv2_mmoe_auc_mean" in res:
        targets += [Target("rankmixer_minus_best_of_dcnv2_mmoe_auc_mean", ">", 0.0),
                    Target("rankmixer_flops_vs_mmoe", "in", (0.8, 1.2))]
    if do_switch:
        targets.append(Target("longer_edge_shrink_switch_off", ">", 0.0))
    plots = [] if quick else plot_rows(res, entries, Path(out_dir))
    config = {"data": size.data, "rows": [e.key for e in entries], "seeds": seeds, "lr_grid": list(size.lr_grid),
              "epochs": size.epochs, "batch_size": size.batch_size, "history_len": size.history_len,
              "train_rows": size.train_rows, "threads": threads, "switch": SWITCH_OVERRIDE if do_switch else "",
              "model_args": {e.key: _model_args(e, size) for e in entries}}
    return BenchResult("ranking", res, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary_markdown(res, entries, rd.tasks, info))


__all__ = ["ENTRIES", "Entry", "SWITCH_ROWS", "bench_ranking", "claims", "run_rows", "sizes"]
