"""The reference's FP8 rounding and scaling steps (contract v1.2, NUMERICS.md Q2-Q4) against independent
implementations.

rnFP8 (bridge.numerics.reference_fp8.encode_fp8, through ml_dtypes) against rounding on the integers of the
float32 bit pattern and against the nearest FP8 value in float64 (tests/fp8_helpers.py); the clamp;
the static and per-token-group steps against float64 (float32 division and multiplication are the
float64 ones rounded once more: 53 >= 2 * 24 + 2 bits, so no double-rounding error). The whole
rms_norm path, special rows and batch invariance are in test_reference_fp8_rows.py; check_fp8_args's
errors in test_reference_fp8_args.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge.numerics.contract import FP8_FORMATS, GROUP_AMAX_FLOOR
from bridge.numerics.reference_fp8 import clamp, encode_fp8, quantize_groups, quantize_static
from fp8_helpers import (F8, FLOOR_SCALE, FP8, MAX_CODE, NAN, POSITIVE, decode, fp8_bits, half_ulp, nearest_fp8_bits,
                         rn_fp8_bits)

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
