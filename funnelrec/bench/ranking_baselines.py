"""``funnelrec bench ranking-baselines``: the classic multi-task rankers against the floor and the ceiling.

What it measures, on ``sim:bench-v1`` by default (10 days: days 0–7 train, day 8 valid, day 9 test):

* **per task** (the 6 KuaiRand tasks): test AUC and GAUC (user-grouped, impression-weighted) of Shared-Bottom, MMoE,
  PLE, DIN and DCNv2, mean ± std over ``seeds`` seeds; the same AUC on the randomly exposed slice (``is_rand``);
  *gap closed* = (model − popularity) / (oracle − popularity) (DESIGN §7), where *popularity* is the
  popularity/position-only logistic model and *oracle* the world's true probabilities;
* **watch time**: XAUC of the duration-debiased watch-time head (sampled pairs) and the popularity floor's
  (predicted watch = the item's mean training watch time);
* **cost**: parameters (embedding / dense) and forward+backward FLOPs per sample (``FlopCounterMode``);
* **loader throughput**: training samples/s through the real data pipeline (``RequestDataset`` → ``EpochBatches``,
  batches built on the fly) against training on the same batches held in memory as tensors; the ratio must be
  ≥ 0.9 for every model.

**Tuning** (valid only, equal budget): every model gets the same grid (learning rates ``LR_GRID``) with seed 0,
early stopping on the *valid* mean AUC (at most ``epochs`` epochs, patience 1), the best epoch kept; the setting
with the best valid mean AUC is then trained with the other seeds. The test split is read once per trained model,
after training.

``--data movielens:PATH``: the label is ``rating >= 4`` (``is_click``; the only task), the split is global temporal
(``split_by_time``: the last 10% of ratings test, the 10% before valid), GAUC is over users, and there is no oracle,
no random slice and no watch time (those figures are null).

Example:
    funnelrec bench ranking-baselines --json
    funnelrec bench ranking-baselines --quick --data movielens:tests/fixtures/ml-100k
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from funnelrec.bench.harness import BenchResult, Target, fix_threads, mean_std, register_benchmark
from funnelrec.data.dataset import RequestDataset
from funnelrec.data.splits import split_by_day, split_by_time
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError
from funnelrec.metrics import auc, gap_closed, gauc, xauc
from funnelrec.ranking import build_ranker
from funnelrec.ranking.budget import count_params_flops
from funnelrec.ranking.popularity import PopularityPositionModel, with_position
from funnelrec.ranking.watch_time import WatchTimeDebiaser, watch_seconds
from funnelrec.train.batches import request_batches
from funnelrec.train.config import TrainConfig
from funnelrec.train.distributed import DistInfo
from funnelrec.train.loop import evaluate_multitask
from funnelrec.train.trainer import Trainer, seed_everything

MODELS = ("shared_bottom", "mmoe", "ple", "din", "dcnv2")
LR_GRID = (1e-3, 3e-3)
ORACLE_OF = {"is_click": "p_click", "long_view": "p_long_view", "is_like": "p_like", "is_follow": "p_follow",
             "is_comment": "p_comment", "is_forward": "p_forward"}
XAUC_PAIRS = 2_000_000
_ROW = "__bench_row"


@dataclass
class RankingData:
    """The splits of one source, featurised once and shared by every model.

    Attributes:
        source: the loaded ``Source``.
        tasks: the label columns.
        parts: ``{"train", "valid", "test"}`` log frames (with a ``__bench_row`` column: the row in ``source.log``).
        datasets: a ``RequestDataset`` per split.
        spec: the feature spec fitted on train.
        watch: the duration debiaser fitted on train (None without watch time).
    """

    source: Any
    tasks: tuple[str, ...]
    parts: dict[str, pl.DataFrame]
    datasets: dict[str, RequestDataset]
    spec: Any
    watch: WatchTimeDebiaser | None
    protocol: str = ""

    @property
    def has_watch(self) -> bool:
        return self.watch is not None

    @property
    def is_sim(self) -> bool:
        return self.source.oracle is not None


def load_ranking_data(spec_str: str, history_len: int = 100, max_train_rows: int | None = None,
                      eval_users: int | None = None, eval_seed: int = 0) -> RankingData:
    """Load ``spec_str``, split it (by day for KuaiRand-like data, by time for MovieLens), build the datasets.

    Args:
        spec_str: a source spec (``sim:NAME?k=v``, ``kuairand:PATH``, ``movielens:PATH``).
        history_len: events per history.
        max_train_rows: keep only the most recent train impressions (whole requests), or None for all.
        eval_users: keep valid and test impressions of this many users only, drawn once with ``eval_seed`` from the
            users present in valid or test (the same users in both splits, for every model); None keeps every user.
            Train is untouched and histories still reach back over the whole log.
    """
    from funnelrec.data.sources import load_source

    source = load_source(spec_str, progress=sys.stderr.isatty())
    log = source.log.with_row_index(_ROW)
    if source.kind == "movielens":
        parts = split_by_time(log, valid_frac=0.1, test_frac=0.1)
        protocol = "global temporal split: last 10% of ratings test, the 10% before valid; label rating >= 4"
    else:
        parts = split_by_day(log, valid_days=1, test_days=1)
        protocol = "split by day: the last day test, the day before valid, every earlier day train"
    if max_train_rows is not None and parts["train"].height > max_train_rows:  # keep whole, most recent requests
        cut = parts["train"]["time_ms"].sort(descending=True)[max_train_rows - 1]
        parts["train"] = parts["train"].filter(pl.col("time_ms") >= cut)
    if eval_users is not None:
        if eval_users < 1:
            raise ConfigError(f"eval_users must be >= 1, got {eval_users}")
        present = np.unique(np.concatenate([parts[k]["user_id"].to_numpy() for k in ("valid", "test")]))
        if eval_users < len(present):
            keep = np.random.default_rng(eval_seed).choice(present, eval_users, replace=False)
            for k in ("valid", "test"):
                parts[k] = parts[k].filter(pl.col("user_id").is_in(keep.tolist()))
    spec = source.spec_factory().fit(source.users, source.videos, parts["train"])
    timelines = Timelines.from_log(source.log, spec)
    tasks = tuple(source.tasks)
    datasets = {name: RequestDataset(df, source.users, source.videos, spec, timelines, history_len=history_len,
                                     tasks=tasks) for name, df in parts.items()}
    has_watch = bool((parts["train"]["duration_ms"] > 0).any())
    watch = WatchTimeDebiaser.from_log(parts["train"]) if has_watch else None
    return RankingData(source, tasks, parts, datasets, spec, watch, protocol)


# ------------------------------------------------------------------------------------------------ predictions
@torch.no_grad()
def predict_split(model: nn.Module, ds: RequestDataset, rows: int, batch_size: int = 4096,
                  with_watch: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Task probabilities [R, T] and predicted watch seconds [R] (or None), in the row order of ``ds``'s log."""
    model.eval()
    probs = np.zeros((rows, len(ds.tasks)), dtype=np.float64)
    watch = np.zeros(rows, dtype=np.float64) if with_watch else None
    for batch in ds.iter_batches(batch_size, shuffle=False):
        out = model(batch)
        m = batch.cand_mask
        r = batch.extras["log_row"][m].numpy()
        probs[r] = torch.sigmoid(out["logits"])[m].double().numpy()
        if with_watch:
            watch[r] = watch_seconds(out["watch"], batch.duration_s, model.watch)[m].double().numpy()
    return probs, watch


