"""``funnelrec bench retrieval-baselines``: popularity, two-tower and SASRec against the oracle, full-corpus ranking.

What is measured (on the leave-last-out test targets, mean ± std over seeds):

* ``MODEL.recall@10``, ``MODEL.recall@50``, ``MODEL.ndcg@10``, ``MODEL.mrr@10``, ``MODEL.coverage@50`` (each with
  ``.std``) of ``popularity``, ``two_tower`` and ``sasrec``: the rank of the held-out item among **all** items of
  the corpus, the items of the target's whole history excluded;
* ``MODEL.true_recall@50`` (simulated worlds): the share of the oracle's top 50 — items ranked by the world's
  true click probability for that user on the test day (top position, neutral short-term intent), history
  excluded — that the model's top 50 contains;
* the **oracle** row (``oracle.*``, simulated worlds): that true-probability ranking scored like a model against
  the actual held-out clicks; ``MODEL.gap_closed_recall@50`` = (m − m_pop) / (m_oracle − m_pop)
  (``funnelrec.metrics.gap_closed``). On real data the oracle figures are null;
* margins over popularity (``MODEL.margin_over_popularity_recall@50``, ``min_margin_over_popularity_recall@50``
  = the smaller over two-tower and SASRec, so a model that loses shows as losing), whether each model *beats*
  popularity (mean paired difference above 2 std, DESIGN §7), the learning rate chosen on valid, training
  seconds, data sizes and wall time.

Protocol (``funnelrec.retrieval.compare``, RecBole's sequential leave-one-out with funnelrec's no-leakage rule):
per user, the positives (clicks on the simulator and KuaiRand, the first of each user-item pair; every rating on
MovieLens) ordered by time; the last is the test target, the second to last the valid target, the rest train.
Each trained model gets the same grid, learning rate ∈ {1e-3, 3e-3}, trained with seed 0 and early stopping on
valid Recall@50; the rate with the better valid Recall@50 is kept for seeds 1 .. S-1. Test is never used for a
choice. Popularity and the oracle are deterministic (one run).

Sizes: the full run uses ``sim:bench-v1`` with a fixed random subset of :data:`FULL_USERS` users (seed 0; every
item stays in the corpus) and per-model epoch caps (:data:`FULL_PLAN`) so that it fits in about half an hour on
2 cores; ``--quick`` runs a 200-user, 4-day small world with one seed and 2-epoch caps, and writes nothing.

On a simulated world the oracle's Recall against the held-out clicks can be *below* popularity's (the held-out
item is the next first click on what a popularity-biased logging policy showed): ``gap_closed_recall@50`` is then
null, ``oracle_margin_over_popularity_recall@50`` shows it (reported, not a target), and ``MODEL.gap_closed_true_recall@50``
= (m − m_pop) / (1 − m_pop) on true Recall@50 measures the closeness to the oracle instead.

``--data`` takes any ``load_source`` spec. On ``movielens:PATH`` the protocol is RecBole's sequential
leave-one-out: ordered by timestamp (ties in file order), every rating an interaction, full ranking over every
movie. Differences from RecBole: a history holds only *strictly* earlier ratings (funnelrec's no-leakage rule:
ratings given in the same second are neither each other's history nor excluded); history is excluded for every
model (RecBole excludes it for general models only, not for sequential ones such as SASRec); users with fewer than
3 ratings get no valid/test target (RecBole gives a 2-rating user a test target; no MovieLens user has fewer
than 20).

Example:
    funnelrec bench retrieval-baselines --json
    funnelrec bench retrieval-baselines --quick --json --data movielens:tests/fixtures/ml-100k
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from funnelrec.bench.harness import BenchResult, Target, fix_threads, register_benchmark
from funnelrec.errors import ConfigError
from funnelrec.metrics import gap_closed
from funnelrec.retrieval.compare import REPORT, Comparison, Plan, compare, flat_results, mean_std

__all__ = ["bench_retrieval_baselines", "derived_figures", "summary_markdown", "protocol_text", "plot_curves",
           "MODELS", "TRAINED", "FULL_DATA", "QUICK_DATA", "FULL_PLAN", "QUICK_PLAN", "FULL_USERS"]

#: The rows of the comparison, in table order (the oracle joins them on simulated data).
MODELS = ("popularity", "two_tower", "sasrec")
#: The models that are trained, tuned and seeded.
TRAINED = ("two_tower", "sasrec")
FULL_DATA = "sim:bench-v1"
QUICK_DATA = "sim:small?num_users=200&days=4"
#: Users kept by the full run (a seeded random subset of bench-v1's 27,285; see the module doc).
FULL_USERS = 10_000
#: Full-run sizing. Measured on bench-v1 with all users at 1 torch thread: an epoch (with its valid pass) costs
#: ~30 s for two-tower and ~85 s for SASRec, the oracle's test pass ~130 s; all scale with the users kept. With
#: 10,000 users the worst case (all 4 runs of each model to their caps) is ~28 min at 1-thread speed; early
#: stopping usually ends runs well before (expected ~20 min at 1 thread, less on 2).
FULL_PLAN = Plan(epochs={"two_tower": 8, "sasrec": 10}, patience=2, max_users=FULL_USERS)
QUICK_PLAN = Plan(epochs={"two_tower": 2, "sasrec": 2}, patience=1)
#: The Recall@50 figure gaps and margins are taken on.
HEAD = "recall@50"

_LABELS = {"popularity": "Popularity", "two_tower": "Two-tower", "sasrec": "SASRec", "oracle": "Oracle"}
_COLUMNS = (("recall@10", "Recall@10"), ("recall@50", "Recall@50"), ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10"),
            ("coverage@50", "Coverage@50"), ("true_recall@50", "true Recall@50"))


# ------------------------------------------------------------------------------------------------------ figures


def _paired_beats(values: list[float], baseline: float) -> bool:
    """DESIGN §7 "beats": the mean paired difference exceeds 2 std (the baseline is deterministic, so the
    paired differences are the values minus it; with one seed the std is 0 and any positive margin counts)."""
    m, s = mean_std([v - baseline for v in values])
    return bool(m > 2 * s)


def derived_figures(cmp: Comparison) -> dict[str, float | bool | None]:
    """Margins over popularity, gap closed, "beats", tuning results and the mins the targets read."""
    flat = flat_results(cmp)
    pop = flat.get(f"popularity.{HEAD}")
    oracle = flat.get(f"oracle.{HEAD}")
    out: dict[str, float | bool | None] = {}
    margins, true_margins, ndcg_margins, gaps = [], [], [], []
    for name in TRAINED:
        rows = cmp.rows.get(name)
        if rows is None or pop is None:
            continue
        m = flat[f"{name}.{HEAD}"]
        margins.append(m - pop)
        out[f"{name}.margin_over_popularity_{HEAD}"] = m - pop
        out[f"{name}.beats_popularity_{HEAD}"] = _paired_beats(rows.values(HEAD), pop)
        ndcg_margins.append(flat[f"{name}.ndcg@10"] - flat["popularity.ndcg@10"])
        gap = gap_closed(m, pop, oracle) if oracle is not None else None
        out[f"{name}.gap_closed_{HEAD}"] = gap
        if gap is not None:
            gaps.append(gap)
        if cmp.has_oracle:
            true_margins.append(flat[f"{name}.true_recall@50"] - flat["popularity.true_recall@50"])
            out[f"{name}.gap_closed_true_recall@50"] = gap_closed(flat[f"{name}.true_recall@50"],
                                                                  flat["popularity.true_recall@50"], 1.0)
        tuned = [t for t in rows.tuning if t["lr"] == rows.chosen.get("lr")]
        out[f"{name}.valid_{HEAD}"] = tuned[0][f"valid_{HEAD}"] if tuned else None
        out[f"{name}.best_epoch"] = mean_std(rows.best_epoch)[0] + 1  # 1-based: epochs trained until the best
        out[f"{name}.tuning_seconds"] = sum(t["seconds"] for t in rows.tuning)
    out[f"min_margin_over_popularity_{HEAD}"] = min(margins) if margins else None
    out["min_margin_over_popularity_ndcg@10"] = min(ndcg_margins) if ndcg_margins else None
    out["min_true_recall@50_margin_over_popularity"] = min(true_margins) if true_margins else None
    out[f"min_gap_closed_{HEAD}"] = min(gaps) if gaps and len(gaps) == len(margins) else None
    out[f"oracle_margin_over_popularity_{HEAD}"] = oracle - pop if oracle is not None and pop is not None else None
    if all(f"{n}.{HEAD}" in flat for n in TRAINED):
        out[f"sasrec_minus_two_tower_{HEAD}"] = flat[f"sasrec.{HEAD}"] - flat[f"two_tower.{HEAD}"]
    return out


def _cell(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def protocol_text(cmp: Comparison, threads: int, derived: dict | None = None) -> str:
    """The protocol paragraph of the report: split, corpus, oracle, tuning, seeds, sizes, wall time."""
    s, plan, derived = cmp.sizes, cmp.plan, derived or {}
    users = f"{s['users']:,} users" + (f" (a seeded random subset of {s['users_total']:,}, user seed "
                                        f"{plan.user_seed}, sized so that the run fits about half an hour on 2 "
                                        "cores; every item stays in the corpus)"
                                        if s["users"] < s["users_total"] else "")
    positive = ("every rating is an interaction (as in RecBole)" if cmp.kind == "movielens"
                else "the positives are clicks, the first click of each user-item pair")
    lines = [
        f"**Protocol.** Data `{cmp.data_spec}`: {users}, {s['items']:,} items, {s['train_positives']:,} train "
        f"positives, {s['valid_targets']:,} valid and {s['test_targets']:,} test targets. Leave-last-out per user "
        f"({positive}, ordered by time): the last is the test target, the second to last the valid target, the "
        "rest train; users with fewer than 3 are train-only. A target's history is the user's interactions "
        "strictly before it (at most 50 read by the models), and ranking is over the **full corpus** with the "
        "target's whole history excluded.",
    ]
    if cmp.has_oracle:
        lines.append(
            "**Oracle.** The oracle row ranks every item by the world's true click probability for that user on "
            "the test day (top position, neutral short-term intent), history excluded, and is scored against the "
            "actual held-out click like a model. `true Recall@50` is the share of that top 50 a model's top 50 "
            "contains (1 for the oracle by definition). The held-out click also depends on what the logging "
            "policy showed, so the oracle's Recall is a reference for `gap_closed`, not a hard ceiling. "
            "`gap closed (true R@50)` = (m − m_pop) / (1 − m_pop) on true Recall@50.")
        margin = derived.get(f"oracle_margin_over_popularity_{HEAD}")
        if margin is not None and margin <= 0:
            lines[-1] += (
                f" **Here the oracle's Recall@50 is {-margin:.3f} below popularity's**: the held-out item is the "
                "next *first* click on what the popularity-biased logging policy showed, which popularity "
                "predicts better than the user's true taste does, so `gap closed (R@50)` is undefined (n/a) "
                "and true Recall@50 is the figure that measures closeness to the oracle.")
    epochs = ", ".join(f"{_LABELS.get(m, m)} ≤ {plan.fit_settings(m)[1].get('epochs')} epochs"
                       for m in TRAINED if m in cmp.rows)
    grid = ", ".join(f"{x:g}" for x in plan.lr_grid)
    patience = plan.patience if plan.patience is not None else "model default"
    lines.append(
        f"**Tuning and seeds.** Each trained model gets the same grid, learning rate ∈ {{{grid}}}, trained with "
        f"seed 0 and early stopping on **valid** Recall@50 (patience {patience}; {epochs}); the better rate on "
        f"valid is kept for the other seeds. Test is never read for a choice. {cmp.seeds} seed(s) per trained "
        "model, mean ± sample std; popularity" + (" and the oracle are" if cmp.has_oracle else " is") +
        f" deterministic (one run). Wall time {cmp.seconds / 60:.1f} min on {threads} torch thread(s).")
    if cmp.kind == "movielens":
        lines.append(
            "**RecBole differences.** Same leave-one-out by timestamp (ties in file order), full ranking, every "
            "rating an interaction. Differences: history is *strictly* earlier ratings (ratings in the same "
            "second are not each other's history, nor excluded); history is excluded for every model (RecBole "
            "excludes it only for general, non-sequential models); users with fewer than 3 ratings get no "
            "valid/test target (RecBole gives a 2-rating user a test target).")
    return "\n\n".join(lines)


def summary_markdown(cmp: Comparison, derived: dict, threads: int) -> str:
    """The models × metrics table (mean ± std) and the protocol paragraph."""
    cols = [(k, label) for k, label in _COLUMNS if any(r.values(k) for r in cmp.rows.values())]
    head = ["model", *[label for _, label in cols]]
    if cmp.has_oracle:
        head += ["gap closed (R@50)", "gap closed (true R@50)"]
    head += ["lr (valid)", "runs", "s / run"]
    lines = [f"## Retrieval baselines on `{cmp.data_spec}`", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for name, rows in cmp.rows.items():
        cells = [_LABELS.get(name, name), *[_cell(rows.values(k)) for k, _ in cols]]
        if cmp.has_oracle:
            for key in (f"gap_closed_{HEAD}", "gap_closed_true_recall@50"):
                cells.append({"popularity": "0", "oracle": "1"}.get(name, _num(derived.get(f"{name}.{key}"))))
        cells += [f"{rows.chosen['lr']:g}" if "lr" in rows.chosen else "–", str(len(rows.runs)),
                  f"{mean_std(rows.seconds)[0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + protocol_text(cmp, threads, derived)


# -------------------------------------------------------------------------------------------------------- plot


def plot_curves(cmp: Comparison, out_dir: Path, stem: str = "retrieval-baselines") -> list[str]:
    """Recall@K (and true Recall@K on a simulated world) for K = 1 .. curve_k of every row; returns the file name
    (relative to ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [("curve", "Recall@K of the held-out item")]
    if cmp.has_oracle:
        panels.append(("true_curve", "true Recall@K: share of the oracle's top K (oracle = 1)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (attr, title) in zip(axes[0], panels):
        for name, rows in cmp.rows.items():
            if name == "oracle" and attr == "true_curve":
                continue  # 1 at every K by definition
            curves = np.stack([getattr(r, attr) for r in rows.runs])
            k = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            style = dict(ls="--", color="black") if name == "oracle" else {}
            (line,) = ax.plot(k, mean, label=_LABELS.get(name, name), **style)
            if curves.shape[0] > 1:
                sd = curves.std(0, ddof=1)
                ax.fill_between(k, mean - sd, mean + sd, alpha=0.2, color=line.get_color(), lw=0)
        ax.set_xlabel("K")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{cmp.data_spec}: full-corpus ranking, history excluded ({cmp.seeds} seed(s))", fontsize=10)
    fig.tight_layout()
    name = f"{stem}_recall_at_k.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


# ---------------------------------------------------------------------------------------------------- benchmark


def _targets(cmp: Comparison) -> list[Target]:
    targets = [Target(f"min_margin_over_popularity_{HEAD}", ">=", 0.0)]
    if cmp.has_oracle:
        # The oracle's margin over popularity on observed Recall is reported, not targeted: the held-out click
        # depends on what the popularity-biased logging policy showed, which true preference alone does not know.
        targets += [Target("min_true_recall@50_margin_over_popularity", ">=", 0.0)]
    return targets


@register_benchmark("retrieval-baselines")
def bench_retrieval_baselines(quick: bool = False, data: str | None = None, seeds: int = 3, threads: int = 2,
                              out_dir: str = "docs/results") -> BenchResult:
    """Run the retrieval-baselines benchmark (see the module doc); ``--quick`` uses one seed."""
    threads = fix_threads(threads)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    plan = QUICK_PLAN if quick else FULL_PLAN
    spec = data or (QUICK_DATA if quick else FULL_DATA)
    seeds = 1 if quick else int(seeds)
    start = time.perf_counter()
    if not quick:
        print(f"retrieval-baselines: {spec}, {seeds} seed(s), {threads} thread(s)", file=sys.stderr, flush=True)
    cmp = compare(spec, MODELS, seeds=seeds, plan=plan, progress=not quick)
    derived = derived_figures(cmp)
    results: dict[str, float | int | bool | str | None] = {
        "data": spec, "data_kind": cmp.kind, **{k: int(v) for k, v in cmp.sizes.items()},
        "seeds": seeds, "threads": threads,
    }
    results.update(flat_results(cmp))
    if not cmp.has_oracle:  # real data: the oracle figures exist, as nulls
        results.update({f"oracle.{m}{sfx}": None for m in REPORT for sfx in ("", ".std")})
        results.update({"oracle.seconds": None, "oracle.runs": None})
    results.update(derived)
    plots = [] if quick else plot_curves(cmp, Path(out_dir))
    results["wall_s"] = time.perf_counter() - start
    config = {
        "data": spec, "models": list(MODELS), "seeds": seeds, "threads": threads, "lr_grid": list(plan.lr_grid),
        "epochs": {m: plan.fit_settings(m)[1].get("epochs") for m in TRAINED},
        "patience": plan.patience, "max_users": plan.max_users, "user_seed": plan.user_seed,
        "max_len": plan.max_len, "curve_k": plan.curve_k, "valid_metric": "recall@50",
        "chosen": {m: cmp.rows[m].chosen for m in TRAINED if m in cmp.rows},
        "tuning": {m: cmp.rows[m].tuning for m in TRAINED if m in cmp.rows},
    }
    return BenchResult("retrieval-baselines", results, config=config, targets=_targets(cmp), plots=plots,
                       quick=quick, summary=summary_markdown(cmp, derived, threads))
