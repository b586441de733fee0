"""The compiled kernels' per-group quotient (group_quotient, bi_torch/triton_fp8.py and
bi_jax/pallas_fp8.py): rn(u * rn(1 / s)) has the contract's FP8 code, rnFP8(clamp(rn(u / s))),
wherever quotient_estimate does not mark it near. Here in numpy (IEEE float32 products and
quotients, subnormals kept) on the (u, s) pairs a group can hold: random groups of every
magnitude, products landing within a few float32 steps of every FP8 midpoint, and special values.
The GPU tests run the kernels' own code over every float32 u for many s.
"""

from __future__ import annotations

import numpy as np
import pytest

from bi_jax.pallas_fp8 import QUOTIENT_MARGIN
from bridge.numerics.contract import FP8_FORMATS
from bridge.numerics.reference_fp8 import clamp, encode_fp8
from fp8_helpers import quotient_pairs, quotient_scales

FP8 = "float8_e4m3fn"
FMT = FP8_FORMATS[FP8]
f32 = np.float32


def _codes(t: np.ndarray) -> np.ndarray:
    return encode_fp8(clamp(t, FP8), FP8).view(np.uint8)


def estimate(u: np.ndarray, s: np.ndarray, margin: int = QUOTIENT_MARGIN) -> tuple:
    """quotient_estimate's (t, near), in numpy."""
    shift, bias = 23 - FMT.mantissa_bits, FMT.exponent_bias
    with np.errstate(all="ignore"):
        t = (u * (f32(1) / s).astype(f32)).astype(f32)
    a = t.view(np.uint32) & np.uint32(0x7FFFFFFF)
    below = np.clip((128 - bias) - (a >> 23).astype(np.int64), 0, FMT.mantissa_bits + 3)
    bits = shift + below
    off = ((a & 0x7FFFFF) | 0x800000).astype(np.int64) % (np.int64(1) << bits) - (np.int64(1) << (bits - 1))
    return t, (np.abs(off) <= margin) & (a < (143 - bias) << 23)


def test_estimate_has_the_quotients_code_wherever_it_is_not_near():
    rng = np.random.default_rng(20261206)
    for _ in range(4):
        u, s = quotient_pairs(rng, 1 << 20)
        t, near = estimate(u, s)
        with np.errstate(all="ignore"):
            exact = (u / s).astype(f32)
        differ = np.flatnonzero((_codes(t) != _codes(exact)) & ~near)
        assert differ.size == 0, (f"{differ.size} codes differ; first u={u[differ[0]]!r} s={s[differ[0]]!r}: "
                                  f"estimate {t[differ[0]]!r}, quotient {exact[differ[0]]!r}")
        assert 0 < np.count_nonzero(near) < u.size


def test_the_margin_matters_on_thesequotient_pairs():
    """Without a margin (near only where the product is exactly a midpoint), the same pairs give codes
    that differ: the sample reaches the cases the margin is for."""
    u, s = quotient_pairs(np.random.default_rng(7), 1 << 20)
    t, near = estimate(u, s, margin=0)
    with np.errstate(all="ignore"):
        exact = (u / s).astype(f32)
    assert np.count_nonzero((_codes(t) != _codes(exact)) & ~near) > 0


@pytest.mark.parametrize("amax", [0.0, 1e-30, 1e-10, 1.0, 448.0, 3e38, np.inf])
def test_special_values(amax):
    """Zeros, subnormals, infinities and NaN in a group, and the amax floor: the estimate's code is
    the quotient's, and none of these is left to the division."""
    s = quotient_scales(np.full(1, amax, f32))
    u = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-39, -1e-39, amax, -amax], f32)
    s = np.broadcast_to(s, u.shape)
    t, near = estimate(u, s)
    with np.errstate(all="ignore"):
        exact = (u / s).astype(f32)
    np.testing.assert_array_equal(_codes(t)[~near], _codes(exact)[~near])
    assert not near[:9].any()
