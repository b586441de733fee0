"""Which gradient bits XLA:CPU cannot give: the rows and columns whose steps meet a float32 subnormal.

JAX runs XLA's CPU backend with the processor's flush-to-zero and denormals-are-zero modes on
(jax-ml/jax#16200: "working as intended"; XLA_FLAGS=--xla_cpu_ftz=false does not change it), so in
Pallas interpret mode a float32 subnormal operand or result of any step is 0. The contract keeps
subnormals (NUMERICS.md), and so do the reference, the Triton interpreter and both GPU kernels;
bi_jax's interpret-mode backward is compared outside these rows and columns (tests and
`bi-norm verify`), and inside them on a GPU. Plain numpy, no framework.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from . import reference
from .contract import next_power_of_two

F32 = np.float32
SMALLEST_NORMAL = F32(2.0**-126)


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


def outside_flushed(expected, got, rows: np.ndarray, cols: np.ndarray) -> list:
    """got (reference.rms_norm_backward's order: grad_x[, grad_residual], grad_weight) with the
    expected bits put back where `flushed` says XLA:CPU cannot give them, so that a bitwise
    comparison covers every other element at its own index."""
    *per_row, last = zip(expected, got)
    kept = [np.where(rows.reshape(e.shape[:-1] + (1,)), e, np.asarray(g)) for e, g in per_row]
    return kept + [np.where(cols, last[0], np.asarray(last[1]))]
