"""Small Flax linen building blocks (NHWC)."""
