"""jax_refine: high-quality segmentation refinement (CRM, PNA) in JAX/Flax."""

import os

# The tf.data pipelines (jax_refine.data) run thousands of small, variously shaped TensorFlow
# ops per example. TensorFlow's oneDNN kernels JIT-compile a primitive for every new shape,
# and that code generation serialises a process's threads (2 cores: 1.2x one core's
# examples/s with oneDNN, 1.9x without; benchmarks/pipeline.py). TensorFlow reads this
# variable once, when it is imported, so it is set here, before any import of TensorFlow by
# the library or by CLU; a process that imported TensorFlow first keeps its own setting.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
