"""Helpers of the bi_jax gradient tests (CPU and GPU): inputs, gradients through jax.vjp, bitwise checks.

`flushed` (bridge.numerics.subnormals) says which gradient bits XLA:CPU cannot reproduce in interpret mode:
those rows and grad_weight columns are compared on a GPU only.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import bi_jax
from bridge import reference
from bridge.numerics import subnormals
from bridge.verify.compare import assert_bitwise_equal

NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
F32 = np.float32


def random_rows(rng: np.random.Generator, shape: Sequence[int], dtype: str) -> np.ndarray:
    """Normal values with a per-row scale in [2**-4, 2**4], rounded to `dtype` (full float32 mantissas)."""
    scale = np.exp2(rng.uniform(-4, 4, tuple(shape[:-1]) + (1,)))
    return (rng.standard_normal(tuple(shape)) * scale).astype(F32).astype(NUMPY_DTYPES[dtype])


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    w = 1.0 + 0.25 * rng.standard_normal(n)
    w[rng.integers(0, n)] = -0.0
    return w.astype(F32).astype(NUMPY_DTYPES[dtype])


def assert_bits(expected, actual, what: str = "") -> None:
    assert_bitwise_equal(np.asarray(expected), np.asarray(actual), what)


def norm_fn(eps: float, mode: str, offset: float, uses: str, interpret: Optional[bool] = None,
            pallas_backend: Optional[str] = None):
    """bi_jax.rms_norm of (x, weight[, residual]) returning what a loss uses: "none" (no residual),
    "both" (out and the new residual) or "out" (the new residual unused: its gradient is a symbolic zero).
    pallas_backend: bi_jax.rms_norm's (None: bi_jax.selection's choice)."""
    def f(*args):
        result = bi_jax.rms_norm(args[0], args[1], eps, *args[2:], mode=mode, weight_offset=offset,
                                 interpret=interpret, pallas_backend=pallas_backend)
        return result[0] if uses == "out" else result
    return f


@functools.partial(jax.jit, static_argnames=("eps", "mode", "offset", "uses", "interpret", "pallas_backend"))
def _vjp(primals, cotangent, *, eps, mode, offset, uses, interpret, pallas_backend):
    return jax.vjp(norm_fn(eps, mode, offset, uses, interpret, pallas_backend), *primals)[1](cotangent)


def grads(x, w, g, eps=1e-6, r=None, gr=None, *, mode="llama", offset=0.0, zeros_for_absent=False,
          interpret: Optional[bool] = None, pallas_backend: Optional[str] = None) -> Tuple[jax.Array, ...]:
    """bi_jax's gradients by a jitted jax.vjp, in reference.rms_norm_backward's order.

    Without gr the new residual is left unused (JAX's symbolic zero: absent), or with
    zeros_for_absent given an explicit array of zeros.
    """
    primals = tuple(jnp.asarray(a) for a in (x, w, r) if a is not None)
    if r is None:
        uses, cotangent = "none", jnp.asarray(g)
    elif gr is None and not zeros_for_absent:
        uses, cotangent = "out", jnp.asarray(g)
    else:
        uses, cotangent = "both", (jnp.asarray(g), jnp.zeros(r.shape, r.dtype) if gr is None else jnp.asarray(gr))
    result = _vjp(primals, cotangent, eps=eps, mode=mode, offset=offset, uses=uses, interpret=interpret,
                  pallas_backend=pallas_backend)
    return tuple(result) if r is None else (result[0], result[2], result[1])


def expected(x, w, g, eps=1e-6, r=None, gr=None, *, mode="llama", offset=0.0) -> Tuple[np.ndarray, ...]:
    """reference.rms_norm_backward over any leading shape (its rows are x.reshape(-1, n))."""
    n = x.shape[-1]
    flat = [None if a is None else a.reshape(-1, n) for a in (x, g, r, gr)]
    result = reference.rms_norm_backward(flat[0], w, flat[1], eps, flat[2], flat[3], mode=mode, weight_offset=offset)
    return tuple(a if a is result[-1] else a.reshape(x.shape) for a in result)


def output_names(count: int) -> Tuple[str, ...]:
    return ("grad_x", "grad_weight") if count == 2 else ("grad_x", "grad_residual", "grad_weight")


def assert_grads(want, got, what: str, rows: Optional[np.ndarray] = None, cols: Optional[np.ndarray] = None) -> None:
    """Bitwise equality of each gradient; rows / cols (boolean masks) leave those rows of grad_x and
    grad_residual, and those columns of grad_weight, out of the comparison."""
    assert len(got) == len(want), f"{what}: {len(got)} gradients, expected {len(want)}"
    if rows is not None:
        for e, a in zip(want, got):  # outside_flushed needs the shapes it puts the expected bits into
            assert np.shape(a) == e.shape, f"{what}: shape {np.shape(a)}, expected {e.shape}"
        got = subnormals.outside_flushed(want, got, rows, cols)
    for name, e, a in zip(output_names(len(want)), want, got):
        assert_bits(e, np.asarray(a), f"{what}: {name}")
