"""Diagnostic behind ``fusion-headroom.md``: how much watch time can *any* fusion of the trained ranker's
predictions earn? A privileged reference for ``bench fusion-ranker``. Not a benchmark row.

The reference (``privileged_*``) is a supervised scorer f(φ(pxtr), user state) → value of one candidate,
fitted by least squares to the world's **true** single-item value of every candidate (the satisfaction-aware
value that ``OracleGreedy`` serves by, or the expected watch seconds). No real system has those labels, so it is
an optimistic reference: f estimates E[true value | the ranker's predictions, the state], which is what the best
myopic fusion of these inputs ranks by. xMTF and the formula RL see only session rewards. ``logged_watch`` is
the same scorer fitted to what a real system has: the realised watch seconds of the items actually served (by
the CEM formula); ``logged_watch_random`` fits them on a log served at random (a randomly exposed slice).
``privileged_watch_additive`` fits xMTF's own form (a sum of per-task cells) to the privileged labels. The
labels come from sessions of each seed's training pool (the evaluation users are never used for fitting); then every scorer is
evaluated like a benchmark row: one session of each of the seed's 2,000 evaluation users with the benchmark's
env seed (common random numbers), so its figures compare with ``fusion-ranker.md``'s rows of the same seeds.

In the same run, as checks that env and cascade match the benchmark's: oracle-greedy (satisfaction) and CEM
log-sum (tuned per seed as in the benchmark).

Usage (repository root; ~7 min for the cascade, then a few minutes per seed on 2 threads):
    python docs/results/diagnostics/fusion_headroom.py --seeds 5 --threads 2 > fusion_headroom.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from torch import nn

from funnelrec.bench.fusion import (QUICK_PLAN, QUICK_RANKER_WORLD, RANKER_PLAN, _env, _eval_requests, _policy,
                                    _train_xmtf, _tune_cem, seed_split, train_ranker)
from funnelrec.fusion.env import OracleGreedy, evaluate
from funnelrec.fusion.xmtf import MonotonicFusionCells
from funnelrec.sim import World


#: the scorers a run fits (``--skip`` leaves some out)
SCORERS = ("privileged_satisfaction", "privileged_watch", "privileged_watch_additive", "logged_watch",
           "logged_watch_random", "logged_watch_random_additive")


def candidate_features(obs: dict) -> torch.Tensor:
    """[B, C, 3·T + S]: φ of every prediction (as xMTF's cells read them) and the user state."""
    pxtr, state = obs["pxtr"], obs["user_state"]
    phi = MonotonicFusionCells.features(pxtr).flatten(-2)
    return torch.cat([phi, state.unsqueeze(1).expand(-1, pxtr.shape[1], -1)], -1)


def collect(env, behaviour, value_of, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """From ``steps`` requests of every session: features ``x`` [N, F] and true values ``y`` [N, V] of the valid
    candidates, and features ``x_served`` [K, F] and realised watch seconds ``y_served`` [K] of the served
    items (what a real system logs)."""
    obs, info = env.reset(seed=seed)
    xs, ys, xs_served, ys_served = [], [], [], []
    with torch.no_grad():
        for _ in range(steps):
            mask, feats = obs["mask"], candidate_features(obs)
            xs.append(feats[mask])
            if value_of:
                ys.append(torch.stack([v(info) for v in value_of], -1)[mask])
            obs, _, _, _, info = env.step(behaviour(obs, info))
            served = info["served"]  # positions in the candidates of the page just served; -1: not served
            hit = served >= 0
            picked = feats.gather(1, served.clamp(min=0).unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
            xs_served.append(picked[hit])
            ys_served.append(info["served_watch_s"][hit])
    return {"x": torch.cat(xs), "y": torch.cat(ys) if ys else None, "x_served": torch.cat(xs_served),
            "y_served": torch.cat(ys_served)}


class ScorerFusion:
    """A fitted ``Scorer`` behind the fusion interface (``score(pxtr, user_state)``), e.g. as xMTF's teacher."""

    def __init__(self, scorer: "Scorer"):
        self.scorer = scorer

    @torch.no_grad()
    def score(self, pxtr: torch.Tensor, user_state: torch.Tensor) -> torch.Tensor:
        return self.scorer(candidate_features({"pxtr": pxtr, "user_state": user_state}))


class Scorer(nn.Module):
    """A standardised-input MLP from candidate features to one value."""

    def __init__(self, x: torch.Tensor, hidden: int = 128):
        super().__init__()
        self.register_buffer("mu", x.mean(0))
        self.register_buffer("sd", x.std(0).clamp(min=1e-6))
        self.net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mu) / self.sd).squeeze(-1)


class AdditiveScorer(nn.Module):
    """xMTF's inner stage as a scorer: a·Σ_k q_k(o_k, s) + b with the ``MonotonicFusionCells`` (additive over
    tasks, each cell reading one task's prediction and the state), to test whether that form can hold what the
    ``Scorer`` MLP finds. Reads the same features: o_k is the middle entry of φ(o_k)."""

    def __init__(self, x: torch.Tensor, num_tasks: int, hidden: int = 32):
        super().__init__()
        self.num_tasks = num_tasks
        self.cells = MonotonicFusionCells(num_tasks, x.shape[1] - 3 * num_tasks, hidden)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        with torch.no_grad():  # start with standardised outputs, as the targets are
            z = self(x[:8192])
            self.scale.copy_(1 / z.std().clamp(min=0.2))  # at most 5: a steeper start is unstable on noisy labels
            self.bias.copy_(-z.mean() * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        t = self.num_tasks
        o = x[:, : 3 * t].view(-1, t, 3)[..., 1]
        q = self.cells(o.unsqueeze(1), x[:, 3 * t:]).squeeze(1)  # [N, T]
        return (self.scale * q.sum(-1) + self.bias).view(lead)


def fit(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 6, batch: int = 8192,
        additive_tasks: int | None = None, cell_hidden: int = 32) -> tuple[nn.Module, float]:
    """Least squares on standardised y; early stopping on a 10 % hold-out. Returns the scorer (a ``Scorer``, or an
    ``AdditiveScorer`` over ``additive_tasks`` tasks) and its hold-out R²."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    cut = len(x) // 10
    hold, train = perm[:cut], perm[cut:]
    y = (y - y[train].mean()) / y[train].std()
    torch.manual_seed(seed)
    model = Scorer(x[train]) if additive_tasks is None else AdditiveScorer(x[train], additive_tasks, cell_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    best, best_state = float("inf"), None
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(batch):
            loss = (model(x[idx]) - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            mse = float((model(x[hold]) - y[hold]).pow(2).mean())
        if mse < best:
            best, best_state = mse, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, 1.0 - best / float(y[hold].var())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=512, help="parallel training-pool sessions collected")
    parser.add_argument("--steps", type=int, default=60, help="requests collected per session slot")
    parser.add_argument("--skip", nargs="*", default=[], help="scorers not to fit (names as in the output)")
    parser.add_argument("--xmtf-teacher", nargs="*", default=[],
                        help="scorers that also warm-start an xMTF (instead of the CEM formula)")
    parser.add_argument("--xmtf-inner", nargs="*", default=[],
                        help="additive scorers whose fitted cells become an xMTF's inner stage")
    parser.add_argument("--xmtf-rl-lr", type=float, default=1e-4,
                        help="xMTF's inner learning rate during RL (fusion-ranker selected 1e-4; 0 freezes the cells)")
    parser.add_argument("--quick", action="store_true", help="a smoke run on sim:small (one-epoch cascade)")
    opts = parser.parse_args()
    for flag, given, allowed in (("--skip", opts.skip, SCORERS), ("--xmtf-teacher", opts.xmtf_teacher, SCORERS),
                                 ("--xmtf-inner", opts.xmtf_inner, [n for n in SCORERS if n.endswith("_additive")])):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            parser.error(f"{flag}: unknown scorer(s) {unknown}; choose from {list(allowed)}")
    torch.set_num_threads(opts.threads)
    plan = RANKER_PLAN
    if opts.quick:
        plan = dataclasses.replace(QUICK_PLAN, world=QUICK_RANKER_WORLD, valid_users=60, eval_users=80)
        opts.sessions, opts.steps = 32, 5
    # the settings fusion-ranker selected on its validation users (docs/results/fusion-ranker.json)
    xmtf_plan = dataclasses.replace(plan, xmtf={**plan.xmtf, "tau": 0.05, "rl_lr": opts.xmtf_rl_lr},
                                    xmtf_action_reg=0.5)
    start = time.perf_counter()
    world = World.from_profile(plan.world)
    ranker = train_ranker(plan.world, quick=opts.quick)
    print(json.dumps({"cascade": {k: v for k, v in ranker.figures.items() if isinstance(v, (int, float))},
                      "elapsed_s": time.perf_counter() - start}), flush=True)
    for seed in range(opts.seeds):
        pool, eval_users, eval_env, eval_seed = seed_split(world, plan, seed, ranker)
        row: dict = {"seed": seed}

        def record(name, policy):
            res = evaluate(eval_env, policy, seed=eval_seed, users=eval_users)
            row[name] = {"watch_s": float(res["watch_s"].mean()), "pages": float(res["pages"].float().mean())}
            print(f"seed {seed}: {name} {row[name]['watch_s']:.1f} s", file=sys.stderr, flush=True)

        record("oracle_greedy_satisfaction", OracleGreedy(eval_env, "satisfaction"))
        probe = _eval_requests(eval_env, eval_seed, eval_users)
        _, tuned = _tune_cem(world, plan, pool, seed, probe, ("logsum",), ranker)
        record("cem_logsum", _policy(tuned["logsum"]))
        train_env = _env(world, plan, opts.sessions, True, pool, ranker)
        targets = [OracleGreedy(train_env, "satisfaction"), OracleGreedy(train_env, "watch")]
        data = collect(train_env, _policy(tuned["logsum"]), [t.value for t in targets], opts.steps,
                       seed=30_000 + seed)
        row["train_rows"], row["served_rows"] = len(data["x"]), len(data["x_served"])
        fits = {"privileged_satisfaction": (data["x"], data["y"][:, 0]),
                "privileged_watch": (data["x"], data["y"][:, 1]),
                "privileged_watch_additive": (data["x"], data["y"][:, 1]),
                "logged_watch": (data["x_served"], data["y_served"])}
        if "logged_watch_random" not in opts.skip:
            # the same log, served at random (a randomly exposed slice, as KuaiRand's is_rand traffic): the served
            # items then cover the candidate sets, so the fit does not extrapolate from the formula's top items
            rand = collect(train_env, lambda obs, info: torch.rand(obs["mask"].shape), [], opts.steps,
                           seed=40_000 + seed)
            fits["logged_watch_random"] = (rand["x_served"], rand["y_served"])
            fits["logged_watch_random_additive"] = (rand["x_served"], rand["y_served"])
        for name, (x, y) in fits.items():
            if name in opts.skip:
                continue
            additive = train_env.num_tasks if name.endswith("_additive") else None
            # the cells as wide as xMTF's (``_train_xmtf``), so that they can become its inner stage
            scorer, r2 = fit(x, y, seed, additive_tasks=additive, cell_hidden=max(8, plan.hidden // 2))
            row[f"{name}_holdout_r2"] = r2
            if additive:
                row[f"{name}_scale"] = float(scorer.scale)  # > 0: the sum of the cells ranks as the scorer does
            record(name, _policy(ScorerFusion(scorer)))
            if name in opts.xmtf_teacher:
                # xMTF (the benchmark's selected settings), its inner stage warm-started from this scorer
                model, _ = _train_xmtf(world, xmtf_plan, pool, seed, "xmtf", ScorerFusion(scorer), ranker)
                record(f"xmtf_teacher_{name}", _policy(model))
            if name in opts.xmtf_inner:
                # xMTF whose inner stage *is* this fitted additive scorer's cells, then TD3 as in the benchmark
                model, _ = _train_xmtf(world, xmtf_plan, pool, seed, "xmtf", None, ranker,
                                       inner_init=scorer.cells.state_dict())
                record(f"xmtf_inner_{name}", _policy(model))
        row["elapsed_s"] = time.perf_counter() - start
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
