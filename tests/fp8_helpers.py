"""Independent FP8 (float8_e4m3fn) rounding for the FP8 tests, and a look at the reference's u.

Two implementations that share nothing with bridge.numerics.reference_fp8 (ml_dtypes) or with the kernels'
bit formula (add a rounding bias, shift): `rn_fp8_bits` rounds on the integer significand and
exponent of the float32 bit pattern, `nearest_fp8_bits` picks the nearest of the format's values in
float64. `captured_u` records the float32 u (Q1) that bridge.reference.rms_norm hands to its
quantization, so that Q2-Q4 can be checked against float64 from the very values the reference used.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import ml_dtypes
import numpy as np

from bridge import golden, reference
from bridge.numerics.contract import FP8_FORMATS, GROUP_AMAX_FLOOR

FP8 = "float8_e4m3fn"
E4M3 = FP8_FORMATS[FP8]
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
NAN = 0x7F
MAX_CODE = 0x7E  # 448
# Every code's value in float64 (0x7F and 0xFF are NaN); the non-negative finite ones ascending.
VALUES = np.arange(256, dtype=np.uint8).view(F8).astype(np.float64)
POSITIVE = VALUES[:MAX_CODE + 1]
# The all-zero (or all-NaN) group's scale: rn(rn(1e-10) / 448).
FLOOR_SCALE = np.float32(np.float32(GROUP_AMAX_FLOOR) / np.float32(E4M3.max))
# Per-group scales across Q2's whole domain, for the GPU tests of the kernels' quotient (u / s as
# one reciprocal per group and a correction): the floor's scale and the largest, rn(FLT_MAX / 448),
# +inf, every eighth binade in between (significands rotating through 1, all ones, some random
# bits and 1 + 2**-23) and those significands at exponent 0.
_BINADES = np.arange(-42, 119, 8)
_SIGNIFICANDS = np.array([0, 0x7FFFFF, 0x2AAAAB, 0x5D3A91, 0x000001], dtype=np.uint32)
QUOTIENT_SCALES = np.concatenate([
    [FLOOR_SCALE, np.float32(np.finfo(np.float32).max / np.float32(E4M3.max)), np.float32(np.inf)],
    (((_BINADES[:, None] + 127).astype(np.uint32) << 23)
     | _SIGNIFICANDS[np.arange(_BINADES.size) % 5][:, None]).reshape(-1).view(np.float32),
    (np.uint32(0x3F800000) | _SIGNIFICANDS).view(np.float32),
]).astype(np.float32)
# The FP8 golden cases' names, for parametrising (the cases themselves: conftest's fp8_cases).
FP8_CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["fp8_cases"]]


def fp8_bits(a: np.ndarray) -> np.ndarray:
    """The uint8 codes of an FP8 array."""
    assert a.dtype == F8, a.dtype
    return np.ascontiguousarray(a).view(np.uint8)


def rn_fp8_bits(c: np.ndarray) -> np.ndarray:
    """rnFP8 of float32 values with |c| <= 448 (or NaN) on the integers of the bit pattern.

    |c| = m * 2**e exactly (m the 24-bit significand); the FP8 quantum at |c| is 2**(max(E, -6) - 3)
    with E = floor(log2 |c|); k = m * 2**e / quantum rounded to nearest even by integer shifts.
    """
    b = np.ascontiguousarray(c, np.float32).view(np.uint32).astype(np.int64)
    sign, a = (b >> 31) & 1, b & 0x7FFFFFFF
    e32 = a >> 23
    m = np.where(e32 > 0, (a & 0x7FFFFF) | 0x800000, a & 0x7FFFFF)
    e = np.where(e32 > 0, e32 - 150, -149)
    emin = 1 - E4M3.exponent_bias
    exponent = e32 - 127  # float32 subnormals (e32 = 0) are far below FP8's smallest subnormal
    quantum = np.maximum(exponent, emin) - E4M3.mantissa_bits
    shift = np.minimum(quantum - e, 62)  # >= 20; beyond 25 k is 0 anyway
    k = m >> shift
    r = m & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    k = k + ((r > half) | ((r == half) & (k % 2 == 1)))
    # A normal k is in [8, 16]: 16 carries into the next exponent, which the sum does by itself;
    # a subnormal k in [0, 8], where 8 is the smallest normal's code.
    code = np.where(exponent >= emin,
                    ((exponent + E4M3.exponent_bias) << E4M3.mantissa_bits) + k - (1 << E4M3.mantissa_bits), k)
    code = code | (sign << 7)
    return np.where(np.isnan(c), NAN, code).astype(np.uint8)


def nearest_fp8_bits(t: np.ndarray) -> np.ndarray:
    """rnFP8 in float64: the nearest FP8 value to t (|t| <= 448 or NaN), ties to the even code,
    the sign of t (so -0.0 and negatives that round to zero give 0x80)."""
    t = np.asarray(t, np.float64)
    a = np.abs(np.where(np.isnan(t), 0.0, t))
    assert np.all(a <= E4M3.max), "nearest_fp8_bits takes clamped values"
    hi = np.clip(np.searchsorted(POSITIVE, a, side="left"), 0, MAX_CODE)
    lo = np.maximum(hi - 1, 0)
    # Exact in float64: Sterbenz above 2**-6, few bits below it (see the test module).
    d_lo, d_hi = a - POSITIVE[lo], POSITIVE[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    code = code | (np.signbit(t).astype(np.int64) << 7)
    return np.where(np.isnan(t), NAN, code).astype(np.uint8)


def decode(q: np.ndarray) -> np.ndarray:
    """FP8 codes (uint8) or an FP8 array as float64 values."""
    return VALUES[fp8_bits(q) if q.dtype == F8 else q]


def half_ulp(t: np.ndarray) -> np.ndarray:
    """Half the FP8 quantum at |t| (float64): 2**(max(floor(log2 |t|), -6) - 4)."""
    a = np.abs(np.asarray(t, np.float64))
    exponent = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.exp2(np.maximum(exponent, 1 - E4M3.exponent_bias) - E4M3.mantissa_bits - 1)


@contextlib.contextmanager
def captured_u() -> Iterator[List[np.ndarray]]:
    """The u arrays (float32, Q1) that reference.rms_norm quantizes while this is active, in order."""
    seen: List[np.ndarray] = []
    static, groups = reference.quantize_static, reference.quantize_groups

    def record_static(u, *args):
        seen.append(u.copy())
        return static(u, *args)

    def record_groups(u, *args):
        seen.append(u.copy())
        return groups(u, *args)

    reference.quantize_static, reference.quantize_groups = record_static, record_groups
    try:
        yield seen
    finally:
        reference.quantize_static, reference.quantize_groups = static, groups
