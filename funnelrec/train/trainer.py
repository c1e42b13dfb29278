"""``Trainer``: one training loop for every funnel stage over ``RequestBatch``.

What it does, per step: move the batch to the device, compute the model's loss (``model.training_loss(batch)``,
or a given ``loss_fn``) under ``torch.autocast`` on CUDA when ``amp`` is on, weight it so that data-parallel
gradients equal single-process ones (below), backward (DDP all-reduces dense gradients), unscale (fp16), clip the
global gradient norm, step every optimiser (AdamW for dense parameters; AdamW, row-wise Adagrad or lazy SparseAdam
for the embedding tables — ``funnelrec.train.optim``). After every epoch: evaluate on validation (rank 0),
early-stop on ``config.metric`` (``patience`` evaluations without improvement), write the run folder.

**Run folder** ``run_dir`` (rank 0 writes; nothing without one): ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON line per evaluation: epoch, step, train_loss, samples/s, time, the validation metrics),
``learning_curve.png``, ``checkpoints/last.pt`` (after every epoch, every ``checkpoint_every_steps`` steps and at
``max_steps``) and ``checkpoints/best.pt`` (the best evaluation so far). Checkpoints are written atomically and
load with ``torch.load(weights_only=True)``: the model and optimiser state dicts, the grad scaler, the torch / CUDA /
numpy / python RNG states of every rank (as tensors and plain lists), the epoch, the global batches done in that
epoch, the global step, the early-stopping state and the history.

**Exact resume.** ``fit(resume=True)`` loads ``last.pt`` and continues from the same global batch of the same
epoch: the data order of an epoch depends only on ``(seed, epoch)`` (``train_batches(epoch, seed)``), the skipped
batches are not rebuilt (``EpochBatches.skip``), and the RNG states are restored, so an interrupted and resumed run
ends with the same parameters as an uninterrupted one, bit for bit on the same machine.

**Data parallel.** Under ``torchrun`` the trainer joins the process group (``init_distributed``) and wraps the
model in DDP. Every rank walks the same sequence of *global* batches and trains on its contiguous slice (see
``batches.request_batches``). The loss of a rank is a mean over its own items, so its loss is scaled by
``world · n_rank / N`` (n_rank its items, N those of the global batch — one all-reduce): DDP's average of the rank
gradients then equals the gradient of the mean loss over the whole global batch. ``n`` is
``model.loss_weight(batch)`` when the model defines it (e.g. requests, for a per-request loss), else the number of
real candidates (``cand_mask.sum()``: the multi-task losses are means over real candidates).

Example:
    >>> trainer = Trainer(model, request_batches(train_ds, 256), lambda m: evaluate_multitask(m, valid_ds),
    ...                   TrainConfig(epochs=3), run_dir=Path("runs/demo"))          # doctest: +SKIP
    >>> result = trainer.fit()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from funnelrec.config import save_yaml, to_dict
from funnelrec.errors import ConfigError
from funnelrec.train.config import TrainConfig
from funnelrec.train.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    wrap_ddp,
)
from funnelrec.train.optim import build_optimizers, clip_grad_norm
from funnelrec.utils.io import atomic_path

CHECKPOINT_FORMAT = 1


@dataclass
class FitResult:
    """What a fit produced.

    Args:
        best_epoch: the epoch (0-based) of the best evaluation (-1 before any).
        best_valid: the history entry of that evaluation (its metrics, epoch, train_loss …).
        history: one entry per evaluated epoch.
        samples_per_s: training throughput in real candidates per second (all ranks together).
        global_step: optimiser steps taken in all.
        stopped_early: True when ``patience`` ran out.
        finished: True when training is over (all epochs or early stopping), False when ``max_steps`` stopped it.
        run_dir: the run folder, if any.
    """

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_s: float = 0.0
    global_step: int = 0
    stopped_early: bool = False
    finished: bool = True
    run_dir: Path | None = None


class _LossModule(nn.Module):
    """``forward(batch) → loss``: what DDP wraps (DDP synchronises gradients of what runs through its forward)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor] | None):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        if self._loss_fn is not None:
            return self._loss_fn(self.model, batch)
        if not hasattr(self.model, "training_loss"):
            raise ConfigError(f"{type(self.model).__name__} has no training_loss(batch); pass loss_fn to Trainer")
        return self.model.training_loss(batch)


