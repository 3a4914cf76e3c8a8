"""Array helpers of the parity tests: layouts between PyTorch (NCHW) and JAX (NHWC)."""

from __future__ import annotations

import numpy as np
import torch


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A PyTorch [B, C, H, W] tensor as a numpy [B, H, W, C] array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(x) -> torch.Tensor:
    """A [B, H, W, C] array as a contiguous PyTorch [B, C, H, W] tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def rand(shape, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """float32 normal samples of `shape` times `scale`."""
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def max_err(a, b) -> float:
    """max |a - b| over all elements."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
