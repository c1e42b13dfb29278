"""Training configs: ``TrainConfig`` (the trainer) and ``RunConfig`` (one ``funnelrec train`` run).

Both are dataclasses loadable from YAML with ``key=value`` overrides (``funnelrec.config``); a run folder keeps the
resolved ``RunConfig`` as ``config.yaml``, which ``funnelrec eval`` and ``--resume`` read back.

Example:
    >>> from funnelrec.config import load_config
    >>> cfg = load_config(RunConfig, {"stage": "ranking", "model": "shared_bottom", "data": "sim:small"},
    ...                   ["train.epochs=2", "train.embedding_optimizer=rowwise_adagrad", "model_args.embed_dim=8"])
    >>> cfg.train.epochs, cfg.train.embedding_optimizer, cfg.model_args
    (2, 'rowwise_adagrad', {'embed_dim': 8})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from funnelrec.errors import ConfigError

EMBEDDING_OPTIMIZERS = ("adamw", "rowwise_adagrad", "sparse_adam")
STAGES = ("ranking", "retrieval")


@dataclass
class TrainConfig:
    """How a model is trained.

    Args:
        epochs: at most this many passes over the training data.
        batch_size: the *global* batch size in requests (split over ranks under DDP).
        eval_batch_size: requests per evaluation batch.
        lr: AdamW learning rate of the dense parameters.
        weight_decay: AdamW weight decay (dense parameters; also embeddings under ``adamw``).
        sparse_lr: learning rate of the embedding tables (None: ``lr``). Row-wise Adagrad wants a larger one
            (≈ 0.01–0.1).
        embedding_optimizer: optimiser of the ``nn.Embedding`` tables: ``adamw`` (with the dense parameters),
            ``rowwise_adagrad`` (one accumulator per row; only rows with a gradient move) or ``sparse_adam``
            (``torch.optim.SparseAdam``: lazy Adam, only rows with a gradient move).
        clip_norm: clip the global gradient norm to this (None or 0: no clipping).
        amp: mixed precision (``torch.autocast``) when training on CUDA; ignored on CPU.
        amp_dtype: ``bfloat16`` (no loss scaling) or ``float16`` (with a ``GradScaler``).
        patience: stop after this many evaluations without improvement of ``metric``.
        metric: the validation metric of early stopping and ``best.pt`` (a key of the evaluation dict).
        metric_mode: ``max`` (higher is better) or ``min``.
        seed: seeds the torch/numpy/python RNGs at the start of a fresh run and the data order of every epoch.
        checkpoint_every_steps: also write ``last.pt`` every this many steps inside an epoch (0: at epoch ends only).
        max_steps: stop after this many optimiser steps in all (None: no limit); ``last.pt`` is written there.
        history_len: N, the history length of every request.
        device: ``auto`` (CUDA when available, the ``LOCAL_RANK``'s GPU under torchrun), ``cpu`` or ``cuda``.
        find_unused_parameters: passed to DDP (set it for models with parameters unused in some steps).
        progress: show tqdm progress bars (rank 0).
        run_name: name of the run folder ``runs_dir/run_name`` (None: ``<stage>-<model>-<time>``).
        runs_dir: where run folders go.
    """

    epochs: int = 3
    batch_size: int = 256
    eval_batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 1e-5
    sparse_lr: float | None = None
    embedding_optimizer: str = "adamw"
    clip_norm: float | None = 5.0
    amp: bool = True
    amp_dtype: str = "bfloat16"
    patience: int = 2
    metric: str = "auc_mean"
    metric_mode: str = "max"
    seed: int = 0
    checkpoint_every_steps: int = 0
    max_steps: int | None = None
    history_len: int = 50
    device: str = "auto"
    find_unused_parameters: bool = False
    progress: bool = True
    run_name: str | None = None
    runs_dir: str = "runs"

    def validate(self) -> "TrainConfig":
        """Raise ``ConfigError`` naming the first impossible value."""
        checks = [
            ("epochs", self.epochs >= 1),
            ("batch_size", self.batch_size >= 1),
            ("eval_batch_size", self.eval_batch_size >= 1),
            ("lr", self.lr > 0 and math.isfinite(self.lr)),
            ("weight_decay", self.weight_decay >= 0),
            ("sparse_lr", self.sparse_lr is None or self.sparse_lr > 0),
            ("clip_norm", self.clip_norm is None or self.clip_norm >= 0),
            ("patience", self.patience >= 1),
            ("checkpoint_every_steps", self.checkpoint_every_steps >= 0),
            ("max_steps", self.max_steps is None or self.max_steps >= 1),
            ("history_len", self.history_len >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} is out of range")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ConfigError(f"train.embedding_optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)}, "
                              f"got {self.embedding_optimizer!r}")
        if self.metric_mode not in ("max", "min"):
            raise ConfigError(f"train.metric_mode must be 'max' or 'min', got {self.metric_mode!r}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"train.amp_dtype must be 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            raise ConfigError(f"train.run_name must be a plain folder name, got {self.run_name!r}")
        return self

    def __post_init__(self) -> None:
        self.validate()


@dataclass
class RunConfig:
    """One training run: which stage, model and data, and how to train.

    Args:
        stage: ``ranking`` or ``retrieval``.
        model: the registry name (``build_ranker`` / ``build_retriever``).
        data: the data source (``sim:small``, ``sim:bench-v1``, ``kuairand:PATH``, ``movielens:PATH``; sim
            sources take ``?key=value&…`` world overrides).
        model_args: keyword overrides of the model config, passed to the registry builder.
        eval_args: keyword arguments of the stage's evaluation (e.g. ``k`` for retrieval).
        valid_days: days of the log held out for validation (ranking: split by day).
        test_days: days held out for the test split.
        train: the ``TrainConfig``.
    """

    stage: str = "ranking"
    model: str = "shared_bottom"
    data: str = "sim:small"
    model_args: dict[str, Any] = field(default_factory=dict)
    eval_args: dict[str, Any] = field(default_factory=dict)
    valid_days: int = 1
    test_days: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if not self.model:
            raise ConfigError("model: a model name is required")
        if not self.data:
            raise ConfigError("data: a data source is required")
        if self.valid_days < 1 or self.test_days < 0:
            raise ConfigError(f"valid_days must be >= 1 and test_days >= 0, got {self.valid_days}, {self.test_days}")
        self.train.validate()
        return self

    def __post_init__(self) -> None:
        self.validate()


__all__ = ["EMBEDDING_OPTIMIZERS", "RunConfig", "STAGES", "TrainConfig"]
