"""The reference's FP8 output through rms_norm (contract v1.2, NUMERICS.md Q1-Q4): out and the scales
are Q2-Q4 of the forward's u (captured, tests/fp8_helpers.py); leading shapes; the special values
of NUMERICS.md's FP8 table; batch invariance of out and the scales; the golden corpus's FP8 cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge import reference
from bridge.numerics.reference_fp8 import quantize_groups, quantize_static
from fp8_helpers import F8, FLOOR_SCALE, FP8, FP8_CASE_NAMES, NAN, captured_u, fp8_bits
from reference_helpers import MODES_OFFSETS, rounded


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


# --- the golden corpus's FP8 cases -------------------------------------------------------------

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
