"""Shared neural-network building blocks used by every stage: field embeddings, MLPs, masked pooling, target
attention (DIN), the DCNv2 cross network and mixture-of-experts layers (MMoE, PLE)."""

from funnelrec.nn.attention import ActivationUnit, TargetAttention, target_attention
from funnelrec.nn.cross import CrossNetwork
from funnelrec.nn.embedding import MLP, FieldEmbedding, masked_mean
from funnelrec.nn.experts import ExtractionLayer, GroupedLinear, GroupedMLP, MMoELayer

__all__ = [
    "FieldEmbedding", "MLP", "masked_mean",
    "ActivationUnit", "TargetAttention", "target_attention",
    "CrossNetwork",
    "GroupedLinear", "GroupedMLP", "MMoELayer", "ExtractionLayer",
]
