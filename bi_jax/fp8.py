"""bi_jax.rms_norm's FP8 output (NUMERICS.md contract v1.2): its arguments, and no gradient.

out_dtype is jnp.float8_e4m3fn (or anything jnp.dtype reads as it); x's own dtype, or None, is
no quantization. A static `scale` is a float32 array of shape () or (1,), or a Python float; it
is an operand of the kernel, so under jax.jit it is traced and its value is checked only where
it is concrete (an eager call, a constant). group_size is static. Every rule is
bridge.numerics.contract.check_fp8_args, run before any kernel.

FP8 outputs have no gradient (the contract's backward covers x's dtype only): the call is a
jax.custom_vjp whose backward raises, so jax.grad through it fails with a message naming
out_dtype instead of differentiating the uint8 codes as zeros.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bridge.numerics.contract import FP8_FORMATS, as_float32, check_fp8_args

from .pallas_fp8 import NO_QUANT, Quant


def _out_dtype_name(out_dtype, x_dtype: str) -> Optional[str]:
    """The contract's name for out_dtype (jnp.dtype's), None for None; the contract judges it."""
    if out_dtype is None:
        return None
    try:
        return jnp.dtype(out_dtype).name
    except TypeError:
        raise TypeError(f"out_dtype: expected None, x's dtype ({x_dtype}) or one of {', '.join(FP8_FORMATS)}; "
                        f"got {out_dtype!r}") from None


def _scale_operand(scale) -> Tuple[Optional[jax.Array], Optional[tuple], Optional[str], Optional[float]]:
    """(the scale as an array, its shape, its dtype name, its value where concrete) for check_fp8_args."""
    if scale is None:
        return None, None, None, None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = as_float32(scale)  # rn(scale): the float32 the kernel reads
        return jnp.full((1,), value, jnp.float32), (), "float32", value
    if not hasattr(scale, "shape") or not hasattr(scale, "dtype") or isinstance(scale, bool):
        raise TypeError(f"scale: expected a float32 jax.Array of shape () or (1,), or a Python float; "
                        f"got {type(scale).__name__}")
    shape, dtype = tuple(scale.shape), jnp.dtype(scale.dtype).name
    value = None
    if not isinstance(scale, jax.core.Tracer) and shape in ((), (1,)) and dtype == "float32":
        value = float(np.asarray(scale).reshape(()))
    return jnp.asarray(scale).reshape(-1) if shape in ((), (1,)) else None, shape, dtype, value


def fp8_arguments(n: int, x_dtype: str, out_dtype, scale, group_size) -> Tuple[Quant, Optional[jax.Array]]:
    """Check the FP8 arguments (contract v1.2) and give the kernel's Quant and the (1,) scale operand.

    Raises TypeError/ValueError naming the argument, before any kernel runs.
    """
    name = _out_dtype_name(out_dtype, x_dtype)
    array, shape, dtype, value = _scale_operand(scale)
    check_fp8_args(n=n, out_dtype=name, scale_shape=shape, scale_dtype=dtype, scale_value=value,
                   group_size=group_size, x_dtype=x_dtype)
    if name not in FP8_FORMATS:
        return NO_QUANT, None
    if array is not None:
        return Quant.fp8("static", name), array
    return Quant.fp8("group", name, int(group_size)), None


def without_gradient(forward: Callable, out_dtype: str) -> Callable:
    """forward as a jax.custom_vjp whose backward raises: FP8 outputs have no gradient."""

    @jax.custom_vjp
    def rows(*args):
        return forward(*args)

    def rows_fwd(*args):
        return forward(*args), None

    def rows_bwd(_, cotangent):
        raise TypeError(f"out_dtype: {out_dtype} outputs have no gradient (NUMERICS.md, FP8 output: the backward "
                        f"covers x's dtype only); differentiate a call without out_dtype")

    rows.defvjp(rows_fwd, rows_bwd)
    return rows
