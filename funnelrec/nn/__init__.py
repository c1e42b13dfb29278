"""Shared neural-network building blocks used by every stage: field embeddings, MLPs, masked pooling, target
attention (DIN), the DCNv2 cross network, mixture-of-experts layers (MMoE, PLE), tokenizers, token mixing and
per-token FFNs (RankMixer), ReLU-routed sparse MoE with DTSI routing, the attention mask builder and sequence
attention kernels (LONGER), and AutoToken, learnable token mixing, shared dense / scenario-aware sparse MoE and
MLoRA adapters (MTmixAtt), and SVD target attention over long histories (SOLAR)."""

from funnelrec.nn.autotoken import GROUPINGS, AutoToken, FieldEncoders, random_groups
from funnelrec.nn.attention import ActivationUnit, TargetAttention, target_attention
from funnelrec.nn.cross import CrossNetwork
from funnelrec.nn.embedding import MLP, FieldEmbedding, masked_mean, take
from funnelrec.nn.experts import ExtractionLayer, GroupedLinear, GroupedMLP, MMoELayer
from funnelrec.nn.mix_attention import MIXING_INITS, LearnableTokenMixing
from funnelrec.nn.mlora import ScenarioLoRA
from funnelrec.nn.masks import TokenLayout, additive_mask, attention_mask, causal_mask, key_padding_mask
from funnelrec.nn.routers import DTSI_MIXES, ReLURouterMoE, SparsityController
from funnelrec.nn.scenario_moe import ScenarioSparseMoE, SharedDenseMoE, TokenExperts
from funnelrec.nn.svd_attention import HistorySVD, SVDTargetAttention, history_svd
from funnelrec.nn.seq_attention import (CrossCausalEncoder, SeqAttentionLayer, SeqKVCache, TokenMerge,
                                        masked_attention)
from funnelrec.nn.token_mixing import PerTokenFFN, SharedFFN, TokenMixing
from funnelrec.nn.tokenizers import AutoSplitTokenizer, SemanticTokenizer

__all__ = [
    "FieldEmbedding", "MLP", "masked_mean", "take",
    "ActivationUnit", "TargetAttention", "target_attention",
    "CrossNetwork",
    "GroupedLinear", "GroupedMLP", "MMoELayer", "ExtractionLayer",
    "SemanticTokenizer", "AutoSplitTokenizer", "TokenMixing", "PerTokenFFN",
    "SharedFFN", "ReLURouterMoE", "SparsityController", "DTSI_MIXES",
    "TokenLayout", "attention_mask", "causal_mask", "key_padding_mask", "additive_mask",
    "masked_attention", "SeqAttentionLayer", "TokenMerge", "SeqKVCache", "CrossCausalEncoder",
    "AutoToken", "FieldEncoders", "random_groups", "GROUPINGS", "LearnableTokenMixing", "MIXING_INITS",
    "SharedDenseMoE", "ScenarioSparseMoE", "TokenExperts", "ScenarioLoRA",
    "SVDTargetAttention", "HistorySVD", "history_svd",
]
