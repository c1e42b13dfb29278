"""Multi-task helpers over ``RequestDataset``: predictions, per-task AUC / GAUC, and ``fit_multitask`` — a compact
call of the ``Trainer`` (AdamW, gradient clipping, early stopping on the *validation* mean AUC, progress bars).

Example:
    >>> result = fit_multitask(model, train_ds, valid_ds, epochs=3)   # doctest: +SKIP
    >>> result.best_valid["auc_mean"]                                # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from funnelrec.data.dataset import RequestDataset
from funnelrec.errors import ConfigError
from funnelrec.metrics import auc, gauc
from funnelrec.ranking.losses import multitask_loss
from funnelrec.train.batches import request_batches
from funnelrec.train.config import TrainConfig
from funnelrec.train.distributed import DistInfo, resolve_device
from funnelrec.train.trainer import FitResult, Trainer


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, ds: RequestDataset, batch_size: int = 2048,
                    with_users: bool = False) -> tuple[np.ndarray, ...]:
    """Predictions over a dataset: (probs [R, T], labels [R, T], log_row [R]) over real candidates, plus the user
    id of every row [R] when ``with_users``. Batches go to the model's device; results come back as numpy."""
    model.eval()
    device = _model_device(model)
    probs, labels, rows, users = [], [], [], []
    for batch in ds.iter_batches(batch_size, shuffle=False):
        p = model.predict(batch.to(device) if device.type != "cpu" else batch).float().cpu()
        m = batch.cand_mask
        probs.append(p[m].numpy())
        labels.append(batch.labels[m].numpy())
        rows.append(batch.extras["log_row"][m].numpy())
        if with_users:
            users.append(batch.user_id.unsqueeze(1).expand_as(m)[m].numpy())
    out = (np.concatenate(probs), np.concatenate(labels), np.concatenate(rows))
    return (*out, np.concatenate(users)) if with_users else out


def evaluate_multitask(model: torch.nn.Module, ds: RequestDataset, batch_size: int = 2048,
                       with_gauc: bool = False) -> dict[str, float]:
    """Per-task AUC of ``model`` on ``ds`` and their mean (``auc_mean``); with ``with_gauc`` also the per-task
    user-grouped AUC (``gauc_<task>``) and ``gauc_mean``. Means are over tasks with a finite value."""
    if with_gauc:
        probs, labels, _, users = predict_dataset(model, ds, batch_size, with_users=True)
    else:
        probs, labels, _ = predict_dataset(model, ds, batch_size)
    out = {f"auc_{t}": auc(probs[:, i], labels[:, i]) for i, t in enumerate(ds.tasks)}
    finite = [v for v in out.values() if np.isfinite(v)]
    out["auc_mean"] = float(np.mean(finite)) if finite else float("nan")
    if with_gauc:
        g = {f"gauc_{t}": gauc(probs[:, i], labels[:, i], users) for i, t in enumerate(ds.tasks)}
        finite = [v for v in g.values() if np.isfinite(v)]
        out.update(g, gauc_mean=float(np.mean(finite)) if finite else float("nan"))
    return out


def _multitask_training_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    if hasattr(model, "training_loss"):
        return model.training_loss(batch)
    return multitask_loss(model(batch), batch)


def fit_multitask(model: torch.nn.Module, train: RequestDataset, valid: RequestDataset, epochs: int = 3,
                  batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-5, clip: float = 5.0,
                  patience: int = 2, seed: int = 0, progress: bool = True, device: str = "cpu") -> FitResult:
    """Train ``model`` (its ``training_loss``, else ``multitask_loss``) with the ``Trainer`` in this process; keep
    the weights of the epoch with the best validation mean AUC. Nothing is written to disk."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, clip_norm=clip,
                      patience=patience, seed=seed, progress=progress, metric="auc_mean", device=device)
    single = DistInfo(device=resolve_device(device))  # a single-process fit, even inside a torchrun job
    trainer = Trainer(model, request_batches(train, batch_size, shuffle=True, rank=0, world=1),
                      lambda m: evaluate_multitask(m, valid), cfg, None, loss_fn=_multitask_training_loss,
                      dist_info=single)
    return trainer.fit()


__all__ = ["FitResult", "evaluate_multitask", "fit_multitask", "predict_dataset"]