def score_split(probs: np.ndarray, watch: np.ndarray | None, data: RankingData, split: str = "test",
                seed: int = 0) -> dict[str, float]:
    """Per-task AUC, GAUC and random-slice AUC, and watch-time XAUC of row-aligned predictions on ``split``."""
    df = data.parts[split]
    users = df["user_id"].to_numpy()
    rand = df["is_rand"].to_numpy() == 1 if "is_rand" in df.columns else np.zeros(df.height, bool)
    out: dict[str, float] = {}
    for t, task in enumerate(data.tasks):
        y = df[task].to_numpy()
        out[f"auc.{task}"] = auc(probs[:, t], y)
        out[f"gauc.{task}"] = gauc(probs[:, t], y, users)
        out[f"auc_rand.{task}"] = auc(probs[rand, t], y[rand]) if rand.any() else math.nan
    if watch is not None and data.has_watch:
        out["xauc.watch"] = xauc(watch, df["play_time_ms"].to_numpy() / 1000.0, max_pairs=XAUC_PAIRS, generator=seed)
    else:
        out["xauc.watch"] = math.nan
    return out


def popularity_scores(data: RankingData, with_probs: bool = False):
    """The popularity/position-only floor on test (its watch time: the item's mean training watch seconds); with
    ``with_probs`` also its test probabilities [R, T]."""
    model = PopularityPositionModel(tasks=data.tasks).fit(with_position(data.parts["train"]))
    probs = model.predict(with_position(data.parts["test"]))
    watch = None
    if data.has_watch:
        item_watch = data.parts["train"].group_by("video_id").agg((pl.col("play_time_ms").mean() / 1000).alias("w"))
        watch = (data.parts["test"].select("video_id").join(item_watch, on="video_id", how="left")
                 ["w"].fill_null(float(data.parts["train"]["play_time_ms"].mean()) / 1000).to_numpy())
    scores = score_split(probs, watch, data)
    return (scores, probs) if with_probs else scores


