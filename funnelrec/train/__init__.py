"""Training: one ``Trainer`` for every stage (AdamW + a sparse-friendly embedding optimiser, gradient clipping,
AMP on GPU, early stopping, checkpoints with exact resume, run folders, progress bars), data-parallel training
under ``torchrun`` (``funnelrec.train.distributed``), and the multi-task helpers the demo uses.

Example:
    >>> from funnelrec.train import Trainer, TrainConfig, request_batches            # doctest: +SKIP
    >>> Trainer(model, request_batches(train_ds, 256), evaluate, TrainConfig(), "runs/x").fit()   # doctest: +SKIP
"""

from funnelrec.train.batches import EpochBatches, request_batches
from funnelrec.train.config import RunConfig, TrainConfig
from funnelrec.train.loop import evaluate_multitask, fit_multitask, predict_dataset
from funnelrec.train.optim import LazySparseAdam, RowWiseAdagrad, build_optimizers, split_parameters
from funnelrec.train.trainer import FitResult, Trainer, load_checkpoint

__all__ = [
    "EpochBatches", "FitResult", "LazySparseAdam", "RowWiseAdagrad", "RunConfig", "TrainConfig", "Trainer",
    "build_optimizers", "evaluate_multitask", "fit_multitask", "load_checkpoint", "predict_dataset",
    "request_batches", "split_parameters",
]
