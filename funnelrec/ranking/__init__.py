"""Multi-task rankers: the baselines (Shared-Bottom, MMoE, PLE, DIN, DCNv2, a plain Transformer encoder), the paper
models (RankMixer, LONGER, HyFormer and the two-stage LONGER + RankMixer baseline, MTmixAtt, OneRank, SOLAR), their registry, and the popularity/position-only floor.

Every ranker reads the same ``RankingInputs`` (same feature spec, same embedding tables) and follows the contract of
``funnelrec.ranking.base``: ``forward(batch) -> {"logits": [B, M, T], "watch": [B, M]}``, ``predict``,
``predict_watch_time``, ``loss``, ``training_loss``. Build one from a fitted ``FeatureSpec`` by name:

Example:
    >>> import polars as pl
    >>> from funnelrec.data.features import FeatureSpec, FeatureField
    >>> spec = FeatureSpec(user_sparse=[FeatureField("user_id", encoding="id")], user_dense=[],
    ...                    item_sparse=[FeatureField("video_id", encoding="id")], item_dense=[])
    >>> spec = spec.fit(pl.DataFrame({"user_id": [0, 1]}), pl.DataFrame({"video_id": [0, 1, 2]}))
    >>> model = build_ranker("mmoe", spec, num_experts=2)
    >>> type(model).__name__, model.config.num_experts, model.config.item_vocab
    ('MMoE', 2, [4])
    >>> sorted(RANKERS)  # doctest: +NORMALIZE_WHITESPACE
    ['dcnv2', 'din', 'hyformer', 'longer', 'longer_rankmixer', 'mmoe', 'mtmixatt', 'onerank', 'ple',
     'rankmixer', 'shared_bottom', 'solar', 'transformer']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from funnelrec.data.features import FeatureSpec
from funnelrec.data.objectives import task_names
from funnelrec.errors import ConfigError
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig
from funnelrec.ranking.budget import count_params, count_params_flops
from funnelrec.ranking.dcnv2 import DCNv2, DCNv2Config
from funnelrec.ranking.din import DIN, DINConfig
from funnelrec.ranking.hyformer import HyFormer, HyFormerConfig
from funnelrec.ranking.longer import Longer, LongerConfig
from funnelrec.ranking.longer_rankmixer import LongerRankMixer, LongerRankMixerConfig
from funnelrec.ranking.inputs import RankingFeatures, RankingInputs
from funnelrec.ranking.losses import multitask_loss
from funnelrec.ranking.mmoe import MMoE, MMoEConfig
from funnelrec.ranking.mtmixatt import MTmixAtt, MTmixAttConfig
from funnelrec.ranking.onerank import OneRank, OneRankConfig
from funnelrec.ranking.ple import PLE, PLEConfig
from funnelrec.ranking.rankmixer import RankMixer, RankMixerConfig
from funnelrec.ranking.solar import Solar, SolarConfig
from funnelrec.ranking.shared_bottom import SharedBottom, SharedBottomConfig
from funnelrec.ranking.transformer import TransformerRankerConfig, TransformerRanker
from funnelrec.ranking.watch_time import WatchTimeDebiaser

#: name -> (config dataclass, model class) of every neural ranker.
RANKERS: dict[str, tuple[type[RankerConfig], type[MultiTaskRanker]]] = {
    "shared_bottom": (SharedBottomConfig, SharedBottom),
    "mmoe": (MMoEConfig, MMoE),
    "ple": (PLEConfig, PLE),
    "din": (DINConfig, DIN),
    "dcnv2": (DCNv2Config, DCNv2),
    "rankmixer": (RankMixerConfig, RankMixer),
    "longer": (LongerConfig, Longer),
    "transformer": (TransformerRankerConfig, TransformerRanker),
    "longer_rankmixer": (LongerRankMixerConfig, LongerRankMixer),
    "hyformer": (HyFormerConfig, HyFormer),
    "mtmixatt": (MTmixAttConfig, MTmixAtt),
    "onerank": (OneRankConfig, OneRank),
    "solar": (SolarConfig, Solar),
}

#: Config fields filled from the feature spec and the objective registry.
SPEC_FIELDS = ("user_vocab", "item_vocab", "user_dense", "item_dense", "num_tasks")


def _lookup(name: str) -> tuple[type[RankerConfig], type[MultiTaskRanker]]:
    if name not in RANKERS:
        raise ConfigError(f"unknown ranker {name!r}; valid rankers: {', '.join(sorted(RANKERS))}")
    return RANKERS[name]


def ranker_config(name: str, spec: FeatureSpec, **overrides: Any) -> RankerConfig:
    """The config of ranker ``name`` for a fitted feature spec: vocab sizes and dense widths from ``spec``,
    ``num_tasks`` from the objective registry, the model's defaults for the rest, then ``overrides``.

    Raises ``ConfigError`` for an unknown ranker (listing the valid ones), an unknown override key (naming it and
    listing the valid ones), an unfitted spec or a bad value.
    """
    config_cls, _ = _lookup(name)
    if not isinstance(spec, FeatureSpec) or not spec.fitted:
        raise ConfigError("ranker_config needs a fitted FeatureSpec (call FeatureSpec.fit first)")
    valid = config_cls.field_names()
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for ranker {name!r}; valid options: {', '.join(valid)}")
    filled = {"user_vocab": spec.vocab_sizes("user_sparse"), "item_vocab": spec.vocab_sizes("item_sparse"),
              "user_dense": spec.num_user_dense, "item_dense": spec.num_item_dense, "num_tasks": len(task_names())}
    return config_cls(**{**filled, **overrides})


def build_ranker(name: str, spec: FeatureSpec, watch: WatchTimeDebiaser | None = None,
                 **overrides: Any) -> nn.Module:
    """Ranker ``name`` built from ``ranker_config(name, spec, **overrides)``; ``watch`` (a fitted
    ``WatchTimeDebiaser``) gives it the D2Q watch head (``watch_head="auto"``)."""
    _, model_cls = _lookup(name)
    return model_cls(ranker_config(name, spec, **overrides), watch=watch)


__all__ = [
    "RANKERS", "SPEC_FIELDS", "build_ranker", "ranker_config",
    "RankerConfig", "MultiTaskRanker", "RankingInputs", "RankingFeatures",
    "SharedBottom", "SharedBottomConfig", "MMoE", "MMoEConfig", "PLE", "PLEConfig", "DIN", "DINConfig",
    "DCNv2", "DCNv2Config", "RankMixer", "RankMixerConfig", "Longer", "LongerConfig", "TransformerRanker",
    "TransformerRankerConfig", "HyFormer", "HyFormerConfig", "LongerRankMixer", "LongerRankMixerConfig",
    "MTmixAtt", "MTmixAttConfig", "OneRank", "OneRankConfig", "Solar", "SolarConfig",
    "WatchTimeDebiaser", "multitask_loss", "count_params", "count_params_flops",
]
