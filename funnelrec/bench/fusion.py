"""``funnelrec bench fusion``: multi-task fusion judged by whole sessions (oracle-greedy, formulas, RL, xMTF).

Every method ranks the same candidates from the same predictions (``SessionEnv``,
``predictions="oracle_noisy"``: the world's true task probabilities with persistent logit noise sized like a
trained ranker's error) and serves the top page of each request; what counts is what users do over the
session: **total watch seconds per session** and **session length** (requests). Rows:

* ``oracle_greedy_watch`` / ``oracle_greedy_satisfaction`` — references that read the world's *true* values:
  greedy on expected watch time, and greedy on a satisfaction-aware value (watch minutes + expected session
  reward, page filled under the repetition cost);
* ``cem_linear`` / ``cem_logsum`` / ``cem_power`` — fixed formulas with one global weight vector tuned by CEM;
* ``rl_linear`` / ``rl_logsum`` / ``rl_power`` — formula-based RL: a TD3 actor (γ = 0.9) outputs each
  request's coefficients (log-weights around the CEM optimum of the same formula);
* ``xmtf`` — Monotonic Fusion Cells + two-stage hybrid learning (λ = 0.4), the outer coefficients from a TD3
  actor; ablations ``xmtf_no_inner``, ``xmtf_no_outer``, ``xmtf_lambda0``.

Selection first (:func:`select_settings`): the settings that are ours, not the paper's (the formula-RL and
xMTF actors' pull to the neutral action, xMTF's transfer temperature and inner learning rate during RL, how
its inner stage starts: from the CEM formula that is best on validation, or fitted to a randomly served slice
of the training pool, ``inner_start``, ``funnelrec.fusion.inner_fit``) are chosen on a fixed set of
``valid_users`` validation users that no seed ever evaluates on. Protocol per seed: the other users are split (seeded) into ``eval_users`` evaluation
users and a training pool; CEM and RL train on sessions of the pool only; every method is then evaluated on one session of each
evaluation user, all methods with the same env seed (common random numbers). Mean ± std over seeds of the
per-seed means. Also: the monotonicity violation rate of each learned cell (within-request pairs of the
evaluation requests where o_k rises and h̃_k falls), prediction AUCs (noisy vs true, on sampled labels of the
candidates), learned fusion curves, and the **switch test**: the world's long-term trade-off switched off —
``sessions.leave_slope=0``, so leaving no longer depends on satisfaction (the world has no boolean switch for
this trade-off; its size is the slope) — where no RL fusion may beat oracle-greedy on watch time.

Sizing: the full run uses ``sim:bench-v1`` with 5 seeds × 2,000 evaluation users (:data:`FULL_PLAN`), and the
switch test 5 seeds of 7 rows. Measured on 1 torch thread while two other benchmarks shared the 2 cores: about
3.5 min per seed for the 12 rows and 1.2 min per switch-test seed, so ~25 min in all (less on an idle
machine). ``--quick`` runs 300 evaluation users, 1 seed and short training (:data:`QUICK_PLAN`, ~15 s) and
writes nothing.

**``funnelrec bench fusion-ranker``** runs the same protocol, rows and targets with a trained ranker's
predictions (``SessionEnv(predictions="ranker")``). First the serving cascade is trained on the world's own log
(:func:`train_ranker`, ``funnelrec.serving.build.train_cascade`` with its defaults: ~11 min on bench-v1, one
thread). Then every env asks a fresh cascade over those parts, on the day after the log, with the user's logged
history plus the pages served in that env. Real predictions carry per-user and per-item biases, which the noisy
oracle's hashed noise does not, and personalised fusion can correct those biases. Its plan
(:data:`RANKER_PLAN`) scores each selection trial by the mean of four trainings, because with these predictions
one setting's trainings spread more than the settings differ. It writes ``docs/results/fusion-ranker.*``.
``--quick`` trains a one-epoch cascade on ``sim:small`` (~1 min).

Example:
    funnelrec bench fusion --json
    funnelrec bench fusion --quick --json
    funnelrec bench fusion-ranker --json --threads 2
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from funnelrec.bench.harness import BenchResult, Target, beats, fix_threads, mean_std, register_benchmark
from funnelrec.errors import ConfigError
from funnelrec.fusion.env import TASKS, OracleGreedy, SessionEnv, SessionEnvConfig, evaluate, split_users
from funnelrec.fusion.formulas import CEMConfig, FormulaFusion, FormulaRL, cem_tune, reference_log_weights
from funnelrec.fusion.inner_fit import LogFitConfig, RequestLog, collect_request_log, fit_cells_to_log
from funnelrec.fusion.rl import TD3, TD3Config, TrainConfig, train_agent
from funnelrec.fusion.xmtf import XMTF, XMTFConfig
from funnelrec.metrics import auc
from funnelrec.sim import World

__all__ = ["FusionPlan", "FULL_PLAN", "QUICK_PLAN", "RANKER_PLAN", "METHODS", "RL_METHODS", "SWITCH_OFF",
           "bench_fusion", "run_seed", "seed_split", "summary_markdown", "xmtf_config"]

ORACLE = ("oracle_greedy_watch", "oracle_greedy_satisfaction")
CEM = ("cem_linear", "cem_logsum", "cem_power")
FORMULA_RL = ("rl_linear", "rl_logsum", "rl_power")
XMTF_ROWS = ("xmtf", "xmtf_no_inner", "xmtf_no_outer", "xmtf_lambda0")
METHODS = ORACLE + CEM + FORMULA_RL + XMTF_ROWS
#: Fusions that learn from long-term reward by RL (the switch test's "RL fusions").
RL_METHODS = FORMULA_RL + ("xmtf", "xmtf_no_inner", "xmtf_lambda0")
#: The rows the switch test runs (the trade-off off).
SWITCH_ROWS = ORACLE + ("cem_linear", "cem_power", "rl_linear", "rl_power", "xmtf")
#: World override that switches the long-term trade-off off: leaving no longer depends on satisfaction.
SWITCH_OFF = ("sessions.leave_slope=0",)
CELLS = ("xmtf", "xmtf_no_inner", "xmtf_no_outer", "xmtf_lambda0")

_LABELS = {
    "oracle_greedy_watch": "oracle-greedy (watch time)",
    "oracle_greedy_satisfaction": "oracle-greedy (satisfaction)",
    "cem_linear": "CEM linear", "cem_logsum": "CEM log-sum", "cem_power": "CEM power-product",
    "rl_linear": "RL linear (TD3)", "rl_logsum": "RL log-sum (TD3)", "rl_power": "RL power-product (TD3)",
    "xmtf": "xMTF (λ = 0.4)",
    "xmtf_no_inner": "xMTF w/o inner stage", "xmtf_no_outer": "xMTF w/o outer stage",
    "xmtf_lambda0": "xMTF λ = 0",
}


@dataclass
class FusionPlan:
    """Sizes of a fusion benchmark run.

    Args:
        world: world profile.
        eval_users: evaluation users per seed (one session each).
        seeds: seeds.
        switch_seeds: seeds of the switch test (trade-off off).
        candidates: C, candidates per request.
        noise_std: prediction logit noise (``SessionEnvConfig.noise_std``).
        cem: CEM settings (its ``seed`` is replaced per seed).
        train_sessions: parallel sessions while training RL / xMTF.
        rl_steps: env steps of RL training.
        updates_per_step: TD3 updates per env step.
        warm_steps: inner-stage warm-start steps of xMTF (teacher: the best CEM formula).
        span: formula-RL log-weight span around the CEM centre.
        lam: xMTF's λ.
        hidden: width of the TD3 networks (xMTF's cells: half of it).
        xmtf: further ``XMTFConfig`` settings (q_max, a_max, lr, tau, rl_lr).
        xmtf_action_reg: TD3 ``action_reg`` (the actor's pull to the neutral action) of xMTF's agent.
        rl_action_reg: TD3 ``action_reg`` of the formula-RL agent of each formula kind.
        valid_users: V, the validation users settings are selected on (:func:`select_settings`): a fixed set
            (``selection_seed``) that is never drawn as evaluation users in any seed.
        selection_seed: seed of the validation set and of the selection runs.
        xmtf_grid: the xMTF settings tried in the selection (each a dict of ``tau``, ``rl_lr``, ``action_reg``).
        rl_action_reg_grid: the ``action_reg`` values tried for each formula-RL kind.
        teacher: the CEM formula kind whose ranking warm-starts xMTF's inner stage (selected on validation).
        inner_start: how xMTF's inner stage starts before RL (for every variant that has one): ``"teacher"``,
            BPR on the ``teacher`` formula's ranking for ``warm_steps`` requests, or ``"random_log"``, least
            squares on the realised watch time of a randomly served slice of the training pool, with the
            monotonicity loss at the variant's λ (``funnelrec.fusion.inner_fit``). An ``xmtf_grid`` entry may
            set it (key ``"inner"``).
        log_sessions: parallel training-pool sessions of that random slice.
        log_steps: requests logged per session slot (the log has ``log_sessions × log_steps`` requests).
        log_fit: the least-squares fit's settings.
        selection_seeds: training seeds per RL / xMTF trial of the selection (``selection_seed``,
            ``selection_seed + 1``, …); a trial scores the mean of their validation watch seconds. One seed
            cannot separate settings whose trainings spread by more than their gap (``fusion-seed-spread.md``).
    """

    world: str = "bench-v1"
    eval_users: int = 2000
    seeds: int = 5
    switch_seeds: int = 5
    candidates: int = 48
    noise_std: float = 1.2
    cem: CEMConfig = field(default_factory=lambda: CEMConfig(iterations=8, population=16,
                                                             sessions_per_candidate=128))
    train_sessions: int = 128
    rl_steps: int = 400
    updates_per_step: int = 2
    warm_steps: int = 150
    span: float = 1.0
    lam: float = 0.4
    hidden: int = 64
    xmtf: dict = field(default_factory=dict)
    xmtf_action_reg: float = 0.5
    rl_action_reg: dict = field(default_factory=lambda: {"linear": 0.5, "logsum": 0.5, "power": 0.5})
    valid_users: int = 1000
    selection_seed: int = 999
    xmtf_grid: tuple = tuple({"tau": tau, "rl_lr": lr, "action_reg": reg}
                             for tau in (0.05, 0.5) for lr in (1e-5, 1e-3) for reg in (0.1, 0.5, 2.0))
    rl_action_reg_grid: tuple = (0.1, 0.5, 2.0)
    teacher: str = "power"
    selection_seeds: int = 1
    inner_start: str = "teacher"
    log_sessions: int = 512
    log_steps: int = 60
    log_fit: LogFitConfig = field(default_factory=LogFitConfig)

    def validate(self) -> "FusionPlan":
        if isinstance(self.selection_seeds, bool) or not isinstance(self.selection_seeds, int) \
                or self.selection_seeds < 1:
            raise ConfigError(f"selection_seeds must be a positive integer, got {self.selection_seeds!r}")
        starts = {self.inner_start, *(dict(g).get("inner", self.inner_start) for g in self.xmtf_grid)}
        unknown = sorted(starts - set(INNER_STARTS))
        if unknown:
            raise ConfigError(f"FusionPlan: inner start(s) {unknown} unknown; choose from {list(INNER_STARTS)}")
        if self.log_sessions < 1 or self.log_steps < 1:
            raise ConfigError(f"FusionPlan: log_sessions={self.log_sessions!r} and log_steps={self.log_steps!r} "
                              "must be >= 1")
        self.log_fit.validate()
        return self


#: How xMTF's inner stage can start before RL (``FusionPlan.inner_start``).
INNER_STARTS = ("teacher", "random_log")


FULL_PLAN = FusionPlan()
#: ``fusion-ranker``'s plan: the selection averages four training seeds per trial, because with the trained
#: ranker's predictions single trainings of one setting spread by up to 45 s: xMTF at ``rl_lr`` 1e-3 collapses in
#: about one training of four, which two seeds often miss (docs/results/fusion-seed-spread.md). The xMTF grid drops
#: the settings that lost in the single-seed selection of the earlier run (``rl_lr`` 1e-5, ``action_reg`` 0.1;
#: validation users only) and adds ``rl_lr`` 1e-4, which never collapsed in twelve trainings. Since then the grid
#: drops ``rl_lr`` 1e-3 (it collapsed in 5 of 16 selection trainings, docs/results/fusion-ranker.md of 32aaa30)
#: and adds the inner stage fitted to a randomly served log (``inner_start="random_log"``), frozen during RL
#: (``rl_lr`` 0) or nearly (1e-4): docs/results/fusion-headroom.md.
RANKER_PLAN = dataclasses.replace(
    FULL_PLAN, selection_seeds=4,
    xmtf_grid=(*({"inner": "teacher", "tau": tau, "rl_lr": 1e-4, "action_reg": reg}
                 for tau in (0.05, 0.5) for reg in (0.5, 2.0)),
               *({"inner": "random_log", "tau": 0.05, "rl_lr": lr, "action_reg": reg}
                 for lr in (0.0, 1e-4) for reg in (0.5, 2.0))))
QUICK_PLAN = FusionPlan(eval_users=300, seeds=1, switch_seeds=1, candidates=32,
                        cem=CEMConfig(iterations=3, population=8, sessions_per_candidate=24),
                        train_sessions=48, rl_steps=40, updates_per_step=1, warm_steps=15, hidden=32,
                        valid_users=150, xmtf_grid=({"tau": 0.05, "rl_lr": 1e-5, "action_reg": 0.5},
                                                    {"tau": 0.5, "rl_lr": 1e-3, "action_reg": 0.1},
                                                    {"inner": "random_log", "tau": 0.05, "rl_lr": 0.0,
                                                     "action_reg": 0.5}),
                        rl_action_reg_grid=(0.5,), log_sessions=32, log_steps=8,
                        log_fit=LogFitConfig(epochs=2, batch=64))


# ----------------------------------------------------------------------------------------------- one seed


def _env(world: World, plan: FusionPlan, sessions: int, autoreset: bool, pool: torch.Tensor,
         ranker=None) -> SessionEnv:
    """An env of ``sessions`` sessions; with ``ranker`` (trained ``CascadeParts``) its predictions come from a
    fresh cascade over those parts (its own live histories) on the day after the world's log."""
    if ranker is None:
        cfg = SessionEnvConfig(world=plan.world, num_sessions=sessions, candidates=plan.candidates,
                               noise_std=plan.noise_std, autoreset=autoreset)
        return SessionEnv(cfg, world=world, user_pool=pool)
    # imported here: it pulls in the serving stack, which only the ranker mode needs
    from funnelrec.fusion.ranker_predictions import CascadeRankerPredictions

    day = world.cfg.days
    cfg = SessionEnvConfig(world=plan.world, num_sessions=sessions, candidates=plan.candidates,
                           autoreset=autoreset, predictions="ranker", day=day)
    return SessionEnv(cfg, world=world, user_pool=pool,
                      predictor=CascadeRankerPredictions(ranker.cascade(), world, day=day))


def _train_formula_rl(world, plan, pool, seed, kind, center, ranker=None) -> tuple[FormulaRL, list]:
    env = _env(world, plan, plan.train_sessions, True, pool, ranker)
    agent = TD3(TD3Config(state_dim=env.state_dim, action_dim=env.num_tasks, hidden=plan.hidden, seed=seed,
                          action_reg=plan.rl_action_reg[kind]))
    fusion = FormulaRL(kind, center, agent.actor, span=plan.span)
    curve = train_agent(env, agent, lambda obs, a: fusion.fused(obs["pxtr"], a),
                        TrainConfig(steps=plan.rl_steps, updates_per_step=plan.updates_per_step, seed=seed))
    return fusion, curve


def xmtf_config(plan: FusionPlan, num_tasks: int, state_dim: int, seed: int, lam: float,
                use_inner: bool = True, use_outer: bool = True) -> XMTFConfig:
    """The benchmark's ``XMTFConfig``: cells half as wide as the TD3 networks, ``plan.xmtf``'s settings."""
    return XMTFConfig(num_tasks=num_tasks, state_dim=state_dim, hidden=max(8, plan.hidden // 2), lam=lam,
                      use_inner=use_inner, use_outer=use_outer, seed=seed, **plan.xmtf)


def seed_split(world: World, plan: FusionPlan, seed: int, ranker=None):
    """One seed's split as every row sees it: ``(pool, eval_users, eval_env, eval_seed)``. The evaluation users
    are drawn outside the validation users; the env seed is shared by all rows (common random numbers)."""
    reserved = validation_users(world.population.num_users, plan)
    pool, eval_users = split_users(world.population.num_users, plan.eval_users, seed, reserved=reserved)
    return pool, eval_users, _env(world, plan, plan.eval_users, False, pool, ranker), 10_000 + seed


def _train_xmtf(world, plan, pool, seed, variant: str, teacher: FormulaFusion | None,
                ranker=None, inner_init: dict | None = None) -> tuple[XMTF, list]:
    """Train one xMTF ``variant``. Its inner stage is warm-started from ``teacher``'s ranking (any object with
    ``score(pxtr, user_state)``), or, with ``inner_init`` (a ``MonotonicFusionCells`` state dict fitted
    elsewhere), starts from those cells."""
    use_inner, use_outer = variant != "xmtf_no_inner", variant != "xmtf_no_outer"
    if use_inner and teacher is None and inner_init is None:
        raise ConfigError(f"xMTF variant {variant!r} needs a teacher or inner_init for its inner stage")
    env = _env(world, plan, plan.train_sessions, True, pool, ranker)
    t, s = env.num_tasks, env.state_dim
    cfg = xmtf_config(plan, t, s, seed, lam=0.0 if variant == "xmtf_lambda0" else plan.lam,
                      use_inner=use_inner, use_outer=use_outer)
    agent = (TD3(TD3Config(state_dim=s, action_dim=t, hidden=plan.hidden, seed=seed,
                           action_reg=plan.xmtf_action_reg)) if use_outer else None)
    model = XMTF(cfg, actor=agent.actor if agent is not None else None)
    if use_inner and inner_init is not None:
        model.cells.load_state_dict(inner_init)
    elif use_inner:  # warm start: absorb the teacher formula's ranking into the inner stage
        obs, _ = env.reset(seed=seed + 11)
        for _ in range(plan.warm_steps):
            target = teacher.score(obs["pxtr"], obs["user_state"])
            model.inner_step(obs["pxtr"], obs["mask"], obs["user_state"], target)
            obs = env.step(target)[0]
    model.start_rl()

    def scorer(obs, action):
        return model.fused(obs["pxtr"], obs["user_state"], action if use_outer else None)

    def hook(obs, action, info):
        if not use_inner or model.cfg.rl_lr == 0:  # rl_lr 0: the inner stage is frozen during RL
            return
        if use_outer:  # transfer: the inner sum follows the outer ranking at the actor's own action
            with torch.no_grad():
                target = model.fused(obs["pxtr"], obs["user_state"], agent.actor(obs["user_state"]))
            model.inner_step(obs["pxtr"], obs["mask"], obs["user_state"], target)
        else:  # no outer stage: the inner sum follows the served items' realised watch time
            served = info["served"]
            model.inner_step(obs["pxtr"], obs["mask"], obs["user_state"], info["served_watch_s"],
                             target_mask=served >= 0, index=served)

    train_cfg = TrainConfig(steps=plan.rl_steps, updates_per_step=plan.updates_per_step, seed=seed)
    curve = train_agent(env, agent, scorer, train_cfg, hook=hook)
    return model, curve


class _LoggedInnerStarts:
    """The ``random_log`` inner start of one training pool: the randomly served log is collected once (on first
    use), and the cells are fitted once per λ; every xMTF variant and training seed of the pool starts from
    them."""

    def __init__(self, world: World, plan: FusionPlan, pool: torch.Tensor, seed: int, ranker=None):
        self.world, self.plan, self.pool, self.seed, self.ranker = world, plan, pool, seed, ranker
        self.log: RequestLog | None = None
        self.fitted: dict[float, dict] = {}
        self.figures: dict[str, float] = {}

    def cells(self, lam: float) -> dict:
        """The state dict of cells (xMTF's inner stage as ``_train_xmtf`` builds it) fitted at ``lam``."""
        if lam not in self.fitted:
            plan = self.plan
            if self.log is None:
                env = _env(self.world, plan, plan.log_sessions, True, self.pool, self.ranker)
                self.log = collect_request_log(env, plan.log_steps, seed=40_000 + self.seed)
            t, s = self.log.pxtr.shape[-1], self.log.state.shape[-1]
            cells = XMTF(xmtf_config(plan, t, s, self.seed, lam)).cells
            figures = fit_cells_to_log(cells, self.log, lam, plan.log_fit, seed=self.seed)
            self.figures.update({f"lam{lam}.{k}": v for k, v in figures.items()})
            self.fitted[lam] = cells.state_dict()
        return self.fitted[lam]


def _xmtf_from(world, plan: FusionPlan, pool, seed, variant: str, teacher, ranker,
               logged: _LoggedInnerStarts) -> tuple[XMTF, list]:
    """``_train_xmtf`` with the inner start ``plan.inner_start``."""
    if plan.inner_start == "random_log" and variant != "xmtf_no_inner":
        lam = 0.0 if variant == "xmtf_lambda0" else plan.lam
        return _train_xmtf(world, plan, pool, seed, variant, None, ranker, inner_init=logged.cells(lam))
    return _train_xmtf(world, plan, pool, seed, variant, teacher, ranker)


def _policy(fusion):
    return lambda obs, info: fusion.score(obs["pxtr"], obs["user_state"])


def _eval_requests(env: SessionEnv, seed: int, users: torch.Tensor) -> dict[str, torch.Tensor]:
    obs, info = env.reset(seed=seed, options={"users": users})
    return {**obs, "oracle_pxtr": info["oracle"]["pxtr"]}


def validation_users(num_users: int, plan: FusionPlan) -> torch.Tensor:
    """[V] the fixed validation users (``plan.selection_seed``) that settings are selected on; no seed ever
    evaluates on them."""
    if plan.valid_users < 1 or plan.valid_users + plan.eval_users >= num_users:
        raise ConfigError(f"valid_users={plan.valid_users} + eval_users={plan.eval_users} must be below the "
                          f"world's {num_users} users")
    perm = torch.randperm(num_users, generator=torch.Generator().manual_seed(plan.selection_seed))
    return perm[: plan.valid_users].sort().values


def _tune_cem(world: World, plan: FusionPlan, pool: torch.Tensor, seed: int, probe: dict,
              kinds, ranker=None) -> tuple[dict, dict]:
    """CEM-tuned log-weights of each formula ``kind`` on sessions of ``pool``: (centres, fusions)."""
    cem_cfg = dataclasses.replace(plan.cem, seed=seed)
    cem_env = _env(world, plan, cem_cfg.population * cem_cfg.sessions_per_candidate, False, pool, ranker)
    centers, tuned = {}, {}
    for kind in kinds:
        center = reference_log_weights(kind, probe["pxtr"], probe["mask"])
        theta, _ = cem_tune(cem_env, kind, center, cem_cfg)
        centers[kind], tuned[kind] = theta, FormulaFusion(kind, theta)
    return centers, tuned


def select_settings(world: World, plan: FusionPlan, progress: bool = False,
                    ranker=None) -> tuple[FusionPlan, dict]:
    """Select the settings that are ours (not the paper's) on validation users, never on evaluation users.

    The validation users (:func:`validation_users`) are held out of training here; every candidate setting
    trains on the rest of the population and is scored by one session of each validation user (watch
    seconds per session). Selected: the formula-RL actor pull (``action_reg``) per formula kind, and xMTF's
    transfer temperature ``tau``, inner learning rate during RL ``rl_lr`` and actor pull ``action_reg``
    (``plan.xmtf_grid``). The teacher of xMTF's warm start is the CEM formula best on the validation users.

    Returns:
        the plan with the selected settings, and the flat table ``{row: validation watch s}`` of every trial.
    """
    seed = plan.selection_seed
    plan.validate()
    valid = validation_users(world.population.num_users, plan)
    keep = torch.ones(world.population.num_users, dtype=torch.bool)
    keep[valid] = False
    pool = torch.arange(world.population.num_users)[keep]
    env = _env(world, plan, plan.valid_users, False, pool, ranker)
    eval_seed = 20_000 + seed
    table: dict[str, float] = {}

    def score(name, fusion) -> float:
        table[name] = float(evaluate(env, _policy(fusion), seed=eval_seed, users=valid)["watch_s"].mean())
        if progress:
            print(f"  selection: {name}: {table[name]:.1f} s", file=sys.stderr, flush=True)
        return table[name]

    def score_trainings(name, train) -> float:
        """Mean validation score of ``train(seed)`` over the selection's training seeds; with several seeds
        the table also keeps each training's score (``name#seed``)."""
        seeds = [seed + i for i in range(plan.selection_seeds)]
        if len(seeds) == 1:
            return score(name, train(seed))
        per_seed = [score(f"{name}#{s}", train(s)) for s in seeds]
        table[name] = sum(per_seed) / len(per_seed)
        if progress:
            print(f"  selection: {name}: mean {table[name]:.1f} s", file=sys.stderr, flush=True)
        return table[name]

    probe = _eval_requests(env, eval_seed, valid)
    centers, tuned = _tune_cem(world, plan, pool, seed, probe, ("linear", "logsum", "power"), ranker)
    teacher = max(tuned, key=lambda kind: score(f"cem_{kind}", tuned[kind]))
    rl_reg = {}
    for kind in ("linear", "logsum", "power"):
        trials = {}
        for reg in plan.rl_action_reg_grid:
            trial = dataclasses.replace(plan, rl_action_reg={**plan.rl_action_reg, kind: reg})
            trials[reg] = score_trainings(
                f"rl_{kind}[action_reg={reg}]",
                lambda s, trial=trial, kind=kind: _train_formula_rl(world, trial, pool, s, kind, centers[kind],
                                                                    ranker)[0])
        rl_reg[kind] = max(trials, key=trials.get)
    xmtf_trials = []
    logged = _LoggedInnerStarts(world, plan, pool, seed, ranker)
    for setting in plan.xmtf_grid:
        setting = dict(setting)
        trial = dataclasses.replace(plan, xmtf={**plan.xmtf, "tau": setting["tau"], "rl_lr": setting["rl_lr"]},
                                    xmtf_action_reg=setting["action_reg"],
                                    inner_start=setting.get("inner", plan.inner_start))
        label = ",".join(f"{k}={v}" for k, v in setting.items())
        mean = score_trainings(f"xmtf[{label}]", lambda s, trial=trial: _xmtf_from(
            world, trial, pool, s, "xmtf", tuned[teacher], ranker, logged)[0])
        xmtf_trials.append((mean, setting))
    best = max(xmtf_trials, key=lambda t: t[0])[1]
    chosen = dataclasses.replace(plan, rl_action_reg=rl_reg, xmtf_action_reg=best["action_reg"],
                                 teacher=teacher, xmtf={**plan.xmtf, "tau": best["tau"], "rl_lr": best["rl_lr"]},
                                 inner_start=best.get("inner", plan.inner_start))
    return chosen, table


def run_seed(world: World, plan: FusionPlan, seed: int, rows=METHODS, progress: bool = False,
             ranker=None) -> dict:
    """Train and evaluate ``rows`` for one seed; returns per-row session figures, violation rates, curves.
    With ``ranker`` (trained ``CascadeParts``) every env predicts with that cascade's ranker.

    Evaluation users are drawn outside the validation users of :func:`validation_users`.
    """
    pool, eval_users, eval_env, eval_seed = seed_split(world, plan, seed, ranker)
    out: dict = {"rows": {}, "violations": {}, "curves": {}, "models": {}}
    logged = _LoggedInnerStarts(world, plan, pool, seed, ranker)

    def log(msg):
        if progress:
            print(f"  seed {seed}: {msg}", file=sys.stderr, flush=True)

    def record(name, fusion_or_policy, is_policy=False):
        pol = fusion_or_policy if is_policy else _policy(fusion_or_policy)
        res = evaluate(eval_env, pol, seed=eval_seed, users=eval_users)
        out["rows"][name] = {"watch_s": float(res["watch_s"].mean()),
                             "pages": float(res["pages"].float().mean())}
        log(f"{name}: {out['rows'][name]['watch_s']:.1f} s, {out['rows'][name]['pages']:.2f} pages")

    for name in ORACLE:
        if name in rows:
            record(name, OracleGreedy(eval_env, name.removeprefix("oracle_greedy_")), is_policy=True)

    probe = _eval_requests(eval_env, eval_seed, eval_users)
    centers, tuned = {}, {}
    teacher_rows = ("xmtf", "xmtf_no_outer", "xmtf_lambda0") if plan.inner_start == "teacher" else ()
    needs_cem = any(r in rows for r in (*CEM, *FORMULA_RL, *teacher_rows))
    if needs_cem:
        kinds = [k for k in ("linear", "logsum", "power")
                 if f"cem_{k}" in rows or f"rl_{k}" in rows or k == "linear"
                 or (k == plan.teacher and teacher_rows)]
        centers, tuned = _tune_cem(world, plan, pool, seed, probe, kinds, ranker)
        for kind in kinds:
            if f"cem_{kind}" in rows or kind == "linear":
                record(f"cem_{kind}", tuned[kind])
    for kind in ("linear", "logsum", "power"):
        name = f"rl_{kind}"
        if name in rows:
            fusion, curve = _train_formula_rl(world, plan, pool, seed, kind, centers[kind], ranker)
            out["curves"][name] = curve
            record(name, fusion)
    teacher = tuned.get(plan.teacher)
    for name in XMTF_ROWS:
        if name in rows:
            model, curve = _xmtf_from(world, plan, pool, seed, name, teacher, ranker, logged)
            out["curves"][name] = curve
            out["models"][name] = model
            record(name, model)
            rate, _ = model.violations(probe["pxtr"], probe["mask"], probe["user_state"])
            out["violations"][name] = rate
    out["inner_fit"] = dict(logged.figures)
    # prediction quality on the first request of every evaluation session (labels drawn from the truth)
    g = torch.Generator().manual_seed(seed)
    true, mask = probe["oracle_pxtr"], probe["mask"]
    pred = probe["pxtr"][..., : true.shape[-1]]
    y = torch.rand(true.shape, generator=g) < true
    out["auc"] = {task: (auc(pred[..., k][mask].numpy(), y[..., k][mask].numpy()),
                         auc(true[..., k][mask].numpy(), y[..., k][mask].numpy()))
                  for k, task in enumerate(TASKS[: true.shape[-1]])}
    out["probe"] = probe
    return out


# ------------------------------------------------------------------------------------------------ figures


def _aggregate(runs: list[dict], prefix: str = "") -> tuple[dict, dict[str, list[float]]]:
    res: dict = {}
    per: dict[str, list[float]] = {}
    names = [n for n in METHODS if all(n in r["rows"] for r in runs)]
    for name in names:
        w = [r["rows"][name]["watch_s"] for r in runs]
        p = [r["rows"][name]["pages"] for r in runs]
        per[name] = w
        (mw, sw), (mp, sp) = mean_std(w), mean_std(p)
        res.update({f"{prefix}{name}.watch_s": mw, f"{prefix}{name}.watch_s.std": sw,
                    f"{prefix}{name}.pages": mp, f"{prefix}{name}.pages.std": sp})
    return res, per


def derived_figures(runs: list[dict], switch_runs: list[dict]) -> dict:
    """Every flat figure of the benchmark from the per-seed runs."""
    res, per = _aggregate(runs)
    rl_rows = [n for n in FORMULA_RL if n in per]
    if rl_rows and "xmtf" in per:
        best = max(rl_rows, key=lambda n: mean_std(per[n])[0])
        gains = [x / y - 1 for x, y in zip(per["xmtf"], per[best])]
        res["best_formula_rl"] = best
        res["best_formula_rl.watch_s"] = mean_std(per[best])[0]
        res["xmtf_gain_over_best_formula_rl"], res["xmtf_gain_over_best_formula_rl.std"] = mean_std(gains)
        res["xmtf_beats_best_formula_rl"] = beats(per["xmtf"], per[best])
        for name in ("xmtf_no_inner", "xmtf_no_outer", "xmtf_lambda0"):
            if name in per:
                res[f"{name}_gain_over_best_formula_rl"] = mean_std(
                    [x / y - 1 for x, y in zip(per[name], per[best])])[0]
    if all(n in per for n in ORACLE):
        res["oracle_satisfaction_gain_over_watch"] = mean_std(
            [x / y - 1 for x, y in zip(per["oracle_greedy_satisfaction"], per["oracle_greedy_watch"])])[0]
    for key in runs[0].get("inner_fit", {}):
        res[f"inner_fit.{key}"] = mean_std([r["inner_fit"][key] for r in runs if key in r.get("inner_fit", {})])[0]
    for name in CELLS:
        rates = [r["violations"][name] for r in runs if name in r["violations"]]
        if rates:
            res[f"{name}.violation_rate"], res[f"{name}.violation_rate.std"] = mean_std(rates)
    for task in runs[0]["auc"]:
        res[f"pred_auc_{task}"] = mean_std([r["auc"][task][0] for r in runs])[0]
        res[f"oracle_auc_{task}"] = mean_std([r["auc"][task][1] for r in runs])[0]
    if switch_runs:
        sres, sper = _aggregate(switch_runs, prefix="switch_off.")
        res.update(sres)
        ref = sper.get("oracle_greedy_watch")
        rl = [n for n in RL_METHODS if n in sper]
        if ref and rl:
            gains = {n: mean_std([x / y - 1 for x, y in zip(sper[n], ref)])[0] for n in rl}
            res["switch_off.max_rl_gain_over_oracle_greedy_watch"] = max(gains.values())
            res["switch_off.rl_beating_oracle_greedy_watch"] = sum(beats(sper[n], ref) for n in rl)
        if all(n in sper for n in ORACLE):
            res["switch_off.oracle_satisfaction_gain_over_watch"] = mean_std(
                [x / y - 1 for x, y in zip(sper["oracle_greedy_satisfaction"],
                                           sper["oracle_greedy_watch"])])[0]
    return res


def summary_markdown(res: dict, plan: FusionPlan, threads: int, wall_s: float, ranker_mode: bool = False) -> str:
    """The methods table, the switch-test table and the protocol paragraph."""
    def cell(key, digits=1):
        m, s = res.get(key), res.get(f"{key}.std")
        if m is None:
            return "n/a"
        return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"

    best = res.get("best_formula_rl")
    best_w = res.get(f"{best}.watch_s") if best else None
    lines = [f"## Multi-task fusion on `sim:{plan.world}`", "",
             "| method | watch s / session | requests / session | vs best formula RL | violation rate |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in METHODS:
        if f"{name}.watch_s" not in res:
            continue
        rel = f"{res[f'{name}.watch_s'] / best_w - 1:+.1%}" if best_w else "n/a"
        vio = f"{res[f'{name}.violation_rate']:.2%}" if f"{name}.violation_rate" in res else "–"
        lines.append(f"| {_LABELS[name]} | {cell(f'{name}.watch_s')} | {cell(f'{name}.pages', 2)} | {rel} "
                     f"| {vio} |")
    if any(k.startswith("switch_off.") for k in res):
        lines += ["", f"### Switch test: long-term trade-off off (`{' '.join(SWITCH_OFF)}`)", "",
                  "| method | watch s / session | requests / session |", "| --- | ---: | ---: |"]
        for name in SWITCH_ROWS:
            if f"switch_off.{name}.watch_s" in res:
                lines.append(f"| {_LABELS[name]} | {cell(f'switch_off.{name}.watch_s')} | "
                             f"{cell(f'switch_off.{name}.pages', 2)} |")
    trials = {k.removeprefix("selection.").removesuffix(".valid_watch_s"): v for k, v in res.items()
              if k.startswith("selection.")}
    if trials:
        lines += ["", f"### Settings selected on {plan.valid_users:,} validation users (never evaluated on)", "",
                  "| trial | validation watch s / session |", "| --- | ---: |"]
        lines += [f"| `{name}` | {v:.1f} |" for name, v in trials.items()]
        lines += ["", f"Selected: teacher `{res.get('teacher')}`; formula-RL action_reg "
                  + ", ".join(f"{k} {res[f'selected.rl_{k}.action_reg']}" for k in ("linear", "logsum", "power")
                              if f"selected.rl_{k}.action_reg" in res)
                  + f"; xMTF inner start `{res.get('selected.xmtf.inner', 'teacher')}`, tau "
                  f"{res.get('selected.xmtf.tau')}, rl_lr {res.get('selected.xmtf.rl_lr')}, "
                  f"action_reg {res.get('selected.xmtf.action_reg')}."]
    auc_txt = ", ".join(f"{t} {res[f'pred_auc_{t}']:.3f} (oracle {res[f'oracle_auc_{t}']:.3f})"
                        for t in TASKS[:6] if f"pred_auc_{t}" in res)
    predictions = (f"come from a cascade trained on the world's log (`funnelrec.serving.build.train_cascade`, "
                   f"ranker `shared_bottom`; valid mean AUC {res.get('ranker.ranker_valid_auc_mean', float('nan')):.3f}"
                   f"), asked on the day after the log with the user's logged history plus the pages served in "
                   f"the env" if ranker_mode else
                   f"are the world's true probabilities with persistent logit noise σ = {plan.noise_std} "
                   f"(click-AUC drop like the trained rankers')")
    lines += ["", (
        f"**Protocol.** Each seed splits the world's users into {plan.eval_users:,} evaluation users and a "
        f"training pool; CEM ({plan.cem.iterations} iterations × {plan.cem.population} candidates × "
        f"{plan.cem.sessions_per_candidate} sessions) and RL (TD3, γ = 0.9, {plan.rl_steps} steps × "
        f"{plan.train_sessions} parallel sessions) train on the pool only; every method is then evaluated on "
        f"one session of each evaluation user with the same env seed. {plan.seeds} seed(s) (switch test: "
        f"{plan.switch_seeds}), mean ± std of the per-seed means. {plan.candidates} candidates per request, "
        f"pages of 6; predictions {predictions} (candidate AUCs: {auc_txt}). {_inner_start_text(res, plan)} "
        f"Violation rate: share of within-request pairs of the evaluation requests where o_k rises and the "
        f"learned h̃_k falls. Wall time {wall_s / 60:.1f} min on {threads} torch thread(s)."),
        "",
        ("`funnelrec bench fusion-ranker` runs the same protocol with a trained ranker's predictions."
         if not ranker_mode else "`funnelrec bench fusion` runs the same protocol with the noisy oracle's "
         "predictions.")]
    return "\n".join(lines)


def _inner_start_text(res: dict, plan: FusionPlan) -> str:
    if plan.inner_start == "teacher":
        return (f"xMTF's inner stage is warm-started from the best CEM formula's ranking ({plan.warm_steps} "
                "steps).")
    r2 = res.get(f"inner_fit.lam{plan.lam}.holdout_r2")
    frozen = "frozen" if plan.xmtf.get("rl_lr") == 0 else f"learning rate {plan.xmtf.get('rl_lr')}"
    return (f"xMTF's inner stage starts from cells fitted by least squares (plus λ·the monotonicity loss) to the "
            f"realised watch seconds of a randomly served slice of the training pool ({plan.log_sessions} "
            f"sessions × {plan.log_steps} requests; hold-out R² "
            f"{'n/a' if r2 is None else f'{r2:.3f}'}), {frozen} during RL; the λ = 0 ablation is fitted "
            "without the monotonicity loss.")


def plot_curves(runs: list[dict], out_dir: Path, stem: str = "fusion") -> list[str]:
    """Learned fusion curves h̃_k(o; s) of several users and tasks (xMTF λ = 0.4 and λ = 0), and RL learning
    curves; returns the file names (relative to ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    run = runs[0]
    probe = run["probe"]
    names = []
    models = [(n, run["models"][n]) for n in ("xmtf", "xmtf_lambda0") if n in run["models"]]
    if models:
        t = probe["pxtr"].shape[-1]
        users = torch.linspace(0, probe["pxtr"].shape[0] - 1, 4).long()
        fig, axes = plt.subplots(len(models), t, figsize=(2.6 * t, 2.6 * len(models)), squeeze=False)
        for row, (name, model) in enumerate(models):
            for k in range(t):
                vals = probe["pxtr"][..., k][probe["mask"]]
                lo, hi = torch.quantile(vals, 0.01).item(), torch.quantile(vals, 0.99).item()
                grid = torch.logspace(math.log10(max(lo, 1e-5)), math.log10(hi), 50)
                ax = axes[row][k]
                for u in users.tolist():
                    px = probe["pxtr"][u: u + 1, :1].expand(1, 50, t).clone()
                    px[0, :, k] = grid
                    state = probe["user_state"][u: u + 1]
                    with torch.no_grad():
                        h = model.cell_outputs(px, state, model.policy_action(state))[0, :, k]
                    ax.plot(grid.numpy(), h.numpy(), lw=1.2, label=f"user {u}")
                ax.set_xscale("log")
                ax.set_title(f"{_LABELS[name]}\n{TASKS[k]}", fontsize=8)
                ax.tick_params(labelsize=7)
                if k == 0:
                    ax.set_ylabel("h̃_k(o; s)", fontsize=8)
        axes[0][0].legend(fontsize=6)
        fig.suptitle("Learned fusion curves: per task, for four evaluation users (seed 0)", fontsize=10)
        fig.tight_layout()
        names.append(f"{stem}_curves.png")
        fig.savefig(out_dir / names[-1], dpi=100)
        plt.close(fig)
    if run["curves"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in run["curves"].items():
            if curve:
                ax.plot([c["step"] for c in curve], [c["watch_s"] for c in curve], label=_LABELS[name])
        ax.set_xlabel("training step")
        ax.set_ylabel("watch s per ended training session")
        ax.set_title("Training curves (seed 0; exploration on)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        names.append(f"{stem}_training.png")
        fig.savefig(out_dir / names[-1], dpi=100)
        plt.close(fig)
    return names


# ---------------------------------------------------------------------------------------------- benchmark


def _world_profile(data: str | None, plan: FusionPlan) -> str:
    if data is None:
        return plan.world
    if not data.startswith("sim:") or "?" in data:
        raise ConfigError(f"--data {data!r}: the fusion benchmark runs on a simulated world, sim:NAME")
    return data.removeprefix("sim:")


#: The quick world of ``fusion-ranker`` (a cascade is trained on it first).
QUICK_RANKER_WORLD = "small"


def train_ranker(world_name: str, quick: bool, progress: bool = False):
    """The trained ``CascadeParts`` whose ranker predicts in ``fusion-ranker``: every stage of the serving
    cascade (``funnelrec.serving.build.train_cascade``, default settings; one epoch per stage with ``quick``)
    trained on the world's own log."""
    from funnelrec.data.sources import load_source
    from funnelrec.serving.build import BuildConfig, train_cascade

    source = load_source(f"sim:{world_name}", progress=progress and sys.stderr.isatty())
    cfg = (BuildConfig(ranker_epochs=1, retriever_epochs=1, preranker_epochs=1, distill_requests=300,
                       cem_iterations=1, closed_loop_iterations=0, fusion_tuning="env") if quick else BuildConfig())
    return train_cascade(source, cfg)


@register_benchmark("fusion")
def bench_fusion(quick: bool = False, data: str | None = None, seeds: int | None = None, threads: int = 1,
                 out_dir: str = "docs/results", progress: bool | None = None) -> BenchResult:
    """Run the fusion benchmark (see the module doc): predictions from the noisy oracle."""
    return _run(quick, data, seeds, threads, out_dir, progress, ranker_mode=False)


@register_benchmark("fusion-ranker")
def bench_fusion_ranker(quick: bool = False, data: str | None = None, seeds: int | None = None, threads: int = 1,
                        out_dir: str = "docs/results", progress: bool | None = None) -> BenchResult:
    """The fusion benchmark with a trained ranker's predictions (see the module doc): a cascade is first trained
    on the world's log (:func:`train_ranker`), then every env asks its ranker on the day after the log."""
    return _run(quick, data, seeds, threads, out_dir, progress, ranker_mode=True)


def _run(quick: bool, data: str | None, seeds: int | None, threads: int, out_dir: str, progress: bool | None,
         ranker_mode: bool) -> BenchResult:
    threads = fix_threads(threads)
    plan = QUICK_PLAN if quick else RANKER_PLAN if ranker_mode else FULL_PLAN
    if quick and ranker_mode:
        plan = dataclasses.replace(plan, world=QUICK_RANKER_WORLD, valid_users=60, eval_users=80,
                                   selection_seeds=2)
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
        plan = dataclasses.replace(plan, seeds=seeds, switch_seeds=min(seeds, plan.switch_seeds))
    plan = dataclasses.replace(plan, world=_world_profile(data, plan))
    progress = (not quick) if progress is None else progress
    start = time.perf_counter()
    world = World.from_profile(plan.world)
    switch_world = World.from_profile(plan.world, list(SWITCH_OFF))
    ranker, ranker_figures = None, {}
    if ranker_mode:
        if progress:
            print(f"fusion-ranker: training the cascade on sim:{plan.world}", file=sys.stderr, flush=True)
        ranker = train_ranker(plan.world, quick, progress)
        ranker_figures = {f"ranker.{k}": v for k, v in ranker.figures.items() if isinstance(v, (int, float))}
    if progress:
        print(f"fusion: selecting settings on {plan.valid_users:,} validation users", file=sys.stderr, flush=True)
    plan, selection = select_settings(world, plan, progress=progress, ranker=ranker)
    runs, switch_runs = [], []
    for seed in range(plan.seeds):
        if progress:
            print(f"fusion: seed {seed + 1}/{plan.seeds} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr,
                  flush=True)
        runs.append(run_seed(world, plan, seed, METHODS, progress=progress, ranker=ranker))
    for seed in range(plan.switch_seeds):
        if progress:
            print(f"fusion: switch test seed {seed + 1}/{plan.switch_seeds}", file=sys.stderr, flush=True)
        switch_runs.append(run_seed(switch_world, plan, seed, SWITCH_ROWS, progress=progress, ranker=ranker))
    res: dict = {"world": f"sim:{plan.world}", "seeds": plan.seeds, "switch_seeds": plan.switch_seeds,
                 "eval_users": plan.eval_users, "candidates": plan.candidates, "rl_steps": plan.rl_steps,
                 "train_sessions": plan.train_sessions, "noise_std": plan.noise_std, "threads": threads,
                 "valid_users": plan.valid_users, "teacher": plan.teacher,
                 "selected.xmtf.inner": plan.inner_start, "selected.xmtf.tau": plan.xmtf["tau"], "selected.xmtf.rl_lr": plan.xmtf["rl_lr"],
                 "selected.xmtf.action_reg": plan.xmtf_action_reg,
                 **{f"selected.rl_{k}.action_reg": v for k, v in plan.rl_action_reg.items()},
                 **{f"selection.{k}.valid_watch_s": v for k, v in selection.items()}, **ranker_figures}
    res.update(derived_figures(runs, switch_runs))
    name = "fusion-ranker" if ranker_mode else "fusion"
    plots = [] if quick else plot_curves(runs, Path(out_dir), stem=name)
    wall = time.perf_counter() - start
    res["wall_s"] = wall
    targets = [Target("xmtf_gain_over_best_formula_rl", ">=", 0.05), Target("xmtf.violation_rate", "<", 0.01),
               Target("switch_off.rl_beating_oracle_greedy_watch", "<=", 0)]
    config = {"plan": dataclasses.asdict(plan), "switch_off": list(SWITCH_OFF), "methods": list(METHODS),
              "switch_rows": list(SWITCH_ROWS), "predictions": "ranker" if ranker_mode else "oracle_noisy"}
    return BenchResult(name, res, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary_markdown(res, plan, threads, wall, ranker_mode))
