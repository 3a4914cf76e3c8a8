"""Pure JAX functions with no parameters (no Flax imports)."""
