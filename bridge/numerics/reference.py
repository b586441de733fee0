"""The numerics contract v1.2 in plain float32 numpy: the only source of expected bits.

Read it next to NUMERICS.md; each numbered step there (forward 1-6, backward B1-B7) is one block
here, and the FP8 output's steps Q1-Q4 are in reference_fp8.py. numpy's float32
arithmetic rounds every operation to nearest even and never fuses a multiply with an add,
which is exactly what the contract asks of every backend.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import ml_dtypes
import numpy as np

from .contract import (CANONICAL_NAN_BITS, FP8_FORMATS, check_fp8_args, check_rms_norm_args,
                       check_rms_norm_backward_args, next_power_of_two)
from .reference_fp8 import quantize_groups, quantize_static

_NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_BITS_DTYPES = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16, "float8_e4m3fn": np.uint8}


def dtype_name(dtype: np.dtype) -> str:
    """The contract's name for a numpy dtype ("float32", "bfloat16", "float16"), else str(dtype)."""
    return np.dtype(dtype).name


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a contract dtype name (bfloat16 as ml_dtypes.bfloat16)."""
    return _NUMPY_DTYPES[name]


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float array as unsigned integers of the same width."""
    return np.ascontiguousarray(a).view(_BITS_DTYPES[dtype_name(a.dtype)])


