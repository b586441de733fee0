"""The reference's FP8 output (contract v1.2, NUMERICS.md Q1-Q4) against independent implementations.

rnFP8 (bridge.reference_fp8.encode_fp8, through ml_dtypes) against rounding on the integers of the
float32 bit pattern and against the nearest FP8 value in float64 (tests/fp8_helpers.py); the static
and per-token-group steps against float64 (float32 division and multiplication are the float64
ones rounded once more: 53 >= 2 * 24 + 2 bits, so no double-rounding error); the special values of
NUMERICS.md's FP8 table; batch invariance of out and the scales; and check_fp8_args's errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge import golden, reference
from bridge.contract import FP8_FORMATS, GROUP_AMAX_FLOOR, check_fp8_args
from bridge.reference_fp8 import clamp, encode_fp8, quantize_groups, quantize_static
from fp8_helpers import (F8, FLOOR_SCALE, MAX_CODE, NAN, POSITIVE, captured_u, decode, fp8_bits, half_ulp,
                         nearest_fp8_bits, rn_fp8_bits)
from reference_helpers import MODES_OFFSETS, rounded

FP8 = "float8_e4m3fn"
M = FP8_FORMATS[FP8].max
F32_MAX_BITS = 0x43E00000  # 448.0


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def _both_signs(c: np.ndarray) -> np.ndarray:
    return np.concatenate([c, -c])


# --- Q4: rnFP8 ---------------------------------------------------------------------------------


def _near_every_midpoint() -> np.ndarray:
    """Every non-negative finite FP8 value and every midpoint between neighbours, each with its
    float32 neighbours up to 4 ulps either side, kept to [0, 448]; both signs."""
    mids = (POSITIVE[:-1] + POSITIVE[1:]) / 2
    centres = np.concatenate([POSITIVE, mids]).astype(np.float32)
    assert np.all(centres.astype(np.float64) == np.concatenate([POSITIVE, mids]))  # all exact in float32
    b = centres.view(np.uint32).astype(np.int64)
    near = (b[:, None] + np.arange(-4, 5)[None, :]).ravel()
    near = near[(near >= 0) & (near <= F32_MAX_BITS)]
    return _both_signs(_f32(near))


def test_rnfp8_at_every_midpoint_matches_integer_and_float64_rounding() -> None:
    c = _near_every_midpoint()
    assert c.size > 2000
    got = fp8_bits(encode_fp8(c, FP8))
    np.testing.assert_array_equal(got, rn_fp8_bits(c))
    np.testing.assert_array_equal(got, nearest_fp8_bits(c))
    # Exact midpoints go to the even code; one float32 ulp off, to the nearer side.
    mids = ((POSITIVE[:-1] + POSITIVE[1:]) / 2).astype(np.float32)
    lower = np.arange(MAX_CODE, dtype=np.uint8)
    tie = fp8_bits(encode_fp8(mids, FP8))
    np.testing.assert_array_equal(tie, np.where(lower % 2 == 0, lower, lower + 1))
    np.testing.assert_array_equal(fp8_bits(encode_fp8(np.nextafter(mids, np.float32(0)), FP8)), lower)
    np.testing.assert_array_equal(fp8_bits(encode_fp8(np.nextafter(mids, np.float32(M)), FP8)), lower + 1)
    np.testing.assert_array_equal(fp8_bits(encode_fp8(-mids, FP8)), tie | 0x80)


def test_rnfp8_on_a_strided_sweep_of_bit_patterns() -> None:
    """Every 331st float32 bit pattern in [0, 448] (all exponents, a spread of low bits), both signs."""
    c = _f32(np.arange(0, F32_MAX_BITS + 1, 331, dtype=np.uint32))
    got = fp8_bits(encode_fp8(c, FP8))
    np.testing.assert_array_equal(got, rn_fp8_bits(c))
    np.testing.assert_array_equal(got[::97], nearest_fp8_bits(c[::97]))
    neg = -c[::7]
    np.testing.assert_array_equal(fp8_bits(encode_fp8(neg, FP8)), rn_fp8_bits(neg))


def test_rnfp8_is_not_float16_double_rounding() -> None:
    """Rounding through float16 first (as some conversions do) changes ties: not the contract."""
    c = _near_every_midpoint()
    through_f16 = fp8_bits(c.astype(np.float16).astype(np.float32).astype(F8))
    differs = through_f16 != fp8_bits(encode_fp8(c, FP8))
    assert differs.any()  # the test set can tell the two apart
    np.testing.assert_array_equal(fp8_bits(encode_fp8(c, FP8)), rn_fp8_bits(c))


def test_rnfp8_values_and_nan() -> None:
    c = np.array([0.0, -0.0, 448.0, -448.0, 2.0**-9, -(2.0**-9), 2.0**-10, 2.0**-10 * 1.001, 2.0**-6,
                  2.0**-6 - 2.0**-10, 1.0, 240.0, 3.0 * 2.0**-8, 2.0**-140, -(2.0**-149)], np.float32)
    want = [0x00, 0x80, 0x7E, 0xFE, 0x01, 0x81, 0x00, 0x01, 0x08, 0x08, 0x38, 0x77, 0x06, 0x00, 0x80]
    np.testing.assert_array_equal(fp8_bits(encode_fp8(c, FP8)), np.array(want, np.uint8))
    # Every NaN, whatever its sign and payload, is the canonical 0x7F.
    nans = _f32([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF, 0xFF812345])
    assert np.isnan(nans).all()
    np.testing.assert_array_equal(fp8_bits(encode_fp8(nans, FP8)), np.full(nans.size, NAN, np.uint8))


def test_clamp_then_rnfp8_on_arbitrary_bit_patterns() -> None:
    """Q3 + Q4 on random float32 patterns: infinities, NaN payloads, subnormals, both signs."""
    rng = np.random.default_rng(8)
    t = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    t = np.concatenate([t, np.array([np.inf, -np.inf, 448.0, 448.00003, 464.0, -1e30, -0.0], np.float32)])
    with np.errstate(invalid="ignore"):
        c = clamp(t, FP8)
    assert c.dtype == np.float32
    nan = np.isnan(t)
    np.testing.assert_array_equal(np.isnan(c), nan)  # NaN stays NaN (no fminf turning it into 448)
    finite = ~nan
    np.testing.assert_array_equal(c[finite], np.clip(t[finite], -M, M))
    np.testing.assert_array_equal(np.signbit(c[finite]), np.signbit(t[finite]))  # -0.0 stays -0.0
    q = fp8_bits(encode_fp8(c, FP8))
    np.testing.assert_array_equal(q, rn_fp8_bits(c))
    assert np.all(q[nan] == NAN) and nan.sum() > 1000
    big = finite & (np.abs(t) >= M)
    assert np.all(q[big] == np.where(t[big] > 0, 0x7E, 0xFE)) and big.sum() > 1000


# --- Q2 static and Q2 per-token-group against float64 ------------------------------------------


def _u_values(rng: np.random.Generator, shape) -> np.ndarray:
    """float32 values over many magnitudes, signed zeros, a few infinities and NaNs."""
    u = rng.choice([-1.0, 1.0], shape) * np.exp2(rng.uniform(-40, 20, shape))
    flat = u.reshape(-1)
    flat[rng.integers(0, flat.size, flat.size // 50)] = 0.0
    flat[rng.integers(0, flat.size, flat.size // 50)] = -0.0
    return u.astype(np.float32)


SCALES = (1.0, 0.5, 3.7, 0.0123, 1 / 448, 1e-4, 64.0, 300.0, 2.0**-20, 3e38, 1e-38)


@pytest.mark.parametrize("scale", SCALES)
def test_static_matches_float64(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 1e6) % 2**32)
    u = _u_values(rng, (64, 96))
    u.reshape(-1)[:3] = [np.inf, -np.inf, np.nan]
    s = np.array(scale, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # rms_norm calls it inside such a block
        q = quantize_static(u, s, FP8)
        q1 = quantize_static(u, s.reshape(1), FP8)
    assert q.dtype == F8 and q.shape == u.shape
    with np.errstate(over="ignore", invalid="ignore"):
        sinv = np.float32(1.0 / np.float64(s))  # rn(1 / scale): correctly rounded via float64
        t = (u.astype(np.float64) * np.float64(sinv)).astype(np.float32)  # rn(u * sinv), the product exact
    saturated = np.abs(t) > M
    np.testing.assert_array_equal(fp8_bits(q), nearest_fp8_bits(np.where(saturated, np.sign(t) * M, t)))
    # Within half an FP8 quantum of t unless saturated (then exactly +-448).
    ok = ~saturated & ~np.isnan(t)
    assert np.all(np.abs(decode(q)[ok] - t[ok].astype(np.float64)) <= half_ulp(t[ok]))
    assert np.all(decode(q)[saturated] == np.sign(t[saturated]) * M)
    assert np.all(fp8_bits(q)[np.isnan(u)] == NAN)
    # A 0-d or a 1-element scale: the same bits.
    np.testing.assert_array_equal(fp8_bits(q1), fp8_bits(q))


def test_static_multiplies_by_the_rounded_reciprocal() -> None:
    """rn(u * rn(1/scale)), not rn(u / scale): inputs where the two differ follow the former."""
    s = np.float32(0.0123)
    # u whose quotient lands on and next to FP8 midpoints, where one float32 ulp of t matters.
    mids = (POSITIVE[:-1] + POSITIVE[1:]) / 2
    near = (mids * np.float64(s)).astype(np.float32).view(np.uint32).astype(np.int64)
    u = _both_signs(_f32((near[:, None] + np.arange(-3, 4)[None, :]).ravel()))
    by_reciprocal = fp8_bits(encode_fp8(clamp(u * (np.float32(1) / s), FP8), FP8))
    by_division = fp8_bits(encode_fp8(clamp(u / s, FP8), FP8))
    assert (by_reciprocal != by_division).sum() > 10
    np.testing.assert_array_equal(fp8_bits(quantize_static(u, s, FP8)), by_reciprocal)


@pytest.mark.parametrize("group_size", [64, 128])
def test_groups_match_float64(group_size: int) -> None:
    rng = np.random.default_rng(group_size)
    u = _u_values(rng, (3, 5, 4 * group_size))
    g = u.reshape(3, 5, 4, group_size)
    g[0, 0, 1] = 0.0  # an all-zero group
    g[0, 1, 2] = -0.0  # an all -0.0 group
    g[0, 2, 0, 7] = np.nan  # a NaN the scale ignores
    g[0, 3, 3, :] = np.nan  # an all-NaN group (scale from the floor)
    g[1, 0, 0, 5] = np.inf  # an inf: s = inf
    g[1, 1, 1] = np.float32(2.0**-130)  # subnormal amax, below the floor
    with np.errstate(invalid="ignore"):  # inf / inf; rms_norm calls it inside such a block
        q, s = quantize_groups(u, group_size, FP8)
    assert q.dtype == F8 and q.shape == u.shape and s.dtype == np.float32 and s.shape == (3, 5, 4)
    u64 = g.astype(np.float64)
    amax = np.where(np.isnan(u64), 0.0, np.abs(u64)).max(axis=-1)
    with np.errstate(invalid="ignore"):
        want_s = (np.maximum(amax, np.float64(np.float32(GROUP_AMAX_FLOOR))) / M).astype(np.float32)
        t = (u64 / want_s.astype(np.float64)[..., None]).astype(np.float32)
    np.testing.assert_array_equal(s.view(np.uint32), want_s.view(np.uint32))
    c = np.where(np.isnan(t), t, np.clip(t, -M, M))
    np.testing.assert_array_equal(fp8_bits(q).reshape(g.shape), nearest_fp8_bits(c))
    ok = ~np.isnan(t) & (np.abs(t) <= M)
    assert np.all(np.abs(decode(q).reshape(g.shape)[ok] - t[ok]) <= half_ulp(t[ok]))
    for where in [(0, 0, 1), (0, 1, 2), (0, 3, 3), (1, 1, 1)]:
        assert s[where] == FLOOR_SCALE, where
    np.testing.assert_array_equal(fp8_bits(q).reshape(g.shape)[0, 0, 1], np.zeros(group_size, np.uint8))
    np.testing.assert_array_equal(fp8_bits(q).reshape(g.shape)[0, 1, 2], np.full(group_size, 0x80, np.uint8))
    np.testing.assert_array_equal(fp8_bits(q).reshape(g.shape)[0, 3, 3], np.full(group_size, NAN, np.uint8))
    assert np.isinf(s[1, 0, 0]) and fp8_bits(q).reshape(g.shape)[1, 0, 0, 5] == NAN
    others = np.delete(fp8_bits(q).reshape(g.shape)[1, 0, 0], 5)
    assert np.all((others == 0) | (others == 0x80))  # finite / inf: signed zeros
    assert fp8_bits(q).reshape(g.shape)[0, 2, 0, 7] == NAN and np.isfinite(s[0, 2, 0])


def test_group_clamp_matters_when_the_scale_rounds_down() -> None:
    """s = rn(amax / 448) below amax / 448 makes rn(amax / s) > 448: the clamp takes it to 448."""
    rng = np.random.default_rng(11)
    u = (rng.standard_normal((400, 64)) * 3).astype(np.float32)
    q, s = quantize_groups(u, 64, FP8)
    amax = np.abs(u).max(axis=-1)
    over = (amax / s[:, 0]) > M  # float32 division, as the reference does
    assert over.sum() > 20
    at = np.abs(u) == amax[:, None]
    assert np.all(np.isin(fp8_bits(q)[at & over[:, None]], [0x7E, 0xFE]))
    assert np.all(np.abs(decode(q)) <= M)


# --- rms_norm(out_dtype="float8_e4m3fn"): Q1 and the whole path ---------------------------------


def _inputs(rng: np.random.Generator, dtype: str, residual: str, rows: int, n: int):
    x = rounded(rng.standard_normal((rows, n)) * np.exp2(rng.uniform(-8, 8, (rows, 1))), dtype)
    w = rounded(1 + 0.25 * rng.standard_normal(n), dtype)
    r_dtype = dtype if residual == "same" else "float32"
    r = None if residual == "none" else rounded(rng.standard_normal((rows, n)), r_dtype)
    return x, w, r


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("residual", ["none", "same", "float32"])
def test_rms_norm_fp8_is_q2_to_q4_of_the_forwards_u(dtype: str, residual: str) -> None:
    """u (captured) rounds to D as the forward's out; out and scales are the quantization of u;
    the new residual is the forward's."""
    rng = np.random.default_rng(len(dtype) * 7 + len(residual))
    x, w, r = _inputs(rng, dtype, residual, 7, 256)
    for mode, offset in MODES_OFFSETS:
        plain = reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset)
        plain_out = plain if r is None else plain[0]
        for quant in ({"scale": np.array(0.01, np.float32)}, {"group_size": 64}, {"group_size": 128}):
            with captured_u() as seen:
                got = reference.rms_norm(x, w, 1e-6, r, mode=mode, weight_offset=offset, out_dtype=FP8, **quant)
            (u,) = seen
            assert u.dtype == np.float32 and u.shape == x.shape
            np.testing.assert_array_equal(reference.bits(reference.encode(u, dtype)), reference.bits(plain_out))
            if "scale" in quant:
                out, rest = (got, ()) if r is None else (got[0], got[1:])
                np.testing.assert_array_equal(fp8_bits(out), fp8_bits(quantize_static(u, quant["scale"], FP8)))
            else:
                out, scales, rest = got[0], got[1], got[2:]
                want_q, want_s = quantize_groups(u, quant["group_size"], FP8)
                np.testing.assert_array_equal(fp8_bits(out), fp8_bits(want_q))
                np.testing.assert_array_equal(scales.view(np.uint32), want_s.view(np.uint32))
                assert scales.shape == (7, 256 // quant["group_size"])
            assert out.dtype == F8 and out.shape == x.shape
            if r is not None:
                (new_residual,) = rest
                np.testing.assert_array_equal(reference.bits(new_residual), reference.bits(plain[1]))
            else:
                assert rest == ()


def test_rms_norm_fp8_keeps_leading_shapes() -> None:
    rng = np.random.default_rng(5)
    x, w, _ = _inputs(rng, "bfloat16", "none", 6, 128)
    x3 = x.reshape(2, 3, 128)
    out, scales = reference.rms_norm(x3, w, out_dtype=FP8, group_size=64)
    assert out.shape == (2, 3, 128) and scales.shape == (2, 3, 2)
    flat_out, flat_scales = reference.rms_norm(x, w, out_dtype=FP8, group_size=64)
    np.testing.assert_array_equal(fp8_bits(out).reshape(6, 128), fp8_bits(flat_out))
    np.testing.assert_array_equal(scales.reshape(6, 2), flat_scales)


def _row(values, n: int, dtype: str) -> np.ndarray:
    return rounded(np.resize(np.asarray(values, np.float64), n)[None, :], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_special_rows(dtype: str) -> None:
    n = 128
    w = rounded(np.full(n, 1.5), dtype)
    rng = np.random.default_rng(1)
    normal = rng.standard_normal(n)
    # A NaN row: every u NaN, out all 0x7F; every scale the floor's.
    nan_row = normal.copy()
    nan_row[17] = np.nan
    x = _row(nan_row, n, dtype)
    assert np.all(fp8_bits(reference.rms_norm(x, w, out_dtype=FP8, scale=np.float32(1))) == NAN)
    out, s = reference.rms_norm(x, w, out_dtype=FP8, group_size=64)
    assert np.all(fp8_bits(out) == NAN) and np.all(s == FLOOR_SCALE)
    # A zero row with -0.0 in it: +-0 out, the floor's scales.
    zeros = _row(np.where(np.arange(n) % 3 == 0, -0.0, 0.0), n, dtype)
    want = np.where(np.arange(n) % 3 == 0, 0x80, 0x00)[None, :]
    np.testing.assert_array_equal(fp8_bits(reference.rms_norm(zeros, w, out_dtype=FP8, scale=np.float32(0.5))), want)
    out, s = reference.rms_norm(zeros, w, out_dtype=FP8, group_size=128)
    np.testing.assert_array_equal(fp8_bits(out), want)
    assert s.shape == (1, 1) and s[0, 0] == FLOOR_SCALE
    # An inf in x: u NaN there (inf * 0), signed zeros elsewhere.
    inf_row = normal.copy()
    inf_row[40] = -np.inf
    x = _row(inf_row, n, dtype)
    for got in (reference.rms_norm(x, w, out_dtype=FP8, scale=np.float32(0.01)),
                reference.rms_norm(x, w, out_dtype=FP8, group_size=64)[0]):
        q = fp8_bits(got)[0]
        assert q[40] == NAN and np.all(np.isin(np.delete(q, 40), [0x00, 0x80]))
    # A zero group inside a normal row: that group's scale is the floor's, the other's is not.
    part = normal.copy()
    part[64:] = 0.0
    out, s = reference.rms_norm(_row(part, n, dtype), w, out_dtype=FP8, group_size=64)
    assert s[0, 1] == FLOOR_SCALE and s[0, 0] > FLOOR_SCALE
    assert np.all(fp8_bits(out)[0, 64:] == 0)
    # A scale that saturates almost everything, and one that puts values among FP8's subnormals.
    x = _row(normal, n, dtype)
    q = fp8_bits(reference.rms_norm(x, w, out_dtype=FP8, scale=np.float32(1e-4)))
    assert np.mean(np.isin(q, [0x7E, 0xFE])) > 0.9
    q = fp8_bits(reference.rms_norm(x, w, out_dtype=FP8, scale=np.float32(200.0)))
    assert np.mean(np.isin(q & 0x7F, np.arange(1, 8))) > 0.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_infinite_u_from_a_huge_weight(dtype: str) -> None:
    """u = xhat * w overflows to inf: static saturates it to +-448; per group s = inf, the group's
    finite values give signed zeros and the inf gives NaN (inf / inf)."""
    n = 128
    x = _row(np.where(np.arange(n) == 0, -3.0, np.linspace(-0.1, 0.1, n)), n, dtype)  # xhat[0] about -11
    w = rounded(np.where(np.arange(n) == 0, 2.0**127, 1.0), dtype)
    with captured_u() as seen:
        q = fp8_bits(reference.rms_norm(x, w, out_dtype=FP8, scale=np.float32(1.0)))
    assert np.isneginf(seen[0][0, 0])
    assert q[0, 0] == 0xFE
    out, s = reference.rms_norm(x, w, out_dtype=FP8, group_size=64)
    q = fp8_bits(out)[0]
    assert np.isinf(s[0, 0]) and np.isfinite(s[0, 1])
    assert q[0] == NAN and np.all(np.isin(q[1:64], [0x00, 0x80]))


# --- batch invariance --------------------------------------------------------------------------


@pytest.mark.parametrize("quant", [{"scale": np.array([0.02], np.float32)}, {"group_size": 64}],
                         ids=["static", "group"])
@pytest.mark.parametrize("residual", ["none", "float32"])
def test_a_row_alone_equals_the_row_in_batches_of_255_and_300(quant: dict, residual: str) -> None:
    rng = np.random.default_rng(255)
    x, w, r = _inputs(rng, "bfloat16", residual, 1, 192)
    alone = reference.rms_norm(x, w, 1e-6, r, mode="llama", out_dtype=FP8, **quant)
    alone = alone if isinstance(alone, tuple) else (alone,)
    for batch in (255, 300):
        bx, _, br = _inputs(rng, "bfloat16", residual, batch, 192)
        pos = (batch * 5) // 7
        bx[pos] = x[0]
        if br is not None:
            br[pos] = r[0]
        got = reference.rms_norm(bx, w, 1e-6, br, mode="llama", out_dtype=FP8, **quant)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(alone)
        for a, g in zip(alone, got):
            view = fp8_bits if a.dtype == F8 else reference.bits
            np.testing.assert_array_equal(view(g[pos]), view(a[0]))


# --- argument checks ---------------------------------------------------------------------------


F32_SCALE = dict(scale_shape=(), scale_dtype="float32")
BAD_ARGS = [
    (dict(out_dtype="float8_e5m2", group_size=64), ValueError, r"^out_dtype: float8_e5m2 is not supported yet"),
    (dict(out_dtype="int8", group_size=64), TypeError, r"^out_dtype: expected None, x's dtype or one of"),
    (dict(out_dtype=None, scale_shape=(), scale_dtype="float32", scale_value=1.0), ValueError, r"^scale: only with"),
    (dict(out_dtype="bfloat16", group_size=64), ValueError, r"^group_size: only with an FP8 out_dtype"),
    (dict(out_dtype=FP8), ValueError, r"^out_dtype=float8_e4m3fn: give exactly one of scale .* got neither"),
    (dict(out_dtype=FP8, scale_shape=(), scale_dtype="float32", scale_value=1.0, group_size=64), ValueError,
     r"^out_dtype=float8_e4m3fn: give exactly one .* got both"),
    (dict(out_dtype=FP8, group_size=32), ValueError, r"^group_size: expected one of \(64, 128\); got 32"),
    (dict(out_dtype=FP8, group_size=True), ValueError, r"^group_size: expected one of"),
    (dict(out_dtype=FP8, n=192, group_size=128), ValueError, r"^group_size: must divide n = 192"),
    (dict(out_dtype=FP8, scale_shape=(2,), scale_dtype="float32"), ValueError, r"^scale: expected a 0-d or 1-element"),
    (dict(out_dtype=FP8, scale_shape=(1, 1), scale_dtype="float32"), ValueError, r"^scale: expected a 0-d"),
    (dict(out_dtype=FP8, scale_shape=(), scale_dtype="float64"), TypeError, r"^scale: expected dtype float32"),
    (dict(out_dtype=FP8, **F32_SCALE, scale_value=0.0), ValueError, r"^scale: expected a finite"),
    (dict(out_dtype=FP8, **F32_SCALE, scale_value=-1.0), ValueError, r"^scale: expected a finite"),
    (dict(out_dtype=FP8, scale_shape=(1,), scale_dtype="float32", scale_value=float("inf")), ValueError,
     r"^scale: expected a finite"),
    (dict(out_dtype=FP8, **F32_SCALE, scale_value=float("nan")), ValueError, r"^scale: expected a finite"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGS)
def test_check_fp8_args_names_the_argument(kwargs: dict, error, message: str) -> None:
    with pytest.raises(error, match=message):
        check_fp8_args(**{"n": 128, **kwargs})


def test_check_fp8_args_accepts() -> None:
    check_fp8_args(n=128, out_dtype=None)
    check_fp8_args(n=128, out_dtype="bfloat16")
    check_fp8_args(n=192, out_dtype=FP8, group_size=64)
    check_fp8_args(n=128, out_dtype=FP8, scale_shape=(1,), scale_dtype="float32", scale_value=1e-30)
    check_fp8_args(n=128, out_dtype=FP8, scale_shape=(), scale_dtype="float32")  # a GPU scale: value unread


def test_rms_norm_runs_the_fp8_checks_first() -> None:
    x = np.ones((2, 128), np.float32)
    w = np.ones(128, np.float32)
    with pytest.raises(ValueError, match=r"^scale: expected a finite float32 > 0; got 0.0"):
        reference.rms_norm(x, w, out_dtype=FP8, scale=np.float32(0))
    with pytest.raises(TypeError, match=r"^scale: expected dtype float32; got float64"):
        reference.rms_norm(x, w, out_dtype=FP8, scale=np.float64(1))
    with pytest.raises(ValueError, match=r"^scale: expected a 0-d or 1-element"):
        reference.rms_norm(x, w, out_dtype=FP8, scale=np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"^group_size: must divide n = 100"):
        reference.rms_norm(np.ones((2, 100), np.float32), np.ones(100, np.float32), out_dtype=FP8, group_size=64)
    # x's own dtype as out_dtype: no quantization, the forward's bits.
    np.testing.assert_array_equal(reference.rms_norm(x, w, out_dtype="float32"), reference.rms_norm(x, w))


# --- the golden corpus's FP8 cases -------------------------------------------------------------

FP8_CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["fp8_cases"]]


@pytest.fixture(scope="module")
def fp8_cases() -> dict:
    return {case.spec.name: case for case in golden.load_fp8_corpus()}


@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_reproduces_fp8_corpus(fp8_cases: dict, name: str) -> None:
    case = fp8_cases[name]
    for mode, offset in case.spec.outputs:
        got = reference.rms_norm(case.x, case.weight, case.spec.eps, case.residual, mode=mode, weight_offset=offset,
                                 **case.quantization())
        got = got if isinstance(got, tuple) else (got,)
        out, scales, new_residual = case.expected(mode, offset)
        want = [a for a in (out, scales, new_residual) if a is not None]
        assert len(got) == len(want)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype and w.shape == g.shape
            as_bytes = [np.ascontiguousarray(a).view(np.uint8) for a in (g, w)]
            np.testing.assert_array_equal(*as_bytes, err_msg=f"{name} {mode}/{offset:g}")


def test_out_dtype_other_than_xs_own_is_rejected_naming_it():
    x = np.ones((2, 128), np.float32)
    with pytest.raises(TypeError, match=r"out_dtype: expected None, x's dtype \(float32\)"):
        reference.rms_norm(x, np.ones(128, np.float32), out_dtype="bfloat16")
    assert reference.rms_norm(x, np.ones(128, np.float32), out_dtype="float32").dtype == np.float32


@pytest.mark.parametrize("group_size", [64.0, True, "64"])
def test_group_size_must_be_an_int(group_size):
    with pytest.raises(ValueError, match=r"group_size: expected one of \(64, 128\)"):
        check_fp8_args(n=128, out_dtype=FP8, group_size=group_size)
