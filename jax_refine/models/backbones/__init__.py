"""Backbone networks returning multi-scale feature dicts."""
