"""``funnelrec train`` / ``funnelrec eval``: a ``RunConfig`` → data, model, ``Trainer``, run folder; and back.

**ranking** — ``load_source(data)``; ``split_by_day`` (``valid_days``, ``test_days``); the source's
``FeatureSpec`` fitted on the train split; ``Timelines`` over the full log (strictly-before histories);
a ``RequestDataset`` per split (``train.history_len``); the model from ``build_ranker(model, spec, watch,
**model_args)`` (``watch``: a ``WatchTimeDebiaser`` fitted on the train log unless ``watch_head=log1p``);
evaluation = per-task AUC and GAUC (``auc_mean``, ``gauc_mean``) on valid.

**retrieval** — ``RetrievalData.from_source`` (leave-last-out); ``build_retriever(model, spec, item_popularity,
item_features, **model_args)``; training batches of the model's ``train_mode``; evaluation =
``evaluate_retriever(model, data, split, **eval_args)`` (the world's oracle gives ``true_recall@k`` on simulated
data). Set ``train.metric`` to a retrieval metric (default for this stage: ``recall@50``).

The run folder ``runs_dir/run_name`` holds ``config.yaml`` (the resolved ``RunConfig``), ``feature_spec.json``
(the fitted spec, so ``eval`` featurises exactly as training did), ``metrics.jsonl``, ``learning_curve.png``,
``checkpoints/{last,best}.pt`` and, after ``funnelrec eval``, ``eval_<split>.json``.

Example:
    >>> cfg = load_config(RunConfig, None, ["data=sim:small?num_users=100&days=3", "train.epochs=1"])  # doctest: +SKIP
    >>> result = train_run(cfg)                                                                # doctest: +SKIP
    >>> evaluate_run(result.run_dir, "test")["auc_mean"]                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from funnelrec.config import load_config
from funnelrec.errors import ConfigError
from funnelrec.train.batches import request_batches
from funnelrec.train.config import RunConfig
from funnelrec.train.distributed import DistInfo, barrier, broadcast_object, init_distributed
from funnelrec.train.loop import evaluate_multitask
from funnelrec.train.trainer import FitResult, Trainer, load_checkpoint, seed_everything
from funnelrec.utils.io import atomic_path

#: the default early-stopping metric of each stage (used when ``train.metric`` is left at ``auc_mean``).
DEFAULT_METRIC = {"ranking": "auc_mean", "retrieval": "recall@50"}


@dataclass
class Stage:
    """What a stage needs to train and evaluate one model.

    Args:
        model: the built model.
        train: a ``BatchSource`` of training requests (``__len__`` and ``batch(indices)``).
        evaluate: ``(model, split) → metrics``.
        spec: the fitted ``FeatureSpec`` (saved to the run folder).
    """

    model: nn.Module
    train: Any
    evaluate: Callable[[nn.Module, str], dict[str, float]]
    spec: Any


# ---------------------------------------------------------------------------------------------------- registries
_SOURCE_MEMO: dict[tuple[str, str | None], Any] = {}


def _load_source(spec: str):
    """``load_source(spec)``, remembered for the last spec (rank 0 loads it once before the other ranks, see
    ``train_run``, and the stage builder then reuses it)."""
    try:
        from funnelrec.data.sources import load_source
    except ImportError as err:  # pragma: no cover - the sources module is part of the package
        raise ConfigError(f"data sources are not available in this build ({err})") from None
    key = (spec, os.environ.get("FUNNELREC_CACHE_DIR"))
    if key not in _SOURCE_MEMO:
        _SOURCE_MEMO.clear()
        _SOURCE_MEMO[key] = load_source(spec, progress=False)
    return _SOURCE_MEMO[key]


def _ranking_registry():
    try:
        from funnelrec.ranking import build_ranker
    except ImportError as err:  # pragma: no cover
        raise ConfigError(f"the ranking registry is not available in this build ({err})") from None
    return build_ranker


def _retrieval_registry():
    try:
        from funnelrec.retrieval import build_retriever
        from funnelrec.retrieval.data import RetrievalData
        from funnelrec.retrieval.evaluate import evaluate_retriever
    except ImportError as err:  # pragma: no cover
        raise ConfigError(f"the retrieval stage is not available in this build ({err})") from None
    return build_retriever, RetrievalData, evaluate_retriever


def _load_spec(run_dir: Path | None):
    from funnelrec.data.features import FeatureSpec

    if run_dir is None or not (run_dir / "feature_spec.json").is_file():
        return None
    return FeatureSpec.from_dict(json.loads((run_dir / "feature_spec.json").read_text()))


# ---------------------------------------------------------------------------------------------------- stages
def build_ranking(cfg: RunConfig, splits: tuple[str, ...] = ("train", "valid"), spec=None) -> Stage:
    """The ranking stage of ``cfg`` (see the module doc); only the requested splits get a dataset."""
    from funnelrec.data.dataset import RequestDataset
    from funnelrec.data.splits import split_by_day
    from funnelrec.data.timeline import Timelines

    source = _load_source(cfg.data)
    parts = split_by_day(source.log, valid_days=cfg.valid_days, test_days=cfg.test_days)
    if spec is None:
        spec = source.spec_factory().fit(source.users, source.videos, parts["train"])
    timelines = Timelines.from_log(source.log, spec)
    tasks = tuple(source.tasks)
    datasets = {}
    for name in dict.fromkeys(("train", *splits)):
        if parts[name].height == 0:
            raise ConfigError(f"data {cfg.data!r}: the {name} split is empty")
        datasets[name] = RequestDataset(parts[name], source.users, source.videos, spec, timelines,
                                        history_len=cfg.train.history_len, tasks=tasks)
    build_ranker = _ranking_registry()
    args = dict(cfg.model_args)
    if "num_tasks" not in args and len(tasks) != 6:
        args["num_tasks"] = len(tasks)
    watch = None
    if args.get("watch_head", "auto") != "log1p":
        from funnelrec.ranking.watch_time import WatchTimeDebiaser

        watch = WatchTimeDebiaser.from_log(parts["train"])
    seed_everything(cfg.train.seed)  # the initial weights depend on the seed only
    model = build_ranker(cfg.model, spec, watch=watch, **args)

    def evaluate(m: nn.Module, split: str) -> dict[str, float]:
        if split not in datasets:
            raise ConfigError(f"split {split!r} was not built; choose one of {', '.join(datasets)}")
        return evaluate_multitask(m, datasets[split], batch_size=cfg.train.eval_batch_size, with_gauc=True)

    return Stage(model=model, train=datasets["train"], evaluate=evaluate, spec=spec)


class _RetrievalTrain:
    """The train split of ``RetrievalData`` as a ``BatchSource`` in the model's ``train_mode``."""

    def __init__(self, data, mode: str):
        self.data, self.mode = data, mode

    def __len__(self) -> int:
        return self.data.num_windows() if self.mode == "sequence" else self.data.num_examples("train")

    def batch(self, indices):
        return self.data.sequence_batch(indices) if self.mode == "sequence" else self.data.batch("train", indices)


