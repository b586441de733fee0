"""bi_jax's FP8 output (contract v1.2) on the CPU: the Pallas kernel in interpret mode, bit for bit.

rnFP8 on the bit pattern against ml_dtypes; the golden corpus's FP8 cases; static and
per-token-group FP8 against bridge.reference on random rows and special values (saturation,
infinities, NaN, zero groups, FP8 subnormals, -0.0), both modes, offsets 0 and 1, no / same /
float32 residual, rows past MAX_WHOLE_ROW; batch invariance of out and the scales (a row alone vs
in batches of 255 and 300); rejected arguments and the missing gradient. jit, vmap, sharding and
the split above MAX_ELEMENTS: test_jax_fp8_transforms_cpu.py.
Every comparison is on integer views, the first difference named (jax_fp8_helpers.py). Inputs
avoid float32-subnormal u, which XLA's CPU client flushes (NUMERICS.md, subnormals).
Shapes are few and small: each distinct shape and static argument is one interpret-mode compile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fp8_helpers import FP8_CASE_NAMES
from jax_fp8_helpers import (COMBOS, E4M3, FP8_JIT, HUGE_WEIGHT_COLUMN, QUANTS, assert_fp8_result, call,
                             check_fp8_corpus_case, expected, fp8_rows, fp8_weight, quant_kwargs)
from jax_helpers import _seed, assert_bits, random_rows, ref, residual_dtype

import bi_jax

# --------------------------------------------------------------------------------------------
# A) rnFP8 on the bit pattern (encode_fp8, clamp_fp8) against ml_dtypes (bridge.numerics.reference_fp8):
#    every FP8 value, every midpoint between two and its float32 neighbours, float32 subnormals,
#    random mantissas at every exponent, NaNs with any payload, +-0, +-inf and beyond +-448.
#    (test_jax_fp8_gpu.py runs it compiled on every float32 up to 448.)
# --------------------------------------------------------------------------------------------

def _rounding_cases() -> np.ndarray:
    rng = np.random.default_rng(_seed("fp8-encode"))
    codes = np.arange(0x7F, dtype=np.uint8).view(np.dtype(jnp.float8_e4m3fn)).astype(np.float64)
    mids = ((codes[1:] + codes[:-1]) / 2).astype(np.float32)
    exps = rng.integers(-149, 9, 200000)
    randoms = np.ldexp(rng.uniform(1, 2, exps.size), exps).astype(np.float32)
    nans = (np.uint32(0x7F800001) + rng.integers(0, 0x7FFFFF, 64).astype(np.uint32)).view(np.float32)
    c = np.concatenate([codes.astype(np.float32), mids, np.nextafter(mids, np.float32(0)),
                        np.nextafter(mids, np.float32(1000)), randoms,
                        np.arange(1, 1 << 12, dtype=np.uint32).view(np.float32), nans,
                        np.array([0.0, np.inf, 448.0001, 464.0, 1e30], np.float32)])
    return np.concatenate([c, -c])


def test_encode_fp8_matches_ml_dtypes():
    from bi_jax.pallas_fp8 import clamp_fp8, encode_fp8
    from bridge.numerics import reference_fp8

    t = _rounding_cases()
    fields = (E4M3.mantissa_bits, E4M3.exponent_bias, E4M3.nan_fp8)
    got = np.asarray(jax.jit(lambda a: encode_fp8(clamp_fp8(a, E4M3.fp8_max), *fields))(jnp.asarray(t)))
    exp = reference_fp8.encode_fp8(reference_fp8.clamp(t, "float8_e4m3fn"), "float8_e4m3fn").view(np.uint8)
    bad = np.flatnonzero(got != exp)
    assert bad.size == 0, (f"{bad.size} of {t.size} codes differ; first {t[bad[0]]!r} "
                           f"(0x{t[bad[0]:bad[0] + 1].view(np.uint32)[0]:08x}): got 0x{got[bad[0]]:02x}, "
                           f"expected 0x{exp[bad[0]]:02x}")


# --------------------------------------------------------------------------------------------
# B) The golden corpus's FP8 cases (bridge/golden/fp8.py), bit for bit: out, scales, new residual.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_fp8_corpus_case(fp8_cases, name):
    check_fp8_corpus_case(FP8_JIT, fp8_cases[name], name)


# --------------------------------------------------------------------------------------------
# C) Against the reference: random rows with special values, every mode, offset and residual kind.
# --------------------------------------------------------------------------------------------

# Static scales: FP8's normal range, its subnormals (t ~ 1e-3) and saturation, 2**-126 (t overflows to inf).
STATIC_SCALES = (np.float32(0.0123), np.float32(150.0), np.float32(2.0**-126))


@pytest.mark.parametrize("dtype,kind,mode,offset,quant", COMBOS)
def test_matches_reference(dtype, kind, mode, offset, quant):
    rng = np.random.default_rng(_seed("fp8-ref", dtype, kind, mode, offset, quant))
    n = 256 if quant != "group64" else 192  # 192: the block pads to 256, a masked group
    x = fp8_rows(rng, (8, n), dtype)
    w = fp8_weight(rng, n, dtype)
    r = None if kind == "none" else fp8_rows(rng, (8, n), residual_dtype(dtype, kind), specials=False)
    scales = STATIC_SCALES if quant == "static" else (None,)
    for scale in scales:
        kwargs = quant_kwargs(quant, scale)
        got = call(FP8_JIT, x, w, r, mode=mode, weight_offset=offset, **kwargs)
        assert_fp8_result(expected(x, w, r, mode=mode, weight_offset=offset, **kwargs), got,
                          f"{dtype} {kind} {mode} {offset} {quant} scale={scale}")


@pytest.mark.parametrize("quant", QUANTS)
def test_special_rows(quant):
    """Whole rows of zeros, -0.0, a NaN, an inf, and a group of zeros beside large values."""
    rng = np.random.default_rng(_seed("fp8-special", quant))
    n = 256
    x = random_rows(rng, (8, n), "bfloat16").astype(np.float32)
    x[0] = 0.0
    x[1] = -0.0
    x[2, 5] = np.nan
    x[3, 7] = np.inf
    x[4, :128] = 0.0  # a zero group (both group sizes) next to a normal one
    x[4, 130] = 3e4
    x[5, :64] = -0.0
    x[6] = np.where(np.arange(n) % 2, 1e-6, -3e4)  # FP8 subnormals and zeros from the small ones
    x[7] = rng.standard_normal(n)
    x[7, HUGE_WEIGHT_COLUMN] = 8.0  # times the 3e38 weight: u = inf
    x = x.astype(np.dtype(jnp.bfloat16))
    w = fp8_weight(rng, n, "bfloat16")
    kwargs = quant_kwargs(quant, np.float32(0.5))
    got = call(FP8_JIT, x, w, None, **kwargs)
    exp = expected(x, w, None, **kwargs)
    assert_fp8_result(exp, got, f"special rows {quant}")
    # The cases are really there: NaN rows, FP8 subnormals, saturation or an inf group.
    codes = np.asarray(exp[0]).view(np.uint8)
    assert (codes[2] == E4M3.nan_fp8).all(), "a NaN row is all canonical NaN"
    assert ((codes[6] & 0x7F) < 8).any() and ((codes[6] & 0x7F) > 0).any(), "FP8 subnormals"
    if quant == "static":
        assert codes[7, HUGE_WEIGHT_COLUMN] == 0x7E, "u = inf saturates"
    else:
        floor = np.float32(np.float32(1e-10) / np.float32(448.0))
        assert (exp[1][2] == floor).all() and (exp[1][0] == floor).all() and (exp[1][4, 0] == floor)
        assert np.isinf(exp[1][7, 0]) and codes[7, HUGE_WEIGHT_COLUMN] == E4M3.nan_fp8, "an inf group"


def test_out_dtype_none_or_x_dtype_keeps_the_v1_bits():
    rng = np.random.default_rng(_seed("fp8-none"))
    x, w = random_rows(rng, (4, 128), "bfloat16"), fp8_weight(rng, 128, "bfloat16")
    plain = bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w))
    assert_bits(ref(x, w)[0], plain, "out_dtype=None")
    assert_bits(plain, bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), out_dtype=jnp.bfloat16), "out_dtype=x's dtype")


@pytest.mark.parametrize("quant,kind", [("static", "float32"), ("group128", "none"), ("group64", "same")])
def test_long_rows(quant, kind):
    """n = 16512 > MAX_WHOLE_ROW: two chunks per row, the groups of each chunk in the second pass."""
    rng = np.random.default_rng(_seed("fp8-long", quant, kind))
    n, dtype = 16512, "bfloat16"
    x = fp8_rows(rng, (2, n), dtype)
    w = fp8_weight(rng, n, dtype)
    r = None if kind == "none" else fp8_rows(rng, (2, n), residual_dtype(dtype, kind), specials=False)
    kwargs = quant_kwargs(quant, np.float32(0.03))
    got = call(FP8_JIT, x, w, r, mode="fp32", **kwargs)
    assert_fp8_result(expected(x, w, r, mode="fp32", **kwargs), got, f"long rows {quant} {kind}")


def test_empty_batch():
    x, w = jnp.zeros((0, 128), jnp.bfloat16), jnp.ones((128,), jnp.bfloat16)
    out = bi_jax.rms_norm(x, w, out_dtype=jnp.float8_e4m3fn, scale=1.0)
    assert out.shape == (0, 128) and out.dtype == jnp.float8_e4m3fn
    out, scales, new_r = bi_jax.rms_norm(x, w, 1e-6, jnp.zeros((0, 128), jnp.float32),
                                         out_dtype=jnp.float8_e4m3fn, group_size=64)
    assert out.shape == (0, 128) and scales.shape == (0, 2) and scales.dtype == jnp.float32
    assert new_r.shape == (0, 128) and new_r.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# D) Batch invariance of out and the scales: a row alone vs in batches of 255 and 300 rows.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant,kind", [("static", "float32"), ("group128", "none"), ("group64", "same")])
def test_batch_invariance(quant, kind):
    rng = np.random.default_rng(_seed("fp8-invariance", quant, kind))
    n, dtype = 128, "bfloat16"
    w = fp8_weight(rng, n, dtype)
    rdt = residual_dtype(dtype, kind)
    row = fp8_rows(rng, (1, n), dtype)
    res_row = None if rdt is None else fp8_rows(rng, (1, n), rdt, specials=False)
    kwargs = quant_kwargs(quant, np.float32(0.02))
    alone = call(FP8_JIT, row, w, res_row, **kwargs)
    assert_fp8_result(expected(row, w, res_row, **kwargs), alone, "alone vs reference")
    for batch in (255, 300):
        xs = fp8_rows(rng, (batch, n), dtype)
        rs = None if rdt is None else fp8_rows(rng, (batch, n), rdt, specials=False)
        for pos in (0, batch // 2, batch - 1):
            xs[pos] = row[0]
            if rs is not None:
                rs[pos] = res_row[0]
        got = call(FP8_JIT, xs, w, rs, **kwargs)
        for pos in (0, batch // 2, batch - 1):
            assert_fp8_result(alone, tuple(g[pos:pos + 1] for g in got), f"row at {pos} of {batch}")


# --------------------------------------------------------------------------------------------
# E) Rejected arguments (naming the argument, before any kernel) and the missing gradient.
# --------------------------------------------------------------------------------------------

def _bad_calls():
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    x, w = jnp.ones((2, 128), f32), jnp.ones((128,), f32)
    base = dict(x=x, weight=w)
    calls = [
        ("out_dtype-int8", dict(out_dtype=jnp.int8, scale=1.0), TypeError, "out_dtype"),
        ("out_dtype-other-D", dict(out_dtype=jnp.float16), TypeError, "out_dtype"),
        ("out_dtype-str", dict(out_dtype="bogus"), TypeError, "out_dtype"),
        ("out_dtype-e5m2", dict(out_dtype=jnp.float8_e5m2, scale=1.0), ValueError, "out_dtype"),
        ("both", dict(out_dtype=f8, scale=1.0, group_size=64), ValueError, "out_dtype"),
        ("neither", dict(out_dtype=f8), ValueError, "out_dtype"),
        ("group-100", dict(out_dtype=f8, group_size=100), ValueError, "group_size"),
        ("group-True", dict(out_dtype=f8, group_size=True), ValueError, "group_size"),
        ("group-not-dividing", dict(x=jnp.ones((2, 192), f32), weight=jnp.ones((192,), f32), out_dtype=f8,
                                    group_size=128), ValueError, "group_size"),
        ("group-without-fp8", dict(group_size=64), ValueError, "group_size"),
        ("scale-without-fp8", dict(scale=1.0), ValueError, "scale"),
        ("scale-shape", dict(out_dtype=f8, scale=jnp.ones((2,), f32)), ValueError, "scale"),
        ("scale-dtype", dict(out_dtype=f8, scale=jnp.ones((), jnp.bfloat16)), TypeError, "scale"),
        ("scale-str", dict(out_dtype=f8, scale="1"), TypeError, "scale"),
        ("scale-bool", dict(out_dtype=f8, scale=True), TypeError, "scale"),
        ("scale-float-underflows", dict(out_dtype=f8, scale=1e-50), ValueError, "scale"),
    ]
    for value in (0.0, -1.0, float("nan"), float("inf")):
        calls.append((f"scale-{value}", dict(out_dtype=f8, scale=value), ValueError, "scale"))
        calls.append((f"scale-array-{value}", dict(out_dtype=f8, scale=jnp.full((1,), value, f32)), ValueError,
                      "scale"))
    return [(name, {**base, **kwargs}, error, arg) for name, kwargs, error, arg in calls]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("kwargs,error,name", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_are_rejected(kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}[:=]"):
        bi_jax.rms_norm(**kwargs)


def test_bad_arguments_are_rejected_while_tracing_under_jit():
    x, w = jnp.ones((2, 128), jnp.float32), jnp.ones((128,), jnp.float32)
    with pytest.raises(ValueError, match="^scale:"):
        jax.jit(lambda a, s: bi_jax.rms_norm(a, w, out_dtype=jnp.float8_e4m3fn, scale=s))(x, jnp.ones((2,)))
    with pytest.raises(ValueError, match="^group_size:"):
        jax.jit(lambda a: bi_jax.rms_norm(a, w, out_dtype=jnp.float8_e4m3fn, group_size=96))(x)


@pytest.mark.parametrize("quant", ["static", "group64"])
def test_no_gradient(quant):
    x, w = jnp.ones((2, 128), jnp.float32), jnp.ones((128,), jnp.float32)
    kwargs = quant_kwargs(quant, 0.5)

    def loss(a):
        result = bi_jax.rms_norm(a, w, **kwargs)
        out = result if quant == "static" else result[0]
        return out.astype(jnp.float32).sum()

    with pytest.raises(TypeError, match="^out_dtype: float8_e4m3fn outputs have no gradient"):
        jax.grad(loss)(x)
