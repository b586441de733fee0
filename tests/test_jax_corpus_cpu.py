"""bi_jax on the CPU: the Pallas kernel in interpret mode (XLA's CPU backend), bit for bit.

The golden corpus, no FMA contraction, edge shapes, rejected arguments, a property against
bridge.reference, and the eager path's compile cache. Every numeric assertion is bitwise (integer
views). jax.jit, vmap, batch invariance, sharding and donation: test_jax_transforms_cpu.py; the
flax.nnx module: test_jax_flax_cpu.py; shared helpers: jax_helpers.py.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax_helpers import (DTYPES, JIT, N, _seed, assert_bits, assert_pair_bits, pair, random_rows, random_weight, ref,
                         residual_dtype, special_rows)

import bi_jax
from bridge import golden

CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["cases"]]


# --------------------------------------------------------------------------------------------
# A) The golden corpus, bit for bit, through the public function (interpret=None: interpret on CPU).
# --------------------------------------------------------------------------------------------


def test_interpret_is_the_default_on_cpu():
    assert jax.default_backend() == "cpu"
    assert bi_jax.ops.default_interpret() is True


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case(cases_by_name, name):
    case = cases_by_name[name]
    x, w = jnp.asarray(case.x), jnp.asarray(case.weight)
    r = None if case.residual is None else jnp.asarray(case.residual)
    for (mode, offset), expected in case.out.items():
        out, new_res = pair(bi_jax.rms_norm(x, w, case.spec.eps, r, mode=mode, weight_offset=offset), r is not None)
        what = f"{name} ({mode}, offset {offset})"
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_bits(expected, out, f"{what} out")
        if r is None:
            assert new_res is None
        else:
            assert new_res.dtype == r.dtype
            assert_bits(case.new_residual, new_res, f"{what} new_residual")
    # The kernel writes an output into the residual's buffer only when it is donated.
    assert_bits(case.x, x, f"{name}: x was modified")
    if r is not None:
        assert_bits(case.residual, r, f"{name}: residual was modified")


# --------------------------------------------------------------------------------------------
# B) No FMA contraction in interpret mode: short float32 rows whose squares are inexact.
# --------------------------------------------------------------------------------------------


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c): the float64 product of two float32 values is exact, then one rounding."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_fma_contraction_in_interpret_mode(n):
    rows, eps = 200, 1e-6
    rng = np.random.default_rng(_seed("fma", n))
    # Full-mantissa float32 values whose squares are inexact, scaled so that v*v, eps and the
    # other squares are of similar size (every place where mul+add could fuse changes bits).
    scale = np.exp2(rng.uniform(-12, 2, (rows, 1)))
    x = (rng.uniform(0.5, 1.0, (rows, n)) * rng.choice([-1.0, 1.0], (rows, n)) * scale).astype(np.float32)
    r = (rng.uniform(0.5, 1.0, (rows, n)) * scale).astype(np.float32)
    w = random_weight(rng, n, "float32")

    # The data can tell a fused from an unfused computation: q0 + q1 vs fma(v0, v0, q1) (n >= 2),
    # or q0 + eps vs fma(v0, v0, eps) (n == 1), differ for many rows.
    v = x.astype(np.float32)
    q = v * v
    if n == 1:
        plain, fused = q[:, 0] + np.float32(eps), _fma(v[:, 0], v[:, 0], np.full(rows, eps, np.float32))
    else:
        plain, fused = q[:, 0] + q[:, 1], _fma(v[:, 0], v[:, 0], q[:, 1])
    assert np.count_nonzero(plain != fused) > rows // 10

    for res, mode, offset in ((None, "llama", 0.0), (r, "fp32", 1.0)):
        expected = ref(x, w, eps, res, mode, offset)
        got = pair(bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), eps, None if res is None else jnp.asarray(res),
                                   mode=mode, weight_offset=offset), res is not None)
        assert_pair_bits(expected, got, f"n={n} residual={res is not None}")


# --------------------------------------------------------------------------------------------
# H) Edge shapes: empty batches, n = 1.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, N), (2, 0, N)])
@pytest.mark.parametrize("kind", ["none", "float32"])
def test_empty_batch(shape, kind):
    x = jnp.zeros(shape, jnp.bfloat16)
    w = jnp.ones((N,), jnp.bfloat16)
    r = None if kind == "none" else jnp.zeros(shape, jnp.float32)
    for call in (bi_jax.rms_norm, JIT):
        out, new_res = pair(call(x, w, 1e-6, r), r is not None)
        assert out.shape == shape and out.dtype == jnp.bfloat16
        if r is not None:
            assert new_res.shape == shape and new_res.dtype == jnp.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_equals_one(dtype):
    rng = np.random.default_rng(_seed("n1", dtype))
    x = random_rows(rng, (7, 1), dtype)
    x[0, 0], x[1, 0] = 0.0, -0.0
    w = random_weight(rng, 1, dtype)
    r = random_rows(rng, (7, 1), "float32")
    for mode in ("llama", "fp32"):
        got = pair(JIT(jnp.asarray(x), jnp.asarray(w), 1e-6, jnp.asarray(r), mode=mode), True)
        assert_pair_bits(ref(x, w, 1e-6, r, mode), got, f"n=1 {mode}")
    assert_bits(ref(x, w, 1e-6)[0], JIT(jnp.asarray(x), jnp.asarray(w), 1e-6), "n=1 no residual")


# --------------------------------------------------------------------------------------------
# I) Arguments outside the contract are rejected at trace time, naming the argument.
# --------------------------------------------------------------------------------------------


def _bad_calls():
    f32, bf16 = jnp.float32, jnp.bfloat16
    x = jnp.ones((2, 8), f32)
    w = jnp.ones((8,), f32)
    xb, wb = x.astype(bf16), w.astype(bf16)
    calls = [
        ("weight-shape", dict(x=x, weight=jnp.ones((9,), f32)), ValueError, "weight"),
        ("weight-2d", dict(x=x, weight=jnp.ones((1, 8), f32)), ValueError, "weight"),
        ("residual-shape", dict(x=x, weight=w, residual=jnp.ones((3, 8), f32)), ValueError, "residual"),
        ("weight-dtype", dict(x=x, weight=wb), TypeError, "weight"),
        ("residual-float16-with-bfloat16", dict(x=xb, weight=wb, residual=jnp.ones((2, 8), jnp.float16)),
         TypeError, "residual"),
        ("x-int32", dict(x=jnp.ones((2, 8), jnp.int32), weight=jnp.ones((8,), jnp.int32)), TypeError, "x"),
        ("x-n0", dict(x=jnp.ones((2, 0), f32), weight=jnp.ones((0,), f32)), ValueError, "x"),
        ("x-0d", dict(x=jnp.ones((), f32), weight=jnp.ones((1,), f32)), ValueError, "x"),
        ("mode", dict(x=x, weight=w, mode="bogus"), ValueError, "mode"),
        ("weight_offset-nan", dict(x=x, weight=w, weight_offset=float("nan")), ValueError, "weight_offset"),
        ("weight_offset-inf", dict(x=x, weight=w, weight_offset=1e39), ValueError, "weight_offset"),
        ("weight_offset-str", dict(x=x, weight=w, weight_offset="1"), TypeError, "weight_offset"),
        ("eps-array", dict(x=x, weight=w, eps=jnp.float32(1e-6)), TypeError, "eps"),
        ("x-list", dict(x=[[1.0] * 8, [2.0] * 8], weight=w), TypeError, "x"),
        ("weight-list", dict(x=x, weight=[1.0] * 8), TypeError, "weight"),
    ]
    for eps in (0.0, -1.0, float("nan"), float("inf"), 1e-50):
        calls.append((f"eps-{eps}", dict(x=x, weight=w, eps=eps), ValueError, "eps"))
    return calls


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("kwargs,error,name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_rejected(kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}:"):
        bi_jax.rms_norm(**kwargs)


@pytest.mark.parametrize("kwargs,error,name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_rejected_while_tracing_under_jit(kwargs, error, name):
    arrays = {k: v for k, v in kwargs.items() if k in ("x", "weight", "residual")}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    f = jax.jit(lambda a: bi_jax.rms_norm(**a, **static))
    with pytest.raises(error, match=rf"^{name}:"):
        f(arrays)


# --------------------------------------------------------------------------------------------
# K) A property: any n, rows, dtype, mode, offset and residual kind equals the reference.
# --------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 300),
    rows=st.integers(0, 9),
    kind=st.sampled_from(["none", "same", "float32"]),
    mode=st.sampled_from(["llama", "fp32"]),
    weight_offset=st.sampled_from([0.0, 1.0, -0.5]),
    eps=st.sampled_from([1e-6, 1e-5, 0.25, 1e-30]),
    specials=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(dtype, n, rows, kind, mode, weight_offset, eps, specials, seed):
    rng = np.random.default_rng(seed)
    make = special_rows if specials else random_rows
    x = make(rng, (rows, n), dtype)
    w = random_weight(rng, n, dtype)
    r = None if kind == "none" else make(rng, (rows, n), residual_dtype(dtype, kind))
    got = pair(bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), eps, None if r is None else jnp.asarray(r),
                               mode=mode, weight_offset=weight_offset), r is not None)
    assert got[0].shape == x.shape
    assert_pair_bits(ref(x, w, eps, r, mode, weight_offset), got, "property vs reference")


# --------------------------------------------------------------------------------------------
# L) Performance contract of the eager path.
# --------------------------------------------------------------------------------------------


def test_eager_call_reuses_its_compiled_kernel(caplog):
    """A second eager call with the same shapes and arguments must not compile again."""
    x, w = jnp.ones((4, N), jnp.float32), jnp.ones((N,), jnp.float32)
    jax.block_until_ready(bi_jax.rms_norm(x, w, 1e-6))  # warm: every compile happens here
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        jax.block_until_ready(bi_jax.rms_norm(x, w, 1e-6))
    compiles = [r.getMessage().split(" with ")[0] for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == [], f"the second eager call compiled again: {compiles}"
