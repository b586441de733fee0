"""bi_jax's gradients on a GPU: the compiled Pallas-Triton backward (pallas_backend="triton"), bit for bit.

Skipped, with the reason, without a CUDA GPU (tests/conftest.py, through torch) or when JAX's
default backend is not a GPU. Every numeric assertion is bitwise: the whole gradient corpus
(subnormals included: only XLA:CPU flushes them), grad_x of every row of batches of 1..4096 rows
against one 4096-row call, grad_weight over 20 runs, compiled vs interpret mode, and a jitted
train step with donated inputs whose HLO copies no array.
"""

from __future__ import annotations

import functools
import os
import zlib

# torch and JAX may share the GPU in one pytest process (see tests/test_jax_gpu.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402
from jax_backward_helpers import (assert_bits, assert_grads, expected, grads, norm_fn, random_rows,  # noqa: E402
                                  random_weight)

import bi_jax  # noqa: E402
from bi_jax.mosaic_kernel import MAX_N  # noqa: E402
from bridge import golden  # noqa: E402
from bridge.bench.timing import array_copies  # noqa: E402

from jax_gpu_marks import JAX_GPU_MARKS  # noqa: E402

pytestmark = JAX_GPU_MARKS

BACKWARD_NAMES = [entry["name"] for entry in golden.load_manifest()["backward_cases"]]
JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROWS = 4096
SIZES = tuple(range(1, 65)) + (127, 128, 129, 255, 256, 1000, 1023, 1024, 4095, 4096)
SIZES_LONG = (1, 2, 3, 5, 8, 16, 17, 64, 129, 1000, 4095, 4096)  # n = 65536: 1 GiB per float32 array
# The Pallas-Triton kernels, named (tests/test_jax_mosaic_backward_gpu.py checks the Mosaic GPU ones).
compiled_grads = functools.partial(grads, interpret=False, pallas_backend="triton")


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _same(a: jax.Array, b: jax.Array) -> jax.Array:
    """On the device: True when a and b have the same bits."""
    uint = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(a.dtype).itemsize]
    return jnp.all(lax.bitcast_convert_type(a, uint) == lax.bitcast_convert_type(b, uint))


def gpu_rows(key: jax.Array, shape, dtype: str) -> jax.Array:
    k1, k2 = jax.random.split(key)
    scale = jnp.exp2(jax.random.uniform(k1, tuple(shape[:-1]) + (1,), minval=-4.0, maxval=4.0))
    return (jax.random.normal(k2, tuple(shape), jnp.float32) * scale).astype(JNP_DTYPES[dtype])


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_corpus_case_compiled(backward_corpus, name):
    case = backward_corpus[name]
    for (mode, offset), want in case.expected.items():
        got = compiled_grads(case.x, case.weight, case.grad_out, case.spec.eps, case.residual, case.grad_new_residual,
                             mode=mode, offset=offset)
        assert_grads(want, got, f"{name} ({mode}, offset {offset})")


def test_signed_zeros_and_a_negative_offset_compiled():
    """dv + 0.0 kept (-0.0 -> +0.0) and masked columns as +0.0 leaves, on the GPU's code path."""
    rng = np.random.default_rng(_seed("gpu-zeros"))
    for n in (100, 16385):
        x = np.abs(random_rows(rng, (3, n), "float32")) + np.float32(0.5)
        w, g = np.ones(n, np.float32), np.full((3, n), -0.0, np.float32)
        r = random_rows(rng, (3, n), "float32")
        assert_grads(expected(x, w, g, offset=-0.5), compiled_grads(x, w, g, offset=-0.5), f"n={n} offset -0.5")
        assert_grads(expected(x, w, g, 1e-6, r), compiled_grads(x, w, g, 1e-6, r), f"n={n} absent g_r")


INVARIANCE = [(n, dtype, kind) for n in (128, 4096, 5120, 8192, 16384, 65536)
              for dtype in ("bfloat16", "float32") for kind in ("none", "float32")]