def encode(y: np.ndarray, dtype_name_: str) -> np.ndarray:
    """rnD: round float32 to D (nearest even), every NaN as D's canonical quiet NaN (step 6)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = y.astype(_NUMPY_DTYPES[dtype_name_])
    out_bits = bits(out)
    out_bits[np.isnan(y)] = CANONICAL_NAN_BITS[dtype_name_]
    return out_bits.view(out.dtype)


def pairwise_sum(q: np.ndarray) -> np.ndarray:
    """Step 3: zero-pad the last axis to a power of two, then q = q[0::2] + q[1::2] to one element."""
    n = q.shape[-1]
    pad = next_power_of_two(n) - n
    q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), np.float32)], axis=-1)
    while q.shape[-1] > 1:
        q = q[..., 0::2] + q[..., 1::2]
    return q[..., 0]


def _inverse_rms(v: np.ndarray, n: int, eps: float) -> np.ndarray:
    """Steps 2-4: squares, pairwise tree, mean, root, inverse; one float32 per row."""
    f32 = np.float32
    s = pairwise_sum(v * v)
    mean = s / f32(n)
    r = np.sqrt(mean + f32(eps))
    return f32(1.0) / r


def _effective_weight(weight: np.ndarray, weight_offset: float) -> np.ndarray:
    """Step 5: w = f32(weight), plus the offset only when it is non-zero in float32."""
    w = weight.astype(np.float32)
    if np.float32(weight_offset) != 0:
        w = w + np.float32(weight_offset)
    return w


def _check(x, weight, eps, residual, mode, weight_offset) -> None:
    check_rms_norm_args(
        x_shape=x.shape,
        x_dtype=dtype_name(x.dtype),
        weight_shape=weight.shape,
        weight_dtype=dtype_name(weight.dtype),
        eps=eps,
        residual_shape=None if residual is None else residual.shape,
        residual_dtype=None if residual is None else dtype_name(residual.dtype),
        mode=mode,
        weight_offset=weight_offset,
    )


def rms_norm(
    x: np.ndarray,
    weight: np.ndarray,
    eps: float = 1e-6,
    residual: Optional[np.ndarray] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype: Optional[str] = None,
    scale: Optional[np.ndarray] = None,
    group_size: Optional[int] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, ...]]:
    """RMSNorm of x over its last axis per NUMERICS.md.

    Returns out, with the new residual after it when residual is given: (out, new_residual).
    With out_dtype="float8_e4m3fn" (v1.2) out is FP8, from a static float32 `scale` or per-token-group
    scales (`group_size`), which come right after out: (out, scales[, new_residual]).
    """
    _check(x, weight, eps, residual, mode, weight_offset)
    scale_arr = None if scale is None else np.asarray(scale)
    check_fp8_args(n=x.shape[-1], out_dtype=out_dtype, x_dtype=dtype_name(x.dtype),
                   scale_shape=None if scale_arr is None else scale_arr.shape,
                   scale_dtype=None if scale_arr is None else dtype_name(scale_arr.dtype),
                   scale_value=None if scale_arr is None or scale_arr.size != 1 else float(scale_arr.reshape(())),
                   group_size=group_size)
    d = dtype_name(x.dtype)
    f32 = np.float32
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        # 1. residual add, rounded to the residual's dtype; z is also the new residual.
        if residual is not None:
            new_residual = encode(x.astype(f32) + residual.astype(f32), dtype_name(residual.dtype))
            v = new_residual.astype(f32)
        else:
            v = x.astype(f32)
        # 2. squares, 3. pairwise tree sum, 4. mean, root, inverse: each one IEEE float32 operation.
        inv = _inverse_rms(v, x.shape[-1], eps)
        # 5. effective weight: the offset is added only when it is non-zero in float32.
        w = _effective_weight(weight, weight_offset)
        # 6. scale (Q1: u, the float32 value rnD would round) and round to x's dtype, or to FP8.
        normed = v * inv[..., None]
        if mode == "llama":
            normed = encode(normed, d).astype(f32)
        u = normed * w
        if out_dtype not in FP8_FORMATS:
            out = encode(u, d)
            return out if residual is None else (out, new_residual)
        if scale is not None:
            out = quantize_static(u, scale_arr, out_dtype)
            return out if residual is None else (out, new_residual)
        out, scales = quantize_groups(u, group_size, out_dtype)
    return (out, scales) if residual is None else (out, scales, new_residual)


def rms_norm_backward(
    x: np.ndarray,
    weight: np.ndarray,
    grad_out: np.ndarray,
    eps: float = 1e-6,
    residual: Optional[np.ndarray] = None,
    grad_new_residual: Optional[np.ndarray] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
) -> Union[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The gradients of rms_norm per NUMERICS.md's backward (contract v1.1).

    grad_out is the gradient of out (x's shape and dtype); grad_new_residual that of the new
    residual (the residual's shape and dtype; None counts as zeros). Returns (grad_x, grad_weight),
    or (grad_x, grad_residual, grad_weight) with a residual.
    """
    _check(x, weight, eps, residual, mode, weight_offset)
    check_rms_norm_backward_args(
        x_shape=x.shape, x_dtype=dtype_name(x.dtype), grad_out_shape=grad_out.shape,
        grad_out_dtype=dtype_name(grad_out.dtype),
        residual_shape=None if residual is None else residual.shape,
        residual_dtype=None if residual is None else dtype_name(residual.dtype),
        grad_new_residual_shape=None if grad_new_residual is None else grad_new_residual.shape,
        grad_new_residual_dtype=None if grad_new_residual is None else dtype_name(grad_new_residual.dtype))
    d = dtype_name(x.dtype)
    n = x.shape[-1]
    f32 = np.float32
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        # The forward's v and inv (steps 1-4), recomputed: the same bits the forward used.
        if residual is not None:
            v = encode(x.astype(f32) + residual.astype(f32), dtype_name(residual.dtype)).astype(f32)
        else:
            v = x.astype(f32)
        inv = _inverse_rms(v, n, eps)[..., None]
        w = _effective_weight(weight, weight_offset)
        g = grad_out.astype(f32)
        # B1. xhat, never rounded to D here.
        xhat = v * inv
        # B2. h: the factor the forward multiplied w by.
        h = encode(xhat, d).astype(f32) if mode == "llama" else xhat
        # B3. a: llama's rounding of xhat to D passes the gradient straight through.
        a = g * w
        # B4. b and its pairwise tree over the row (zero-padded with +0.0), then c.
        t = pairwise_sum(a * xhat)
        c = t[..., None] / f32(n)
        # B5. dv.
        dv = inv * (a - xhat * c)
        # B6. grad_x (and grad_residual): an absent grad_new_residual counts as +0.0, so -0.0 -> +0.0.
        if residual is not None:
            g_r = f32(0.0) if grad_new_residual is None else grad_new_residual.astype(f32)
            dz = dv + g_r
            grad_x, grad_residual = encode(dz, d), encode(dz, dtype_name(residual.dtype))
        else:
            grad_x = encode(dv, d)
        # B7. grad_weight: the pairwise tree over rows (row-major, zero-padded with +0.0) of p = g * h.
        p = (g * h).reshape(-1, n)
        grad_weight = encode(pairwise_sum(np.ascontiguousarray(p.T)), d)
    return (grad_x, grad_weight) if residual is None else (grad_x, grad_residual, grad_weight)
