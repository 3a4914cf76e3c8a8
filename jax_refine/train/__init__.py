"""Training: state, optimisers, the sharded train step, checkpoints and the loop.

Entry points: `jax_refine.train.loop.train_and_evaluate(config, workdir)` (used by the
top-level `train.py`) and `jax_refine.train.evaluate.evaluate(...)` (`evaluate.py`).
"""
