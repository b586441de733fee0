"""bi_jax's Mosaic GPU backward (bi_jax/mosaic_backward.py) compiled, bit for bit.

Skipped, with the reason, without a CUDA GPU, when JAX's default backend is not a GPU, or where
the Mosaic kernel cannot run (compute capability below 9.0, a jax without its API). Bitwise
through integer views: the gradient corpus against the reference (subnormals included: only
XLA:CPU flushes them), the kernel directly with several block sizes, grad_x of every row of
batches of 1..4096 rows against one 4096-row call, grad_weight against the Pallas-Triton backward
on the same inputs, and bi_jax.rms_norm's gradients picking the Mosaic backward by default.
"""

from __future__ import annotations

import functools
import os
import re

# torch and JAX may share the GPU in one pytest process (see tests/test_jax_gpu.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402
from jax_backward_helpers import assert_bits, assert_grads, expected, grads, random_rows, random_weight  # noqa: E402
from jax_gpu_marks import JAX_GPU_MARKS, jax_gpu  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax import backward, mosaic_backward, mosaic_kernel, selection  # noqa: E402
from bridge import golden  # noqa: E402
from bridge.numerics import reference as ref  # noqa: E402

_WHY_NOT = (selection.jax_lacks() or selection.gpu_lacks()) if jax_gpu() else None
pytestmark = JAX_GPU_MARKS + [pytest.mark.skipif(_WHY_NOT is not None, reason=f"no Mosaic GPU here: {_WHY_NOT}")]

BACKWARD_NAMES = [e["name"] for e in golden.load_manifest()["backward_cases"]]
JNP = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROWS = 4096
SIZES = (1, 2, 3, 5, 7, 8, 16, 17, 33, 64, 100, 127, 128, 129, 1000, 4095, 4096)


@functools.lru_cache(maxsize=None)
def _direct(eps, mode, offset, has_residual, steps):
    def fn(z, w, g, gr):
        return mosaic_backward.rms_norm_backward(z, w, g, gr, eps=eps, mode=mode, weight_offset=offset,
                                                 has_residual=has_residual, steps=steps)
    return jax.jit(fn)


def _same(a: jax.Array, b: jax.Array) -> jax.Array:
    uint = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(a.dtype).itemsize]
    return jnp.all(lax.bitcast_convert_type(a, uint) == lax.bitcast_convert_type(b, uint))


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_corpus_case_direct(backward_corpus, name):
    """The kernel itself on every corpus case, with the rule's blocks and with one block of all rows."""
    case = backward_corpus[name]
    n = case.spec.n
    if n > mosaic_kernel.MAX_N:
        pytest.skip(f"n = {n} > MAX_N")
    x = case.x.reshape(-1, n)
    rows = x.shape[0]
    r = None if case.residual is None else case.residual.reshape(x.shape)
    gr = None if case.grad_new_residual is None else case.grad_new_residual.reshape(x.shape)
    z = x if r is None else ref.rms_norm(x, case.weight, case.spec.eps, r)[1]
    for (mode, offset), want in case.expected.items():
        want = tuple(a.reshape(x.shape) if a.shape != (n,) else a for a in want)
        for steps in (None, 1 << (rows - 1).bit_length()):
            got = _direct(case.spec.eps, mode, offset, r is not None, steps)(
                jnp.asarray(z), jnp.asarray(case.weight), jnp.asarray(case.grad_out.reshape(x.shape)),
                None if gr is None else jnp.asarray(gr))
            got = tuple(np.asarray(a) for a in got if a is not None)
            assert_grads(want, got, f"{name} ({mode}, {offset}) steps={steps}")


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_corpus_case_through_rms_norm(backward_corpus, name):
    case = backward_corpus[name]
    if case.spec.n > mosaic_kernel.MAX_N:
        pytest.skip(f"n = {case.spec.n} > MAX_N")
    assert selection.backward_kernel(None, case.spec.n, interpret=False) == "mosaic"
    for (mode, offset), want in case.expected.items():
        got = grads(case.x, case.weight, case.grad_out, case.spec.eps, case.residual, case.grad_new_residual,
                    mode=mode, offset=offset, interpret=False)
        assert_grads(want, got, f"{case.spec.name} ({mode}, {offset})")


@pytest.mark.parametrize("dtype, n", [("bfloat16", 4096), ("float32", 1000), ("float16", 100), ("bfloat16", 8192)])
def test_grad_x_is_batch_invariant(dtype, n):
    """grad_x of every row of a batch of `size` rows equals that row's grad_x in one 4096-row call."""
    key = jax.random.key(n)
    k1, k2, k3 = jax.random.split(key, 3)
    x = (jax.random.normal(k1, (ROWS, n)) * 2.0).astype(JNP[dtype])
    g = jax.random.normal(k2, (ROWS, n)).astype(JNP[dtype])
    w = (1.0 + 0.25 * jax.random.normal(k3, (n,))).astype(JNP[dtype])
    full = _direct(1e-6, "llama", 0.0, False, None)(x, w, g, None)[0]
    for size in SIZES:
        for start in (0, ROWS - size, (ROWS // 3) // size * size):
            part = _direct(1e-6, "llama", 0.0, False, None)(x[start:start + size], w, g[start:start + size], None)[0]
            assert bool(_same(part, full[start:start + size])), f"{dtype} n={n} rows [{start}, {start + size})"


@pytest.mark.parametrize("rows, n, dtype, residual", [(4096, 4096, "bfloat16", None), (1000, 8192, "bfloat16", None),
                                                      (300, 1000, "float32", "float32"), (65, 100, "float16", "float16")])
def test_equals_the_pallas_triton_backward(rows, n, dtype, residual):
    rng = np.random.default_rng(rows + n)
    x, w, g = random_rows(rng, (rows, n), dtype), random_weight(rng, n, dtype), random_rows(rng, (rows, n), dtype)
    r = None if residual is None else random_rows(rng, (rows, n), residual)
    z = jnp.asarray(x if r is None else ref.rms_norm(x, w, 1e-6, r)[1])
    args = (z, jnp.asarray(w), jnp.asarray(g), None)
    outs = {}
    for root in (False, True):
        for k in ("mosaic", "triton"):
            outs[k, root] = jax.jit(functools.partial(
                backward.backward_rows, eps=1e-6, mode="llama", weight_offset=1.0, interpret=False,
                has_residual=r is not None, root=root, kernel=k))(*args)
        for name, a, b in zip(("grad_x", "grad_residual", "grad_weight"), outs["mosaic", root], outs["triton", root]):
            if a is not None:
                assert_bits(np.asarray(b), np.asarray(a), f"{rows}x{n} root={root} {name}: mosaic vs triton")
    want = expected(x, w, g, 1e-6, r, mode="llama", offset=1.0)
    assert_bits(want[-1], np.asarray(outs["mosaic", False][2]), "grad_weight vs reference")


def test_default_backward_is_mosaic_and_triton_by_the_environment(monkeypatch):
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    x, w = jnp.ones((8, 4096), jnp.bfloat16), jnp.ones(4096, jnp.bfloat16)

    def loss(a, b):
        return jnp.sum(bi_jax.rms_norm(a, b).astype(jnp.float32))

    def targets():
        return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()))

    assert not any("triton" in t for t in targets()), targets()
    monkeypatch.setenv(selection.ENV_VAR, "triton")
    assert not any("mosaic" in t for t in targets()), targets()
