"""bridge.reference.rms_norm_backward: argument errors and NUMERICS.md's backward special values."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.numerics.contract import CANONICAL_NAN_BITS
from bridge.numerics.reference import bits, encode, numpy_dtype, rms_norm_backward
from bridge.verify.compare import assert_bitwise_equal

DTYPES = ("float32", "bfloat16", "float16")
NEG_ZERO = {"float32": 0x80000000, "bfloat16": 0x8000, "float16": 0x8000}
F32 = np.float32


def _as(a, dtype: str) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float32).astype(numpy_dtype(dtype))


# --- argument errors -------------------------------------------------------------------------

X, W, R = np.zeros((2, 4), F32), np.ones(4, F32), np.zeros((2, 4), F32)


@pytest.mark.parametrize("change,error,message", [
    ({"grad_out": np.zeros((2, 5), F32)}, ValueError, r"grad_out: expected shape \(2, 4\) \(out's shape\)"),
    ({"grad_out": np.zeros((2, 4), np.float16)}, TypeError, r"grad_out: expected dtype float32 \(out's dtype\)"),
    ({"grad_new_residual": np.zeros((2, 4), F32)}, ValueError, "grad_new_residual: given without a residual"),
    ({"residual": R, "grad_new_residual": np.zeros((4, 2), F32)}, ValueError,
     r"grad_new_residual: expected shape \(2, 4\) \(the residual's shape\)"),
    ({"residual": R, "grad_new_residual": np.zeros((2, 4), np.float16)}, TypeError,
     r"grad_new_residual: expected dtype float32 \(the residual's dtype\)"),
    ({"residual": np.zeros((2, 4), np.float16)}, TypeError, "residual: expected dtype float32"),
    ({"x": np.zeros((2, 4), np.float64)}, TypeError, "x: dtype must be one of"),
    ({"weight": np.ones(5, F32)}, ValueError, r"weight: expected shape \(4,\)"),
    ({"mode": "bf16"}, ValueError, "mode: expected one of"),
])
def test_argument_errors_name_the_argument(change: dict, error: type, message: str) -> None:
    args = {"x": X, "weight": W, "grad_out": X, "residual": None, "grad_new_residual": None, "mode": "llama"}
    args.update(change)
    with pytest.raises(error, match=message):
        rms_norm_backward(args["x"], args["weight"], args["grad_out"], 1e-6, args["residual"],
                          args["grad_new_residual"], mode=args["mode"])


# --- special values (NUMERICS.md's backward table) -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype: str) -> None:
    weight = _as(np.ones(16), dtype)
    for shape in ((0, 16), (2, 0, 16)):
        x = np.zeros(shape, numpy_dtype(dtype))
        grad_x, grad_residual, grad_weight = rms_norm_backward(x, weight, x, 1e-6, np.zeros(shape, F32))
        assert grad_x.shape == shape and grad_x.dtype == x.dtype
        assert grad_residual.shape == shape and grad_residual.dtype == np.float32
        assert grad_weight.shape == (16,) and grad_weight.dtype == x.dtype
        assert np.all(bits(grad_weight) == 0)  # the empty tree: +0.0, not -0.0
        assert np.all(bits(rms_norm_backward(x, weight, x, 1e-6)[1]) == 0)


@pytest.mark.parametrize("mode", ["llama", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_n1(dtype: str, mode: str) -> None:
    x = _as([[3.0], [-0.5], [1e-3], [0.0]], dtype)
    weight, g = _as([-1.25], dtype), _as([[0.7], [-1.3], [2.0], [1.0]], dtype)
    eps = 1e-5
    grad_x, grad_weight = rms_norm_backward(x, weight, g, eps, mode=mode)
    # t = b[0] and c = b[0]: dv = inv * (a - xhat * (a * xhat)), each operation rounded.
    v, w, gf = x.astype(F32), weight.astype(F32), g.astype(F32)
    inv = F32(1) / np.sqrt(v * v / F32(1) + F32(eps))
    xhat, a = v * inv, gf * w
    assert_bitwise_equal(encode(inv * (a - xhat * ((a * xhat) / F32(1))), dtype), grad_x, "grad_x")
    h = encode(xhat, dtype).astype(F32) if mode == "llama" else xhat
    assert_bitwise_equal(encode((((gf * h)[0] + (gf * h)[1]) + ((gf * h)[2] + (gf * h)[3])), dtype), grad_weight)
    # About a * inv * eps / (v^2 + eps): a - xhat^2 a cancels, leaving float32's error times (v^2 + eps) / eps.
    v64, e64 = v.astype(np.float64), float(F32(eps))
    approx = a * inv * e64 / (v64 * v64 + e64)
    tol = 8 * 2.0**-24 * (v64 * v64 + e64) / e64 * np.abs(approx) + 2.0**-8 * np.abs(approx)
    assert np.all(np.abs(grad_x.astype(np.float64) - approx) <= tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_g_row(dtype: str) -> None:
    x = _as([[1.0, -2.0, 3.0, 0.5], [0.25, 1.5, -1.0, 2.0]], dtype)
    g = np.stack([_as([0.5, -1.0, 2.0, 0.25], dtype), _as([0.0, -0.0, -0.0, 0.0], dtype)])
    weight = _as([1.0, -0.5, 2.0, 1.5], dtype)
    grad_x, grad_weight = rms_norm_backward(x, weight, g, 1e-6)
    assert np.all(grad_x[1].astype(np.float64) == 0)  # signed zeros
    # The zero row's leaves are ±0: T = p_0 + ±0 = p_0 wherever p_0 is not zero.
    alone = rms_norm_backward(x[:1], weight, g[:1], 1e-6)[1]
    assert_bitwise_equal(alone, grad_weight)
    for r_dtype in (dtype, "float32"):  # with a residual and no grad_new_residual: +0.0 exactly
        grad_x, grad_residual, _ = rms_norm_backward(x, weight, g, 1e-6, _as(np.zeros((2, 4)), r_dtype))
        assert np.all(bits(grad_x[1]) == 0) and np.all(bits(grad_residual[1]) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_x_row(dtype: str) -> None:
    x = _as(np.zeros((1, 4)), dtype)
    g, weight = _as([[0.5, -1.0, 2.0, 0.0]], dtype), _as([1.0, -0.5, 2.0, 1.5], dtype)
    grad_x, grad_weight = rms_norm_backward(x, weight, g, 1e-6)
    inv = F32(1) / np.sqrt(F32(0) / F32(4) + F32(1e-6))  # xhat = 0, so dv = rn(inv * a)
    assert_bitwise_equal(encode(inv * (g.astype(F32) * weight.astype(F32)), dtype), grad_x)
    assert np.all(grad_weight.astype(np.float64) == 0)  # p = g * ±0


# Float16 squares cannot overflow float32, so only float32 and bfloat16 get inv = 0.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overflowing_row(dtype: str) -> None:
    weight, g = _as([1.0, 1.0, -1.0, 1.0], dtype), _as([[0.5, -1.0, 2.0, 0.25]], dtype)
    grad_x, grad_weight = rms_norm_backward(_as([[2.0**70, -(2.0**65), 3.0, -1.0]], dtype), weight, g, 1e-6)
    assert np.all(grad_x.astype(np.float64) == 0) and np.all(grad_weight.astype(np.float64) == 0)
    grad_x, grad_weight = rms_norm_backward(_as([[np.inf, -2.0, 3.0, 0.5]], dtype), weight, g, 1e-6)
    assert np.all(bits(grad_x) == CANONICAL_NAN_BITS[dtype])  # xhat NaN at the inf, so t is NaN
    assert int(bits(grad_weight)[0]) == CANONICAL_NAN_BITS[dtype]  # p = g * NaN in the inf's column
    assert np.all(grad_weight[1:].astype(np.float64) == 0)


@pytest.mark.parametrize("mode", ["llama", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(dtype: str, mode: str) -> None:
    weight = _as([1.0, 0.5, -0.5, 2.0], dtype)
    g = _as([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -1.0, 0.5]], dtype)
    x = _as([[1.0, np.nan, 2.0, -3.0], [1.0, 2.0, 3.0, 4.0]], dtype)
    grad_x, grad_weight = rms_norm_backward(x, weight, g, 1e-6, mode=mode)
    assert np.all(bits(grad_x[0]) == CANONICAL_NAN_BITS[dtype])  # the whole row
    assert np.all(np.isfinite(grad_x[1].astype(F32)))  # the other row is untouched
    assert np.all(bits(grad_weight) == CANONICAL_NAN_BITS[dtype])  # every column sums a NaN p
    x = _as([[1.0, -2.0, 2.0, -3.0], [1.0, 2.0, 3.0, 4.0]], dtype)
    for bad in (np.nan, np.inf):
        g_bad = g.copy()
        g_bad[0, 2] = bad
        grad_x, grad_weight = rms_norm_backward(x, weight, g_bad, 1e-6, mode=mode)
        assert not np.any(np.isfinite(grad_x[0].astype(F32)))  # through t and c to the whole row
        assert np.all(np.isfinite(grad_x[1].astype(F32)))
        assert not np.isfinite(F32(grad_weight[2])) and np.all(np.isfinite(grad_weight[[0, 1, 3]].astype(F32)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_absent_grad_new_residual_turns_negative_zero_dv_into_positive_zero(dtype: str) -> None:
    # a = -0.0 everywhere; b's mixed signs make t = c = +0.0, so dv = -0.0 where xhat > 0.
    x, weight = _as([[1.0, -2.0, 3.0, 0.5]], dtype), _as(np.ones(4), dtype)
    g = _as(-np.zeros((1, 4)), dtype)
    grad_x, _ = rms_norm_backward(x, weight, g, 1e-6)
    negative_zero = [NEG_ZERO[dtype], 0, NEG_ZERO[dtype], NEG_ZERO[dtype]]
    assert list(bits(grad_x)[0]) == negative_zero  # without a residual grad_x is rnD(dv)
    for r_dtype in (dtype, "float32"):
        residual = _as(np.zeros((1, 4)), r_dtype)  # z = x exactly
        absent = rms_norm_backward(x, weight, g, 1e-6, residual)
        assert np.all(bits(absent[0]) == 0) and np.all(bits(absent[1]) == 0)  # dv + 0.0 = +0.0
        zeros = rms_norm_backward(x, weight, g, 1e-6, residual, residual)  # materialised +0.0: the same bits
        for got, want in zip(zeros, absent):
            assert_bitwise_equal(want, got)
        minus = rms_norm_backward(x, weight, g, 1e-6, residual, _as(-np.zeros((1, 4)), r_dtype))
        assert list(bits(minus[1])[0]) == [NEG_ZERO[r_dtype], 0, NEG_ZERO[r_dtype], NEG_ZERO[r_dtype]]
