"""bridge.reference's forward against float64 math and NUMERICS.md's stated outcomes: rnD's rounding
and canonical NaNs, and the special values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bridge.numerics.contract import CANONICAL_NAN_BITS, next_power_of_two
from bridge.numerics.reference import bits, encode, rms_norm
from bridge.verify.compare import assert_bitwise_equal
from reference_helpers import NP, UNIT, SUBNORMAL, U32, MODES_OFFSETS, rounded, from_bits


# --- against float64 -------------------------------------------------------------------------


def _rms_norm_f64(x, weight, eps, residual, mode, weight_offset):
    """The same formula in float64: only the residual is rounded (to R), as the contract returns it."""
    z = x.astype(np.float64)
    new_residual = None
    if residual is not None:
        new_residual = (z + residual.astype(np.float64)).astype(residual.dtype)
        z = new_residual.astype(np.float64)
    eps64 = float(np.float32(eps))  # the contract takes eps as rn(eps)
    inv = 1.0 / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps64)
    return z * inv * (weight.astype(np.float64) + weight_offset), new_residual


@pytest.mark.parametrize("residual_kind", ["none", "same", "float32"])
@pytest.mark.parametrize("mode", ["llama", "fp32"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_close_to_float64(dtype: str, mode: str, residual_kind: str) -> None:
    rng = np.random.default_rng([len(dtype), len(mode), len(residual_kind)])
    u, sub = UNIT[dtype], SUBNORMAL[dtype]
    for n in (1, 7, 128, 1000, 4096):
        x = rounded(rng.standard_normal((4, n)), dtype)
        r_dtype = {"none": None, "same": dtype, "float32": "float32"}[residual_kind]
        residual = None if r_dtype is None else rounded(rng.standard_normal((4, n)), r_dtype)
        for offset in (0.0, 1.0):
            # Gemma stores w with the 1 taken out; Llama stores it whole.
            weight = rounded((0.1 if offset else 0.25) * rng.standard_normal(n) + (0.0 if offset else 1.0), dtype)
            got = rms_norm(x, weight, 1e-6, residual, mode=mode, weight_offset=offset)
            want, want_residual = _rms_norm_f64(x, weight, 1e-6, residual, mode, offset)
            out = (got if residual is None else got[0]).astype(np.float64)
            if residual is not None:
                # One rounding to R from the float32 sum: within one rounding of R plus one of float32.
                new_res = got[1].astype(np.float64)
                exact = x.astype(np.float64) + residual.astype(np.float64)
                assert np.all(np.abs(new_res - exact) <= (UNIT[r_dtype] + U32) * np.abs(exact))
            # Float32 work: the pairwise sum (log2 P roundings), mean, +eps, sqrt, 1/r, v*inv, offset, *w;
            # (log2 P + 8) float32 units bound them. Then one rounding to D, two in llama mode (y and out).
            roundings = 2 if mode == "llama" and dtype != "float32" else 1
            slack = (math.log2(next_power_of_two(n)) + 8) * U32
            rtol = (1 + u) ** roundings * (1 + slack) - 1
            # A rounding into D's subnormal range errs by at most half a subnormal step, scaled by |w|.
            atol = roundings * sub * max(1.0, float(np.max(np.abs(weight.astype(np.float64) + offset))))
            err = np.abs(out - want)
            worst = np.unravel_index(np.argmax(err - rtol * np.abs(want)), err.shape)
            assert np.all(err <= rtol * np.abs(want) + atol), (
                f"n={n} offset={offset}: out {out[worst]} vs float64 {want[worst]} at {worst}, rtol {rtol:.3g}")


# --- rnD: rounding and canonical NaNs --------------------------------------------------------


def _bf16_round_bits(b: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 on the bit pattern, written independently."""
    b = b.astype(np.uint64)
    upper, lower = b >> 16, b & 0xFFFF
    up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & 1) == 1))
    rounded = (upper + up).astype(np.uint16)
    is_nan = ((b & 0x7F800000) == 0x7F800000) & ((b & 0x007FFFFF) != 0)
    return np.where(is_nan, np.uint16(CANONICAL_NAN_BITS["bfloat16"]), rounded)


