"""Numerics contract v1.2: the constants and argument rules every backend shares.

NUMERICS.md is the prose; this module holds the few values that the reference and both kernels
must agree on, and the one argument check that every public entry point runs. It never imports
torch or jax: frameworks pass shapes as tuples and dtypes by name.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Optional, Sequence, Tuple

# "1.1": v1's forward, unchanged, plus the backward; "1.2": FP8 output (NUMERICS.md).
CONTRACT_VERSION = "1.2"

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("llama", "fp32")

# Every NaN a backend writes is the canonical quiet NaN of the output dtype (sign 0, quiet bit,
# zero payload), so bitwise comparison needs no NaN exception: GPUs make 0x7fffffff, x86 0xffc00000.
CANONICAL_NAN_BITS = {"float32": 0x7FC00000, "bfloat16": 0x7FC0, "float16": 0x7E00, "float8_e4m3fn": 0x7F}


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """An FP8 output format: what rnFP8 and the clamp need (NUMERICS.md, FP8 output)."""
    name: str
    max: float  # the largest finite magnitude; the clamp's bound
    mantissa_bits: int
    exponent_bias: int


# The FP8 output formats of contract v1.2. float8_e5m2 would be one more entry (max 57344, 2
# mantissa bits, bias 15, NaN 0x7E) once each backend's conversion is checked for it.
FP8_FORMATS = {"float8_e4m3fn": Fp8Format("float8_e4m3fn", 448.0, 3, 7)}
FP8_NOT_YET = ("float8_e5m2",)
GROUP_SIZES = (64, 128)
# The FP8 output's arguments, which an API takes to offer it.
FP8_ARGUMENTS = ("out_dtype", "scale", "group_size")
# The per-token-group scale's floor on amax, taken as rn(1e-10) (vLLM's per_token_group_quant_fp8 eps):
# an all-zero group gets the scale rn(rn(1e-10) / 448) instead of 0.
GROUP_AMAX_FLOOR = 1e-10


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (the width of the zero-padded pairwise tree)."""
    return 1 << max(0, (n - 1).bit_length())


# Magnitudes from here on round to infinity in float32 (the midpoint between FLT_MAX and 2**128).
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def as_float32(value: float) -> float:
    """A Python float rounded to float32 (nearest even), as a Python float; inf if it overflows.

    Plain arithmetic and one numpy scalar conversion, so torch.compile can trace it.
    """
    import numpy as np

    if abs(value) >= _FLOAT32_OVERFLOW:
        return math.copysign(math.inf, value)
    return float(np.float32(value))