def default_loss_weight(model: nn.Module, batch: Any) -> float:
    """Items the batch's loss averages over: ``model.loss_weight(batch)`` or the number of real candidates."""
    if hasattr(model, "loss_weight"):
        return float(model.loss_weight(batch))
    mask = getattr(batch, "cand_mask", None)
    if mask is None:
        raise ConfigError("batch has no cand_mask; give the model a loss_weight(batch) method")
    return float(mask.sum())


def _rng_state() -> dict[str, Any]:
    """Every RNG of this process as tensors / plain values (``torch.load(weights_only=True)`` reads them)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"].cpu())
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    p = s["python"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    """Seed the torch (CPU and CUDA), numpy and python RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A trainer checkpoint, read with ``torch.load(weights_only=True)``; ``ConfigError`` naming the file when it
    is missing or not a funnelrec checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle / zip errors
        raise ConfigError(f"{path}: not a readable checkpoint ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise ConfigError(f"{path}: not a funnelrec trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


class Trainer:
    """The training loop of every stage (see the module doc).

    Args:
        model: the model; it must define ``training_loss(batch) → scalar`` unless ``loss_fn`` is given.
        train_batches: ``(epoch, seed) → iterable of batches`` (this rank's batches, in an order that depends only
            on (epoch, seed)); ``batches.request_batches(dataset, batch_size)`` builds one. A returned object with
            ``skip(n)`` and ``__len__`` resumes without rebuilding skipped batches and shows an ETA.
        evaluate: ``model → {metric: value}`` on validation (called on rank 0, model in eval mode); None trains
            without evaluation or early stopping.
        config: a ``TrainConfig``.
        run_dir: the run folder (None: nothing is written; the best weights are kept in memory).
        loss_fn: ``(model, batch) → loss`` instead of ``model.training_loss``.
        loss_weight: ``(model, batch) → items the loss averages over`` (default ``default_loss_weight``).
        run_config: the object written as ``config.yaml`` (default ``config``), e.g. a ``RunConfig``.
        dist_info: a ``DistInfo`` (default: ``init_distributed(config.device)``, which joins torchrun's group).
    """

    def __init__(self, model: nn.Module, train_batches: Callable[[int, int], Iterable[Any]],
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None, config: TrainConfig | None = None,
                 run_dir: str | os.PathLike | None = None, *,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 loss_weight: Callable[[nn.Module, Any], float] | None = None, run_config: Any = None,
                 dist_info: DistInfo | None = None):
        self.config = cfg = copy.deepcopy(config) if config is not None else TrainConfig()
        cfg.validate()
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.train_batches = train_batches
        self.evaluate = evaluate
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_config = run_config if run_config is not None else cfg
        self.loss_weight = loss_weight or default_loss_weight
        self.rank0 = self.dist.rank == 0
        # a model without trainable parameters (popularity) is only evaluated and checkpointed
        self.trainable = bool(getattr(model, "trainable", True)) and any(p.requires_grad for p in model.parameters())
        self._loss_module = _LossModule(self.model, loss_fn)
        self.ddp = (wrap_ddp(self._loss_module, self.dist, cfg.find_unused_parameters)
                    if self.dist.distributed and self.trainable else self._loss_module)
        self.optimizers = build_optimizers(self.model, cfg.lr, cfg.weight_decay, cfg.sparse_lr,
                                           cfg.embedding_optimizer) if self.trainable else []
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        if self.amp and self.amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        # progress state (what a checkpoint stores)
        self.epoch = 0  # the epoch being trained (0-based); == epochs when done
        self.step_in_epoch = 0  # global batches of ``epoch`` already trained
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped_early = False
        self.finished = False
        self.history: list[dict[str, float]] = []
        self._epoch_loss = 0.0  # sum over the epoch's steps of N · loss
        self._epoch_weight = 0.0  # sum of N
        self._samples = 0.0  # real candidates trained on, all ranks
        self._train_time = 0.0
        self._best_state: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ collectives (only in a process group)
    def _sum(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t) if self.dist.distributed else t

    def _barrier(self) -> None:
        if self.dist.distributed:
            barrier()

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    @property
    def last_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints" / "best.pt"

    # ------------------------------------------------------------------ logging
    def _log(self, text: str) -> None:
        if self.rank0 and self.config.progress:
            tqdm.write(text, file=sys.stderr)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint dict (see the module doc)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "optimizer_names": [type(o).__name__ for o in self.optimizers],
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng_states if rng_states is not None else [_rng_state()],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "finished": self.finished,
            "history": copy.deepcopy(self.history),
            "epoch_loss": self._epoch_loss,
            "epoch_weight": self._epoch_weight,
            "samples": self._samples,
            "train_time": self._train_time,
            "world_size": self.dist.world_size,
            "config": to_dict(self.config),
        }

    def save_checkpoint(self, which: str = "last") -> Path | None:
        """Write ``checkpoints/<which>.pt`` atomically (rank 0; every rank must call it: the RNG states of all
        ranks are gathered)."""
        rngs = all_gather_object(_rng_state()) if self.dist.distributed else [_rng_state()]
        if self.run_dir is None or not self.rank0:
            return None
        path = self.checkpoint_dir / f"{which}.pt"
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(rngs), tmp)
        return path

    def load_state_dict(self, ckpt: dict[str, Any], restore_rng: bool = True) -> None:
        """Restore model, optimisers, scaler, progress and (``restore_rng``) this rank's RNG states."""
        self.model.load_state_dict(ckpt["model"])
        opts = ckpt.get("optimizers", [])
        names = ckpt.get("optimizer_names", [])
        if len(opts) != len(self.optimizers) or (names and names != [type(o).__name__ for o in self.optimizers]):
            raise ConfigError(f"checkpoint optimisers {names} do not match this run's "
                              f"{[type(o).__name__ for o in self.optimizers]} (same embedding_optimizer?)")
        for opt, state in zip(self.optimizers, opts):
            opt.load_state_dict(state)
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for key in ("epoch", "step_in_epoch", "global_step", "best_metric", "best_epoch", "bad_epochs",
                    "stopped_early", "finished"):
            setattr(self, key, ckpt[key])
        self.history = list(ckpt["history"])
        self._epoch_loss, self._epoch_weight = float(ckpt["epoch_loss"]), float(ckpt["epoch_weight"])
        self._samples, self._train_time = float(ckpt["samples"]), float(ckpt["train_time"])
        if restore_rng:
            rngs = ckpt["rng"]
            if len(rngs) != self.dist.world_size:
                self._log(f"resuming a {len(rngs)}-process checkpoint on {self.dist.world_size} processes: "
                          "RNG streams (dropout) differ from an uninterrupted run")
            _set_rng_state(rngs[self.dist.rank % len(rngs)])

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load ``path`` (default ``last.pt``) if it exists; True when something was loaded."""
        path = Path(path) if path is not None else self.last_path
        if path is None or not path.is_file():
            return False
        self.load_state_dict(load_checkpoint(path, map_location="cpu"))
        self._log(f"resumed {path} at epoch {self.epoch + 1}, step {self.step_in_epoch} of the epoch "
                  f"(global step {self.global_step})")
        return True

    # ------------------------------------------------------------------ training
    def _step(self, batch: Any) -> tuple[float, float, float]:
        """One optimiser step on this rank's share of a global batch; returns (global mean loss, global weight N,
        global real candidates)."""
        cfg = self.config
        if hasattr(batch, "to"):
            batch = batch.to(self.device, non_blocking=True)
        n_local = float(self.loss_weight(self.model, batch))
        mask = getattr(batch, "cand_mask", None)
        items = float(mask.sum()) if mask is not None else n_local
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else nullcontext()
        with ctx:
            loss = self.ddp(batch)
        if loss.dim() != 0:
            raise ConfigError(f"the training loss must be a scalar, got shape {tuple(loss.shape)}")
        stats = self._sum(torch.stack([torch.tensor(n_local, dtype=torch.float64),
                                            n_local * loss.detach().double().cpu(),
                                            torch.tensor(items, dtype=torch.float64)]))
        n_global = float(stats[0])
        # DDP averages rank gradients: scale each rank's mean loss by its share of the global items
        scale = self.dist.world_size * n_local / n_global if n_global > 0 else 0.0
        self.scaler.scale(loss * scale if scale != 1.0 else loss).backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.clip_norm:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            clip_grad_norm(params, cfg.clip_norm)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        mean_loss = float(stats[1]) / n_global if n_global > 0 else 0.0
        return mean_loss, n_global, float(stats[2])

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when ``max_steps`` stopped it."""
        cfg = self.config
        batches = self.train_batches(self.epoch, cfg.seed)
        total = len(batches) if hasattr(batches, "__len__") else None
        start = self.step_in_epoch
        if start:
            if hasattr(batches, "skip"):
                batches = batches.skip(start)
                total = None if total is None else start + len(batches)
            else:
                batches = itertools.islice(iter(batches), start, None)
        self.model.train()
        bar = tqdm(total=total, initial=start, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not (cfg.progress and self.rank0), leave=False, dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        try:
            for batch in batches:
                loss, weight, items = self._step(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                self._epoch_loss += loss * weight
                self._epoch_weight += weight
                self._samples += items
                now = time.perf_counter()
                self._train_time += now - t0
                t0 = now
                bar.update(1)
                bar.set_postfix(loss=f"{self._epoch_loss / max(self._epoch_weight, 1e-12):.4f}",
                                samples_s=f"{self._samples / max(self._train_time, 1e-9):,.0f}", refresh=False)
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                    self.save_checkpoint("last")
                    return False
                if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0:
                    self.save_checkpoint("last")
                    t0 = time.perf_counter()
        finally:
            bar.close()
        return True

    def _evaluate(self) -> dict[str, float]:
        """Rank 0 evaluates; the others receive its metrics (or its error, so no rank waits forever)."""
        metrics: dict[str, float] = {}
        error: str | None = None
        if self.evaluate is not None and self.rank0:
            self.model.eval()
            try:
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
            except Exception as err:
                if not self.dist.distributed:
                    raise
                error = f"evaluation failed on rank 0: {type(err).__name__}: {' '.join(str(err).split())}"
            finally:
                self.model.train()
        if self.dist.distributed:
            metrics, error = broadcast_object((metrics, error))
            if error is not None:
                raise ConfigError(error)
        return metrics

    def _end_epoch(self) -> None:
        cfg = self.config
        metrics = self._evaluate()
        train_loss = self._epoch_loss / self._epoch_weight if self._epoch_weight > 0 else float("nan")
        entry: dict[str, float] = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss,
                                   "samples_per_s": self._samples / max(self._train_time, 1e-9),
                                   "time_s": self._train_time, **metrics}
        improved = True
        if self.evaluate is not None:
            if cfg.metric not in metrics:
                raise ConfigError(f"train.metric {cfg.metric!r} is not among the evaluation metrics "
                                  f"({', '.join(sorted(metrics)) or 'none'})")
            value = metrics[cfg.metric]
            better = (lambda a, b: a > b) if cfg.metric_mode == "max" else (lambda a, b: a < b)
            if not math.isfinite(value):  # e.g. an AUC without positives: best only while there is no other
                improved = self.best_epoch < 0
            else:
                improved = (self.best_metric is None or not math.isfinite(self.best_metric)
                            or better(value, self.best_metric))
        entry["best"] = bool(improved)
        self.history.append(entry)
        if improved:
            self.best_metric = metrics.get(cfg.metric) if self.evaluate is not None else None
            self.best_epoch = self.epoch
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch += 1
        self.step_in_epoch = 0
        self._epoch_loss = self._epoch_weight = 0.0
        if self.evaluate is not None and self.bad_epochs >= cfg.patience:
            self.stopped_early = True
        self.finished = self.stopped_early or self.epoch >= cfg.epochs or not self.trainable
        self.save_checkpoint("last")
        if improved:
            if self.run_dir is not None:
                self.save_checkpoint("best")
            else:
                self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._write_metrics()
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("_mean") or k == cfg.metric)
        self._log(f"epoch {entry['epoch'] + 1}/{cfg.epochs}  step {self.global_step}  train_loss {train_loss:.4f}  "
                  f"{shown}{'  (best)' if improved else ''}  {entry['samples_per_s']:,.0f} samples/s")

    def _write_metrics(self) -> None:
        if self.run_dir is None or not self.rank0:
            return
        with atomic_path(self.run_dir / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(_jsonable(h)) + "\n" for h in self.history))
        try:
            plot_learning_curve(self.history, self.config.metric, self.run_dir / "learning_curve.png")
        except Exception as err:  # a plot never stops training
            self._log(f"learning curve not written: {err}")

    def _restore_best(self) -> None:
        if self.best_epoch < 0 or (self.history and self.history[-1]["epoch"] == self.best_epoch):
            return
        if self.run_dir is not None:
            self._barrier()
            self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    def fit(self, resume: bool = False) -> FitResult:
        """Train (resuming from ``last.pt`` when ``resume`` and it exists) until all epochs ran, patience ran out
        or ``max_steps``; leave the best evaluation's weights in the model when training is over."""
        cfg = self.config
        if not (resume and self.resume()):
            seed_everything(cfg.seed + self.dist.rank)
        if self.run_dir is not None and self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.run_config, self.run_dir / "config.yaml")
        if self.finished and self.epoch < cfg.epochs and not self.stopped_early and self.trainable:
            self.finished = False  # more epochs asked for on resume
        while not self.finished:
            if self.trainable and not self._train_epoch():
                break
            self._end_epoch()
        if self.finished:
            self._restore_best()
        self._barrier()
        best = next((h for h in self.history if h["epoch"] == self.best_epoch), {})
        return FitResult(best_epoch=self.best_epoch, best_valid=dict(best), history=list(self.history),
                         samples_per_s=self._samples / max(self._train_time, 1e-9), global_step=self.global_step,
                         stopped_early=self.stopped_early, finished=self.finished, run_dir=self.run_dir)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def plot_learning_curve(history: list[dict[str, float]], metric: str, path: str | os.PathLike) -> Path:
    """Training loss and the validation ``metric`` per epoch, as a PNG (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(epochs, [h.get("train_loss", float("nan")) for h in history], marker="o")
    axes[0].set_title("train loss")
    axes[0].set_xlabel("epoch")
    values = [h.get(metric, float("nan")) for h in history]
    axes[1].plot(epochs, values, marker="o", color="tab:orange")
    best = [e for e, h in zip(epochs, history) if h.get("best")]
    if best and metric in history[0]:
        axes[1].axvline(best[-1], color="grey", linestyle=":", label="best")
        axes[1].legend()
    axes[1].set_title(f"valid {metric}")
    axes[1].set_xlabel("epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


__all__ = ["CHECKPOINT_FORMAT", "FitResult", "Trainer", "default_loss_weight", "load_checkpoint",
           "plot_learning_curve", "seed_everything"]
