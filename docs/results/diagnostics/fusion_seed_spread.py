"""Diagnostic behind ``fusion-seed-spread.md``: the training-seed spread of RL log-sum and xMTF (two inner learning
rates) on the ``fusion-ranker`` validation users. Not a benchmark: validation users only.

Usage (repository root, ~13 min on 2 threads):
    OMP_NUM_THREADS=2 python docs/results/diagnostics/fusion_seed_spread.py
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from funnelrec.bench import fusion as F
from funnelrec.sim import World

SEEDS = (999, 1000, 1001, 1002)
RL_LRS = (1e-3, 1e-4)


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    plan = F.FULL_PLAN
    world = World.from_profile(plan.world)
    ranker = F.train_ranker(plan.world, False, False)
    valid = F.validation_users(world.population.num_users, plan)
    keep = torch.ones(world.population.num_users, dtype=torch.bool)
    keep[valid] = False
    pool = torch.arange(world.population.num_users)[keep]
    env = F._env(world, plan, plan.valid_users, False, pool, ranker)
    eval_seed = 20_000 + plan.selection_seed  # as in select_settings

    def score(fusion) -> float:
        return float(F.evaluate(env, F._policy(fusion), seed=eval_seed, users=valid)["watch_s"].mean())

    probe = F._eval_requests(env, eval_seed, valid)
    centers, tuned = F._tune_cem(world, plan, pool, plan.selection_seed, probe, ("logsum",), ranker)
    out = {"cem_logsum": score(tuned["logsum"])}
    rl_plan = dataclasses.replace(plan, rl_action_reg={**plan.rl_action_reg, "logsum": 0.5})
    for seed in SEEDS:
        fusion, _ = F._train_formula_rl(world, rl_plan, pool, seed, "logsum", centers["logsum"], ranker)
        out[f"rl_logsum/{seed}"] = score(fusion)
        for lr in RL_LRS:
            trial = dataclasses.replace(plan, xmtf={"tau": 0.05, "rl_lr": lr}, xmtf_action_reg=2.0)
            model, _ = F._train_xmtf(world, trial, pool, seed, "xmtf", tuned["logsum"], ranker)
            out[f"xmtf_rl_lr={lr}/{seed}"] = score(model)
    out["wall_s"] = time.perf_counter() - start
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