def test_encode_bfloat16_rounds_to_nearest_even_on_bits() -> None:
    rng = np.random.default_rng(2)
    special = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infs
        0x7F7FFFFF, 0x7F7F8000, 0xFF7F8001, 0x7F7F7FFF,  # round to inf (tie to even, above tie) or to max
        0x00000001, 0x00008000, 0x00018000, 0x80018000, 0x007FFFFF,  # subnormals and ties
        0x3F808000, 0x3F818000, 0x3F808001,  # ties near 1 to even, and just above a tie
        0x7F800001, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF,  # NaNs, quiet and signalling
    ]
    patterns = np.concatenate([np.array(special, np.uint32), rng.integers(0, 2**32, 200_000, dtype=np.uint32),
                               # Every exponent with random low bits, so subnormals and ties are frequent.
                               (rng.integers(0, 2**9, 50_000, dtype=np.uint32) << 23)
                               | rng.integers(0, 2**16, 50_000, dtype=np.uint32)])
    with np.errstate(invalid="ignore"):
        got = bits(encode(patterns.view(np.float32), "bfloat16"))
    want = _bf16_round_bits(patterns)
    diff = np.flatnonzero(got != want)
    assert diff.size == 0, f"0x{int(patterns[diff[0]]):08x} -> 0x{int(got[diff[0]]):04x}, want 0x{int(want[diff[0]]):04x}"
    assert got[2] == 0x7F80 and got[5] == 0x7F80 and got[6] == 0xFF80 and got[7] == 0x7F7F
    assert np.count_nonzero(got == CANONICAL_NAN_BITS["bfloat16"]) > 500  # NaNs were well represented


def test_encode_float16_nan_inf_and_ties() -> None:
    rng = np.random.default_rng(3)
    nans = (rng.integers(0, 2**23, 1000, dtype=np.uint32) | 1) | (rng.integers(0, 2, 1000, dtype=np.uint32) << 31)
    nans |= np.uint32(0x7F800000)
    values = np.concatenate([nans.view(np.float32), np.float32([np.inf, -np.inf, 65520.0, -1e9, 2049.0, 2051.0,
                                                               65519.0, 2.0**-25, 3 * 2.0**-26])])
    with np.errstate(invalid="ignore", over="ignore"):
        got = encode(values, "float16")
    assert np.all(bits(got[:1000]) == CANONICAL_NAN_BITS["float16"])
    # inf stays inf; 65520 is the tie above 65504 and rounds (to even) to inf; 2049 -> 2048, 2051 -> 2052;
    # 2**-25 is the tie between 0 and the smallest subnormal (even: 0); 3 * 2**-26 rounds up to it.
    assert list(got[1000:].astype(np.float64)) == [np.inf, -np.inf, np.inf, -np.inf, 2048.0, 2052.0, 65504.0,
                                                   0.0, 2.0**-24]


def test_encode_float32_only_canonicalises_nans() -> None:
    values = np.array([0x7FFFFFFF, 0xFFC00000, 0x7F800001, 0x3F800001, 0x80000001, 0xFF800000], np.uint32)
    with np.errstate(invalid="ignore"):
        got = bits(encode(values.view(np.float32), "float32"))
    assert [int(v) for v in got] == [0x7FC00000] * 3 + [0x3F800001, 0x80000001, 0xFF800000]


# --- special values (NUMERICS.md) -----------------------------------------------------------

DTYPES = ["float32", "bfloat16", "float16"]


