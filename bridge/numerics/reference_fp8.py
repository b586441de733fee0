"""Contract v1.2's FP8 output in plain float32 numpy (NUMERICS.md, steps Q1-Q4).

`u` is the float32 value step 6 would round to D. The static path multiplies it by the scale's
reciprocal, rounded once per call (as vLLM's CUDA kernels do); the per-token-group path divides
each group by its own scale. Both clamp to the format's range and round to FP8 once.
"""

from __future__ import annotations

from typing import Tuple

import ml_dtypes
import numpy as np

from .contract import CANONICAL_NAN_BITS, FP8_FORMATS, GROUP_AMAX_FLOOR

_FP8_NUMPY = {"float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}


def fp8_numpy_dtype(name: str) -> np.dtype:
    """The ml_dtypes dtype of an FP8 format name."""
    return _FP8_NUMPY[name]


def clamp(t: np.ndarray, fmt_name: str) -> np.ndarray:
    """Q3: min(max(t, -M), M) with M the format's largest finite value; a NaN stays NaN."""
    m = np.float32(FP8_FORMATS[fmt_name].max)
    return np.where(np.isnan(t), t, np.minimum(np.maximum(t, -m), m)).astype(np.float32)


def encode_fp8(c: np.ndarray, fmt_name: str) -> np.ndarray:
    """Q4, rnFP8: round a clamped float32 (|c| <= M, or NaN) to the format, nearest even, straight
    from float32 (no rounding through float16), every NaN as the canonical 0x7F."""
    with np.errstate(invalid="ignore"):
        out = c.astype(_FP8_NUMPY[fmt_name])
    out_bits = out.view(np.uint8).copy()
    out_bits[np.isnan(c)] = CANONICAL_NAN_BITS[fmt_name]
    return out_bits.view(out.dtype)


def quantize_static(u: np.ndarray, scale: np.ndarray, fmt_name: str) -> np.ndarray:
    """Q2 static: rnFP8(clamp(rn(u * rn(1 / scale)))), scale a float32 scalar."""
    f32 = np.float32
    inv_scale = f32(1.0) / f32(np.asarray(scale, np.float32).reshape(()))
    return encode_fp8(clamp(u * inv_scale, fmt_name), fmt_name)


def quantize_groups(u: np.ndarray, group_size: int, fmt_name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Q2 per-token-group: per row and aligned group of group_size columns, amax = max |u| over the
    group's non-NaN values (0 if none; max is exact in any order), s = rn(max(amax, rn(1e-10)) / M),
    q = rnFP8(clamp(rn(u / s))). Returns (q, s) with s of shape (..., n / group_size)."""
    f32 = np.float32
    groups = u.reshape(u.shape[:-1] + (u.shape[-1] // group_size, group_size))
    amax = np.where(np.isnan(groups), f32(0.0), np.abs(groups)).max(axis=-1)
    s = np.maximum(amax, f32(GROUP_AMAX_FLOOR)) / f32(FP8_FORMATS[fmt_name].max)
    q = encode_fp8(clamp(groups / s[..., None], fmt_name), fmt_name)
    return q.reshape(u.shape), s.astype(np.float32)
