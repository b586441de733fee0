"""A pre-norm residual stream of layers (`x, r = rms_norm(x, w, residual=r)`), differentiated through
lax.scan and unrolled: every gradient equals the numpy reference run layer by layer, bit for bit.

This is how models call the norm: each call's outputs are the next call's inputs, written in
place by both kernel bodies (out over x, the new residual over the residual; grad_x and
grad_residual over the incoming gradients), and with a loss on both outputs the two incoming
gradients are equal. On the CPU: interpret mode; on a GPU: each kernel body (Mosaic GPU where this
GPU and jax run it). In-place Mosaic GPU calls through jax refs (pl.kernel) failed this test
inside lax.scan on the H100: see README.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import bi_jax
from bi_jax import selection
from bridge.numerics import reference as ref

from jax_gpu_marks import JAX_GPU_MARKS, jax_gpu


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _inputs(rows: int, n: int, layers: int, seed: int):
    rng = np.random.default_rng(seed)
    bf = ml_dtypes.bfloat16
    x, r = rng.standard_normal((rows, n)).astype(bf), rng.standard_normal((rows, n)).astype(bf)
    return x, r, (1 + 0.1 * rng.standard_normal((layers, n))).astype(bf)


def _reference(x, r, ws):
    """The loss sum(out) + sum(new residual) of the last layer: both incoming gradients are ones."""
    xs, rs = [x], [r]
    for w in ws:
        out, new_r = ref.rms_norm(xs[-1], w, 1e-6, rs[-1])
        xs.append(out)
        rs.append(new_r)
    g = gr = np.ones(x.shape, x.dtype)
    gws = [None] * len(ws)
    for i in reversed(range(len(ws))):
        g, gr, gws[i] = ref.rms_norm_backward(xs[i], ws[i], g, 1e-6, rs[i], gr)
    return g, gr, np.stack(gws)


def _grads(x, r, ws, *, scan: bool, **kwargs):
    def loss(x_, r_, ws_):
        def layer(carry, w):
            return bi_jax.rms_norm(carry[0], w, 1e-6, carry[1], **kwargs), None
        carry = (x_, r_)
        if scan:
            carry = jax.lax.scan(layer, carry, ws_)[0]
        else:
            for i in range(ws_.shape[0]):
                carry = layer(carry, ws_[i])[0]
        return jnp.sum(carry[0].astype(jnp.float32)) + jnp.sum(carry[1].astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*map(jnp.asarray, (x, r, ws)))


def _assert_equal(want, got, label: str) -> None:
    for name, a, b in zip(("grad_x", "grad_residual", "grad_weights"), want, got):
        a, b = np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16)
        bad = np.flatnonzero(a != b)
        assert bad.size == 0, (f"{label} {name}: {bad.size} elements differ from the reference chain, the first "
                               f"at flat index {bad[0]} (reference {a.flat[bad[0]]:#06x}, got {b.flat[bad[0]]:#06x})")


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_interpret_layer_stack(scan):
    x, r, ws = _inputs(16, 256, 3, _seed("cpu-stack", scan))
    with jax.default_device(jax.devices("cpu")[0]):  # interpret mode's bits are XLA:CPU's
        got = _grads(x, r, ws, scan=scan, interpret=True)
    _assert_equal(_reference(x, r, ws), got, "interpret")


def _mosaic_why_not():
    return selection.jax_lacks() or selection.gpu_lacks() if jax_gpu() else None


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("rows,n,layers", [(1024, 4096, 3), (16384, 4096, 2), (2048, 8192, 2)])
@JAX_GPU_MARKS[0]
@JAX_GPU_MARKS[1]
def test_gpu_layer_stack(rows, n, layers, scan, backend):
    if backend == "mosaic" and _mosaic_why_not():
        pytest.skip(f"no Mosaic GPU here: {_mosaic_why_not()}")
    x, r, ws = _inputs(rows, n, layers, _seed("gpu-stack", rows, n))
    got = _grads(x, r, ws, scan=scan, interpret=False, pallas_backend=backend)
    _assert_equal(_reference(x, r, ws), got, f"{backend} {'scan' if scan else 'unrolled'} {rows}x{n}")
