"""``funnelrec bench cascade``: closed-loop simulated sessions served by the whole cascade.

The cascade's stages are trained on the world's log (``train_cascade``: days before the last two train, the
day before the last validates; the whole log is the users' history); then, on the **day after the log**, one
session of each of ``eval_users`` users (drawn per seed) runs in the world three times, each time served by a
different policy through the world's own session loop (``World.run_sessions``: the same users, start times and
random streams to start with; the world's responses, satisfaction and leaving):

* ``cascade`` — the trained funnel through its Python API (two-tower + popularity retrieval → pre-ranker →
  ranker → power-product fusion → re-ranker), each page's feedback appended to the users' live histories, so the
  next request reads it (closed loop);
* ``popularity`` — the most popular unseen items (training click counts), the same live histories;
* ``oracle`` — the world's greedy satisfaction-aware policy (``OracleGreedyPolicy``) over 1,000 candidates
  drawn by the logging policy's samplers (true values; the reference).

Figures per policy (mean ± std over seeds of the per-seed means): watch seconds per session, session length in
pages, coverage (distinct items served / catalogue), and for the cascade how many of the oracle's top 10 survive
each stage — the oracle's top 10 by true expected watch time over the whole catalogue, on each user's first
request, the user's history window excluded — plus the cascade's per-stage time per request.

Requests carry the end of the evaluation day as their time, hour 20 and tab 1
(``funnelrec.serving.closed_loop``).

Sizing (full run, 2 cores): training ≈ 10 min on sim:bench-v1, then 3 seeds × 2,000 users × 3 policies.
``--quick`` runs a 150-user ``sim:small`` world with one short epoch per stage (≈ 20 s) and writes nothing.

Example:
    funnelrec bench cascade --json
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch

from funnelrec.bench.harness import BenchResult, Target, fix_threads, mean_std, register_benchmark
from funnelrec.data.sources import load_source
from funnelrec.errors import ConfigError
from funnelrec.serving.build import BuildConfig, train_cascade
from funnelrec.serving.cascade import STAGES, Cascade, FunnelSizes
from funnelrec.serving.closed_loop import SURVIVAL_STAGES, CascadePolicy, PopularityPolicy, run_sessions
from funnelrec.sim.diagnostics import OracleGreedyPolicy

__all__ = ["CascadePlan", "FULL_PLAN", "QUICK_PLAN", "bench_cascade", "run_policies"]

POLICIES = ("cascade", "popularity", "oracle")


@dataclass
class CascadePlan:
    """Sizes of a cascade benchmark run.

    Args:
        data: the world (``sim:NAME[?overrides]``).
        eval_users: users with one evaluation session each, per seed.
        seeds: seeds (users and random streams).
        build: how the stages are trained.
        oracle_candidates: candidates the oracle policy scores per request.
        oracle_top: the size of the oracle's list whose survival is counted.
    """

    data: str = "sim:bench-v1"
    eval_users: int = 2000
    seeds: int = 3
    build: BuildConfig = field(default_factory=lambda: BuildConfig(ranker_epochs=2, retriever_epochs=2,
                                                                   preranker_epochs=1, cem_iterations=4))
    oracle_candidates: int = 1000
    oracle_top: int = 10


FULL_PLAN = CascadePlan()
QUICK_PLAN = CascadePlan(
    data="sim:small?num_users=150&days=3", eval_users=60, seeds=1, oracle_candidates=100,
    build=BuildConfig(ranker_epochs=1, retriever_epochs=1, preranker_epochs=1, cem_iterations=1,
                      distill_requests=150, closed_loop_iterations=1, closed_loop_users=24,
                      sizes=FunnelSizes(retrieve=300, popular=50, prerank=100, pool=30, serve=6)))


def run_policies(world, cascade: Cascade, plan: CascadePlan, seed: int, progress: bool = False) -> dict:
    """Every policy on one seed's evaluation users; returns per-policy figures and the cascade's survival."""
    day = world.cfg.days
    users = torch.randperm(world.population.num_users,
                           generator=torch.Generator().manual_seed(seed))[: plan.eval_users].sort().values
    out: dict = {}
    for name in POLICIES:
        t0 = time.perf_counter()
        cascade.history.reset()
        if name == "cascade":
            policy = CascadePolicy(cascade, world, day, plan.oracle_top)
        elif name == "popularity":
            policy = PopularityPolicy(cascade, world, day)
        else:
            policy = OracleGreedyPolicy(world, "satisfaction", candidates=plan.oracle_candidates)
        res = run_sessions(world, policy, users, day, seed)
        if name == "cascade":
            res.update({f"survival_{s}": policy.survived[s] / max(1, policy.first_requests)
                        for s in SURVIVAL_STAGES})
            res.update({f"ms_per_request_{s}": policy.timings[s] / max(1, policy.requests) for s in STAGES})
            res["requests"] = policy.requests
        res["wall_s"] = time.perf_counter() - t0
        out[name] = res
        if progress:
            print(f"  seed {seed} {name}: {res['watch_s']:.1f} s/session, {res['pages']:.2f} pages, "
                  f"coverage {res['coverage']:.3f} ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    cascade.history.reset()
    return out


def summary_markdown(res: dict, plan: CascadePlan) -> str:
    def cell(key, digits=1):
        return f"{res[key]:.{digits}f} ± {res[key + '.std']:.{digits}f}" if key in res else "n/a"

    lines = [f"## The cascade in closed loop on `{plan.data}`", "",
             "| policy | watch s / session | pages / session | coverage |", "| --- | ---: | ---: | ---: |"]
    for name in POLICIES:
        lines.append(f"| {name} | {cell(f'{name}.watch_s')} | {cell(f'{name}.pages', 2)} | "
                     f"{cell(f'{name}.coverage', 3)} |")
    lines += ["", f"### How many of the oracle's top {plan.oracle_top} survive each stage (first request)", "",
              "| stage | kept | share of the oracle's top 10 |", "| --- | ---: | ---: |"]
    kept = {"retrieval": plan.build.sizes.retrieve, "prerank": plan.build.sizes.prerank,
            "fusion": plan.build.sizes.pool, "rerank": "page"}
    for s in SURVIVAL_STAGES:
        lines.append(f"| {s} | {kept[s]} | {cell(f'cascade.survival_{s}', 3)} |")
    lines += ["", "### Cascade time per request (ms, batched over the users of a page step, 1 thread)", "",
              "| " + " | ".join(STAGES) + " |", "|" + " ---: |" * len(STAGES),
              "| " + " | ".join(f"{res.get(f'cascade.ms_per_request_{s}', float('nan')):.3f}" for s in STAGES)
              + " |"]
    return "\n".join(lines)


@register_benchmark("cascade")
def bench_cascade(quick: bool = False, data: str | None = None, seeds: int | None = None, threads: int = 1,
                  progress: bool | None = None) -> BenchResult:
    """Run the cascade benchmark (see the module doc)."""
    threads = fix_threads(threads)
    plan = QUICK_PLAN if quick else FULL_PLAN
    if data is not None:
        if not data.startswith("sim:"):
            raise ConfigError(f"--data {data!r}: the cascade benchmark runs sessions in a simulated world, sim:NAME")
        plan = dataclasses.replace(plan, data=data)
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
        plan = dataclasses.replace(plan, seeds=seeds)
    progress = (not quick) if progress is None else progress
    start = time.perf_counter()
    source = load_source(plan.data, progress=progress)
    world = source.world
    if plan.eval_users >= world.population.num_users:
        raise ConfigError(f"eval_users={plan.eval_users} must be below the world's "
                          f"{world.population.num_users} users")
    parts = train_cascade(source, plan.build)
    cascade = parts.cascade({"name": "bench"})
    train_s = time.perf_counter() - start
    if progress:
        print(f"cascade: stages trained in {train_s:.0f} s ({parts.figures})", file=sys.stderr, flush=True)
    runs = [run_policies(world, cascade, plan, seed, progress) for seed in range(plan.seeds)]
    res: dict = {"data": plan.data, "seeds": plan.seeds, "eval_users": plan.eval_users, "threads": threads,
                 "train_s": train_s, **{f"build.{k}": v for k, v in parts.figures.items()}}
    for name in POLICIES:
        for key in runs[0][name]:
            res[f"{name}.{key}"], res[f"{name}.{key}.std"] = mean_std([r[name][key] for r in runs])
    gains = [r["cascade"]["watch_s"] / r["popularity"]["watch_s"] - 1 for r in runs]
    res["cascade_gain_over_popularity"], res["cascade_gain_over_popularity.std"] = mean_std(gains)
    res["cascade_share_of_oracle"] = mean_std([r["cascade"]["watch_s"] / r["oracle"]["watch_s"] for r in runs])[0]
    res["wall_s"] = time.perf_counter() - start
    targets = [Target("cascade_gain_over_popularity", ">", 0.0)]
    config = {"plan": dataclasses.asdict(plan)}
    return BenchResult("cascade", res, config=config, targets=targets, quick=quick,
                       summary=summary_markdown(res, plan))
