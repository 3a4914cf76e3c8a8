"""jax_refine: high-quality segmentation refinement (CRM, PNA) in JAX/Flax."""
