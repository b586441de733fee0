"""bi_jax above 2^31 elements on a GPU: rms_norm's row split (bi_jax/ops.py) against the reference.

32769 x 65536 bfloat16 (2^31 + 65536 elements; about 30 GB in all): pieces of 16384 rows
(piece_rows), three kernel calls. Rows of out and grad_x are checked against bridge.reference;
grad_weight against its tree split by hand: each 16384-row block is an aligned subtree of B7's
tree, whose float32 root T_k one float32 call on that block gives (mode fp32: h = xhat whatever D
is, and x, g, w widen exactly), and the last row's subtree in the big call is p + 0.0 (its
padding). Then rnD((T_0 + T_1) + (T_2 + 0.0)), added in numpy (no flush-to-zero).
"""

from __future__ import annotations

import os

# torch and JAX may share the GPU in one pytest process (see tests/test_jax_gpu.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax_backward_helpers import assert_bits  # noqa: E402
from jax_gpu_marks import JAX_GPU_MARKS  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax import ops  # noqa: E402
from bridge import reference  # noqa: E402

pytestmark = JAX_GPU_MARKS


def check_split(rows: int, n: int) -> None:
    """The whole check for x of (rows, n) bfloat16, rows = 2 pieces + 1 row."""
    piece = ops.piece_rows(n)
    assert rows == 2 * piece + 1 and rows * n > ops.MAX_ELEMENTS, (rows, n, piece)
    kx, kg, kw = jax.random.split(jax.random.key(31), 3)
    x = jax.random.normal(kx, (rows, n), jnp.bfloat16)
    g = jax.random.normal(kg, (rows, n), jnp.bfloat16)
    w = (1.0 + 0.25 * jax.random.normal(kw, (n,), jnp.float32)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: bi_jax.rms_norm(a, b, 1e-6, mode="fp32"), x, w)
    grad_x, grad_w = vjp(g)
    probe = np.array([0, 1, piece - 1, piece, rows - 2, rows - 1])
    xp, gp, wn = np.asarray(x[probe]), np.asarray(g[probe]), np.asarray(w)
    assert_bits(reference.rms_norm(xp, wn, 1e-6, mode="fp32"), out[probe], "out rows vs reference")
    e_x, _ = reference.rms_norm_backward(xp, wn, gp, 1e-6, mode="fp32")
    assert_bits(e_x, grad_x[probe], "grad_x rows vs reference")
    del out, grad_x

    def root(lo: int, hi: int) -> np.ndarray:
        f32 = lambda a: a[lo:hi].astype(jnp.float32)  # noqa: E731
        _, block_vjp = jax.vjp(lambda a, b: bi_jax.rms_norm(a, b, 1e-6, mode="fp32"), f32(x), w.astype(jnp.float32))
        return np.asarray(block_vjp(f32(g))[1])

    t0, t1, t2 = root(0, piece), root(piece, 2 * piece), root(2 * piece, rows)
    zero = np.float32(0.0)
    by_hand = reference.encode((t0 + t1) + (t2 + zero), "bfloat16")
    assert np.isfinite(by_hand.astype(np.float32)).all()
    assert_bits(by_hand, grad_w, "grad_weight vs its tree split by hand")


@pytest.mark.gpu
def test_over_two_to_the_31_elements():
    check_split(2**15 + 1, 2**16)