@pytest.mark.parametrize("n,dtype,kind", INVARIANCE, ids=[f"n{n}-{d}-res_{k}" for n, d, k in INVARIANCE])
def test_grad_x_invariance_1_to_4096(n, dtype, kind):
    """grad_x (and grad_residual) of x[:B] and x[-B:] equal the same rows of one 4096-row call."""
    keys = jax.random.split(jax.random.key(_seed("gpu-grad-invariance", n, dtype, kind)), 5)
    x, g = gpu_rows(keys[0], (ROWS, n), dtype), gpu_rows(keys[1], (ROWS, n), dtype)
    w = (1.0 + 0.25 * jax.random.normal(keys[2], (n,), jnp.float32)).astype(JNP_DTYPES[dtype])
    r = None if kind == "none" else gpu_rows(keys[3], (ROWS, n), "float32")
    gr = None if kind == "none" else gpu_rows(keys[4], (ROWS, n), "float32")
    uses = "none" if r is None else "both"

    def row_grads(x_, g_, r_, gr_):
        primals = (x_, w) if r_ is None else (x_, w, r_)
        out = jax.vjp(norm_fn(1e-6, "llama", 0.0, uses, interpret=False, pallas_backend="triton"), *primals)[1](g_ if r_ is None else (g_, gr_))
        return (out[0],) if r_ is None else (out[0], out[2])

    full = jax.jit(row_grads)(x, g, r, gr)
    pick = np.array([0, 1, ROWS // 2, ROWS - 1])
    rows = [None if a is None else np.asarray(a[pick]) for a in (x, g, r, gr)]
    want = expected(rows[0], np.asarray(w), rows[1], 1e-6, rows[2], rows[3])
    for e, a in zip(want[:-1], full):
        assert_bits(e, a[pick], "4096-row call vs reference on 4 rows")

    for batch in SIZES_LONG if n >= 65536 else SIZES:
        @jax.jit
        def check(x, g, r, gr, full, batch=batch):
            ok = []
            for part in (slice(None, batch), slice(ROWS - batch, None)):
                got = row_grads(x[part], g[part], None if r is None else r[part], None if gr is None else gr[part])
                ok += [_same(a, b[part]) for a, b in zip(got, full)]
            return jnp.stack(ok)

        ok = np.asarray(check(x, g, r, gr, full))
        assert ok.all(), f"B={batch}: grad_x / grad_residual of rows [:B] and [-B:] differ from the full call ({ok})"


GRAD_WEIGHT_SHAPES = [(4096, 4096, "bfloat16", "float32"), (1000, 8192, "float32", "none"),
                      (64, 65536, "bfloat16", "none"), (37, 5120, "float16", "float16")]


@pytest.mark.parametrize("rows,n,dtype,kind", GRAD_WEIGHT_SHAPES)
def test_grad_weight_is_identical_over_20_runs(rows, n, dtype, kind):
    keys = jax.random.split(jax.random.key(_seed("gpu-gw", rows, n, dtype, kind)), 4)
    x, g = gpu_rows(keys[0], (rows, n), dtype), gpu_rows(keys[1], (rows, n), dtype)
    w = (1.0 + 0.25 * jax.random.normal(keys[2], (n,), jnp.float32)).astype(JNP_DTYPES[dtype])
    r = None if kind == "none" else gpu_rows(keys[3], (rows, n), dtype if kind != "float32" else "float32")
    first = compiled_grads(x, w, g, 1e-6, r)
    same = [bool(_same(first[-1], compiled_grads(x, w, g, 1e-6, r)[-1])) for _ in range(19)]
    assert all(same), f"grad_weight differed in runs {[i + 2 for i, s in enumerate(same) if not s]}"
    if rows * n <= 2**23:  # the reference's time stays in seconds
        want = expected(*(None if a is None else np.asarray(a) for a in (x, w, g)), 1e-6,
                        None if r is None else np.asarray(r))
        assert_bits(want[-1], first[-1], "grad_weight vs reference")


AGREE = [("bfloat16", "float32", "llama", 0.0, 4096, 37), ("float16", "same", "fp32", 1.0, 1000, 300),
         ("float32", "none", "fp32", 0.0, 5120, 5), ("bfloat16", "same", "llama", 1.0, 20000, 3)]


@pytest.mark.parametrize("dtype,kind,mode,offset,n,rows", AGREE)
def test_compiled_matches_interpret(dtype, kind, mode, offset, n, rows):
    rng = np.random.default_rng(_seed("gpu-agree", dtype, kind, mode, offset, n))
    x, g, w = random_rows(rng, (rows, n), dtype), random_rows(rng, (rows, n), dtype), random_weight(rng, n, dtype)
    rdt = None if kind == "none" else (dtype if kind == "same" else "float32")
    r = None if rdt is None else random_rows(rng, (rows, n), rdt)
    gr = None if rdt is None else random_rows(rng, (rows, n), rdt)
    compiled = compiled_grads(x, w, g, 1e-6, r, gr, mode=mode, offset=offset)
    with jax.default_device(jax.devices("cpu")[0]):
        interpreted = grads(x, w, g, 1e-6, r, gr, mode=mode, offset=offset, interpret=True)
    assert_grads(tuple(np.asarray(a) for a in interpreted), compiled, "compiled vs interpret")
    assert_grads(expected(x, w, g, 1e-6, r, gr, mode=mode, offset=offset), compiled, "compiled vs reference")


@pytest.mark.parametrize("n,backend", [(n, b) for n in (4096, 65536) for b in ("triton", "mosaic")
                                       if b == "triton" or n <= MAX_N])  # Mosaic's widest row
def test_train_step_copies_no_array(n, backend):
    """Forward and backward in one jitted step with the weight donated: out is written over x, the new
    residual over the residual, grad_x over the gradient of out, grad_residual over that of the new
    residual. Each of those is an intermediate, as inside a model: the kernels write over their
    operands, so an operand that is a live step input (not donated, or a donation JAX cannot pair
    with an output) would be copied first. Either kernel body."""
    keys = jax.random.split(jax.random.key(_seed("gpu-step", n)), 5)
    inp, r_in = gpu_rows(keys[0], (64, n), "float32"), gpu_rows(keys[1], (64, n), "float32")
    w = (1.0 + 0.25 * jax.random.normal(keys[2], (n,), jnp.float32)).astype(jnp.bfloat16)
    g_out, g_res = gpu_rows(keys[3], (64, n), "float32"), gpu_rows(keys[4], (64, n), "float32")

    def loss(w_, inp_, r_, g_out_, g_res_):
        # x and the residual stand for the layer above's outputs.
        out, res = bi_jax.rms_norm((inp_ * 2).astype(jnp.bfloat16), w_, 1e-6, r_ * 2, interpret=False,
                                   pallas_backend=backend)
        return jnp.sum(out.astype(jnp.float32) * g_out_) + jnp.sum(res * g_res_ * 0.5)

    def step(w_, inp_, r_, g_out_, g_res_):
        value, grads_ = jax.value_and_grad(loss, argnums=(0, 1, 2))(w_, inp_, r_, g_out_, g_res_)
        return value, (w_.astype(jnp.float32) - 0.01 * grads_[0].astype(jnp.float32)).astype(w_.dtype), grads_[1:]

    donating = jax.jit(step, donate_argnums=0)
    copies = array_copies(donating.lower(w, inp, r_in, g_out, g_res).compile().as_text())
    assert not copies, copies
    want = jax.jit(step)(w, inp, r_in, g_out, g_res)
    got = donating(jnp.copy(w), inp, r_in, g_out, g_res)
    for a, b, name in zip(jax.tree.leaves(want), jax.tree.leaves(got), ("loss", "weight", "grad_inp", "grad_r")):
        assert_bits(a, b, f"donated vs not: {name}")


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_layer_loop_backward_copies_no_array(backend):
    """jax.grad through lax.scan over layers: each layer's grad_x and grad_residual are written over
    the loop's carried gradients, in place (either kernel body, as above)."""
    n, layers = 4096, 3
    keys = jax.random.split(jax.random.key(_seed("gpu-scan-grad")), 4)
    h, r = gpu_rows(keys[0], (64, n), "float32"), gpu_rows(keys[1], (64, n), "float32")
    g = gpu_rows(keys[2], (64, n), "float32")
    ws = (1.0 + 0.25 * jax.random.normal(keys[3], (layers, n), jnp.float32)).astype(jnp.bfloat16)

    def layer(carry, w):
        return bi_jax.rms_norm(carry[0], w, 1e-6, carry[1], interpret=False, pallas_backend=backend), None

    def loss(h_, r_, ws_, g_, unrolled):
        carry = ((h_ * 2).astype(jnp.bfloat16), r_ * 2)  # the embedding's outputs, say
        if unrolled:
            for i in range(layers):
                carry = layer(carry, ws_[i])[0]
        else:
            carry = lax.scan(layer, carry, ws_)[0]
        return jnp.sum(carry[0].astype(jnp.float32) * g_)

    f = jax.jit(jax.grad(functools.partial(loss, unrolled=False), argnums=(0, 1, 2)))
    copies = array_copies(f.lower(h, r, ws, g).compile().as_text())
    assert not copies, copies
    want = jax.jit(jax.grad(functools.partial(loss, unrolled=True), argnums=(0, 1, 2)))(h, r, ws, g)
    for a, b, name in zip(want, f(h, r, ws, g), ("grad_h", "grad_residual", "grad_weights")):
        assert_bits(a, b, f"scan vs unrolled: {name}")
