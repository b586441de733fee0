"""Shared helpers for the bi_torch tests: numpy <-> torch through bit patterns, random rows, references.

Every conversion goes through the raw bits (int16/int32 views), so no value is ever rounded,
NaN payloads and signed zeros included, and bfloat16 needs no float conversion on either side.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

import bi_torch
from bridge import reference
from bridge.compare import assert_bitwise_equal

DTYPES = ("float32", "bfloat16", "float16")
NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
_SIGNED_TORCH = {2: torch.int16, 4: torch.int32}


def to_torch(a: Optional[np.ndarray], device="cpu") -> Optional[torch.Tensor]:
    """A torch tensor with exactly a's bits (a copy; contiguous), on `device`."""
    return None if a is None else bi_torch.from_numpy(a, device)


def to_numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """A numpy array (bfloat16 as ml_dtypes.bfloat16) with exactly t's bits."""
    return None if t is None else bi_torch.to_numpy(t)


def int_view(t: torch.Tensor) -> torch.Tensor:
    """t's bits as a same-shaped integer tensor (works on any strides, on any device)."""
    return t.view(_SIGNED_TORCH[t.element_size()])


def assert_bits(expected, actual, what: str = "") -> None:
    """Bitwise equality of numpy arrays or torch tensors (any mix); the first difference is reported."""
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        if (expected.shape == actual.shape and expected.dtype == actual.dtype
                and expected.device == actual.device and torch.equal(int_view(expected), int_view(actual))):
            return  # fast path (on the GPU, no copy); details come from the numpy comparison below
    e = to_numpy(expected) if isinstance(expected, torch.Tensor) else expected
    a = to_numpy(actual) if isinstance(actual, torch.Tensor) else actual
    assert_bitwise_equal(e, a, what)


def random_rows(rng: np.random.Generator, shape, dtype: str, *, specials: bool = False) -> np.ndarray:
    """Normal values with a per-row scale; with `specials`, a few zeros, infs, NaNs and huge/tiny values."""
    shape = tuple(shape)
    scale = np.exp2(rng.uniform(-4, 4, shape[:-1] + (1,)))
    v = rng.standard_normal(shape) * scale
    if specials and v.size:
        flat = v.reshape(-1)
        k = max(1, flat.size // 50)
        idx = rng.integers(0, flat.size, k)
        choices = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e4, -3e4, 1e-6, 6e-8])
        flat[idx] = rng.choice(choices, k)
    with np.errstate(over="ignore"):
        return v.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    w = 1.0 + 0.25 * rng.standard_normal(n)
    return w.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def ref(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
        mode: str = "llama", weight_offset: float = 0.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """bridge.reference.rms_norm over any leading shape, always as (out, new_residual or None)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    r2 = None if residual is None else residual.reshape(-1, n)
    result = reference.rms_norm(x2, weight, eps, r2, mode=mode, weight_offset=weight_offset)
    if residual is None:
        return result.reshape(x.shape), None
    out, new_res = result
    return out.reshape(x.shape), new_res.reshape(x.shape)


def bi(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None,
       mode: str = "llama", weight_offset: float = 0.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """bi_torch.rms_norm, always as (out, new_residual or None)."""
    result = bi_torch.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset)
    if residual is None:
        return result, None
    return result