def oracle_scores(data: RankingData, with_probs: bool = False):
    """The world's true probabilities on test (simulated data only; its watch time: the true expected watch); with
    ``with_probs`` also the probabilities [R, T]."""
    oracle = data.source.oracle[data.parts["test"][_ROW].to_numpy()]
    probs = np.stack([oracle[ORACLE_OF[t]].to_numpy() for t in data.tasks], axis=1)
    watch = oracle["e_play_ms"].to_numpy() / 1000.0 if "e_play_ms" in oracle.columns else None
    scores = score_split(probs, watch, data)
    return (scores, probs) if with_probs else scores


# ------------------------------------------------------------------------------------------------ training
def build_model(name: str, data: RankingData, model_args: dict[str, Any]) -> nn.Module:
    """``build_ranker`` over the data's spec, tasks and watch-time debiaser."""
    args = dict(model_args)
    if len(data.tasks) != 6:
        args.setdefault("num_tasks", len(data.tasks))
    return build_ranker(name, data.spec, watch=data.watch, **args)


def train_config(lr: float, epochs: int, batch_size: int, seed: int) -> TrainConfig:
    """The trainer settings every model shares (only ``lr`` is tuned)."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, eval_batch_size=4096, lr=lr, weight_decay=1e-5,
                       clip_norm=5.0, patience=1, metric="auc_mean", seed=seed, progress=sys.stderr.isatty(),
                       device="cpu", amp=False)


def fit_model(name: str, data: RankingData, lr: float, epochs: int, batch_size: int, seed: int,
              model_args: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Train one model with early stopping on the valid mean AUC; returns the model (best epoch) and facts
    (``valid_auc_mean``, ``best_epoch``, ``train_s``, ``epochs_run``, ``samples_per_s``)."""
    seed_everything(seed)
    model = build_model(name, data, model_args)
    cfg = train_config(lr, epochs, batch_size, seed)
    valid = data.datasets["valid"]
    trainer = Trainer(model, request_batches(data.datasets["train"], batch_size, shuffle=True, rank=0, world=1),
                      lambda m: evaluate_multitask(m, valid, batch_size=4096), cfg, None,
                      dist_info=DistInfo(device=torch.device("cpu")))
    t0 = time.perf_counter()
    result = trainer.fit()
    return model, {"valid_auc_mean": float(result.best_valid.get("auc_mean", math.nan)),
                   "best_epoch": int(result.best_epoch), "train_s": time.perf_counter() - t0,
                   "epochs_run": len(result.history), "samples_per_s": float(result.samples_per_s)}