def build_retrieval(cfg: RunConfig, splits: tuple[str, ...] = ("train", "valid"), spec=None) -> Stage:
    """The retrieval stage of ``cfg`` (see the module doc)."""
    build_retriever, RetrievalData, evaluate_retriever = _retrieval_registry()
    source = _load_source(cfg.data)
    data = RetrievalData.from_source(source, spec=spec, max_len=cfg.train.history_len)
    seed_everything(cfg.train.seed)
    model = build_retriever(cfg.model, data.spec, data.item_popularity(), item_features=data.item_features,
                            **cfg.model_args)
    oracle = getattr(source, "world", None)
    eval_args = dict(cfg.eval_args)
    eval_args.setdefault("batch_size", cfg.train.eval_batch_size)

    def evaluate(m: nn.Module, split: str) -> dict[str, float]:
        return evaluate_retriever(m, data, split, oracle=oracle if split == "test" else None, **eval_args)

    return Stage(model=model, train=_RetrievalTrain(data, getattr(model, "train_mode", "example")),
                 evaluate=evaluate, spec=data.spec)


STAGE_BUILDERS = {"ranking": build_ranking, "retrieval": build_retrieval}


# ---------------------------------------------------------------------------------------------------- train
def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.stage}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_metric(cfg: RunConfig) -> RunConfig:
    """Use the stage's default metric when ``train.metric`` is the ranking default on another stage."""
    if cfg.stage != "ranking" and cfg.train.metric == DEFAULT_METRIC["ranking"]:
        cfg.train.metric = DEFAULT_METRIC[cfg.stage]
    return cfg


