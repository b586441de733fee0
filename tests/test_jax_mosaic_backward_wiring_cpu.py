"""bi_jax.rms_norm's gradients through the Mosaic GPU backward on the CPU, its body emulated on the host.

mosaic_backward._kernel (the kernel for one shape) is replaced by a jax.pure_callback into
mosaic_backward.emulate_kernel, the body the GPU runs on numpy (tests/test_jax_mosaic_backward.py
checks it against the reference), and the selection is forced to "mosaic" for the backward. What
this checks is the wiring: jax.grad through the custom_vjp, a residual with and without the new
residual's gradient, several blocks combined by block_tree's XLA adds, the root=True path of a
call split above MAX_ELEMENTS, all with the reference's bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_backward_helpers import assert_grads, expected, grads, random_rows, random_weight

from bi_jax import mosaic_backward, ops


def _stand_in(built: list):
    def kernel(n_rows, n, dtype, z_dtype, has_residual, has_gr, eps, weight_offset, llama, steps, reload, warpgroups,
               semantics=None):
        built.append((n_rows, n, steps))
        blocks = -(-n_rows // steps)
        shapes = [jax.ShapeDtypeStruct((n_rows, n), jnp.dtype(dtype))]
        if has_residual:
            shapes.append(jax.ShapeDtypeStruct((n_rows, n), jnp.dtype(z_dtype)))
        shapes.append(jax.ShapeDtypeStruct((blocks, n), jnp.float32))

        def host(z, g, *rest):
            gr, w = (rest[0], rest[1]) if has_gr else (None, rest[0])
            return mosaic_backward.emulate_kernel(
                np.asarray(z), np.asarray(w), np.asarray(g), None if gr is None else np.asarray(gr), eps=eps,
                mode="llama" if llama else "fp32", weight_offset=weight_offset, has_residual=has_residual,
                steps=steps, reload=reload, warpgroups=warpgroups)

        return lambda *args: jax.pure_callback(host, shapes, *args)

    return kernel


def _clear() -> None:
    for fn in (ops._rows_fn, ops._differentiable):
        fn.cache_clear()
    jax.clear_caches()


@pytest.fixture
def emulated(monkeypatch):
    """The backward's selection forced to "mosaic", its kernel a stand-in; (rows, n, steps) of each built."""
    built = []
    monkeypatch.setattr(mosaic_backward, "_kernel", _stand_in(built))
    monkeypatch.setattr(ops, "backward_kernel", lambda backend, n, interpret: "mosaic")
    _clear()
    yield built
    _clear()


@pytest.mark.parametrize("rows, n, residual, with_gr, mode, offset", [
    (6, 100, None, False, "llama", 0.0), (300, 256, "float32", True, "fp32", -0.5),
    (5, 1000, "bfloat16", False, "llama", 1.0), (1, 3, "bfloat16", True, "fp32", 0.0)])
def test_grad_runs_the_mosaic_backward(emulated, rows, n, residual, with_gr, mode, offset):
    rng = np.random.default_rng(rows * 7 + n)
    x, w = random_rows(rng, (rows, n), "bfloat16"), random_weight(rng, n, "bfloat16")
    g = random_rows(rng, (rows, n), "bfloat16")
    r = None if residual is None else random_rows(rng, (rows, n), residual)
    gr = random_rows(rng, (rows, n), residual) if with_gr else None
    want = expected(x, w, g, 1e-6, r, gr, mode=mode, offset=offset)
    got = grads(x, w, g, 1e-6, r, gr, mode=mode, offset=offset)
    assert_grads(want, got, f"{rows}x{n} res={residual} gr={with_gr}")
    assert emulated and all(b[:2] == (rows, n) for b in emulated)
    if rows == 300:
        assert -(-rows // emulated[0][2]) > 1  # several blocks: block_tree's XLA levels ran


def test_split_above_max_elements_takes_roots(emulated, monkeypatch):
    """MAX_ELEMENTS patched to 1000: 11 rows of 100 are pieces of 8 and 3 rows, each root=True."""
    monkeypatch.setattr(ops, "MAX_ELEMENTS", 1000)
    rng = np.random.default_rng(11)
    x, w = random_rows(rng, (11, 100), "float32"), random_weight(rng, 100, "float32")
    g = random_rows(rng, (11, 100), "float32")
    g[:, :7] = -0.0  # -0.0 roots of the 3-row piece, which its padding turns into +0.0
    want = expected(x, w, g, 1e-6)
    assert_grads(want, grads(x, w, g), "split")
    assert sorted(b[:2] for b in emulated) == [(3, 100), (8, 100)]
