"""Helpers of the bi_jax gradient tests (CPU and GPU): inputs, gradients through jax.vjp, bitwise checks.

`flushed` says which gradient bits XLA:CPU cannot reproduce: JAX runs XLA's CPU backend with the
processor's flush-to-zero and denormals-are-zero modes on (jax-ml/jax#16200: "working as
intended"; XLA_FLAGS=--xla_cpu_ftz=false does not change it), so in interpret mode a float32
subnormal operand or result of any step is 0. The reference keeps subnormals (NUMERICS.md), so
rows and grad_weight columns whose steps pass through one are compared on a GPU only.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import bi_jax
from bridge import reference
from bridge.compare import assert_bitwise_equal
from bridge.contract import next_power_of_two

NUMPY_DTYPES = {name: reference.numpy_dtype(name) for name in ("float32", "bfloat16", "float16")}
F32 = np.float32
SMALLEST_NORMAL = F32(2.0**-126)


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


def norm_fn(eps: float, mode: str, offset: float, uses: str, interpret: Optional[bool] = None):
    """bi_jax.rms_norm of (x, weight[, residual]) returning what a loss uses: "none" (no residual),
    "both" (out and the new residual) or "out" (the new residual unused: its gradient is a symbolic zero)."""
    def f(*args):
        result = bi_jax.rms_norm(args[0], args[1], eps, *args[2:], mode=mode, weight_offset=offset,
                                 interpret=interpret)
        return result[0] if uses == "out" else result
    return f


@functools.partial(jax.jit, static_argnames=("eps", "mode", "offset", "uses", "interpret"))
def _vjp(primals, cotangent, *, eps, mode, offset, uses, interpret):
    return jax.vjp(norm_fn(eps, mode, offset, uses, interpret), *primals)[1](cotangent)


def grads(x, w, g, eps=1e-6, r=None, gr=None, *, mode="llama", offset=0.0, zeros_for_absent=False,
          interpret: Optional[bool] = None) -> Tuple[jax.Array, ...]:
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
    result = _vjp(primals, cotangent, eps=eps, mode=mode, offset=offset, uses=uses, interpret=interpret)
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
    for name, e, a in zip(output_names(len(want)), want, got):
        a = np.asarray(a)
        skip = cols if name == "grad_weight" else (None if rows is None else rows.reshape(e.shape[:-1] + (1,)))
        if skip is not None and a.shape == e.shape:
            a = np.where(skip, e, a)  # the expected bits where skipped: indices stay those of the full array
        assert_bits(e, a, f"{what}: {name}")


def _subnormal(a) -> np.ndarray:
    a = np.abs(np.asarray(a, F32))
    return (a > 0) & (a < SMALLEST_NORMAL)


def _tree_touches(q: np.ndarray) -> np.ndarray:
    """Per row: whether a leaf or a node of the pairwise tree over the last axis is subnormal."""
    n = q.shape[-1]
    q = np.concatenate([q, np.zeros(q.shape[:-1] + (next_power_of_two(n) - n,), F32)], axis=-1)
    touched = _subnormal(q).any(-1)
    while q.shape[-1] > 1:
        q = q[..., 0::2] + q[..., 1::2]
        touched |= _subnormal(q).any(-1)
    return touched


def flushed(x, w, g, eps, r, gr, mode: str, offset: float) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, columns): the rows (x.reshape(-1, n)) of grad_x / grad_residual and the columns of
    grad_weight whose contract steps (NUMERICS.md 1-5, B1-B7) have a float32 subnormal operand or
    result. XLA:CPU flushes those to zero (see the module docstring); the others it computes exactly."""
    n = x.shape[-1]
    with np.errstate(all="ignore"):
        x2, g2 = x.reshape(-1, n).astype(F32), g.reshape(-1, n).astype(F32)
        if r is not None:
            r2 = r.reshape(-1, n).astype(F32)
            total = x2 + r2
            v = reference.encode(total, reference.dtype_name(r.dtype)).astype(F32)
            inputs = _subnormal(x2) | _subnormal(r2) | _subnormal(total)
        else:
            v, inputs = x2, _subnormal(x2)
        q = v * v
        mean = reference.pairwise_sum(q) / F32(n)
        root = np.sqrt(mean + F32(eps))
        inv = F32(1) / root
        wf = w.astype(F32)
        we = wf + F32(offset) if F32(offset) != 0 else wf
        xhat = v * inv[:, None]
        h = reference.encode(xhat, reference.dtype_name(w.dtype)).astype(F32) if mode == "llama" else xhat
        steps_1_4 = np.stack([mean, mean + F32(eps), root, inv, np.full_like(inv, eps)], -1)
        forward = ((inputs | _subnormal(v) | _subnormal(xhat) | _subnormal(h)).any(-1) | _tree_touches(q)
                   | _subnormal(steps_1_4).any(-1))
        a = g2 * we
        b = a * xhat
        t = reference.pairwise_sum(b)
        c = t / F32(n)
        xc = xhat * c[:, None]
        dv = inv[:, None] * (a - xc)
        each = (_subnormal(g2) | _subnormal(a) | _subnormal(b) | _subnormal(xc) | _subnormal(a - xc) | _subnormal(dv)
                | _subnormal(wf) | _subnormal(we))
        if gr is not None:
            gr2 = gr.reshape(-1, n).astype(F32)
            each |= _subnormal(gr2) | _subnormal(dv + gr2)
        rows = forward | each.any(-1) | _tree_touches(b) | _subnormal(np.stack([t, c], -1)).any(-1)
        # grad_weight sums every row's p = g * h: a row with a flushed h changes every column.
        p = g2 * h
        cols = (forward.any() | _tree_touches(np.ascontiguousarray(p.T)) | (_subnormal(g2) | _subnormal(h)).any(0)
                | _subnormal(wf) | _subnormal(we))
    return rows, cols
