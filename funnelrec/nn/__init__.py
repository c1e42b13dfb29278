"""Shared neural-network building blocks (embeddings, MLPs, pooling) used by every stage."""

from funnelrec.nn.embedding import FieldEmbedding, MLP, masked_mean

__all__ = ["FieldEmbedding", "MLP", "masked_mean"]
