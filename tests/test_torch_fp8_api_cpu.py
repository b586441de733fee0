"""bi_torch's FP8 output (contract v1.2) on CPU tensors, the Triton interpreter: bad input raised
before anything is written, naming the argument; no gradient; torch.compile (fullgraph) and opcheck;
the vLLM drop-ins, bit for bit against bridge.reference, and their bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bi_torch
from torch_fp8_helpers import TORCH_FP8, assert_fp8_bits, fp8_inputs, ref_fp8, scale_array
from torch_helpers import DTYPES, assert_bits, to_numpy, to_torch

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# --------------------------------------------------------------------------------------------
# Bad input: raised before anything is written, naming the argument; no gradient.
# --------------------------------------------------------------------------------------------


def _bad_fp8_calls():
    """(id, keyword arguments that break the call, exception, match)."""
    f32 = dict(dtype=torch.float32)
    return [
        ("e5m2", dict(out_dtype=torch.float8_e5m2, scale=1.0), ValueError, r"^out_dtype: float8_e5m2 is not supported"),
        ("int8", dict(out_dtype=torch.int8, scale=1.0), TypeError, r"^out_dtype:"),
        ("other_float", dict(out_dtype=torch.float16, scale=1.0), TypeError, r"^out_dtype:"),
        ("string_dtype", dict(out_dtype="float8_e4m3fn", scale=1.0), TypeError, r"^out_dtype:"),
        ("neither", dict(out_dtype=TORCH_FP8), ValueError, r"^out_dtype=float8_e4m3fn: give exactly one"),
        ("both", dict(out_dtype=TORCH_FP8, scale=1.0, group_size=64), ValueError, r"got both"),
        ("scale_alone", dict(scale=1.0), ValueError, r"^scale: only with an FP8 out_dtype"),
        ("group_alone", dict(group_size=64), ValueError, r"^group_size: only with an FP8 out_dtype"),
        ("scale_x_dtype", dict(out_dtype=torch.bfloat16, scale=1.0), ValueError, r"^scale: only with an FP8"),
        ("group_96", dict(out_dtype=TORCH_FP8, group_size=96), ValueError, r"^group_size: expected one of"),
        ("group_bool", dict(out_dtype=TORCH_FP8, group_size=True), ValueError, r"^group_size:"),
        ("group_not_dividing", dict(out_dtype=TORCH_FP8, group_size=128), ValueError, r"^group_size: must divide n"),
        ("scale_shape", dict(out_dtype=TORCH_FP8, scale=torch.ones(2, **f32)), ValueError, r"^scale: expected a 0-d"),
        ("scale_2d", dict(out_dtype=TORCH_FP8, scale=torch.ones(1, 1, **f32)), ValueError, r"^scale: expected a 0-d"),
        ("scale_dtype", dict(out_dtype=TORCH_FP8, scale=torch.ones((), dtype=torch.bfloat16)), TypeError,
         r"^scale: expected dtype float32"),
        ("scale_device", dict(out_dtype=TORCH_FP8, scale=torch.ones((), device="meta")), ValueError,
         r"^scale: expected a tensor on cpu"),
        ("scale_zero", dict(out_dtype=TORCH_FP8, scale=torch.zeros((), **f32)), ValueError,
         r"^scale: expected a finite"),
        ("scale_negative", dict(out_dtype=TORCH_FP8, scale=-1.0), ValueError, r"^scale: expected a finite"),
        ("scale_inf", dict(out_dtype=TORCH_FP8, scale=torch.full((1,), float("inf"))), ValueError, r"^scale:"),
        ("scale_nan", dict(out_dtype=TORCH_FP8, scale=float("nan")), ValueError, r"^scale:"),
        ("scale_underflows", dict(out_dtype=TORCH_FP8, scale=1e-50), ValueError, r"^scale:"),
        ("scale_overflows", dict(out_dtype=TORCH_FP8, scale=1e39), ValueError, r"^scale:"),
        ("scale_bool", dict(out_dtype=TORCH_FP8, scale=True), TypeError, r"^scale:"),
        ("scale_list", dict(out_dtype=TORCH_FP8, scale=[1.0]), TypeError, r"^scale:"),
    ]


@pytest.mark.parametrize("bad_id,kwargs,exc,match", _bad_fp8_calls(), ids=[c[0] for c in _bad_fp8_calls()])
def test_bad_fp8_input_raises(bad_id, kwargs, exc, match):
    xn, wn, rn = fp8_inputs("bad", 4, 192, "bfloat16", "float32", special=False)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    for residual in (None, r):
        with pytest.raises(exc, match=match):
            bi_torch.rms_norm(x, w, 1e-6, residual, **kwargs)
    assert_bits(xn, x, "x written")
    assert_bits(rn, r, "residual written")


def test_fp8_has_no_gradient():
    xn, wn, rn = fp8_inputs("grad", 2, 64, "bfloat16", "float32", special=False)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    for name, args in (("x", (x.clone().requires_grad_(), w, 1e-6, None)), ("weight", (x, w.clone().requires_grad_())),
                       ("residual", (x, w, 1e-6, r.clone().requires_grad_()))):
        for kw in (dict(scale=0.5), dict(group_size=64)):
            with pytest.raises(RuntimeError, match=rf"^out_dtype: float8_e4m3fn outputs have no gradient.*{name}"):
                bi_torch.rms_norm(*args, out_dtype=TORCH_FP8, **kw)
            with torch.no_grad():
                bi_torch.rms_norm(*args, out_dtype=TORCH_FP8, **kw)
            with torch.inference_mode():
                bi_torch.rms_norm(*args, out_dtype=TORCH_FP8, **kw)
    with pytest.raises(RuntimeError, match=r"scale requires grad"):
        bi_torch.rms_norm(x, w, out_dtype=TORCH_FP8, scale=torch.ones((), requires_grad=True))


# --------------------------------------------------------------------------------------------
# torch.compile (fullgraph) gives eager's bits; opcheck.
# --------------------------------------------------------------------------------------------


def _fp8_leaves(result):
    return torch.utils._pytree.tree_leaves(result)


def _assert_same(want: torch.Tensor, got: torch.Tensor, what: str) -> None:
    (assert_fp8_bits if want.dtype == TORCH_FP8 else assert_bits)(want, got, what)


def test_compile_fullgraph(fresh_dynamo):
    xn, wn, rn = fp8_inputs("compile", 5, 256, "bfloat16", "float32")
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    scale = torch.tensor([0.02])

    def f(x, w, r, scale):
        return (bi_torch.rms_norm(x, w, 1e-6, r, out_dtype=TORCH_FP8, scale=scale),
                bi_torch.rms_norm(x, w, 1e-6, out_dtype=TORCH_FP8, scale=0.5, mode="fp32"),
                bi_torch.rms_norm(x, w, 1e-6, r, out_dtype=TORCH_FP8, group_size=128, weight_offset=1.0))

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    for got, want in zip(_fp8_leaves(compiled(x, w, r, scale)), _fp8_leaves(f(x, w, r, scale))):
        _assert_same(want, got, "compiled FP8 rms_norm vs eager")


def test_compile_vllm_drop_ins_fullgraph(fresh_dynamo):
    xn, wn, rn = fp8_inputs("compile-vllm", 5, 256, "bfloat16", "same")
    x, w = to_torch(xn), to_torch(wn)
    scale = torch.tensor([0.02])

    def f(result, x, r, w, scale):
        bi_torch.fused_add_rms_norm_static_fp8_quant(result, x, r, w, scale, 1e-6)
        out, scales = bi_torch.rms_norm_per_block_quant(x, w, 1e-6, TORCH_FP8, [1, 128], is_scale_transposed=True)
        return out, scales

    results, residuals, outs = [], [], []
    for fn in (f, torch.compile(f, fullgraph=True, backend="inductor")):
        result, r = torch.empty(x.shape, dtype=TORCH_FP8), to_torch(rn)
        outs.append(_fp8_leaves(fn(result, x, r, w, scale)))
        results.append(result), residuals.append(r)
    assert_fp8_bits(results[0], results[1], "compiled static result vs eager")
    assert_bits(residuals[0], residuals[1], "compiled residual vs eager")
    for want, got in zip(*outs):
        _assert_same(want, got, "compiled per-block output vs eager")


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck():
    """Fake tensors, autograd registration and AOT dispatch. Not test_schema: its aliasing check
    multiplies the outputs, which torch's CPU kernels cannot do in float8_e4m3fn."""
    xn, wn, rn = fp8_inputs("opcheck", 3, 128, "bfloat16", "float32", special=False)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    scale = torch.tensor([0.5])
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    op, inplace = torch.ops.bi_norm.rms_norm_fp8.default, torch.ops.bi_norm.rms_norm_fp8_.default
    torch.library.opcheck(op, (x, r, w, scale, 1e-6, "llama", 0.0, 0, TORCH_FP8), test_utils=utils)
    torch.library.opcheck(op, (x, None, w, None, 1e-5, "fp32", 1.0, 64, TORCH_FP8), test_utils=utils)
    out, scales = torch.empty(x.shape, dtype=TORCH_FP8), torch.empty(3, 2)
    torch.library.opcheck(inplace, (out, x, r.clone(), w, None, scales, 1e-6, "llama", 0.0, 64), test_utils=utils)


