"""Retrieval: the first stage of the funnel — from the whole corpus to a few hundred candidates per request.

Models (one file and one config dataclass each), all following the protocol of ``funnelrec.retrieval.base``
(``training_loss``, ``score_all`` → [B, I], ``retrieve(batch, k, exclude)``):

============  ======================================================================================================
name          model
============  ======================================================================================================
popularity    :class:`~funnelrec.retrieval.popularity.PopularityRetriever` — most popular training items
two_tower     :class:`~funnelrec.retrieval.two_tower.TwoTowerRetriever` — user tower · item tower, in-batch /
              sampled / mixed softmax with logQ correction
sasrec        :class:`~funnelrec.retrieval.sasrec.SASRec` — causal transformer over the positive sequence
============  ======================================================================================================

Data: :class:`~funnelrec.retrieval.data.RetrievalData` (leave-last-out, RecBole protocol); evaluation:
:func:`~funnelrec.retrieval.evaluate.evaluate_retriever`; training: :func:`~funnelrec.retrieval.training.fit_retriever`.

Example:
    >>> from funnelrec.data.sources import load_source
    >>> src = load_source("sim:small?num_users=200&days=4", progress=False)  # doctest: +SKIP
    >>> data = RetrievalData.from_source(src)  # doctest: +SKIP
    >>> model = build_retriever("two_tower", data.spec, data.item_popularity(),  # doctest: +SKIP
    ...                         item_features=data.item_features, out_dim=32)
    >>> fit_retriever(model, data, epochs=5)  # doctest: +SKIP
    >>> evaluate_retriever(model, data, "test", oracle=src.world)["recall@50"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from funnelrec.errors import ConfigError
from funnelrec.retrieval.base import Retriever, log_sampling_probability, softmax_loss_logq
from funnelrec.retrieval.data import RetrievalData
from funnelrec.retrieval.evaluate import evaluate_retriever
from funnelrec.retrieval.popularity import PopularityConfig, PopularityRetriever
from funnelrec.retrieval.sasrec import SASRec, SASRecConfig
from funnelrec.retrieval.training import FitResult, fit_retriever
from funnelrec.retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever
from funnelrec.retrieval.ann import AnnConfig, AnnIndex  # noqa: F401  (the ANN index: docs/retrieval-ann.md)
from funnelrec.retrieval.mpformer import FROM_SPEC as _MP_SPEC, MPFormer, MPFormerConfig, build_mpformer  # noqa: E402
from funnelrec.retrieval.t2diff import FROM_SPEC as _T2_SPEC, T2Diff, T2DiffConfig, build_t2diff  # noqa: E402

__all__ = [
    "RETRIEVERS", "build_retriever", "Retriever", "RetrievalData", "evaluate_retriever", "fit_retriever",
    "FitResult", "PopularityConfig", "PopularityRetriever", "TwoTowerConfig", "TwoTowerRetriever", "SASRecConfig",
    "SASRec", "softmax_loss_logq", "log_sampling_probability",
]


@dataclass(frozen=True)
class RetrieverEntry:
    """A registered retriever: its model class, its config class, the config keys taken from the feature spec
    (not overridable), and how to build it."""

    model: type[Retriever]
    config: type
    from_spec: tuple[str, ...]
    build: Callable[..., Retriever]

    def keys(self) -> list[str]:
        """The config keys a caller may override."""
        return [f.name for f in dataclasses.fields(self.config) if f.name not in self.from_spec]


def _build_popularity(spec, item_popularity, item_features, overrides) -> Retriever:
    return PopularityRetriever(PopularityConfig(**overrides), item_popularity)


def _build_two_tower(spec, item_popularity, item_features, overrides) -> Retriever:
    if item_features is None:
        raise ConfigError("two_tower needs item_features=(item_sparse [I, Fi], item_dense [I, Di]) "
                          "(RetrievalData.item_features)")
    sparse, dense = item_features
    return TwoTowerRetriever(TwoTowerConfig.from_spec(spec, **overrides), sparse, dense, item_popularity)


def _build_sasrec(spec, item_popularity, item_features, overrides) -> Retriever:
    config = SASRecConfig.from_spec(spec, **overrides)
    if config.side_features and item_features is None:
        raise ConfigError("sasrec with side_features needs item_features=(item_sparse [I, Fi], item_dense [I, Di]) "
                          "(RetrievalData.item_features), or side_features=False")
    return SASRec(config, item_popularity, None if item_features is None else item_features[0])


#: name → :class:`RetrieverEntry`.
RETRIEVERS: dict[str, RetrieverEntry] = {
    "popularity": RetrieverEntry(PopularityRetriever, PopularityConfig, (), _build_popularity),
    "two_tower": RetrieverEntry(TwoTowerRetriever, TwoTowerConfig,
                                ("user_vocab", "item_vocab", "num_items", "user_dense", "item_dense"),
                                _build_two_tower),
    "sasrec": RetrieverEntry(SASRec, SASRecConfig, ("num_items", "item_vocab"), _build_sasrec),
    "mpformer": RetrieverEntry(MPFormer, MPFormerConfig, _MP_SPEC, build_mpformer),  # docs/retrieval-mpformer.md
    "t2diff": RetrieverEntry(T2Diff, T2DiffConfig, _T2_SPEC, build_t2diff),  # docs/retrieval-t2diff.md
}


def build_retriever(name: str, spec, item_popularity: Tensor | None = None,
                    item_features: tuple[Tensor, Tensor] | None = None, **overrides: Any) -> Retriever:
    """Build a registered retriever for a fitted feature spec.

    Args:
        name: a key of :data:`RETRIEVERS` (``"popularity"``, ``"two_tower"``, ``"sasrec"``; ``-`` = ``_``).
        spec: the fitted ``FeatureSpec`` of the data (``RetrievalData.spec``).
        item_popularity: [I] training-positive counts (``RetrievalData.item_popularity()``): required by
            ``popularity``, the logQ / sampling distribution of the others (None = uniform).
        item_features: ``(item_sparse [I, Fi], item_dense [I, Di])`` by item index (``RetrievalData.item_features``);
            required by ``two_tower`` and by ``sasrec`` with side features (its default).
        **overrides: config fields (e.g. ``out_dim=32, negatives="in_batch"``).

    Raises:
        ConfigError: an unknown name or override key (the message lists the valid ones), or a bad config value.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in RETRIEVERS:
        raise ConfigError(f"unknown retriever {name!r}; choose one of {', '.join(RETRIEVERS)}")
    entry = RETRIEVERS[key]
    valid = entry.keys()
    bad = sorted(k for k in overrides if k not in valid)
    if bad:
        raise ConfigError(f"{key}: unknown config key(s) {', '.join(bad)}; valid keys: {', '.join(valid) or 'none'}")
    if not getattr(spec, "fitted", False):
        raise ConfigError(f"{key}: the feature spec must be fitted (RetrievalData.spec)")
    return entry.build(spec, item_popularity, item_features, overrides)
