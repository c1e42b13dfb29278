"""Diagnostic: what the monotonicity loss costs xMTF's inner stage fitted to a randomly served log.

``bench fusion-ranker`` starts xMTF's inner stage from cells fitted to the realised watch seconds of a randomly
served slice of the training pool (``funnelrec.fusion.inner_fit``), with λ·the monotonicity hinge. This script
fits those cells at several λ on the benchmark's own pools (same cascade, seeds, evaluation users and env seed)
and serves them as they are (no outer stage, no RL): watch seconds per session and the violation rate per task
on the first request of every evaluation session. A task whose unconstrained cell falls as its prediction rises
carries a negative partial effect on watch time, which a monotone fusion cannot use.

Usage (repository root; the cascade takes ~7 min on 2 threads, then about a minute per seed and λ):
    python docs/results/diagnostics/fusion_inner_lambda.py --seeds 3 --lams 0 0.1 0.4 > fusion_inner_lambda.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from funnelrec.bench.fusion import (QUICK_PLAN, QUICK_RANKER_WORLD, RANKER_PLAN, _eval_requests,
                                    _LoggedInnerStarts, _policy, seed_split, train_ranker, xmtf_config)
from funnelrec.fusion.env import TASKS, evaluate
from funnelrec.fusion.xmtf import XMTF
from funnelrec.sim import World


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.1, 0.4])
    parser.add_argument("--quick", action="store_true", help="a smoke run on sim:small (one-epoch cascade)")
    opts = parser.parse_args()
    if any(not 0 <= lam <= 1 for lam in opts.lams):
        parser.error(f"--lams: every λ must be in [0, 1], got {opts.lams}")
    torch.set_num_threads(opts.threads)
    plan = RANKER_PLAN
    if opts.quick:
        plan = dataclasses.replace(QUICK_PLAN, world=QUICK_RANKER_WORLD, valid_users=60, eval_users=80)
    start = time.perf_counter()
    world = World.from_profile(plan.world)
    ranker = train_ranker(plan.world, quick=opts.quick)
    print(json.dumps({"cascade_valid_auc": ranker.figures.get("ranker_valid_auc_mean"),
                      "elapsed_s": time.perf_counter() - start}), flush=True)
    for seed in range(opts.seeds):
        pool, eval_users, eval_env, eval_seed = seed_split(world, plan, seed, ranker)
        probe = _eval_requests(eval_env, eval_seed, eval_users)
        logged = _LoggedInnerStarts(world, plan, pool, seed, ranker)  # as run_seed builds it
        for lam in opts.lams:
            cells = logged.cells(lam)
            t, s = probe["pxtr"].shape[-1], probe["user_state"].shape[-1]
            model = XMTF(xmtf_config(plan, t, s, seed, lam, use_outer=False))
            model.cells.load_state_dict(cells)
            res = evaluate(eval_env, _policy(model), seed=eval_seed, users=eval_users)
            rate, per_task = model.violations(probe["pxtr"], probe["mask"], probe["user_state"])
            row = {"seed": seed, "lam": lam, "watch_s": float(res["watch_s"].mean()),
                   "pages": float(res["pages"].float().mean()), "violation_rate": rate,
                   "violation_rate_per_task": {task: float(v) for task, v in zip(TASKS, per_task)},
                   **{k.removeprefix(f"lam{lam}."): v for k, v in logged.figures.items() if k.startswith(f"lam{lam}.")},
                   "elapsed_s": time.perf_counter() - start}
            print(json.dumps(row), flush=True)
            print(f"seed {seed} λ {lam}: {row['watch_s']:.1f} s, violations {rate:.2%}", file=sys.stderr,
                  flush=True)


if __name__ == "__main__":
    main()