def prepare_run_dir(cfg: RunConfig, resume: bool = False, force: bool = False,
                    info: DistInfo | None = None) -> Path:
    """Name the run (rank 0 picks a default name and tells the others) and check / clear its folder."""
    info = info or init_distributed(cfg.train.device)
    name = cfg.train.run_name or (default_run_name(cfg) if info.rank == 0 else None)
    if info.distributed:
        name = broadcast_object(name)
    cfg.train.run_name = name
    run_dir = Path(cfg.train.runs_dir) / name
    problem = None
    if info.rank == 0 and run_dir.exists():
        if force:
            shutil.rmtree(run_dir)
        elif not resume:
            problem = f"{run_dir} already exists; pass --resume to continue it or --force to start over"
    if info.distributed:
        problem = broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    return run_dir


def train_run(cfg: RunConfig, resume: bool = False, force: bool = False) -> FitResult:
    """Train ``cfg`` into its run folder (resuming from ``last.pt`` with ``resume``); see the module doc."""
    cfg = resolve_metric(cfg)
    cfg.validate()
    info = init_distributed(cfg.train.device)
    run_dir = prepare_run_dir(cfg, resume=resume, force=force, info=info)
    if info.distributed:  # rank 0 simulates / caches the data first, so ranks never write the same cache
        if info.rank == 0:
            _load_source(cfg.data)
        barrier()
    stage = STAGE_BUILDERS[cfg.stage](cfg, ("train", "valid"), spec=_load_spec(run_dir) if resume else None)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "feature_spec.json") as tmp:
            tmp.write_text(json.dumps(stage.spec.to_dict()))
    trainer = Trainer(stage.model, request_batches(stage.train, cfg.train.batch_size),
                      lambda m: stage.evaluate(m, "valid"), cfg.train, run_dir, run_config=cfg, dist_info=info)
    result = trainer.fit(resume=resume)
    if info.distributed:
        barrier()
    return result


# ---------------------------------------------------------------------------------------------------- eval
def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The ``RunConfig`` saved in a run folder (plus overrides)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_config(RunConfig, run_dir / "config.yaml", overrides)


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best",
                 device: str | None = None) -> dict[str, Any]:
    """Metrics of a trained run on ``split``: rebuild its data from ``config.yaml`` (and ``feature_spec.json``),
    load ``checkpoints/<checkpoint>.pt`` (``weights_only=True``), evaluate, and write ``eval_<split>.json``.

    Returns ``{"run", "split", "checkpoint", "epoch", "metrics": {...}}``.
    """
    run_dir = Path(run_dir)
    if split not in ("train", "valid", "test"):
        raise ConfigError(f"split must be train, valid or test, got {split!r}")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint must be best or last, got {checkpoint!r}")
    cfg = load_run_config(run_dir)
    ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    ckpt = load_checkpoint(ckpt_path)
    stage = STAGE_BUILDERS[cfg.stage](cfg, (split,), spec=_load_spec(run_dir))
    model = stage.model
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ConfigError(f"{ckpt_path}: does not fit the model of config.yaml "
                          f"({' '.join(str(err).split())[:200]})") from None
    from funnelrec.train.distributed import resolve_device

    model.to(resolve_device(device or cfg.train.device))
    model.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in stage.evaluate(model, split).items()}
    best = next((h for h in ckpt.get("history", []) if h.get("epoch") == ckpt.get("best_epoch")), {})
    out = {"run": str(run_dir), "split": split, "checkpoint": checkpoint,
           "epoch": int(best.get("epoch", ckpt.get("epoch", 0) - 1)), "global_step": int(ckpt.get("global_step", 0)),
           "stage": cfg.stage, "model": cfg.model, "data": cfg.data, "metrics": metrics}
    with atomic_path(run_dir / f"eval_{split}.json") as tmp:
        tmp.write_text(json.dumps(jsonable(out), indent=2) + "\n")
    return out


def jsonable(v: Any) -> Any:
    """``v`` with every NaN float replaced by None (strict JSON)."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and v != v:
        return None
    return v


__all__ = ["DEFAULT_METRIC", "STAGE_BUILDERS", "Stage", "build_ranking", "build_retrieval", "evaluate_run",
           "jsonable", "load_run_config", "prepare_run_dir", "train_run"]
