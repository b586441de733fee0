"""Helpers of the bi_jax FP8 tests (test_jax_fp8_cpu.py, test_jax_fp8_gpu.py).

Inputs for FP8 (normal rows with special values, weights that make some u overflow), the
reference as a tuple (out, [scales,] [new_residual]) like bi_jax.rms_norm's, and bitwise checks
on integer views (bridge.verify.compare, FP8 as its uint8 codes).
FP8_JIT is one jitted entry point shared by the tests, so equal shapes compile once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_helpers import NUMPY_DTYPES, assert_bits, random_rows

import bi_jax
from bi_jax.pallas_fp8 import Quant
from bridge import reference

# The format's fields as the kernel takes them (fp8_max, mantissa_bits, exponent_bias, nan_fp8).
E4M3 = Quant.fp8("static", "float8_e4m3fn")
QUANTS = ("static", "group128", "group64")
# (dtype, residual kind, mode, offset, quant): each quant with each mode, offset and residual kind at least once.
COMBOS = [
    ("float32", "none", "llama", 0.0, "static"),
    ("bfloat16", "float32", "llama", 0.0, "static"),
    ("float16", "same", "fp32", 1.0, "static"),
    ("bfloat16", "none", "fp32", 1.0, "group128"),
    ("float16", "float32", "llama", 0.0, "group128"),
    ("float32", "same", "fp32", 0.0, "group128"),
    ("bfloat16", "same", "llama", 1.0, "group64"),
    ("float16", "none", "llama", 0.0, "group64"),
    ("float32", "float32", "fp32", 1.0, "group64"),
]
FP8_JIT = jax.jit(bi_jax.rms_norm, static_argnames=("eps", "mode", "weight_offset", "out_dtype", "group_size",
                                                     "interpret"))


def quant_kwargs(quant: str, scale) -> dict:
    """bi_jax.rms_norm's FP8 arguments for "static" (with scale), "group128" or "group64"."""
    if quant == "static":
        return {"out_dtype": jnp.float8_e4m3fn, "scale": scale}
    return {"out_dtype": jnp.float8_e4m3fn, "group_size": int(quant[len("group"):])}


def fp8_rows(rng: np.random.Generator, shape, dtype: str, specials: bool = True) -> np.ndarray:
    """random_rows with, when specials, about 3% zeros, -0.0, huge and tiny values in every row, and
    in every 8th row (row 7, 15, ...) one inf, NaN or float32-overflowing square."""
    v = random_rows(rng, shape, "float32").astype(np.float64)
    if specials and v.size:
        rows = v.reshape(-1, shape[-1])
        k = max(1, rows.size // 33)
        benign = np.array([0.0, -0.0, 3e4, -3e4, 1e-6, -6e-8, 2.0**-20])
        rows.reshape(-1)[rng.integers(0, rows.size, k)] = rng.choice(benign, k)
        fatal = np.array([np.inf, -np.inf, np.nan, 2.0**70])
        for i in range(7, rows.shape[0], 8):
            rows[i, rng.integers(0, shape[-1])] = rng.choice(fatal)
    with np.errstate(over="ignore"):
        return v.astype(np.float32).astype(NUMPY_DTYPES[dtype])


HUGE_WEIGHT_COLUMN = 3
# The GPU tests' static scales: FP8's normal range, its subnormals, 2**-126 (t overflows) and
# 2**-127, a float32 subnormal whose reciprocal is finite: the GPU keeps subnormals (XLA:CPU would
# read it as 0, hence not in the CPU tests).
GPU_STATIC_SCALES = (np.float32(0.0123), np.float32(150.0), np.float32(2.0**-126), np.float32(2.0**-127))


def fp8_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """1 + 0.25 N(0, 1), one -0.0 and one 0.0; in float32 and bfloat16 also 3e38 at column 3 (u
    overflows there for |normed| > 1.14: inf in u, saturation, and an inf group's scale)."""
    w = 1.0 + 0.25 * rng.standard_normal(n)
    w[rng.integers(HUGE_WEIGHT_COLUMN + 1, n, 2)] = [-0.0, 0.0]
    if dtype != "float16":
        w[HUGE_WEIGHT_COLUMN] = 3e38
    return w.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def _jnp(a):
    return None if a is None else jnp.asarray(a)


def call(fn, x, w, r, eps: float = 1e-6, **kwargs) -> Tuple[jax.Array, ...]:
    """fn (bi_jax.rms_norm or FP8_JIT) on numpy inputs, its result always as a tuple."""
    if kwargs.get("scale") is not None and not isinstance(kwargs["scale"], float):
        kwargs = {**kwargs, "scale": jnp.asarray(kwargs["scale"])}
    result = fn(jnp.asarray(x), jnp.asarray(w), eps, _jnp(r), **kwargs)
    return tuple(result) if isinstance(result, tuple) else (result,)


def expected(x, w, r, eps: float = 1e-6, *, mode: str = "llama", weight_offset: float = 0.0,
             out_dtype=None, scale=None, group_size: Optional[int] = None) -> Tuple[np.ndarray, ...]:
    """bridge.reference.rms_norm with bi_jax's FP8 arguments, over any leading shape, as a tuple."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    name = None if out_dtype is None else jnp.dtype(out_dtype).name
    scale = None if scale is None else np.asarray(scale, np.float32)
    result = reference.rms_norm(x.reshape(-1, n), w, eps, None if r is None else r.reshape(-1, n), mode=mode,
                                weight_offset=weight_offset, out_dtype=name, scale=scale, group_size=group_size)
    result = result if isinstance(result, tuple) else (result,)
    return tuple(a.reshape(lead + a.shape[-1:]) for a in result)


def assert_fp8_result(expected_result, actual_result, what: str) -> None:
    """Equal (out, [scales,] [new_residual]) tuples, bit for bit (FP8 by its uint8 codes), the first
    difference named."""
    assert len(expected_result) == len(actual_result), f"{what}: {len(actual_result)} results, " \
                                                       f"expected {len(expected_result)}"
    for k, (e, a) in enumerate(zip(expected_result, actual_result)):
        assert_bits(e, a, f"{what}: result {k}")


def check_fp8_corpus_case(fn, case, name: str) -> None:
    """Every (mode, offset) output of an FP8 golden case through fn (a jitted bi_jax.rms_norm), bit for bit."""
    x, w = jnp.asarray(case.x), jnp.asarray(case.weight)
    r = None if case.residual is None else jnp.asarray(case.residual)
    kwargs = quant_kwargs("static", jnp.asarray(case.scale)) if case.scale is not None else \
        quant_kwargs(f"group{case.spec.group_size}", None)
    for (mode, offset) in case.out:
        result = fn(x, w, case.spec.eps, r, mode=mode, weight_offset=offset, **kwargs)
        got = tuple(result) if isinstance(result, tuple) else (result,)
        exp = tuple(a for a in case.expected(mode, offset) if a is not None)
        assert_fp8_result(exp, tuple(np.asarray(a) for a in got), f"{name} ({mode}, offset {offset})")
