"""``funnelrec bench simulator``: throughput of the world, and how much signal it holds for models to find.

Figures:

* ``impressions_per_s`` — impressions logged per second by ``World.simulate`` (logging policy + responses +
  sessions + assembling the KuaiRand-schema table) on ``threads`` threads. Target ≥ 200,000 on 2 cores.
* ``oracle_auc_<task>`` — AUC of the world's true probabilities on the last simulated day (the test day).
  Target for click: inside 0.75–0.85 (a world where an oracle is near-perfect or near-random teaches nothing).
* ``pop_auc_<task>`` — AUC of the popularity/position-only model fitted on the earlier days.
  Target: ``oracle_auc_click − pop_auc_click ≥ 0.08`` (room for personal models to show their worth).
* the same on the randomly exposed (``is_rand``) slice, label rates, sessions and their lengths.

The full run simulates ``sim:bench-v1`` for 7 days (all 27,285 users); ``--quick`` simulates ``sim:small`` for 2.

Example:
    >>> from funnelrec.bench import run_benchmark
    >>> r = run_benchmark("simulator", quick=True, json_mode=False, write=False)  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from funnelrec.bench.harness import BenchResult, Target, fix_threads, register_benchmark
from funnelrec.data.schema import LABEL_COLUMNS
from funnelrec.metrics import auc
from funnelrec.ranking.popularity import PopularityPositionModel
from funnelrec.sim import World
from funnelrec.sim.world import SimLog, date_of_day

ORACLE_OF = {"is_click": "p_click", "long_view": "p_long_view", "is_like": "p_like", "is_follow": "p_follow",
             "is_comment": "p_comment", "is_forward": "p_forward"}


def signal_report(sim: SimLog, days: int) -> dict[str, float]:
    """Oracle and popularity/position AUCs per task on the last simulated day (pop model fitted on the earlier
    days). Sessions that run past midnight of the last day count to it."""
    log = sim.log.with_columns(pl.Series("position", sim.oracle["position"]))
    is_test = (log["date"] >= date_of_day(days - 1)).to_numpy()
    train, test = log.filter(~pl.Series(is_test)), log.filter(pl.Series(is_test))
    oracle_test = sim.oracle.filter(pl.Series(is_test))
    pop = PopularityPositionModel().fit(train).predict(test)
    rand = test["is_rand"].to_numpy() == 1
    out: dict[str, float] = {}
    for t, task in enumerate(LABEL_COLUMNS):
        y = test[task].to_numpy()
        p_oracle = oracle_test[ORACLE_OF[task]].to_numpy()
        out[f"oracle_auc_{task}"] = auc(p_oracle, y)
        out[f"pop_auc_{task}"] = auc(pop[:, t], y)
        out[f"oracle_auc_{task}_rand"] = auc(p_oracle[rand], y[rand])
        out[f"pop_auc_{task}_rand"] = auc(pop[rand, t], y[rand])
    out["oracle_minus_pop_auc_click"] = out["oracle_auc_is_click"] - out["pop_auc_is_click"]
    out["test_impressions"] = int(test.height)
    return out


def calibration_report(sim: SimLog) -> dict[str, float]:
    """Label rates, volumes and session figures of a simulated log."""
    log = sim.log
    out: dict[str, float] = {f"rate_{c}": float(log[c].cast(pl.Float64).mean())
                             for c in (*LABEL_COLUMNS, "is_hate", "is_rand")}
    days = log["date"].n_unique()
    out.update({
        "impressions": int(log.height), "users": int(log["user_id"].n_unique()),
        "items_exposed": int(log["video_id"].n_unique()),
        "impressions_per_user_day": log.height / max(1, log["user_id"].n_unique()) / max(1, days),
        "mean_play_time_s": float(log["play_time_ms"].mean()) / 1000,
        "median_play_time_s": float(log["play_time_ms"].median()) / 1000,
    })
    sessions = sim.oracle.group_by("session_id").agg(pl.col("page").max() + 1)
    out["sessions"] = int(sessions.height)
    out["mean_pages_per_session"] = float(sessions["page"].mean())
    out["questionnaire_answers"] = int(sim.questionnaire.height)
    return out


def plot_world(sim: SimLog, out_dir: Path, stem: str = "simulator") -> list[str]:
    """Write the four calibration plots; return their file names (relative to ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    log = sim.log.join(sim.users.select("user_id", "user_active_degree"), on="user_id", how="left")
    names = []
    fig, ax = plt.subplots(figsize=(8, 4))
    by = log.group_by("user_active_degree").agg(*[pl.col(c).cast(pl.Float64).mean() for c in LABEL_COLUMNS],
                                                pl.len().alias("n")).sort("n", descending=True)
    x = np.arange(by.height)
    for i, c in enumerate(LABEL_COLUMNS):
        ax.bar(x + i * 0.13, by[c].to_numpy(), width=0.13, label=c)
    ax.set_xticks(x + 0.33, by["user_active_degree"].to_list(), rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("label rate")
    ax.set_title("Label rates by user activity degree")
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    names.append(f"{stem}_label_rates.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    counts = np.sort(log.group_by("video_id").len()["len"].to_numpy())[::-1]
    ax.loglog(np.arange(1, len(counts) + 1), counts)
    ax.set_xlabel("item rank")
    ax.set_ylabel("impressions")
    ax.set_title("Item popularity (rank-frequency)")
    fig.tight_layout()
    names.append(f"{stem}_item_popularity.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    play = log["play_time_ms"].to_numpy() / 1000
    clicked = log["is_click"].to_numpy() == 1
    bins = np.logspace(-2, 3.5, 60)
    ax.hist(play[clicked], bins=bins, alpha=0.6, label="clicked")
    ax.hist(play[~clicked], bins=bins, alpha=0.6, label="not clicked")
    ax.set_xscale("log")
    ax.set_xlabel("play time (s)")
    ax.set_ylabel("impressions")
    ax.set_title("Watch time")
    ax.legend()
    fig.tight_layout()
    names.append(f"{stem}_watch_time.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    pages = sim.oracle.group_by("session_id").agg(pl.col("page").max() + 1)["page"].to_numpy()
    ax.hist(pages, bins=np.arange(1, pages.max() + 2) - 0.5)
    ax.set_xlabel("pages per session (page = 6 impressions)")
    ax.set_ylabel("sessions")
    ax.set_title("Session length")
    fig.tight_layout()
    names.append(f"{stem}_session_length.png")
    fig.savefig(out_dir / names[-1], dpi=110)
    plt.close(fig)
    return names


@register_benchmark("simulator")
def bench_simulator(quick: bool = False, days: int | None = None, threads: int = 2,
                    out_dir: str = "docs/results") -> BenchResult:
    """Run the simulator benchmark (see the module docstring)."""
    threads = fix_threads(threads)
    profile = "small" if quick else "bench-v1"
    days = days or (2 if quick else 7)
    world = World.from_profile(profile)
    print(f"simulating sim:{profile} for {days} days on {threads} threads", file=sys.stderr)
    start = time.perf_counter()
    sim = world.simulate(days=days, progress=not quick)
    elapsed = time.perf_counter() - start
    results: dict[str, float | int | str] = {
        "profile": profile, "days": days, "threads": threads, "simulate_s": elapsed,
        "impressions_per_s": sim.log.height / elapsed,
    }
    results.update(calibration_report(sim))
    results.update(signal_report(sim, days))
    plots = [] if quick else plot_world(sim, Path(out_dir))
    targets = [
        Target("impressions_per_s", ">=", 200_000),
        Target("oracle_auc_is_click", "in", (0.75, 0.85)),
        Target("oracle_minus_pop_auc_click", ">=", 0.08),
    ]
    if quick:  # a small world on a busy CI core is not a throughput measurement
        targets = targets[1:]
    return BenchResult("simulator", results, config={"profile": profile, "days": days, "threads": threads,
                                                      "world_config": f"configs/sim/{profile}.yaml"},
                       targets=targets, plots=plots, quick=quick)


__all__ = ["bench_simulator", "signal_report", "calibration_report", "plot_world"]