def loader_throughput(name: str, data: RankingData, batch_size: int, steps: int, rounds: int,
                      model_args: dict[str, Any], prefetch: int = 0) -> dict[str, float]:
    """Samples/s of training through the real pipeline vs on the same batches pre-built in memory.

    Both arms train a copy of the same freshly initialised model with the same optimiser on the same ``steps``
    batches; the arms alternate for ``rounds`` rounds and the total times are compared.
    """
    seed_everything(0)
    base = build_model(name, data, model_args)
    epoch = request_batches(data.datasets["train"], batch_size, shuffle=True, rank=0, world=1, prefetch=prefetch)(0, 0)
    in_memory = list(_take(iter(epoch), steps))
    samples = sum(int(b.cand_mask.sum()) for b in in_memory)

    def run(batches) -> float:
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        for batch in batches:  # a training loop: one optimiser step per batch
            loss = model.training_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    run(in_memory[: max(1, steps // 5)])  # warm-up (allocator, kernels)
    pipe_s = mem_s = 0.0
    for _ in range(rounds):
        pipe_s += run(_take(iter(epoch), steps))
        mem_s += run(in_memory)
    return {"pipeline_samples_per_s": rounds * samples / pipe_s, "memory_samples_per_s": rounds * samples / mem_s,
            "loader_ratio": mem_s / pipe_s}


def _take(it, n: int):
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


# ------------------------------------------------------------------------------------------------ report
def _cell(m: float, s: float | None = None, digits: int = 4) -> str:
    if m is None or not np.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None and np.isfinite(s) else "")


def summary_markdown(res: dict[str, Any], models: list[str], tasks: tuple[str, ...], info: dict[str, Any]) -> str:
    """The readable tables of the report (models × tasks), from the flat results."""
    short = [t.replace("is_", "") for t in tasks]
    rows = ["popularity", *models] + (["oracle"] if info["oracle"] else [])
    lines = [f"**Data**: `{info['data']}` — {info['protocol']}. {info['train_rows']:,} train / "
             f"{info['valid_rows']:,} valid / {info['test_rows']:,} test impressions. Mean ± std over "
             f"{info['seeds']} seed(s); learning rate chosen per model from {list(LR_GRID)} on the valid split "
             f"(seed 0); at most {info['epochs']} epochs, early stopping on valid mean AUC. Wall time "
             f"{info['wall_s'] / 60:.1f} min on {info['threads']} threads.", ""]

    def table(title: str, metric: str, with_std: bool = True) -> None:
        lines.extend([f"### {title}", "", "| model | " + " | ".join(short) + " |",
                      "| --- | " + " | ".join("---" for _ in short) + " |"])
        for m in rows:
            cells = []
            for t in tasks:
                v = res.get(f"{m}.{metric}.{t}")
                s = res.get(f"{m}.{metric}.{t}.std") if with_std and m in models else None
                cells.append(_cell(v, s))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")

    table("Test AUC", "auc")
    table("Test GAUC (user-grouped, impression-weighted)", "gauc")
    if info["oracle"]:
        table("Gap closed on AUC: (model − popularity) / (oracle − popularity)", "gap_closed", with_std=False)
        table("Test AUC on the random-exposure slice (is_rand)", "auc_rand")
    lines += ["### Watch time, cost and loader throughput", "",
              "| model | XAUC watch | lr | epochs | params (dense) | params (embedding) | FLOPs/sample | "
              "pipeline samples/s | in-memory samples/s | ratio |", "| --- |" + " --- |" * 9]
    for m in rows:
        def g(k: str, digits: int = 0) -> str:
            v = res.get(f"{m}.{k}")
            if v is None or (isinstance(v, float) and not np.isfinite(v)):
                return "—"
            return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else str(v)
        xa = _cell(res.get(f"{m}.xauc.watch"), res.get(f"{m}.xauc.watch.std") if m in models else None)
        lines.append(f"| {m} | {xa} | {g('lr', 4)} | {g('epochs_run', 1)} | {g('params_dense')} | "
                     f"{g('params_embedding')} | {g('flops_per_sample')} | {g('pipeline_samples_per_s')} | "
                     f"{g('memory_samples_per_s')} | {g('loader_ratio', 3)} |")
    lines.append("")
    return "\n".join(lines)


def plot_auc(res: dict[str, Any], models: list[str], tasks: tuple[str, ...], out_dir: Path,
             stem: str = "ranking-baselines") -> list[str]:
    """Grouped bars of test AUC per task (error bars = std over seeds), popularity and oracle as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(tasks))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, m in enumerate(models):
        means = [res.get(f"{m}.auc.{t}") or np.nan for t in tasks]
        stds = [res.get(f"{m}.auc.{t}.std") or 0.0 for t in tasks]
        ax.bar(x - 0.4 + (i + 0.5) * width, means, width, yerr=stds, label=m, capsize=2)
    for ref, style in (("popularity", "k_"), ("oracle", "r_")):
        vals = [res.get(f"{ref}.auc.{t}") for t in tasks]
        if any(v is not None for v in vals):
            ax.plot(x, [v if v is not None else np.nan for v in vals], style, markersize=40, mew=2, label=ref)
    ax.set_xticks(x, [t.replace("is_", "") for t in tasks])
    lo = np.nanmin([res.get(f"popularity.auc.{t}") or 0.5 for t in tasks])
    ax.set_ylim(max(0.4, lo - 0.05), 1.0)
    ax.set_ylabel("test AUC")
    ax.set_title("Ranking baselines: test AUC per task")
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    name = f"{stem}_auc.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


# ------------------------------------------------------------------------------------------------ benchmark
@dataclass
class _Sizes:
    epochs: int
    batch_size: int
    lr_grid: tuple[float, ...]
    loader_steps: int
    loader_rounds: int
    history_len: int
    max_train_rows: int | None
    model_args: dict[str, Any] = field(default_factory=dict)


def _sizes(quick: bool) -> _Sizes:
    if quick:
        return _Sizes(epochs=1, batch_size=64, lr_grid=(3e-3,), loader_steps=4, loader_rounds=1, history_len=20,
                      max_train_rows=None, model_args={"embed_dim": 8})
    return _Sizes(epochs=3, batch_size=512, lr_grid=LR_GRID, loader_steps=100, loader_rounds=3, history_len=100,
                  max_train_rows=None)


@register_benchmark("ranking-baselines")
def bench_ranking_baselines(quick: bool = False, data: str | None = None, seeds: int | None = None,
                            threads: int = 2, models: tuple[str, ...] = MODELS,
                            out_dir: str = "docs/results") -> BenchResult:
    """Run the ranking-baselines benchmark (see the module docstring)."""
    wall0 = time.perf_counter()
    threads = fix_threads(threads)
    seeds = seeds if seeds is not None else (1 if quick else 3)
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    data = data or ("sim:small?num_users=200&days=4" if quick else "sim:bench-v1")
    size = _sizes(quick)
    models = list(models)
    log = lambda msg: print(f"[ranking-baselines] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"loading {data}")
    rd = load_ranking_data(data, history_len=size.history_len, max_train_rows=size.max_train_rows)
    res: dict[str, Any] = {}
    res.update({f"popularity.{k}": v for k, v in popularity_scores(rd).items()})
    if rd.is_sim:
        res.update({f"oracle.{k}": v for k, v in oracle_scores(rd).items()})
    sample = rd.datasets["train"].batch(torch.arange(min(256, len(rd.datasets["train"]))))
    for name in models:
        # tuning: the same grid for every model, chosen on valid with seed 0
        trials = []
        for lr in size.lr_grid:
            log(f"{name}: seed 0, lr {lr:g}")
            model, facts = fit_model(name, rd, lr, size.epochs, size.batch_size, 0, size.model_args)
            trials.append((facts["valid_auc_mean"], lr, model, facts))
        best = max(trials, key=lambda t: (np.nan_to_num(t[0], nan=-1.0), -t[1]))
        _, lr, model, facts = best
        runs = [(model, facts)]
        for seed in range(1, seeds):
            log(f"{name}: seed {seed}, lr {lr:g}")
            runs.append(fit_model(name, rd, lr, size.epochs, size.batch_size, seed, size.model_args))
        per_seed = [score_split(*predict_split(m, rd.datasets["test"], rd.parts["test"].height,
                                               with_watch=rd.has_watch), rd, seed=i)
                    for i, (m, _) in enumerate(runs)]
        for key in per_seed[0]:
            mean, std = mean_std([s[key] for s in per_seed])
            res[f"{name}.{key}"], res[f"{name}.{key}.std"] = mean, std
        res[f"{name}.lr"] = lr
        res[f"{name}.valid_auc_mean"] = best[0]
        res[f"{name}.valid_auc_mean_per_lr"] = ", ".join(f"{t[1]:g}: {t[0]:.4f}" for t in trials)
        res[f"{name}.epochs_run"] = float(np.mean([f["epochs_run"] for _, f in runs]))
        res[f"{name}.train_s"] = float(np.mean([f["train_s"] for _, f in runs]))
        cost = count_params_flops(copy.deepcopy(model), sample)
        res.update({f"{name}.{k}": cost[k] for k in ("params_dense", "params_embedding", "flops_per_sample")})
        log(f"{name}: loader throughput")
        res.update({f"{name}.{k}": v for k, v in loader_throughput(name, rd, size.batch_size, size.loader_steps,
                                                                   size.loader_rounds, size.model_args).items()})
    _aggregate(res, models, rd)
    info = {"data": data, "protocol": rd.protocol, "seeds": seeds, "epochs": size.epochs, "threads": threads,
            "train_rows": rd.parts["train"].height, "valid_rows": rd.parts["valid"].height,
            "test_rows": rd.parts["test"].height, "oracle": rd.is_sim, "wall_s": time.perf_counter() - wall0}
    res.update({"data": data, "seeds": seeds, "test_impressions": info["test_rows"],
                "train_impressions": info["train_rows"], "wall_s": info["wall_s"]})
    plots = [] if quick else plot_auc(res, models, rd.tasks, Path(out_dir))
    targets = [Target("min_loader_ratio", ">=", 0.9), Target("min_auc_margin_over_popularity", ">", 0.0)]
    if seeds > 1:
        targets.append(Target("share_above_popularity_by_2std", ">=", 1.0))
    config = {"data": data, "models": models, "seeds": seeds, "lr_grid": list(size.lr_grid), "epochs": size.epochs,
              "batch_size": size.batch_size, "history_len": size.history_len, "threads": threads,
              "patience": 1, "optimizer": "AdamW (weight decay 1e-5, clip 5)", "model_args": size.model_args,
              "world_config": f"configs/sim/{data[4:]}.yaml" if data.startswith("sim:") and "?" not in data else ""}
    return BenchResult("ranking-baselines", res, config=config, targets=targets, plots=plots, quick=quick,
                       summary=summary_markdown(res, models, rd.tasks, info))


def _aggregate(res: dict[str, Any], models: list[str], rd: RankingData) -> None:
    """Gap closed per model and task, and the headline figures the targets check."""
    margins, clear, pairs = [], 0, 0
    for m in models:
        for t in rd.tasks:
            mean, std, pop = res[f"{m}.auc.{t}"], res[f"{m}.auc.{t}.std"], res[f"popularity.auc.{t}"]
            if rd.is_sim:
                res[f"{m}.gap_closed.{t}"] = gap_closed(mean, pop, res[f"oracle.auc.{t}"])
            if not all(np.isfinite(v) for v in (mean, pop)):
                continue
            margins.append(mean - pop)
            pairs += 1
            clear += int(mean - 2 * (std if np.isfinite(std) else 0.0) > pop)
    res["min_auc_margin_over_popularity"] = float(min(margins)) if margins else math.nan
    res["share_above_popularity_by_2std"] = clear / pairs if pairs else math.nan
    res["min_loader_ratio"] = float(min(res[f"{m}.loader_ratio"] for m in models)) if models else math.nan


__all__ = ["MODELS", "LR_GRID", "RankingData", "bench_ranking_baselines", "build_model", "fit_model",
           "load_ranking_data", "loader_throughput", "mean_std", "oracle_scores", "popularity_scores", "predict_split",
           "score_split"]


@register_benchmark("ranking-loader")
def bench_ranking_loader(quick: bool = False, data: str | None = None, threads: int = 2) -> BenchResult:
    """Loader throughput alone (the same measurement as in ``ranking-baselines``, without training to convergence):
    samples/s through the real pipeline vs in-memory batches for every baseline. Run it on a quiet machine: another
    process on the same cores distorts the two arms unequally."""
    threads = fix_threads(threads)
    data = data or ("sim:small?num_users=200&days=4" if quick else "sim:bench-v1")
    size = _sizes(quick)
    rd = load_ranking_data(data, history_len=size.history_len)
    res: dict[str, Any] = {"data": data, "threads": threads}
    for name in MODELS:
        res.update({f"{name}.{k}": v for k, v in loader_throughput(name, rd, size.batch_size, size.loader_steps,
                                                                   size.loader_rounds, size.model_args).items()})
    res["min_loader_ratio"] = float(min(res[f"{m}.loader_ratio"] for m in MODELS))
    config = {"data": data, "batch_size": size.batch_size, "steps": size.loader_steps, "rounds": size.loader_rounds,
              "history_len": size.history_len, "threads": threads, "models": list(MODELS)}
    return BenchResult("ranking-loader", res, config=config, quick=quick,
                       targets=[Target("min_loader_ratio", ">=", 0.9)] if not quick else [])
