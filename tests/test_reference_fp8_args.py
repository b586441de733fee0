"""check_fp8_args's errors (contract v1.2), each naming the argument, and reference.rms_norm running
them before anything else."""

from __future__ import annotations

import numpy as np
import pytest

from bridge import reference
from bridge.numerics.contract import check_fp8_args
from fp8_helpers import FP8


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


def test_out_dtype_other_than_xs_own_is_rejected_naming_it():
    x = np.ones((2, 128), np.float32)
    with pytest.raises(TypeError, match=r"out_dtype: expected None, x's dtype \(float32\)"):
        reference.rms_norm(x, np.ones(128, np.float32), out_dtype="bfloat16")
    assert reference.rms_norm(x, np.ones(128, np.float32), out_dtype="float32").dtype == np.float32


@pytest.mark.parametrize("group_size", [64.0, True, "64"])
def test_group_size_must_be_an_int(group_size):
    with pytest.raises(ValueError, match=r"group_size: expected one of \(64, 128\)"):
        check_fp8_args(n=128, out_dtype=FP8, group_size=group_size)
