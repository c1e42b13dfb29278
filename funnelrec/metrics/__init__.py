"""Evaluation metrics: classification (AUC, GAUC, log-loss, calibration), regression (XAUC, MAE) and full-corpus
top-K ranking (recall, NDCG, MRR, hit rate, coverage, true recall against the oracle, gap closed).

All functions accept torch tensors, numpy arrays or lists and return Python floats (``reliability_bins`` and
``topk_metrics`` return dicts). Shape or value errors raise ``funnelrec.errors.DataError`` naming the argument.

Example:
    >>> from funnelrec.metrics import auc, gap_closed
    >>> auc([0.2, 0.7, 0.4], [0, 1, 1])
    1.0
    >>> gap_closed(0.75, 0.5, 1.0)
    0.5
"""

from funnelrec.metrics.classification import auc, calibration, gauc, logloss, reliability_bins
from funnelrec.metrics.ranking import coverage, gap_closed, topk_metrics, true_recall_at_k
from funnelrec.metrics.regression import mae, xauc

__all__ = [
    "auc",
    "gauc",
    "logloss",
    "calibration",
    "reliability_bins",
    "xauc",
    "mae",
    "topk_metrics",
    "coverage",
    "true_recall_at_k",
    "gap_closed",
]
