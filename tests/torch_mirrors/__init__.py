"""PyTorch re-statements of reference models (official parameter names and op order).

Used only by parity tests and benchmarks; importing them requires torch.
"""