@pytest.mark.parametrize("mode,offset", MODES_OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_row_gives_signed_zeros(dtype: str, mode: str, offset: float) -> None:
    x = from_bits([0x0000, 0x8000] * 4, dtype) if dtype != "float32" else from_bits([0, 0x80000000] * 4, dtype)
    weight = rounded([1.5, 1.5, -2.0, -2.0, 0.25, 0.25, -0.5, -0.5], dtype)
    out = rms_norm(x[None], weight, 1e-6, mode=mode, weight_offset=offset)[0]
    assert np.all(out.astype(np.float64) == 0)
    w_eff = weight.astype(np.float64) + offset
    assert list(np.signbit(out)) == list(np.signbit(x) ^ np.signbit(w_eff))


# Float16 squares cannot overflow float32 (65504**2 < 2**32), so only float32 and bfloat16 get here.
@pytest.mark.parametrize("mode", ["llama", "fp32"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overflowing_squares_give_zeros_and_nan_at_inf(dtype: str, mode: str) -> None:
    huge = rounded([2.0**70, -(2.0**65), 3.0, -1.0], dtype)
    weight = rounded([1.0, 1.0, -1.0, 1.0], dtype)
    out = rms_norm(huge[None], weight, 1e-6, mode=mode)[0]
    assert np.all(out.astype(np.float64) == 0)  # s = inf, inv = 0: finite inputs give zeros
    assert list(np.signbit(out)) == [False, True, True, True]
    with_inf = rounded([np.inf, -2.0, 3.0, 0.5], dtype)
    out = rms_norm(with_inf[None], weight, 1e-6, mode=mode)[0]
    assert int(bits(out)[0]) == CANONICAL_NAN_BITS[dtype]  # inf * 0
    assert np.all(out[1:].astype(np.float64) == 0)


@pytest.mark.parametrize("mode", ["llama", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_anywhere_makes_the_row_canonical_nan(dtype: str, mode: str) -> None:
    x = rounded([[1.0, np.nan, 2.0, -3.0], [1.0, 2.0, 3.0, 4.0]], dtype)
    weight = rounded([1.0, 0.5, -0.0, 2.0], dtype)
    out = rms_norm(x, weight, 1e-6, mode=mode)
    assert np.all(bits(out[0]) == CANONICAL_NAN_BITS[dtype])
    assert not np.any(np.isnan(out[1].astype(np.float32)))  # the other row is untouched
    # inf + (-inf) in the residual add is NaN in the new residual (canonical in R) and in the row.
    x = rounded([[np.inf, 1.0, 2.0, 3.0]], dtype)
    residual = np.float32([[-np.inf, 1.0, 2.0, 3.0]])
    out, new_residual = rms_norm(x, weight, 1e-6, residual, mode=mode)
    assert np.all(bits(out) == CANONICAL_NAN_BITS[dtype])
    assert int(bits(new_residual)[0, 0]) == CANONICAL_NAN_BITS["float32"]
    assert list(new_residual[0, 1:]) == [2.0, 4.0, 6.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_n1(dtype: str) -> None:
    x = rounded([[3.0], [-0.5], [1e-3], [0.0]], dtype)
    weight = rounded([-1.25], dtype)
    eps = 1e-5
    for mode in ("llama", "fp32"):
        out = rms_norm(x, weight, eps, mode=mode)
        v = x.astype(np.float64)[:, 0]
        want = v / np.sqrt(v * v + float(np.float32(eps))) * -1.25  # |w| |v| / sqrt(v^2 + eps), signed
        np.testing.assert_allclose(out[:, 0].astype(np.float64), want, rtol=3 * UNIT[dtype] + 16 * U32)
        assert np.signbit(out[3, 0])  # +0 * negative weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormals_are_kept(dtype: str) -> None:
    tiny = SUBNORMAL[dtype] * 3  # a subnormal input: its square is 0, so s = 0 and inv = 1/sqrt(eps)
    x = rounded([[tiny, -tiny]], dtype)
    weight = rounded([1.0, 1.0], dtype)
    out = rms_norm(x, weight, 1e-6, mode="fp32")
    inv = np.float32(1) / np.sqrt(np.float32(1e-6))
    want = encode(x.astype(np.float32) * inv, dtype)
    assert_bitwise_equal(want, out)
    assert np.all(out.astype(np.float64) != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype: str) -> None:
    weight = rounded(np.ones(16), dtype)
    for shape in ((0, 16), (2, 0, 16)):
        x = np.zeros(shape, NP[dtype])
        out, new_residual = rms_norm(x, weight, 1e-6, np.zeros(shape, np.float32))
        assert out.shape == shape and out.dtype == NP[dtype]
        assert new_residual.shape == shape and new_residual.dtype == np.float32
        assert rms_norm(x, weight, 1e-6).shape == shape


def test_n0_is_an_error() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        rms_norm(np.zeros((3, 0), np.float32), np.zeros(0, np.float32))
