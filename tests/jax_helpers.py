"""Helpers of the bi_jax forward tests on the CPU (test_jax_{corpus,transforms,flax}_cpu.py).

Inputs, the reference as (out, new_residual or None), and bitwise checks. JIT is one jitted entry
point shared by all those files: interpret-mode pallas calls cost an XLA compile per distinct shape
and static argument, so equal shapes and static arguments compile once per session.
"""

from __future__ import annotations

import zlib
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import bi_jax
from bridge import reference
from bridge.verify.compare import assert_bitwise_equal

DTYPES = ("float32", "bfloat16", "float16")
NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
N = 100  # the row length most tests share (pads to 128: masked columns, 16 rows per program)

# One jitted entry point shared by the tests, so equal shapes and static arguments compile once.
JIT = jax.jit(bi_jax.rms_norm, static_argnames=("eps", "mode", "weight_offset"))


def _seed(*parts) -> int:
    """A deterministic seed from the test's parameters (hash() of str is salted per process)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def random_rows(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Normal values with a per-row scale in [2**-4, 2**4], rounded to `dtype`."""
    shape = tuple(shape)
    scale = np.exp2(rng.uniform(-4, 4, shape[:-1] + (1,)))
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(NUMPY_DTYPES[dtype])


def special_rows(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """random_rows with about 2% zeros, infinities, NaNs, huge and tiny values."""
    v = random_rows(rng, shape, "float32").astype(np.float64)
    flat = v.reshape(-1)
    if flat.size:
        k = max(1, flat.size // 50)
        choices = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e4, -3e4, 1e-6, 6e-8, 2.0**70, 2.0**-70])
        flat[rng.integers(0, flat.size, k)] = rng.choice(choices, k)
    with np.errstate(over="ignore"):
        return v.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    w = 1.0 + 0.25 * rng.standard_normal(n)
    w[rng.integers(0, n)] = -0.0
    return w.astype(np.float32).astype(NUMPY_DTYPES[dtype])


def residual_dtype(dtype: str, kind: str) -> Optional[str]:
    return None if kind == "none" else (dtype if kind == "same" else "float32")


def ref(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
        mode: str = "llama", weight_offset: float = 0.0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """bridge.reference.rms_norm over any leading shape, always as (out, new_residual or None)."""
    n = x.shape[-1]
    r2 = None if residual is None else residual.reshape(-1, n)
    result = reference.rms_norm(x.reshape(-1, n), weight, eps, r2, mode=mode, weight_offset=weight_offset)
    if residual is None:
        return result.reshape(x.shape), None
    return result[0].reshape(x.shape), result[1].reshape(x.shape)


def pair(result, has_residual: bool):
    """bi_jax.rms_norm's result as (out, new_residual or None)."""
    return tuple(result) if has_residual else (result, None)


def assert_bits(expected, actual, what: str = "") -> None:
    """Bitwise equality of numpy or JAX arrays (shape and dtype included); the first difference is named."""
    assert_bitwise_equal(np.asarray(expected), np.asarray(actual), what)


def assert_pair_bits(expected, actual, what: str) -> None:
    assert_bits(expected[0], actual[0], f"{what}: out")
    assert (expected[1] is None) == (actual[1] is None), f"{what}: new_residual presence"
    if expected[1] is not None:
        assert_bits(expected[1], actual[1], f"{what}: new_residual")