def check_rms_norm_args(
    *,
    x_shape: Sequence[int],
    x_dtype: str,
    weight_shape: Sequence[int],
    weight_dtype: str,
    eps: object,
    residual_shape: Optional[Sequence[int]] = None,
    residual_dtype: Optional[str] = None,
    mode: object = "llama",
    weight_offset: object = 0.0,
) -> None:
    """Raise TypeError/ValueError naming the argument if the call is outside the contract.

    Runs before any kernel touches memory. Dtypes are names ("float32", "bfloat16", "float16").
    """
    x_shape, weight_shape = tuple(x_shape), tuple(weight_shape)
    if x_dtype not in DTYPES:
        raise TypeError(f"x: dtype must be one of {', '.join(DTYPES)}; got {x_dtype}")
    if len(x_shape) < 1:
        raise ValueError(f"x: expected shape (..., n) with at least one dimension; got {x_shape}")
    n = x_shape[-1]
    if n < 1:
        raise ValueError(f"x: the last dimension n must be >= 1; got shape {x_shape}")
    if weight_shape != (n,):
        raise ValueError(f"weight: expected shape ({n},) to match x's last dimension; got {weight_shape}")
    if weight_dtype != x_dtype:
        raise TypeError(f"weight: expected dtype {x_dtype} (x's dtype); got {weight_dtype}")
    if residual_shape is not None:
        if tuple(residual_shape) != x_shape:
            raise ValueError(f"residual: expected shape {x_shape} (x's shape); got {tuple(residual_shape)}")
        if residual_dtype not in (x_dtype, "float32"):
            raise TypeError(f"residual: expected dtype {x_dtype} (x's dtype) or float32; got {residual_dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a Python float; got {type(eps).__name__}")
    if not math.isfinite(eps) or eps <= 0 or as_float32(eps) <= 0 or not math.isfinite(as_float32(eps)):
        raise ValueError(f"eps: expected a finite float > 0 that stays > 0 in float32; got {eps!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}; got {mode!r}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(f"weight_offset: expected a Python float; got {type(weight_offset).__name__}")
    if not math.isfinite(float(weight_offset)) or not math.isfinite(as_float32(weight_offset)):
        raise ValueError(f"weight_offset: expected a finite float (finite in float32); got {weight_offset!r}")


def check_rms_norm_backward_args(
    *,
    x_shape: Sequence[int],
    x_dtype: str,
    grad_out_shape: Sequence[int],
    grad_out_dtype: str,
    residual_shape: Optional[Sequence[int]] = None,
    residual_dtype: Optional[str] = None,
    grad_new_residual_shape: Optional[Sequence[int]] = None,
    grad_new_residual_dtype: Optional[str] = None,
) -> None:
    """The backward's own arguments, after check_rms_norm_args has accepted the forward's.

    grad_out must have out's shape and dtype (x's); grad_new_residual, which is optional (None
    counts as zeros), the new residual's (the residual's), and only with a residual.
    """
    x_shape = tuple(x_shape)
    if tuple(grad_out_shape) != x_shape:
        raise ValueError(f"grad_out: expected shape {x_shape} (out's shape); got {tuple(grad_out_shape)}")
    if grad_out_dtype != x_dtype:
        raise TypeError(f"grad_out: expected dtype {x_dtype} (out's dtype); got {grad_out_dtype}")
    if grad_new_residual_shape is None:
        return
    if residual_shape is None:
        raise ValueError("grad_new_residual: given without a residual; there is no new residual to differentiate")
    if tuple(grad_new_residual_shape) != tuple(residual_shape):
        raise ValueError(f"grad_new_residual: expected shape {tuple(residual_shape)} (the residual's shape); "
                         f"got {tuple(grad_new_residual_shape)}")
    if grad_new_residual_dtype != residual_dtype:
        raise TypeError(f"grad_new_residual: expected dtype {residual_dtype} (the residual's dtype); "
                        f"got {grad_new_residual_dtype}")


def check_fp8_args(
    *,
    n: int,
    out_dtype: Optional[str],
    scale_shape: Optional[Sequence[int]] = None,
    scale_dtype: Optional[str] = None,
    scale_value: Optional[float] = None,
    group_size: object = None,
    x_dtype: Optional[str] = None,
) -> None:
    """The FP8 output's arguments (contract v1.2), after check_rms_norm_args.

    out_dtype is None (or x's dtype: no quantization) or an FP8 format name. scale_value is the
    scale as a float where reading it is free (numpy, a CPU tensor, a Python float); a scale on a
    GPU is checked for shape and dtype only, since reading it would synchronise (and break CUDA-graph
    capture): there the kernel applies the contract's steps to whatever value it holds.
    """
    fp8 = out_dtype in FP8_FORMATS
    if out_dtype in FP8_NOT_YET:
        raise ValueError(f"out_dtype: {out_dtype} is not supported yet (contract v1.2 defines {', '.join(FP8_FORMATS)})")
    if out_dtype is not None and not fp8 and (out_dtype not in DTYPES or x_dtype not in (None, out_dtype)):
        own = f"x's dtype ({x_dtype})" if x_dtype else "x's dtype"
        raise TypeError(f"out_dtype: expected None, {own} or one of {', '.join(FP8_FORMATS)}; got {out_dtype}")
    has_scale, has_group = scale_shape is not None, group_size is not None
    if not fp8:
        if has_scale or has_group:
            what = "scale" if has_scale else "group_size"
            raise ValueError(f"{what}: only with an FP8 out_dtype ({', '.join(FP8_FORMATS)}); got out_dtype={out_dtype}")
        return
    if has_scale == has_group:
        raise ValueError(f"out_dtype={out_dtype}: give exactly one of scale (a static float32 scale) or group_size "
                         f"(per-token-group scales, one of {GROUP_SIZES}); got {'both' if has_scale else 'neither'}")
    if has_group:
        if type(group_size) is not int or group_size not in GROUP_SIZES:  # 64.0 and True are not sizes
            raise ValueError(f"group_size: expected one of {GROUP_SIZES}; got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size: must divide n = {n} (x's last dimension); got {group_size}")
        return
    if tuple(scale_shape) not in ((), (1,)):
        raise ValueError(f"scale: expected a 0-d or 1-element float32 scalar, shape () or (1,); got {tuple(scale_shape)}")
    if scale_dtype != "float32":
        raise TypeError(f"scale: expected dtype float32; got {scale_dtype}")
    if scale_value is not None and not (math.isfinite(scale_value) and scale_value > 0):
        raise ValueError(f"scale: expected a finite float32 > 0; got {scale_value!r}")


def missing_fp8_arguments(fn: Callable, where: str) -> Optional[str]:
    """None if fn takes FP8_ARGUMENTS (an API with the FP8 output); else why not, naming `where`."""
    params = inspect.signature(fn).parameters
    missing = [p for p in FP8_ARGUMENTS if p not in params]
    return f"{where} has no {', '.join(missing)} argument (FP8 output, contract v1.2)" if missing else None


def split_fp8(result, grouped: bool, has_residual: bool) -> Tuple[object, Optional[object], Optional[object]]:
    """An FP8 call's result as (out, scales or None, new_residual or None), after checking that it
    has the spec's shape: out alone (a single array, not a tuple), or a tuple of out, the scales
    (per group) and the new residual (with a residual), in that order."""
    names = ("out",) + (("scales",) if grouped else ()) + (("new_residual",) if has_residual else ())
    parts = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if len(parts) != len(names) or (len(names) == 1 and isinstance(result, (tuple, list))):
        got = f"a {type(result).__name__} of {len(parts)}" if isinstance(result, (tuple, list)) else "one array"
        want = names[0] if len(names) == 1 else f"({', '.join(names)})"
        raise ValueError(f"FP8 call returned {got}; the spec's result is {want}")
    return parts[0], parts[1] if grouped else None, parts[-1] if has_residual else None
