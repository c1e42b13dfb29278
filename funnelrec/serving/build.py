"""Train every stage of the cascade on one data source: the parts a bundle is made of.

``train_cascade(source)`` runs, on the source's day split (train / valid / test = all but the last two days /
the day before the last / the last):

1. the feature spec, fitted on the training log (one spec for every stage);
2. the **two-tower retriever** on the training clicks (leave-last-out validation), and its item vectors in a FAISS
   ANN index (exact ``flat`` below 50,000 items, IVF above);
3. the **ranker** (``shared_bottom`` by default, any registered ranker by name) with a D2Q watch-time head, early
   stopping on the valid mean AUC;
4. the **fusion** formula: a power-product of the ranker's task probabilities and watch time, its weights first
   tuned by CEM in the fusion benchmark's session environment (noisy oracle predictions; a fixed formula when the
   source is not simulated);
5. the **pre-ranker** (two-tower vectors frozen), distilled from the ranker + fusion on the retrieval stage's
   candidates of sampled training requests (``preranker_target="distill"``), or fitted on the logged impressions
   (``"logs"``);
6. with ``fusion_tuning="closed_loop"`` (simulated sources): the fusion weights tuned again by CEM on closed-loop
   sessions served by the assembled cascade itself (:func:`tune_fusion_closed_loop`) on the **last logged day**
   — yesterday's traffic, never the evaluation day of ``bench cascade`` — so the weights fit the trained ranker's
   own predictions (its calibration differs from the environment's noisy oracle). Ours.
6. the **re-ranker**: the greedy one, by fused score (``funnelrec.rerank.GreedyReranker``; any ``Reranker``
   can be passed to the ``Cascade``).

The parts come back as :class:`CascadeParts`; :func:`funnelrec.serving.bundle.export_bundle` writes them and
``load_bundle`` rebuilds the :class:`~funnelrec.serving.cascade.Cascade`.

Example:
    >>> from funnelrec.data.sources import load_source
    >>> parts = train_cascade(load_source("sim:small"), BuildConfig(ranker_epochs=1))   # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from rich.console import Console

from funnelrec.data.dataset import RequestDataset
from funnelrec.data.feature_tables import FeatureTables
from funnelrec.data.features import FeatureSpec
from funnelrec.data.splits import split_by_day
from funnelrec.data.timeline import Timelines
from funnelrec.errors import ConfigError
from funnelrec.fusion.formulas import FormulaFusion
from funnelrec.ranking import build_ranker
from funnelrec.ranking.watch_time import WatchTimeDebiaser
from funnelrec.retrieval.ann import AnnConfig, AnnIndex
from funnelrec.retrieval.data import RetrievalData
from funnelrec.retrieval.training import fit_retriever
from funnelrec.retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever
from funnelrec.serving.cascade import Cascade, FunnelSizes
from funnelrec.serving.history import LiveTimelines
from funnelrec.serving.prerank import PreRanker, PreRankerConfig, distill_preranker, fit_preranker
from funnelrec.train.loop import fit_multitask

__all__ = ["BuildConfig", "CascadeParts", "train_cascade", "item_duration_s", "tune_fusion"]


@dataclass
class BuildConfig:
    """How the cascade's stages are trained.

    Args:
        ranker: a registered ranker name; ranker_args: its config overrides.
        ranker_epochs / retriever_epochs / preranker_epochs: at most this many epochs.
        history_len: N of every stage.
        retriever_args: ``TwoTowerConfig`` overrides.
        preranker_target: ``"distill"`` (keep the ranker + fusion's top ``sizes.pool`` of the retrieved candidates)
            or ``"logs"`` (the logged impressions' click and long-view labels).
        distill_requests: training requests sampled for the distillation.
        fusion_kind: the fused formula (``power``, ``linear``, ``logsum``).
        fusion_tuning: ``"closed_loop"`` (step 6 of the module doc; simulated sources only) or ``"env"``.
        closed_loop_users: users of each closed-loop CEM candidate's sessions.
        closed_loop_iterations: closed-loop CEM iterations (8 candidates each).
        cem_iterations: CEM iterations of the fusion weights (0 = the formula's reference weights).
        sizes: the funnel sizes.
        seed: seeds every stage.
    """

    ranker: str = "shared_bottom"
    ranker_args: dict = field(default_factory=dict)
    ranker_epochs: int = 3
    retriever_epochs: int = 3
    preranker_epochs: int = 2
    history_len: int = 50
    retriever_args: dict = field(default_factory=dict)
    preranker_target: str = "distill"
    distill_requests: int = 1500
    fusion_kind: str = "power"
    fusion_tuning: str = "closed_loop"
    closed_loop_users: int = 96
    closed_loop_iterations: int = 3
    cem_iterations: int = 4
    sizes: FunnelSizes = field(default_factory=FunnelSizes)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ranker_epochs", "retriever_epochs", "preranker_epochs", "history_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"build config: {name} must be >= 1, got {getattr(self, name)}")
        if self.preranker_target not in ("distill", "logs"):
            raise ConfigError(f"build config: preranker_target must be 'distill' or 'logs', "
                              f"got {self.preranker_target!r}")
        if self.distill_requests < 1:
            raise ConfigError(f"build config: distill_requests must be >= 1, got {self.distill_requests}")
        if self.fusion_tuning not in ("closed_loop", "env"):
            raise ConfigError(f"build config: fusion_tuning must be 'closed_loop' or 'env', got {self.fusion_tuning!r}")
        if self.closed_loop_users < 1 or self.closed_loop_iterations < 0:
            raise ConfigError("build config: closed_loop_users must be >= 1 and closed_loop_iterations >= 0, got "
                              f"{self.closed_loop_users} and {self.closed_loop_iterations}")
        if self.cem_iterations < 0:
            raise ConfigError(f"build config: cem_iterations must be >= 0, got {self.cem_iterations}")


@dataclass
class CascadeParts:
    """Everything a cascade is made of (what a bundle stores)."""

    spec: FeatureSpec
    users: pl.DataFrame
    videos: pl.DataFrame
    history_log: pl.DataFrame
    retriever: TwoTowerRetriever
    retriever_config: TwoTowerConfig
    item_vectors: torch.Tensor
    ann: AnnIndex
    item_log_pop: torch.Tensor
    preranker: PreRanker
    ranker: torch.nn.Module
    ranker_name: str
    ranker_args: dict
    fusion: FormulaFusion
    sizes: FunnelSizes
    history_len: int
    tasks: tuple[str, ...]
    figures: dict = field(default_factory=dict)

    def cascade(self, metadata: dict | None = None) -> Cascade:
        """The serving cascade over these parts (histories: the logged events, no real-time feedback yet)."""
        live = LiveTimelines(Timelines.from_log(self.history_log, self.spec), self.spec)
        return Cascade(FeatureTables(self.users, self.videos, self.spec), live, self.retriever, self.item_vectors,
                       self.ann, self.item_log_pop, self.preranker, self.ranker, self.fusion,
                       None, item_duration_s(self.videos, self.spec), self.sizes,
                       self.history_len, self.tasks, metadata, videos=self.videos)


def item_duration_s(videos: pl.DataFrame, spec: FeatureSpec) -> torch.Tensor:
    """[I] duration in seconds of every item index (``video_duration`` ms of the video table; the median where
    missing; 0 at padding)."""
    out = torch.zeros(spec.num_items, dtype=torch.float32)
    col = "video_duration" if "video_duration" in videos.columns else None
    if col is None:
        return out
    dur = videos.get_column(col).cast(pl.Float64)
    dur = dur.fill_null(dur.median() or 0.0).to_numpy() / 1000.0
    idx = np.asarray(spec.item_index(videos.get_column("video_id").cast(pl.Int64).to_numpy()))
    ok = idx > 0
    out[torch.from_numpy(idx[ok])] = torch.from_numpy(dur[ok].astype(np.float32))
    return out


def history_log(log: pl.DataFrame) -> pl.DataFrame:
    """The columns of the logged events a bundle keeps for serving histories."""
    from funnelrec.data.objectives import ACTION_COLUMNS
    cols = ["user_id", "video_id", "time_ms", *[c for c in ACTION_COLUMNS if c in log.columns]]
    if "play_time_ms" in log.columns:
        cols.append("play_time_ms")
    return log.select(cols)


def tune_fusion(world, kind: str, iterations: int, seed: int = 0) -> FormulaFusion:
    """A ``FormulaFusion`` of ``kind`` with weights tuned by CEM on simulated sessions of ``world`` (the fusion
    benchmark's method, small budget); ``world`` None or ``iterations`` 0 → the reference weights."""
    from funnelrec.fusion.env import SessionEnv, SessionEnvConfig
    from funnelrec.fusion.formulas import CEMConfig, cem_tune, reference_log_weights

    if world is None or iterations == 0:
        return FormulaFusion(kind, torch.zeros(7))
    cem = CEMConfig(iterations=iterations, population=8, sessions_per_candidate=24, seed=seed)
    env = SessionEnv(SessionEnvConfig(world=world.cfg.name, num_sessions=cem.population * cem.sessions_per_candidate,
                                      candidates=48, autoreset=False), world=world)
    obs, _ = env.reset(seed=seed)
    theta, _ = cem_tune(env, kind, reference_log_weights(kind, obs["pxtr"], obs["mask"]), cem)
    return FormulaFusion(kind, theta)


def tune_fusion_closed_loop(cascade: Cascade, world, day: int, iterations: int, users: int,
                            population: int = 8, seed: int = 0) -> tuple[FormulaFusion, list[dict[str, float]]]:
    """Tune the cascade's fusion log-weights θ by CEM on closed-loop sessions it serves itself.

    Each iteration draws ``population`` θ around the current mean (std 1 at first, floor 0.1); each is scored by
    the mean session watch time of ``users`` users (the same users and random streams for every candidate of an
    iteration), served by the cascade with that θ in the world on ``day``; the top quarter refits the mean and
    std. Starts from the cascade's current fusion. Returns the fusion at the final mean and the per-iteration
    history (best and mean watch seconds).
    """
    from funnelrec.serving.closed_loop import CascadePolicy, run_sessions

    kind = cascade.fusion.kind
    mean = cascade.fusion.log_weights.clone()
    std = torch.ones_like(mean)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(world.population.num_users, generator=g)[:users].sort().values
    history = []
    original = cascade.fusion
    try:
        for it in range(iterations):
            thetas = torch.cat([mean.unsqueeze(0), mean + std * torch.randn(population - 1, mean.numel(),
                                                                                 generator=g)])
            scores = []
            for theta in thetas:
                cascade.fusion = FormulaFusion(kind, theta)
                cascade.history.reset()
                policy = CascadePolicy(cascade, world, day, oracle_top=0)
                scores.append(run_sessions(world, policy, sample, day, seed=seed * 1000 + it)["watch_s"])
            score = torch.tensor(scores)
            elite = thetas[score.topk(max(2, population // 4)).indices]
            mean, std = elite.mean(0), elite.std(0).clamp(min=0.1)
            history.append({"iteration": it, "best_watch_s": float(score.max()), "mean_watch_s": float(score.mean())})
    finally:
        cascade.fusion = original
        cascade.history.reset()
    return FormulaFusion(kind, mean), history


def _two_tower_vectors(model: TwoTowerRetriever, ds: RequestDataset, batch_size: int = 1024):
    """Per logged impression of ``ds``: (user vector, item index, labels) for training the pre-ranker."""
    users, items, labels = [], [], []
    with torch.inference_mode():
        for batch in ds.iter_batches(batch_size):
            u = model.user_vectors(batch)
            m = batch.cand_mask
            users.append(u.unsqueeze(1).expand(-1, m.shape[1], -1)[m])
            items.append(batch.cand_items[m])
            labels.append(batch.labels[m])
    return torch.cat(users), torch.cat(items), torch.cat(labels)


def _teacher_scores(cascade: Cascade, ds: RequestDataset, requests: torch.Tensor, chunk: int = 64):
    """Retrieval candidates of the ``requests`` of ``ds`` and their ranker + fusion scores: ([R, D] user
    vectors, [R, C] items, [R, C] mask, [R, C] teacher scores)."""
    users, cands, masks, scores = [], [], [], []
    with torch.inference_mode():
        for i in range(0, len(requests), chunk):
            b = ds.batch(requests[i: i + chunk])
            uid, t = b.user_id.numpy(), b.request_time_ms.numpy()
            hist = cascade.history.history(uid, t, cascade.history_len)
            user_vec, cand, mask, _ = cascade.retrieve(uid, t, b.tab, b.hour, hist)
            pxtr, watch = cascade.rank(uid, t, b.tab, b.hour, cand, mask, hist)
            users.append(user_vec)
            cands.append(cand)
            masks.append(mask)
            scores.append(cascade.fuse(pxtr, watch, mask))
    return torch.cat(users), torch.cat(cands), torch.cat(masks), torch.cat(scores)


def train_cascade(source, config: BuildConfig | None = None, console: Console | None = None) -> CascadeParts:
    """Train every stage on ``source`` (a ``funnelrec.data.sources.Source``); see the module doc."""
    cfg = config or BuildConfig()
    console = console or Console(quiet=True)
    torch.manual_seed(cfg.seed)
    figures: dict[str, float] = {}
    log = source.log
    splits = split_by_day(log, valid_days=1, test_days=1)
    spec = source.feature_spec().fit(source.users, source.videos, splits["train"])
    train_log = pl.concat([splits["train"], splits["valid"]], how="vertical")

    # retrieval: two-tower on the clicks before the test day
    t0 = time.perf_counter()
    rdata = RetrievalData.from_log(train_log, source.users, source.videos, spec, positive=source.positive,
                                   max_len=cfg.history_len)
    item_sparse, item_dense = rdata.item_features
    rcfg = TwoTowerConfig.from_spec(spec, **cfg.retriever_args)
    retriever = TwoTowerRetriever(rcfg, item_sparse, item_dense, rdata.item_popularity())
    fit = fit_retriever(retriever, rdata, epochs=cfg.retriever_epochs, lr=3e-3, seed=cfg.seed, patience=1)
    retriever.eval()
    with torch.inference_mode():
        vectors = retriever.all_item_vectors()
    ids = np.arange(1, vectors.shape[0], dtype=np.int64)
    kind = "flat" if len(ids) < 50_000 else "ivf"
    ann = AnnIndex.build(vectors[1:].numpy(), ids, AnnConfig(kind=kind))
    figures["retriever_valid_recall@50"] = float(fit.best_valid.get("recall@50", float("nan")))
    figures["retriever_s"] = time.perf_counter() - t0
    console.print(f"two-tower: {len(ids):,} item vectors in a {kind} ANN index "
                  f"({figures['retriever_s']:.0f} s)")

    # ranking datasets (histories from the whole log: strictly-before slicing)
    timelines = Timelines.from_log(log, spec)
    make = lambda df: RequestDataset(df, source.users, source.videos, spec, timelines,  # noqa: E731
                                     history_len=cfg.history_len)
    train, valid = make(splits["train"]), make(splits["valid"])

    # ranker with a D2Q watch-time head
    t0 = time.perf_counter()
    watch = WatchTimeDebiaser.from_log(splits["train"])
    args = {"history_pool": cfg.history_len, **cfg.ranker_args}
    ranker = build_ranker(cfg.ranker, spec, watch, **args)
    rfit = fit_multitask(ranker, train, valid, epochs=cfg.ranker_epochs, seed=cfg.seed, progress=False)
    ranker.eval()
    figures["ranker_valid_auc_mean"] = float(rfit.best_valid["auc_mean"])
    figures["ranker_s"] = time.perf_counter() - t0
    console.print(f"ranker {cfg.ranker}: valid mean AUC {figures['ranker_valid_auc_mean']:.4f} "
                  f"({figures['ranker_s']:.0f} s)")

    # fusion weights tuned on the world's sessions
    t0 = time.perf_counter()
    fusion = tune_fusion(getattr(source, "world", None), cfg.fusion_kind, cfg.cem_iterations, cfg.seed)
    figures["fusion_s"] = time.perf_counter() - t0
    console.print(f"fusion: {cfg.fusion_kind} formula, weights {np.round(fusion.log_weights.exp().numpy(), 3)}")

    # pre-ranker: distilled from ranker + fusion, or fitted on the logged impressions
    t0 = time.perf_counter()
    log_pop = torch.log1p(rdata.item_popularity().float())
    preranker = PreRanker(PreRankerConfig(dim=vectors.shape[1]))
    if cfg.preranker_target == "logs":
        u, items, labels = _two_tower_vectors(retriever, train)
        task_idx = [train.tasks.index(t) for t in preranker.config.tasks]
        pfit = fit_preranker(preranker, u, vectors[items], log_pop[items], labels[:, task_idx],
                             epochs=cfg.preranker_epochs, seed=cfg.seed)
    else:
        teacher_cascade = Cascade(FeatureTables(source.users, source.videos, spec),
                                  LiveTimelines(timelines, spec), retriever, vectors, ann, log_pop, preranker,
                                  ranker, fusion, None, item_duration_s(source.videos, spec), cfg.sizes,
                                  cfg.history_len)
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.distill_requests]
        user_vec, cand, mask, teacher = _teacher_scores(teacher_cascade, train, pick.sort().values)
        pfit = distill_preranker(preranker, user_vec, cand, mask, teacher, vectors, log_pop, cfg.sizes.pool,
                                 epochs=cfg.preranker_epochs, seed=cfg.seed)
        figures["preranker_distill_recall"] = pfit["recall_at_k"]
    preranker.eval()
    figures["preranker_s"] = time.perf_counter() - t0
    console.print(f"pre-ranker ({cfg.preranker_target}): loss {pfit['loss']:.4f} ({figures['preranker_s']:.0f} s)")

    world = getattr(source, "world", None)
    if cfg.fusion_tuning == "closed_loop" and world is not None and cfg.closed_loop_iterations > 0:
        t0 = time.perf_counter()
        cascade = Cascade(FeatureTables(source.users, source.videos, spec), LiveTimelines(timelines, spec),
                          retriever, vectors, ann, log_pop, preranker, ranker, fusion, None,
                          item_duration_s(source.videos, spec), cfg.sizes, cfg.history_len)
        fusion, curve = tune_fusion_closed_loop(cascade, world, world.cfg.days - 1, cfg.closed_loop_iterations,
                                                cfg.closed_loop_users, seed=cfg.seed)
        figures["fusion_closed_loop_s"] = time.perf_counter() - t0
        figures["fusion_closed_loop_first_mean_watch_s"] = curve[0]["mean_watch_s"]
        figures["fusion_closed_loop_last_best_watch_s"] = curve[-1]["best_watch_s"]
        console.print(f"fusion tuned in closed loop: {curve[0]['mean_watch_s']:.0f} → "
                      f"{curve[-1]['best_watch_s']:.0f} watch s / session on day {world.cfg.days - 1} "
                      f"({figures['fusion_closed_loop_s']:.0f} s)")
    return CascadeParts(spec=spec, users=source.users, videos=source.videos, history_log=history_log(log),
                        retriever=retriever, retriever_config=rcfg, item_vectors=vectors, ann=ann,
                        item_log_pop=log_pop, preranker=preranker, ranker=ranker, ranker_name=cfg.ranker,
                        ranker_args=args, fusion=fusion, sizes=cfg.sizes, history_len=cfg.history_len,
                        tasks=tuple(train.tasks), figures=figures)
