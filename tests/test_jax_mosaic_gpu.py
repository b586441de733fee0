"""bi_jax's Mosaic GPU forward (bi_jax/mosaic_kernel.py) through bi_jax.rms_norm's selection, bit for bit.

Skipped, with the reason, without a CUDA GPU, when JAX's default backend is not a GPU, or where
the Mosaic kernel cannot run (a GPU below compute capability 9.0, a jax without its API). Every
numeric assertion is bitwise, through integer views with the first differing index: against the
golden corpus and bridge.reference, against the Pallas-Triton kernel, and between calls that must
agree (a row alone vs in batches, jit, vmap). Also: the selection picks Mosaic here by default and
Pallas-Triton with BI_NORM_PALLAS_BACKEND=triton, and no call shows JAX's Pallas-Triton warning.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
import zlib

# torch and JAX may share the GPU in one pytest process (see tests/testjax_gpu.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402
from jax_backward_helpers import assert_grads  # noqa: E402
from jax_gpu_marks import JAX_GPU_MARKS, jax_gpu  # noqa: E402
from jax_helpers import pair, random_weight, ref, special_rows  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax import mosaic_kernel, selection  # noqa: E402
from bridge import golden  # noqa: E402
from bridge.verify.compare import assert_bitwise_equal  # noqa: E402

_WHY_NOT = (selection.jax_lacks() or selection.gpu_lacks()) if jax_gpu() else None
pytestmark = JAX_GPU_MARKS + [pytest.mark.skipif(_WHY_NOT is not None, reason=f"no Mosaic GPU here: {_WHY_NOT}")]

CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["cases"]]
STATIC = ("eps", "mode", "weight_offset")
MOSAIC = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="mosaic"), static_argnames=STATIC)
TRITON = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="triton"), static_argnames=STATIC)
JNP = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def assert_bits(expected, actual, what: str) -> None:
    assert_bitwise_equal(np.asarray(expected), np.asarray(actual), what)


def _same(a: jax.Array, b: jax.Array) -> jax.Array:
    """On the device: True when a and b have the same bits (same shape and dtype assumed)."""
    view = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(a.dtype).itemsize]
    return jnp.all(lax.bitcast_convert_type(a, view) == lax.bitcast_convert_type(b, view))


def gpu_rows(key: jax.Array, shape, dtype: str) -> jax.Array:
    k1, k2 = jax.random.split(key)
    scale = jnp.exp2(jax.random.uniform(k1, tuple(shape[:-1]) + (1,), minval=-4.0, maxval=4.0))
    return (jax.random.normal(k2, tuple(shape), jnp.float32) * scale).astype(JNP[dtype])


def _targets(fn, *args) -> set:
    """The custom-call targets of fn's lowering: Mosaic GPU's ("mosaic_gpu...") or Pallas-Triton's."""
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", jax.jit(fn).lower(*args).as_text()))


# --------------------------------------------------------------------------------------------
# The selection on this GPU.
# --------------------------------------------------------------------------------------------


def test_mosaic_by_default_and_triton_by_the_environment(monkeypatch):
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    x, w, r = jnp.ones((8, 4096), jnp.bfloat16), jnp.ones(4096, jnp.bfloat16), jnp.ones((8, 4096), jnp.float32)
    assert selection.forward_kernel(None, 4096, interpret=False) == "mosaic"
    plain = _targets(lambda a, b: bi_jax.rms_norm(a, b), x, w)
    assert plain and all("mosaic_gpu" in t for t in plain), plain
    # The gradient's forward and backward are Mosaic's (stages 1 and 2), and so is the FP8 output (stage 3).
    grad = _targets(jax.grad(lambda a, b, c: jnp.sum(bi_jax.rms_norm(a, b, 1e-6, c)[0].astype(jnp.float32)),
                             argnums=(0, 1)), x, w, r)
    assert grad and all("mosaic_gpu" in t for t in grad), grad
    fp8 = _targets(lambda a, b: bi_jax.rms_norm(a, b, out_dtype=jnp.float8_e4m3fn, scale=0.5), x, w)
    assert fp8 and all("mosaic_gpu" in t for t in fp8), fp8
    monkeypatch.setenv(selection.ENV_VAR, "triton")
    plain = _targets(lambda a, b: bi_jax.rms_norm(a, b), x, w)
    assert plain and all("triton" in t for t in plain), plain
    wide = _targets(lambda a, b: bi_jax.rms_norm(a, b, pallas_backend="auto"), jnp.ones((2, 65536)), jnp.ones(65536))
    assert wide and all("triton" in t for t in wide), wide  # past MAX_N: Pallas-Triton (with the one-time warning)


