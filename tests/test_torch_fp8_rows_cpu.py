"""bi_torch's FP8 output (contract v1.2) on CPU tensors, the Triton interpreter, bit for bit: random and
special rows against bridge.reference (both modes, offsets 0 and 1, residual none / same / float32,
static and both group sizes, long rows), leading shapes and strides, and batch invariance of out and
scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bi_torch
from torch_fp8_helpers import (DTYPE_RESIDUALS, QUANTS, TORCH_FP8, assert_fp8_bits, bi_fp8, check_fp8, fp8_codes,
                               fp8_inputs, ref_fp8, scale_array)
from torch_helpers import DTYPES, assert_bits, to_torch

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _quant_args(scale, group):
    """(reference kwargs, bi_torch kwargs) of one scaling: a static scale as a 0-d float32 array / tensor."""
    sa = scale_array(scale)
    return dict(scale=sa, group_size=group), dict(scale=None if sa is None else torch.from_numpy(sa), group_size=group)


# --------------------------------------------------------------------------------------------
# Against the reference: random and special rows, every dtype, residual kind and scaling.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant,scale,group", QUANTS, ids=[q[0] for q in QUANTS])
@pytest.mark.parametrize("dtype,res_kind", DTYPE_RESIDUALS)
def test_matches_reference(dtype, res_kind, quant, scale, group):
    xn, wn, rn = fp8_inputs("ref", 9, 256, dtype, res_kind)
    ref_kw, bi_kw = _quant_args(scale, group)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    for mode in ("llama", "fp32"):
        for offset in (0.0, 1.0):
            what = f"{dtype} res {res_kind} {quant} {mode} offset {offset}"
            check_fp8(ref_fp8(xn, wn, 1e-6, rn, mode, offset, **ref_kw), bi_fp8(x, w, 1e-6, r, mode, offset, **bi_kw),
                      what)
    assert_bits(xn, x, "x was modified")
    if r is not None:
        assert_bits(rn, r, "residual was modified")


# Static scales: saturating, into FP8's subnormals, exact and inexact reciprocals, a float32
# subnormal scale (rn(1/scale) = inf: zeros give NaN) and a huge one (rn(1/scale) subnormal).
STATIC_SCALES = (1e-4, 100.0, 0.5, 3.7, 2.0**-3, 1e-40, 3e38)


@pytest.mark.parametrize("scale", STATIC_SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_scales(dtype, scale):
    xn, wn, _ = fp8_inputs("static", 7, 128, dtype, "none")
    x, w = to_torch(xn), to_torch(wn)
    for mode in ("llama", "fp32"):
        for shape in ((), (1,)):
            sa = scale_array(scale, shape)
            expected = ref_fp8(xn, wn, 1e-6, None, mode, 0.0, scale=sa)
            check_fp8(expected, bi_fp8(x, w, 1e-6, None, mode, 0.0, scale=torch.from_numpy(sa)), f"{scale} {shape}")
        # A Python float is the same float32 scale.
        check_fp8(expected, bi_fp8(x, w, 1e-6, None, mode, 0.0, scale=scale), f"{scale} as a Python float")


def test_special_rows_reach_every_case():
    """The special rows do reach saturation, FP8 subnormals, NaN, signed zeros and floor scales."""
    xn, wn, _ = fp8_inputs("static", 7, 128, "bfloat16", "none")
    codes = fp8_codes(ref_fp8(xn, wn, scale=scale_array(1e-4))[0])
    assert {0x7E, 0xFE, 0x7F} <= set(codes.ravel().tolist())
    out, scales, _ = ref_fp8(xn, wn, group_size=64)
    codes = fp8_codes(out) & 0x7F
    assert ((codes > 0) & (codes < 8)).any() and (fp8_codes(out) == 0x80).any()
    assert (scales == np.float32(np.float32(1e-10) / np.float32(448))).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inf_u_from_huge_weights(dtype):
    """u = xhat * w overflows to inf where w = 2**127: per group amax = inf, s = inf, the finite
    values give +-0 and the inf NaN; static: inf saturates to +-448."""
    xn, wn, _ = fp8_inputs("huge", 4, 128, dtype, "none", special=False)
    xn[:, 5::40] = np.where(xn[:, 5::40] < 0, -4.0, 4.0).astype(xn.dtype)
    wn[5::40] = np.array(2.0**127, np.float32).astype(wn.dtype)
    x, w = to_torch(xn), to_torch(wn)
    for mode in ("llama", "fp32"):
        for kw in (dict(group_size=64), dict(scale=0.5)):
            ref_kw = dict(kw, scale=scale_array(kw.get("scale")))
            expected = ref_fp8(xn, wn, 1e-6, None, mode, **ref_kw)
            check_fp8(expected, bi_fp8(x, w, 1e-6, None, mode, **kw), f"{dtype} {mode} {kw}")
    assert np.isinf(ref_fp8(xn, wn, group_size=64)[1]).any()


@pytest.mark.parametrize("quant,scale,group", QUANTS, ids=[q[0] for q in QUANTS])
def test_long_rows(quant, scale, group):
    """Rows past the 16384-element whole-row limit: the second pass quantizes chunk by chunk."""
    n = 16384 + 4096
    xn, wn, rn = fp8_inputs("long", 2, n, "bfloat16", "float32")
    ref_kw, bi_kw = _quant_args(scale, group)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    for mode, offset in (("llama", 0.0), ("fp32", 1.0)):
        check_fp8(ref_fp8(xn, wn, 1e-5, rn, mode, offset, **ref_kw), bi_fp8(x, w, 1e-5, r, mode, offset, **bi_kw),
                  f"n {n} {quant} {mode}")


def test_leading_shapes_strides_and_empty_batches():
    xn, wn, rn = fp8_inputs("shapes", 6, 128, "float16", "same")
    w = to_torch(wn)
    x3, r3 = to_torch(xn).reshape(2, 3, 128), to_torch(rn).reshape(2, 3, 128)
    for scale, group in ((0.25, None), (None, 64)):
        ref_kw, bi_kw = _quant_args(scale, group)
        check_fp8(ref_fp8(xn.reshape(2, 3, 128), wn, 1e-6, rn.reshape(2, 3, 128), **ref_kw),
                  bi_fp8(x3, w, 1e-6, r3, **bi_kw), f"3-d {scale} {group}")
        padded = torch.cat([to_torch(xn), torch.zeros(6, 8, dtype=torch.float16)], dim=1)[:, :128]
        check_fp8(ref_fp8(xn, wn, **ref_kw), bi_fp8(padded, w, **bi_kw), f"strided rows {scale} {group}")
    out, scales = bi_torch.rms_norm(x3[:0], w, out_dtype=TORCH_FP8, group_size=128)
    assert out.shape == (0, 3, 128) and out.dtype == TORCH_FP8 and scales.shape == (0, 3, 1)
    assert bi_torch.rms_norm(x3[:, :0], w, out_dtype=TORCH_FP8, scale=1.0).shape == (2, 0, 128)


def test_out_dtype_of_x_is_no_quantization():
    xn, wn, rn = fp8_inputs("same", 3, 64, "bfloat16", "float32", special=False)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    assert_bits(bi_torch.rms_norm(x, w), bi_torch.rms_norm(x, w, out_dtype=torch.bfloat16), "out_dtype=x.dtype")
    for got, want in zip(bi_torch.rms_norm(x, w, 1e-6, r, out_dtype=torch.bfloat16), bi_torch.rms_norm(x, w, 1e-6, r)):
        assert_bits(want, got, "out_dtype=x.dtype with a residual")


# --------------------------------------------------------------------------------------------
# Batch invariance: a row alone vs in batches of 255 and 300 rows (vLLM's test sizes).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant,scale,group", QUANTS, ids=[q[0] for q in QUANTS])
@pytest.mark.parametrize("res_kind", ["none", "float32"])
def test_batch_invariance(quant, scale, group, res_kind):
    n = 128
    xn, wn, rn = fp8_inputs("inv", 300, n, "bfloat16", res_kind)
    _, bi_kw = _quant_args(scale, group)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    alone = [bi_fp8(x[i:i + 1], w, 1e-6, None if r is None else r[i:i + 1], **bi_kw) for i in (0, 100, 254, 299)]
    for batch in (255, 300):
        got = bi_fp8(x[:batch], w, 1e-6, None if r is None else r[:batch], **bi_kw)
        for i, single in zip((0, 100, 254, 299), alone):
            if i >= batch:
                continue
            for name, a, b in zip(("out", "scales", "new_residual"), single, got):
                if a is None:
                    continue
                what = f"row {i} alone vs in a batch of {batch}: {name}"
                (assert_fp8_bits if name == "out" else assert_bits)(a[0], b[i], what)
