"""Small Flax linen building blocks (NHWC)."""

from jax_refine.layers.mlp import Mlp
from jax_refine.layers.neighborhood_attention import NeighborhoodCrossAttention
from jax_refine.layers.pna_layer import PNALayer
from jax_refine.layers.restormer import ChannelAttention, GatedDconvFeedForward, RestormerBlock

__all__ = [
    "ChannelAttention",
    "GatedDconvFeedForward",
    "Mlp",
    "NeighborhoodCrossAttention",
    "PNALayer",
    "RestormerBlock",
]