def test_no_pallas_triton_deprecation_warning_from_bi_jax(monkeypatch):
    """Eager calls (which lower inside bi_jax's call) and a user's jit (which lowers after it), fresh shapes."""
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    x, w = jnp.ones((3, 7, 1234), jnp.bfloat16), jnp.ones(1234, jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for backend in ("mosaic", "triton"):
            bi_jax.rms_norm(x, w, pallas_backend=backend).block_until_ready()
            jax.jit(jax.grad(lambda a: jnp.sum(bi_jax.rms_norm(a, w, pallas_backend=backend).astype(jnp.float32))))(
                x).block_until_ready()
        jax.jit(lambda a: bi_jax.rms_norm(a, w, out_dtype=jnp.float8_e4m3fn, scale=2.0))(x).block_until_ready()


# --------------------------------------------------------------------------------------------
# The golden corpus, and random cases against the reference.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case(cases_by_name, name):
    case = cases_by_name[name]
    if case.spec.n > mosaic_kernel.MAX_N:
        pytest.skip(f"n = {case.spec.n} > {mosaic_kernel.MAX_N}: Pallas-Triton's (tests/testjax_gpu.py)")
    x, w = jnp.asarray(case.x), jnp.asarray(case.weight)
    r = None if case.residual is None else jnp.asarray(case.residual)
    for (mode, offset), expected in case.out.items():
        out, new_res = pair(MOSAIC(x, w, case.spec.eps, r, mode=mode, weight_offset=offset), r is not None)
        assert_bits(expected, out, f"{name} ({mode}, offset {offset}) out")
        if r is not None:
            assert_bits(case.new_residual, new_res, f"{name} ({mode}, offset {offset}) new_residual")


MODES = (("llama", 0.0), ("fp32", 1.0), ("fp32", 0.0), ("llama", -0.5))
NS = (1, 2, 3, 7, 31, 100, 127, 129, 1000, 1025, 3000, 4096, 5120, 6000, 8191, 12288, 16384, 20000, 32768)
RANDOM = [(n, dtype, kind, *MODES[i % 4], 1 + (i * 37) % 300)
          for i, (n, dtype, kind) in enumerate((n, d, k) for n in NS for d, k in
                                               (("bfloat16", "none"), ("float16", "same"), ("float32", "float32")))]


@pytest.mark.parametrize("n,dtype,kind,mode,offset,rows", RANDOM)
def test_random_case_against_the_reference(n, dtype, kind, mode, offset, rows):
    """Rows with zeros, infinities, NaNs, huge and tiny values; every n not a multiple of 8 masks vectors."""
    rng = np.random.default_rng(_seed("mosaic-random", n, dtype, kind))
    x, w = special_rows(rng, (rows, n), dtype), random_weight(rng, n, dtype)
    r = None if kind == "none" else special_rows(rng, (rows, n), dtype if kind == "same" else "float32")
    got = pair(MOSAIC(jnp.asarray(x), jnp.asarray(w), 1e-5, None if r is None else jnp.asarray(r), mode=mode,
                      weight_offset=offset), r is not None)
    want = ref(x, w, 1e-5, r, mode, offset)
    assert_bits(want[0], got[0], "out vs reference")
    if r is not None:
        assert_bits(want[1], got[1], "new_residual vs reference")


AGAINST_TRITON = [(4096, 4096, "bfloat16", "none"), (1024, 8192, "float32", "float32"),
                  (333, 20000, "float16", "same"), (7, 32768, "bfloat16", "float32"), (5000, 5120, "bfloat16", "same")]


@pytest.mark.parametrize("rows,n,dtype,kind", AGAINST_TRITON)
def test_mosaic_equals_pallas_triton(rows, n, dtype, kind):
    keys = jax.random.split(jax.random.key(_seed("mosaic-vs-triton", rows, n, dtype, kind)), 3)
    x, w = gpu_rows(keys[0], (rows, n), dtype), gpu_rows(keys[1], (n,), dtype)
    r = None if kind == "none" else gpu_rows(keys[2], (rows, n), dtype if kind == "same" else "float32")
    for mode, offset in MODES[:2]:
        a = pair(MOSAIC(x, w, 1e-6, r, mode=mode, weight_offset=offset), r is not None)
        b = pair(TRITON(x, w, 1e-6, r, mode=mode, weight_offset=offset), r is not None)
        for what, p, q in zip(("out", "new_residual"), a, b):
            if p is not None and not bool(_same(p, q)):
                assert_bits(q, p, f"{mode}/{offset} {what}: Mosaic vs Pallas-Triton")


# --------------------------------------------------------------------------------------------
# Batch invariance, and JAX's transformations.
# --------------------------------------------------------------------------------------------

ROWS = 1024
BATCHES = (1, 2, 3, 7, 33, 128, 255, 1000)
INVARIANCE = [(n, dtype, kind) for n in (128, 4096, 8192) for dtype in ("bfloat16", "float32")
              for kind in ("none", "float32")]


@pytest.mark.parametrize("n,dtype,kind", INVARIANCE, ids=[f"n{n}-{d}-res_{k}" for n, d, k in INVARIANCE])
def test_batch_invariance(n, dtype, kind):
    """Rows x[:B] and x[-B:] of one 1024-row call, alone (B = 1) and in batches of B."""
    keys = jax.random.split(jax.random.key(_seed("mosaic-invariance", n, dtype, kind)), 3)
    x, w = gpu_rows(keys[0], (ROWS, n), dtype), gpu_rows(keys[1], (n,), dtype)
    r = gpu_rows(keys[2], (ROWS, n), "float32") if kind != "none" else None
    full = pair(MOSAIC(x, w, 1e-6, r), r is not None)
    pick = np.array([0, ROWS // 2, ROWS - 1])
    want = ref(np.asarray(x[pick]), np.asarray(w), 1e-6, None if r is None else np.asarray(r[pick]))
    assert_bits(want[0], full[0][pick], "1024-row call vs reference")
    for batch in BATCHES:
        for part in (slice(None, batch), slice(ROWS - batch, None)):
            got = pair(MOSAIC(x[part], w, 1e-6, None if r is None else r[part]), r is not None)
            for what, p, q in zip(("out", "new_residual"), got, full):
                if p is not None and not bool(_same(p, q[part])):
                    assert_bits(q[part], p, f"B={batch} rows {part} {what}")


def test_shapes_jit_and_vmap():
    rng = np.random.default_rng(_seed("mosaic-shapes"))
    x, w = special_rows(rng, (3, 4, 1000), "bfloat16"), random_weight(rng, 1000, "bfloat16")
    r = special_rows(rng, (3, 4, 1000), "float32")
    want = ref(x, w, 1e-6, r)
    jx, jw, jr = jnp.asarray(x), jnp.asarray(w), jnp.asarray(r)
    eager = pair(bi_jax.rms_norm(jx, jw, 1e-6, jr, pallas_backend="mosaic"), True)
    for what, got in (("eager", eager), ("jit", pair(MOSAIC(jx, jw, 1e-6, jr), True)),
                      ("vmap, shared weight", pair(jax.vmap(lambda a, c: MOSAIC(a, jw, 1e-6, c))(jx, jr), True)),
                      ("vmap, batched weight", pair(jax.vmap(lambda a, b, c: MOSAIC(a, b, 1e-6, c))(
                          jx, jnp.stack([jw] * 3), jr), True))):
        assert_bits(want[0], got[0], f"{what}: out")
        assert_bits(want[1], got[1], f"{what}: new_residual")
    assert_bits(ref(x[0, 0], w)[0], MOSAIC(jx[0, 0], jw), "1-D x")
    empty = pair(MOSAIC(jx[:0], jw, 1e-6, jr[:0]), True)
    assert empty[0].shape == (0, 4, 1000) and empty[1].shape == (0, 4, 1000)


@pytest.mark.parametrize("kind", ["none", "same"])
def test_grad_through_the_mosaic_forward(kind):
    """The gradients (Pallas-Triton's backward) with the Mosaic forward equal those with Pallas-Triton's."""
    keys = jax.random.split(jax.random.key(_seed("mosaic-grad", kind)), 4)
    x, w, g = (gpu_rows(k, s, "bfloat16") for k, s in zip(keys, ((64, 4096), (4096,), (64, 4096))))
    r = gpu_rows(keys[3], (64, 4096), "bfloat16") if kind == "same" else None

    def grads(backend):
        def loss(*args):
            out = bi_jax.rms_norm(args[0], args[1], 1e-6, *args[2:], pallas_backend=backend)
            out = out[0] if r is not None else out
            return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

        primals = (x, w) + ((r,) if r is not None else ())
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(primals)))))(*primals)

    assert_grads(tuple(np.asarray(a) for a in grads("triton")), grads("mosaic"), "Mosaic vs Pallas-Triton forward")


def test_donated_and_looped_calls_keep_their_bits():
    """The calls write in place (bi_jax/mosaic_call.py): donated and in a layer loop, they give the
    unrolled calls' bits (tests/test_jax_gpu.py counts the copies)."""
    keys = jax.random.split(jax.random.key(_seed("mosaic-donate")), 3)
    h, r = gpu_rows(keys[0], (64, 4096), "bfloat16"), gpu_rows(keys[1], (64, 4096), "float32")
    ws = jnp.stack([gpu_rows(k, (4096,), "bfloat16") for k in jax.random.split(keys[2], 3)])

    def step(carry, w):
        out, new_r = bi_jax.rms_norm(carry[0], w, 1e-6, carry[1], pallas_backend="mosaic")
        return (out * 2, new_r), None

    expected = (h, r)
    for i in range(3):
        expected = step(expected, ws[i])[0]
    got = jax.jit(lambda c, w: lax.scan(step, c, w)[0], donate_argnums=0)((jnp.copy(h), jnp.copy(r)), ws)
    assert_bits(expected[0], got[0], "scan vs unrolled: h")
    assert_bits(expected[1], got[1], "scan vs unrolled: residual")
