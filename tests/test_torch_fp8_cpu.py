"""bi_torch's FP8 output (contract v1.2) on CPU tensors, the Triton interpreter, bit for bit: rnFP8 on
its own over float32 patterns, random and special rows against bridge.reference (both modes,
offsets 0 and 1, residual none / same / float32, static and both group sizes, long rows), the FP8
golden corpus, batch invariance of out and scales, bad input raised before anything is written,
no gradient, torch.compile and opcheck, and the vLLM drop-ins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

import bi_torch
from bi_torch import launch
from bridge import golden, reference_fp8
from torch_fp8_helpers import (DTYPE_RESIDUALS, FP8, FP8_CASE_NAMES, QUANTS, TORCH_FP8, assert_fp8_bits, bi_fp8,
                               check_fp8, fp8_codes, fp8_inputs, fp8_patterns, ref_fp8, scale_array)
from torch_helpers import DTYPES, assert_bits, to_numpy, to_torch

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _quant_args(scale, group):
    """(reference kwargs, bi_torch kwargs) of one scaling: a static scale as a 0-d float32 array / tensor."""
    sa = scale_array(scale)
    return dict(scale=sa, group_size=group), dict(scale=None if sa is None else torch.from_numpy(sa), group_size=group)


# --------------------------------------------------------------------------------------------
# Q3-Q4 alone: encode_fp8(clamp_fp8(c)) of the interpreted kernel module over float32 patterns.
# --------------------------------------------------------------------------------------------

# The interpreted copy of triton_kernel.py, whose helpers the interpreted test kernel calls (the
# interpreter runs the kernel's source with its module's globals: no closures).
_KERNELS = launch.interpreted_kernels()


def _encode_kernel(c_ptr, q_ptr, n, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                   EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = _KERNELS.clamp_fp8(tl.load(c_ptr + offs, mask=offs < n, other=0.0), FP8_MAX)
    tl.store(q_ptr + offs, _KERNELS.encode_fp8(c, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8), mask=offs < n)


def test_encode_fp8_matches_reference_on_float32_patterns():
    fmt = launch.fp8_constexprs(FP8)
    c = fp8_patterns()
    q = torch.empty(c.size, dtype=torch.uint8)
    block = 1 << 16
    with np.errstate(all="ignore"):
        InterpretedFunction(_encode_kernel)[(-(-c.size // block),)](torch.from_numpy(c), q, c.size, BLOCK=block, **fmt)
        expected = reference_fp8.encode_fp8(reference_fp8.clamp(c, FP8), FP8)
    got = q.numpy().view(reference_fp8.fp8_numpy_dtype(FP8))
    assert_fp8_bits(expected, got, "encode_fp8(clamp_fp8(c)) vs reference")
    # NaN is 0x7F whatever its sign; inf and out-of-range values saturate; -0.0 keeps its sign.
    assert set(fp8_codes(got)[np.isnan(c)]) == {0x7F}
    assert set(fp8_codes(got)[c >= 464]) == {0x7E} and set(fp8_codes(got)[c <= -464]) == {0xFE}
    assert fp8_codes(got)[np.signbit(c) & (c == 0)].tolist() == [0x80] * int((np.signbit(c) & (c == 0)).sum())


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
# The FP8 golden corpus, bit for bit.
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_cases():
    return {case.spec.name: case for case in golden.load_fp8_corpus()}


@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_fp8_corpus_case(fp8_cases, name):
    case = fp8_cases[name]
    x, w, r = to_torch(case.x), to_torch(case.weight), to_torch(case.residual)
    scale = None if case.scale is None else torch.from_numpy(case.scale.copy())
    for (mode, offset), expected_out in case.out.items():
        expected = (expected_out, case.scales.get((mode, offset)), case.new_residual)
        got = bi_fp8(x, w, case.spec.eps, r, mode, offset, scale=scale, group_size=case.spec.group_size)
        check_fp8(expected, got, f"{name} ({mode}, offset {offset})")
    assert_bits(case.x, x, f"{name}: x was modified")


def test_fp8_corpus_is_there():
    assert len(FP8_CASE_NAMES) >= 30


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
