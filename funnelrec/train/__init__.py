"""Training: a small multi-task fit loop (the full trainer with checkpoints and DDP is built on it)."""

from funnelrec.train.loop import FitResult, evaluate_multitask, fit_multitask

__all__ = ["FitResult", "fit_multitask", "evaluate_multitask"]