# --------------------------------------------------------------------------------------------
# The vLLM drop-ins.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_vllm_static_drop_ins(dtype):
    xn, wn, rn = fp8_inputs("vllm-static", 6, 192, dtype, "same")
    x, w = to_torch(xn), to_torch(wn)
    sa = scale_array(0.0123, (1,))
    result = torch.empty(x.shape, dtype=TORCH_FP8)
    assert bi_torch.rms_norm_static_fp8_quant(result, x, w, torch.from_numpy(sa), 1e-6) is None
    assert_fp8_bits(ref_fp8(xn, wn, 1e-6, scale=sa)[0], result, "rms_norm_static_fp8_quant")
    r = to_torch(rn)
    assert bi_torch.fused_add_rms_norm_static_fp8_quant(result, x, r, w, torch.from_numpy(sa), 1e-6) is None
    e_out, _, e_res = ref_fp8(xn, wn, 1e-6, rn, scale=sa)
    assert_fp8_bits(e_out, result, "fused_add_rms_norm_static_fp8_quant result")
    assert_bits(e_res, r, "fused_add_rms_norm_static_fp8_quant: residual in place")
    assert_bits(xn, x, "fused_add_rms_norm_static_fp8_quant modified its input")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vllm_per_block_drop_in(dtype, group, transposed):
    xn, wn, rn = fp8_inputs("vllm-block", 6, 256, dtype, "same")
    x, w = to_torch(xn).reshape(2, 3, 256), to_torch(wn)
    out, scales = bi_torch.rms_norm_per_block_quant(x, w, 1e-6, TORCH_FP8, [1, group],
                                                    is_scale_transposed=transposed)
    e_out, e_scales, _ = ref_fp8(xn, wn, 1e-6, group_size=group)
    assert out.shape == x.shape and scales.shape == (6, 256 // group)
    assert scales.stride() == ((1, 6) if transposed else (256 // group, 1))
    assert_fp8_bits(e_out.reshape(2, 3, 256), out, "rms_norm_per_block_quant out")
    assert_bits(e_scales, scales, "rms_norm_per_block_quant scales")
    r = to_torch(rn)
    out, scales = bi_torch.rms_norm_per_block_quant(to_torch(xn), w, 1e-6, TORCH_FP8, [1, group], None, r, transposed)
    e_out, e_scales, e_res = ref_fp8(xn, wn, 1e-6, rn, group_size=group)
    assert_fp8_bits(e_out, out, "rms_norm_per_block_quant out (residual)")
    assert_bits(e_scales, scales, "rms_norm_per_block_quant scales (residual)")
    assert_bits(e_res, r, "rms_norm_per_block_quant: residual in place")


def _bad_vllm_calls():
    """(id, call(x, w, r, result, scale), exception, match): each must leave result and residual as they were."""
    fp8, f = TORCH_FP8, bi_torch
    return [
        ("result_dtype", lambda x, w, r, o, s: f.rms_norm_static_fp8_quant(o.view(torch.bfloat16), x, w, s, 1e-6),
         TypeError, r"^result:"),
        ("result_e5m2", lambda x, w, r, o, s: f.rms_norm_static_fp8_quant(o.view(torch.float8_e5m2), x, w, s, 1e-6),
         ValueError, r"^result:"),
        ("result_shape", lambda x, w, r, o, s: f.rms_norm_static_fp8_quant(o[:3], x, w, s, 1e-6), ValueError,
         r"^result: expected shape"),
        ("result_strided", lambda x, w, r, o, s: f.rms_norm_static_fp8_quant(o.t().contiguous().t(), x, w, s, 1e-6),
         ValueError, r"^result: must be contiguous"),
        ("scale_shape", lambda x, w, r, o, s: f.rms_norm_static_fp8_quant(o, x, w, s.expand(2), 1e-6), ValueError,
         r"^scale:"),
        ("scale_value", lambda x, w, r, o, s: f.fused_add_rms_norm_static_fp8_quant(o, x, r, w, -s, 1e-6), ValueError,
         r"^scale:"),
        ("residual_is_input", lambda x, w, r, o, s: f.fused_add_rms_norm_static_fp8_quant(o, r, r, w, s, 1e-6),
         ValueError, r"^residual: must not share memory with x"),
        ("residual_missing", lambda x, w, r, o, s: f.fused_add_rms_norm_static_fp8_quant(o, x, None, w, s, 1e-6),
         TypeError, r"^residual:"),
        ("quant_int8", lambda x, w, r, o, s: f.rms_norm_per_block_quant(x, w, 1e-6, torch.int8, [1, 64], residual=r),
         TypeError, r"^quant_dtype:"),
        ("group_1d", lambda x, w, r, o, s: f.rms_norm_per_block_quant(x, w, 1e-6, fp8, [64], residual=r),
         ValueError, r"^group_size:"),
        ("group_2_rows", lambda x, w, r, o, s: f.rms_norm_per_block_quant(x, w, 1e-6, fp8, [2, 64], residual=r),
         ValueError, r"^group_size:"),
        ("group_not_dividing", lambda x, w, r, o, s: f.rms_norm_per_block_quant(x, w, 1e-6, fp8, [1, 128], residual=r),
         ValueError, r"^group_size: must divide"),
        ("scale_ub", lambda x, w, r, o, s: f.rms_norm_per_block_quant(x, w, 1e-6, fp8, [1, 64], s, r), ValueError,
         r"^scale_ub:"),
        ("grad", lambda x, w, r, o, s: f.fused_add_rms_norm_static_fp8_quant(o, x, r, w.requires_grad_(), s, 1e-6),
         RuntimeError, r"^result: float8_e4m3fn outputs have no gradient"),
    ]


@pytest.mark.parametrize("bad_id,call,exc,match", _bad_vllm_calls(), ids=[c[0] for c in _bad_vllm_calls()])
def test_bad_vllm_input_raises(bad_id, call, exc, match):
    xn, wn, rn = fp8_inputs("vllm-bad", 4, 192, "bfloat16", "same", special=False)
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    result = torch.full(x.shape, 0x55, dtype=torch.uint8).view(TORCH_FP8)
    with pytest.raises(exc, match=match):
        call(x, w, r, result, torch.tensor([0.5]))
    assert (result.view(torch.uint8) == 0x55).all(), "result written"
    assert_bits(rn, r, "residual written")
    assert_bits(xn, x, "input written")
    assert np.array_equal(to_numpy(w).view(np.uint16), wn.view(np.uint16))
