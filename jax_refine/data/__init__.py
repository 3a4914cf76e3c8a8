"""Data: synthetic scenes, mask perturbation, input pipelines (never imported by models)."""
