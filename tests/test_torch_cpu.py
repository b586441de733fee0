"""bi_torch on CPU tensors: the same Triton kernel, run by the Triton interpreter.

Every numeric assertion here is bitwise (integer views): against the golden corpus, against
bridge.reference, and between calls that must agree (a row alone vs in a batch, strided vs
contiguous, in place vs functional, compiled vs eager).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bi_torch
import bi_torch.ops
from bridge import golden
from torch_helpers import (DTYPES, NUMPY_DTYPES, assert_bits, bi, random_rows, random_weight, ref, to_numpy,
                           to_torch)

_MANIFEST_CASES = golden.load_manifest()["cases"]
CASE_NAMES = [entry["name"] for entry in _MANIFEST_CASES]
RESIDUAL_CASE_NAMES = [entry["name"] for entry in _MANIFEST_CASES if entry["residual"] != "none"]
# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _seed(*parts) -> int:
    """A deterministic seed from the test's parameters (hash() of str is salted per process)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


# --------------------------------------------------------------------------------------------
# A) The golden corpus, bit for bit.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case(cases_by_name, name):
    case = cases_by_name[name]
    x, w, r = to_torch(case.x), to_torch(case.weight), to_torch(case.residual)
    x_before, r_before = to_numpy(x), to_numpy(r)
    for (mode, offset), expected in case.out.items():
        out, new_res = bi(x, w, case.spec.eps, r, mode, offset)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert_bits(expected, out, f"{name} out ({mode}, offset {offset})")
        if r is None:
            assert new_res is None
        else:
            assert new_res.dtype == r.dtype
            assert_bits(case.new_residual, new_res, f"{name} new_residual ({mode}, offset {offset})")
    # The functional call never writes its inputs.
    assert_bits(x_before, x, f"{name}: x was modified")
    if r is not None:
        assert_bits(r_before, r, f"{name}: residual was modified")


@pytest.mark.parametrize("name", RESIDUAL_CASE_NAMES)
def test_corpus_inplace_matches_functional(cases_by_name, name):
    case = cases_by_name[name]
    w = to_torch(case.weight)
    for (mode, offset), expected in case.out.items():
        x, r = to_torch(case.x), to_torch(case.residual)
        f_out, f_res = bi(x, w, case.spec.eps, r, mode, offset)
        result = bi_torch.fused_add_rms_norm_(x, r, w, case.spec.eps, mode=mode, weight_offset=offset)
        assert result[0] is x and result[1] is r
        assert_bits(f_out, x, f"{name} in place x vs functional out ({mode}, {offset})")
        assert_bits(f_res, r, f"{name} in place residual vs functional new_residual ({mode}, {offset})")
        assert_bits(expected, x, f"{name} in place x vs corpus ({mode}, {offset})")
        assert_bits(case.new_residual, r, f"{name} in place residual vs corpus ({mode}, {offset})")


def test_corpus_covers_the_residual_kinds():
    kinds = {entry["residual"] for entry in _MANIFEST_CASES if entry["residual"] != "none"}
    assert kinds == {"same", "float32"}


@pytest.mark.parametrize("n", [20000, 65536])
@pytest.mark.parametrize("dtype,res_dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                             ("float16", "float16"), ("float32", "float32")])
def test_inplace_chunked_rows(n, dtype, res_dtype):
    """Rows past the 16384 whole-row limit (two-pass kernel) in place: x and residual alias out."""
    rng = np.random.default_rng(_seed("chunked-inplace", n, dtype, res_dtype))
    xn, rn = random_rows(rng, (2, n), dtype, specials=True), random_rows(rng, (2, n), res_dtype)
    wn = random_weight(rng, n, dtype)
    e_out, e_res = ref(xn, wn, 1e-5, rn)
    x, r, w = to_torch(xn), to_torch(rn), to_torch(wn)
    f_out, f_res = bi(x, w, 1e-5, r)
    bi_torch.fused_add_rms_norm_(x, r, w, 1e-5)
    assert_bits(e_out, f_out, "functional out vs reference")
    assert_bits(e_res, f_res, "functional new_residual vs reference")
    assert_bits(e_out, x, "in place x vs reference")
    assert_bits(e_res, r, "in place residual vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_vllm_drop_in(dtype):
    rng = np.random.default_rng(_seed("vllm", dtype))
    xn, wn = random_rows(rng, (5, 96), dtype), random_weight(rng, 96, dtype)
    rn = random_rows(rng, (5, 96), "float32")
    x, w, r = to_torch(xn), to_torch(wn), to_torch(rn)
    out = bi_torch.rms_norm_batch_invariant(x, w, 1e-5)
    assert isinstance(out, torch.Tensor) and out is not x
    assert_bits(bi_torch.rms_norm(x, w, 1e-5, mode="fp32"), out, "drop-in vs rms_norm(mode='fp32')")
    assert_bits(ref(xn, wn, 1e-5, mode="fp32")[0], out, "drop-in vs reference")
    assert_bits(xn, x, "drop-in modified its input")
    # fp32 mode really differs from llama mode on these inputs (else this test would prove little).
    if dtype != "float32":
        assert not np.array_equal(to_numpy(out).view(np.uint16), ref(xn, wn, 1e-5, mode="llama")[0].view(np.uint16))
    # With a residual: in place, returns the very same objects.
    e_out, e_res = ref(xn, wn, 1e-5, rn, mode="fp32")
    f_out, f_res = bi_torch.rms_norm(x, w, 1e-5, r, mode="fp32")
    result = bi_torch.rms_norm_batch_invariant(x, w, 1e-5, r)
    assert isinstance(result, tuple) and len(result) == 2
    assert result[0] is x and result[1] is r
    assert_bits(f_out, x, "drop-in in place x vs rms_norm(mode='fp32')")
    assert_bits(f_res, r, "drop-in in place residual vs rms_norm(mode='fp32')")
    assert_bits(e_out, x, "drop-in in place x vs reference")
    assert_bits(e_res, r, "drop-in in place residual vs reference")


# --------------------------------------------------------------------------------------------
# Batch invariance on the interpreter.
# --------------------------------------------------------------------------------------------

BATCH_NS = [7, 128, 1000, 5120, 20000]


def _batch_plan(n: int, res_dtype, dtype: str):
    """(batch size, positions of the probed row) pairs; fewer, smaller calls for long rows (slow to interpret)."""
    if n <= 1000:
        return [(b, sorted({0, b // 2, b - 1})) for b in (1, 2, 3, 17, 64)]
    if n <= 5120:
        return [(1, [0]), (2, [1]), (3, [1]), (17, [0, 16]), (64, [37])]
    plan = [(1, [0]), (2, [0, 1]), (3, [2]), (17, [9])]
    if dtype == "bfloat16" and res_dtype == "float32":
        plan.append((64, [63]))
    return plan


@pytest.mark.parametrize("res_dtype", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", BATCH_NS)
def test_batch_invariance(n, dtype, res_dtype):
    rng = np.random.default_rng(_seed("batch", n, dtype, res_dtype))
    wn = random_weight(rng, n, dtype)
    w = to_torch(wn)
    row = random_rows(rng, (1, n), dtype, specials=n == 1000)
    row_r = None if res_dtype is None else random_rows(rng, (1, n), res_dtype)
    alone_out, alone_res = bi(to_torch(row), w, 1e-6, to_torch(row_r))
    e_out, e_res = ref(row, wn, 1e-6, row_r)
    assert_bits(e_out, alone_out, "row alone vs reference")
    if res_dtype is not None:
        assert_bits(e_res, alone_res, "row alone new_residual vs reference")
    for b, positions in _batch_plan(n, res_dtype, dtype):
        for p in positions:
            xn = random_rows(rng, (b, n), dtype)
            rn = None if res_dtype is None else random_rows(rng, (b, n), res_dtype)
            xn[p] = row[0]
            if rn is not None:
                rn[p] = row_r[0]
            out, new_res = bi(to_torch(xn), w, 1e-6, to_torch(rn))
            what = f"n={n} {dtype} batch {b} position {p}"
            assert_bits(alone_out[0], out[p], f"{what}: row in batch vs alone")
            b_out, b_res = ref(xn, wn, 1e-6, rn)
            assert_bits(b_out, out, f"{what}: batch vs reference")
            if rn is not None:
                assert_bits(alone_res[0], new_res[p], f"{what}: new_residual in batch vs alone")
                assert_bits(b_res, new_res, f"{what}: batch new_residual vs reference")


@pytest.mark.parametrize("res_dtype", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("n,dtype", [(7, "float16"), (128, "bfloat16"), (1000, "float32"), (20000, "bfloat16")])
def test_leading_shapes(n, dtype, res_dtype):
    """(B, n), (2, B, n) and (B, 1, n) inputs: same bits row by row, output shaped like x."""
    rng = np.random.default_rng(_seed("lead", n, dtype, res_dtype))
    b = 3 if n == 20000 else 17
    wn = random_weight(rng, n, dtype)
    w = to_torch(wn)
    xn = random_rows(rng, (2 * b, n), dtype)
    rn = None if res_dtype is None else random_rows(rng, (2 * b, n), res_dtype)
    flat_out, flat_res = bi(to_torch(xn), w, 1e-6, to_torch(rn))
    e_out, e_res = ref(xn, wn, 1e-6, rn)
    assert_bits(e_out, flat_out, "(2B, n) vs reference")
    for shape, rows in (((b, n), slice(0, b)), ((2, b, n), slice(0, 2 * b)), ((b, 1, n), slice(b, 2 * b))):
        x = to_torch(xn[rows]).reshape(shape)
        r = None if rn is None else to_torch(rn[rows]).reshape(shape)
        out, new_res = bi(x, w, 1e-6, r)
        assert out.shape == shape
        assert_bits(flat_out[rows], out.reshape(-1, n), f"shape {shape}: out vs flat")
        if r is not None:
            assert new_res.shape == shape and new_res.dtype == r.dtype
            assert_bits(flat_res[rows], new_res.reshape(-1, n), f"shape {shape}: new_residual vs flat")
            xi, ri = x.clone(), r.clone()
            bi_torch.fused_add_rms_norm_(xi, ri, w, 1e-6)
            assert_bits(out, xi, f"shape {shape}: in place x")
            assert_bits(new_res, ri, f"shape {shape}: in place residual")


@pytest.fixture
def launched(monkeypatch):
    """Records (data_ptr, stride) of every x that reaches the kernel launcher."""
    calls = []
    original = bi_torch.ops.launch

    def recording_launch(x, weight, out, eps, residual, new_residual, mode, weight_offset):
        calls.append({"x": (x.data_ptr(), tuple(x.stride())),
                      "out": (out.data_ptr(), tuple(out.stride())),
                      "residual": None if residual is None else (residual.data_ptr(), tuple(residual.stride()))})
        return original(x, weight, out, eps, residual, new_residual, mode, weight_offset)

    monkeypatch.setattr(bi_torch.ops, "launch", recording_launch)
    return calls


def _poisoned(shape, dtype):
    """A buffer whose every element is NaN: columns or rows a kernel must not read stay NaN."""
    return np.full(shape, np.nan, dtype=np.float32).astype(NUMPY_DTYPES[dtype])


@pytest.mark.parametrize("res_dtype", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("n,dtype", [(7, "bfloat16"), (128, "float16"), (1000, "float32"), (5120, "bfloat16"),
                                     (20000, "bfloat16"), (20000, "float32")])
def test_strided_row_views(n, dtype, res_dtype, launched):
    rng = np.random.default_rng(_seed("strided", n, dtype, res_dtype))
    b = 3
    wn = random_weight(rng, n, dtype)
    w = to_torch(wn)
    xn = random_rows(rng, (b, n), dtype)
    rn = None if res_dtype is None else random_rows(rng, (b, n), res_dtype)
    e_out, e_res = ref(xn, wn, 1e-6, rn)

    # Padded rows: x = big[:, :n] of a wider buffer (the padding is NaN, so any over-read shows).
    pad = 5
    big = _poisoned((b, n + pad), dtype)
    big[:, :n] = xn
    big_t = to_torch(big)
    x_cols = big_t[:, :n]
    # Every other row: x = big[::2], the rows in between NaN.
    tall = _poisoned((2 * b, n), dtype)
    tall[::2] = xn
    tall_t = to_torch(tall)
    x_rows = tall_t[::2]
    r_cols = r_rows = r_big_t = r_tall_t = None
    if rn is not None:
        r_big = _poisoned((b, n + pad), res_dtype)
        r_big[:, :n] = rn
        r_big_t = to_torch(r_big)
        r_cols = r_big_t[:, :n]
        r_tall = _poisoned((2 * b, n), res_dtype)
        r_tall[::2] = rn
        r_tall_t = to_torch(r_tall)
        r_rows = r_tall_t[::2]

    contiguous_out, contiguous_res = bi(to_torch(xn), w, 1e-6, to_torch(rn))
    assert_bits(e_out, contiguous_out, "contiguous vs reference")
    for label, x, r, parent, r_parent in (("big[:, :n]", x_cols, r_cols, big_t, r_big_t),
                                         ("big[::2]", x_rows, r_rows, tall_t, r_tall_t)):
        assert not x.is_contiguous()
        launched.clear()
        out, new_res = bi(x, w, 1e-6, r)
        # No copy: the kernel got x's own memory and row stride.
        assert len(launched) == 1
        assert launched[0]["x"] == (x.data_ptr(), (x.stride(0), 1)), f"{label}: x was copied"
        if r is not None:
            assert launched[0]["residual"] == (r.data_ptr(), (r.stride(0), 1)), f"{label}: residual was copied"
        assert_bits(contiguous_out, out, f"{label}: out vs contiguous")
        assert_bits(e_out, out, f"{label}: out vs reference")
        if r is not None:
            assert_bits(contiguous_res, new_res, f"{label}: new_residual vs contiguous")
            assert_bits(e_res, new_res, f"{label}: new_residual vs reference")
            # In place on the strided views: the right bits land in the views, nothing else moves.
            parent_before, r_parent_before = to_numpy(parent), to_numpy(r_parent)
            launched.clear()
            result = bi_torch.fused_add_rms_norm_(x, r, w, 1e-6)
            assert result[0] is x and result[1] is r
            assert launched[0]["x"] == (x.data_ptr(), (x.stride(0), 1)), f"{label}: in place x was copied"
            assert_bits(e_out, x, f"{label}: in place x vs reference")
            assert_bits(e_res, r, f"{label}: in place residual vs reference")
            after, r_after = to_numpy(parent), to_numpy(r_parent)
            if label == "big[:, :n]":
                assert_bits(parent_before[:, n:], after[:, n:], f"{label}: x's parent padding was written")
                assert_bits(r_parent_before[:, n:], r_after[:, n:], f"{label}: residual's parent padding written")
            else:
                assert_bits(parent_before[1::2], after[1::2], f"{label}: x's parent odd rows were written")
                assert_bits(r_parent_before[1::2], r_after[1::2], f"{label}: residual's parent odd rows written")
            assert_bits(e_out, after[::2] if label == "big[::2]" else after[:, :n], f"{label}: parent view")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    w = torch.ones(16, dtype=TD[dtype])
    for shape in ((0, 16), (2, 0, 16)):
        x = torch.empty(shape, dtype=TD[dtype])
        out = bi_torch.rms_norm(x, w)
        assert out.shape == shape and out.dtype == x.dtype
        r = torch.empty(shape, dtype=torch.float32)
        out, new_res = bi_torch.rms_norm(x, w, 1e-6, r)
        assert out.shape == shape and new_res.shape == shape and new_res.dtype == torch.float32
        xr, rr = bi_torch.fused_add_rms_norm_(x, r, w)
        assert xr is x and rr is r


def test_empty_batch_from_numpy():
    """An empty (0, n) tensor has no element to address: torch calls it contiguous whatever its strides.
    torch.from_numpy of an empty numpy array has strides (0, 0) (numpy's own), and must be accepted:
    the error's advice, x.contiguous(), returns the very same tensor."""
    n = 16
    x = torch.from_numpy(np.zeros((0, n), np.float32))
    r = torch.from_numpy(np.zeros((0, n), np.float32))
    assert x.numel() == 0 and x.is_contiguous() and x.contiguous().stride() == x.stride()
    w = torch.ones(n)
    out = bi_torch.rms_norm(x, w)
    assert out.shape == (0, n)
    out, new_res = bi_torch.rms_norm(x, w, 1e-6, r)
    assert out.shape == (0, n) and new_res.shape == (0, n)
    assert bi_torch.fused_add_rms_norm_(x, r, w)[0] is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_equals_one(dtype):
    rng = np.random.default_rng(_seed("n1", dtype))
    xn = random_rows(rng, (9, 1), dtype, specials=True)
    xn[0, 0] = 0
    rn = random_rows(rng, (9, 1), "float32")
    wn = random_weight(rng, 1, dtype)
    for mode in ("llama", "fp32"):
        out, _ = bi(to_torch(xn), to_torch(wn), 1e-6, mode=mode)
        assert_bits(ref(xn, wn, 1e-6, mode=mode)[0], out, f"n=1 {mode}")
        out, new_res = bi(to_torch(xn), to_torch(wn), 1e-6, to_torch(rn), mode=mode)
        e_out, e_res = ref(xn, wn, 1e-6, rn, mode=mode)
        assert_bits(e_out, out, f"n=1 {mode} with residual")
        assert_bits(e_res, new_res, f"n=1 {mode} new_residual")
    # A 1-D x of one element, and a (rows, 1) view of a wider buffer.
    out = bi_torch.rms_norm(to_torch(xn[1]), to_torch(wn))
    assert out.shape == (1,)
    assert_bits(ref(xn[1:2], wn)[0][0], out, "1-D x")
    big = to_torch(np.repeat(xn, 3, axis=1))
    out = bi_torch.rms_norm(big[:, :1], to_torch(wn))
    assert_bits(ref(xn, wn)[0], out, "(rows, 1) view")


# --------------------------------------------------------------------------------------------
# Bad input: raised before anything is written, naming the argument.
# --------------------------------------------------------------------------------------------

N = 8


def _args(dtype=torch.bfloat16, shape=(4, N), res_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    r = torch.randn(shape, generator=g).to(res_dtype)
    return {"x": x, "weight": w, "eps": 1e-6, "residual": r, "mode": "llama", "weight_offset": 0.0}


def _bad_calls():
    """(id, function of a fresh valid argument dict that breaks it, exception, match, needs residual)."""
    def setk(**kw):
        def f(a):
            a.update({k: (v(a) if callable(v) else v) for k, v in kw.items()})
            return a
        return f

    return [
        ("weight_short", setk(weight=lambda a: a["weight"][:N - 1].clone()), ValueError, r"^weight:", False),
        ("weight_2d", setk(weight=lambda a: a["weight"].reshape(1, N).clone()), ValueError, r"^weight:", False),
        ("weight_long", setk(weight=lambda a: torch.ones(N + 1, dtype=a["x"].dtype)), ValueError, r"^weight:", False),
        ("residual_shape", setk(residual=lambda a: a["residual"][:, :N - 1].clone()), ValueError, r"^residual:", True),
        ("residual_rows", setk(residual=lambda a: a["residual"][:3].clone()), ValueError, r"^residual:", True),
        ("weight_dtype", setk(weight=lambda a: a["weight"].float()), TypeError, r"^weight:", False),
        ("residual_float16", setk(residual=lambda a: a["residual"].half()), TypeError, r"^residual:", True),
        ("residual_float64", setk(residual=lambda a: a["residual"].double()), TypeError, r"^residual:", True),
        ("x_float64", setk(x=lambda a: a["x"].double(), weight=lambda a: a["weight"].double(),
                           residual=lambda a: a["residual"].double()), TypeError, r"^x:", False),
        ("x_int32", setk(x=lambda a: a["x"].to(torch.int32), weight=lambda a: a["weight"].to(torch.int32),
                         residual=lambda a: a["residual"].to(torch.int32)), TypeError, r"^x:", False),
        ("n_zero", setk(x=lambda a: a["x"][:, :0].clone(), weight=lambda a: a["weight"][:0].clone(),
                        residual=lambda a: a["residual"][:, :0].clone()), ValueError, r"^x:", False),
        ("eps_zero", setk(eps=0.0), ValueError, r"^eps:", False),
        ("eps_int_zero", setk(eps=0), ValueError, r"^eps:", False),
        ("eps_negative", setk(eps=-1.0), ValueError, r"^eps:", False),
        ("eps_nan", setk(eps=math.nan), ValueError, r"^eps:", False),
        ("eps_inf", setk(eps=math.inf), ValueError, r"^eps:", False),
        ("eps_underflows_float32", setk(eps=1e-50), ValueError, r"^eps:", False),
        ("eps_overflows_float32", setk(eps=1e39), ValueError, r"^eps:", False),
        ("eps_str", setk(eps="a"), TypeError, r"^eps:", False),
        ("eps_bool", setk(eps=True), TypeError, r"^eps:", False),
        ("eps_tensor", setk(eps=torch.tensor(1e-6)), TypeError, r"^eps:", False),
        ("mode_bogus", setk(mode="bogus"), ValueError, r"^mode:", False),
        ("weight_offset_nan", setk(weight_offset=math.nan), ValueError, r"^weight_offset:", False),
        ("weight_offset_inf", setk(weight_offset=math.inf), ValueError, r"^weight_offset:", False),
        ("weight_offset_str", setk(weight_offset="1"), TypeError, r"^weight_offset:", False),
        ("weight_on_meta", setk(weight=lambda a: a["weight"].to("meta")), ValueError, r"^weight:", False),
        ("residual_on_meta", setk(residual=lambda a: a["residual"].to("meta")), ValueError, r"^residual:", True),
        ("x_on_meta", setk(x=lambda a: a["x"].to("meta")), ValueError, r"^x:", False),
        ("x_transposed", setk(x=lambda a: torch.randn(N, N).to(a["x"].dtype).t(),
                              residual=lambda a: torch.randn(N, N)), ValueError, r"^x:", False),
        ("x_every_other_column", setk(x=lambda a: torch.randn(4, 2 * N).to(a["x"].dtype)[:, ::2]),
         ValueError, r"^x:", False),
        ("x_rows_not_one_stride", setk(x=lambda a: torch.randn(3, 2, N).to(a["x"].dtype).transpose(0, 1),
                                       residual=lambda a: torch.randn(2, 3, N)), ValueError, r"^x:", False),
        ("residual_every_other_column", setk(residual=lambda a: torch.randn(4, 2 * N)[:, ::2]),
         ValueError, r"^residual:", True),
        ("residual_transposed", setk(x=lambda a: torch.randn(N, N).to(a["x"].dtype),
                                     residual=lambda a: torch.randn(N, N).t()), ValueError, r"^residual:", True),
        ("weight_strided", setk(weight=lambda a: torch.ones(2 * N, dtype=a["x"].dtype)[::2]),
         ValueError, r"^weight:", False),
        ("x_not_a_tensor", setk(x=lambda a: a["x"].tolist()), TypeError, r"^x:", False),
        ("weight_not_a_tensor", setk(weight=lambda a: a["weight"].tolist()), TypeError, r"^weight:", False),
    ]


BAD_CALLS = _bad_calls()
# Bad for the in-place call only (it has no backward); the functional call differentiates
# (test_torch_autograd_cpu.py).
INPLACE_GRAD_CALLS = [
    (f"{name}_requires_grad", lambda a, name=name: {**a, name: a[name].clone().requires_grad_()}, RuntimeError,
     rf"^{name}: requires grad", name == "residual") for name in ("x", "weight", "residual")]


# Each bad call without a residual (unless the error is about the residual) and with one.
FUNCTIONAL_BAD_CALLS = [pytest.param(c, with_res, id=f"{c[0]}-{'res' if with_res else 'nores'}")
                        for c in BAD_CALLS for with_res in (False, True) if with_res or not c[4]]


@pytest.mark.parametrize("case,with_residual", FUNCTIONAL_BAD_CALLS)
def test_bad_input_functional(case, with_residual):
    name, breaker, exc, match, _ = case
    a = breaker(_args())
    if not with_residual:
        a["residual"] = None
    with pytest.raises(exc, match=match):
        bi_torch.rms_norm(a["x"], a["weight"], a["eps"], a["residual"], mode=a["mode"],
                          weight_offset=a["weight_offset"])


def _snapshot(t):
    return to_numpy(t) if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in (
        torch.float32, torch.bfloat16, torch.float16) else (t.clone() if isinstance(t, torch.Tensor)
                                                            and t.device.type == "cpu" else None)


def _assert_untouched(before, t, what):
    if before is None:
        return
    if isinstance(before, np.ndarray):
        assert_bits(before, t, what)
    else:
        assert torch.equal(before, t), what


@pytest.mark.parametrize("case", [c for c in BAD_CALLS + INPLACE_GRAD_CALLS if c[0] not in ("x_not_a_tensor",)],
                         ids=[c[0] for c in BAD_CALLS + INPLACE_GRAD_CALLS if c[0] not in ("x_not_a_tensor",)])
def test_bad_input_inplace_writes_nothing(case):
    name, breaker, exc, match, _ = case
    a = breaker(_args())
    x, r = a["x"], a["residual"]
    x_before, r_before = _snapshot(x), _snapshot(r)
    with pytest.raises(exc, match=match):
        bi_torch.fused_add_rms_norm_(x, r, a["weight"], a["eps"], mode=a["mode"], weight_offset=a["weight_offset"])
    _assert_untouched(x_before, x, f"{name}: x was written")
    _assert_untouched(r_before, r, f"{name}: residual was written")


def test_inplace_rejects_aliasing_and_missing_residual():
    a = _args(res_dtype=torch.bfloat16)
    x, w = a["x"], a["weight"]
    before = to_numpy(x)
    with pytest.raises(ValueError, match=r"^residual:"):
        bi_torch.fused_add_rms_norm_(x, x, w)
    with pytest.raises(ValueError, match=r"^residual:"):
        bi_torch.fused_add_rms_norm_(x, x.view(-1).view(x.shape), w)
    with pytest.raises(TypeError, match=r"^residual:"):
        bi_torch.fused_add_rms_norm_(x, None, w)
    assert_bits(before, x, "x was written")


def test_inplace_rejects_overlapping_memory():
    """Partial overlap of x and residual, or rows of one tensor sharing memory, cannot be written in place."""
    buf = torch.randn(4, N + 2).to(torch.bfloat16)
    before = to_numpy(buf)
    w = torch.ones(N, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^residual:"):
        bi_torch.fused_add_rms_norm_(buf[:, :N], buf[:, 2:], w)  # different data_ptr, same memory
    assert_bits(before, buf, "overlapping x/residual written by a failing call")
    row = torch.randn(N).to(torch.bfloat16)
    r = torch.randn(4, N)
    r_before = to_numpy(r)
    with pytest.raises(ValueError, match=r"^x:"):
        bi_torch.fused_add_rms_norm_(row.expand(4, N), r, w)  # four rows on one row of memory
    assert_bits(r_before, r, "residual written by a failing call")
    # The functional call reads such inputs fine: every row gets the bits of the row alone.
    out = bi_torch.rms_norm(row.expand(4, N), w)
    alone = bi_torch.rms_norm(row.reshape(1, N), w)
    assert_bits(alone.expand(4, N), out, "expanded rows vs the row alone")


def test_inplace_disjoint_interleaved_views():
    """x = buf[:, :n] and residual = buf[:, n:] share no element (a packed [hidden | residual] buffer): the
    in-place call must accept them (PyTorch's own in-place ops do, e.g. x.add_(r)) and write each half."""
    buf = torch.randn(4, 2 * N)
    x, r = buf[:, :N], buf[:, N:]
    w = torch.ones(N)
    e_out, e_res = ref(to_numpy(x), to_numpy(w), 1e-6, to_numpy(r))
    bi_torch.fused_add_rms_norm_(x, r, w)
    assert_bits(e_out, x, "disjoint halves: x")
    assert_bits(e_res, r, "disjoint halves: residual")


def test_late_failure_writes_nothing():
    """Errors found last in validation (non-contiguous residual, after all dtype/shape/device checks)."""
    a = _args()
    x = a["x"]
    r_parent = torch.randn(4, 2 * N)
    r = r_parent[:, ::2]
    xb, rpb = to_numpy(x), to_numpy(r_parent)
    with pytest.raises(ValueError, match=r"^residual:"):
        bi_torch.fused_add_rms_norm_(x, r, a["weight"], 1e-6)
    assert_bits(xb, x, "x written by a failing call")
    assert_bits(rpb, r_parent, "residual written by a failing call")
    # Weight on the wrong dtype with everything else valid, including a strided x.
    x_parent = torch.randn(4, N + 3).to(torch.bfloat16)
    x = x_parent[:, :N]
    r = torch.randn(4, N)
    xpb, rb = to_numpy(x_parent), to_numpy(r)
    with pytest.raises(TypeError, match=r"^weight:"):
        bi_torch.fused_add_rms_norm_(x, r, torch.ones(N, dtype=torch.float16), 1e-6)
    assert_bits(xpb, x_parent, "x written by a failing call")
    assert_bits(rb, r, "residual written by a failing call")


def test_requires_grad_fine_under_no_grad():
    a = _args()
    expected = bi_torch.rms_norm(a["x"], a["weight"])
    x = a["x"].clone().requires_grad_()
    w = a["weight"].clone().requires_grad_()
    with_grad = bi_torch.rms_norm(x, w)
    assert with_grad.requires_grad
    assert_bits(expected, with_grad.detach(), "with grad")
    with torch.no_grad():
        out = bi_torch.rms_norm(x, w)
        out2, new_res = bi_torch.rms_norm(x, w, 1e-6, a["residual"])
    assert not out.requires_grad
    assert_bits(expected, out, "under no_grad")
    with torch.inference_mode():
        out3 = bi_torch.rms_norm(x, w)
    assert_bits(expected, out3, "under inference_mode")


def test_vllm_drop_in_validates_both_paths():
    a = _args()
    x, r = a["x"], a["residual"]
    xb, rb = to_numpy(x), to_numpy(r)
    bad_w = torch.ones(N - 1, dtype=x.dtype)
    with pytest.raises(ValueError, match=r"^weight:"):
        bi_torch.rms_norm_batch_invariant(x, bad_w, 1e-6)
    with pytest.raises(ValueError, match=r"^weight:"):
        bi_torch.rms_norm_batch_invariant(x, bad_w, 1e-6, r)
    with pytest.raises(ValueError, match=r"^eps:"):
        bi_torch.rms_norm_batch_invariant(x, a["weight"], 0.0, r)
    assert_bits(xb, x, "x written by a failing drop-in call")
    assert_bits(rb, r, "residual written by a failing drop-in call")


# --------------------------------------------------------------------------------------------
# torch.library integration: torch.compile and opcheck.
# --------------------------------------------------------------------------------------------

# Inductor compiles for this CPU (gcc is there); the custom ops stay opaque nodes that call the
# interpreter, so the bits must equal eager's exactly.
COMPILE_BACKEND = "inductor"


def _compile_inputs(dtype="bfloat16", shape=(5, 1000), seed=1):
    rng = np.random.default_rng(seed)
    n = shape[-1]
    return (to_torch(random_rows(rng, shape, dtype, specials=True)), to_torch(random_weight(rng, n, dtype)),
            to_torch(random_rows(rng, shape, "float32")))


def test_compile_rms_norm_fullgraph(fresh_dynamo):
    x, w, r = _compile_inputs()

    def f(x, w):
        return bi_torch.rms_norm(x, w, 1e-5), bi_torch.rms_norm(x, w, 1e-5, mode="fp32", weight_offset=1.0)

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    for got, want in zip(compiled(x, w), f(x, w)):
        assert_bits(want, got, "compiled rms_norm vs eager")
    # A second shape (and a strided view) through the same compiled function.
    x2 = to_torch(random_rows(np.random.default_rng(2), (3, 1005), "bfloat16"))[:, :1000]
    for got, want in zip(compiled(x2, w), f(x2, w)):
        assert_bits(want, got, "compiled rms_norm vs eager (strided)")


def test_compile_add_rms_norm_fullgraph(fresh_dynamo):
    x, w, r = _compile_inputs()

    def f(x, w, r):
        out, new_res = bi_torch.rms_norm(x, w, 1e-6, r)
        return out, new_res

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    r_before = to_numpy(r)
    got, want = compiled(x, w, r), f(x, w, r)
    assert_bits(want[0], got[0], "compiled add_rms_norm out vs eager")
    assert_bits(want[1], got[1], "compiled add_rms_norm new_residual vs eager")
    assert_bits(r_before, r, "compiled add_rms_norm modified its residual")


def test_compile_fused_add_rms_norm_inplace_fullgraph(fresh_dynamo):
    """The public in-place entry point inside torch.compile(fullgraph=True), as vLLM would call it."""
    x, w, r = _compile_inputs()
    xe, re_ = x.clone(), r.clone()
    bi_torch.fused_add_rms_norm_(xe, re_, w, 1e-6)

    def f(x, r, w):
        bi_torch.fused_add_rms_norm_(x, r, w, 1e-6)
        return x.sum()  # something after the in-place call, to keep it in a graph

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    compiled(x, r, w)
    assert_bits(xe, x, "compiled in place x vs eager")
    assert_bits(re_, r, "compiled in place residual vs eager")


def test_compile_inplace_validation_has_no_graph_break(fresh_dynamo):
    """Dynamo must trace the wrapper's validation without a graph break (backend 'eager': no functionalization,
    so only the Python validation is exercised)."""
    x, w, r = _compile_inputs()
    xe, re_ = x.clone(), r.clone()
    bi_torch.rms_norm_batch_invariant(xe, w, 1e-6, re_)
    compiled = torch.compile(lambda x, w, r: bi_torch.rms_norm_batch_invariant(x, w, 1e-6, r),
                             fullgraph=True, backend="eager")
    compiled(x, w, r)
    assert_bits(xe, x, "compiled drop-in x vs eager")
    assert_bits(re_, r, "compiled drop-in residual vs eager")


def test_compile_fused_add_rms_norm_op_directly(fresh_dynamo):
    """The registered mutating op itself under torch.compile (functionalized by AOTAutograd)."""
    x, w, r = _compile_inputs()
    xe, re_ = x.clone(), r.clone()
    torch.ops.bi_norm.fused_add_rms_norm_(xe, re_, w, 1e-6, "llama", 0.0)

    def f(x, r, w):
        torch.ops.bi_norm.fused_add_rms_norm_(x, r, w, 1e-6, "llama", 0.0)
        return x.sum()

    torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)(x, r, w)
    assert_bits(xe, x, "compiled op x vs eager")
    assert_bits(re_, r, "compiled op residual vs eager")


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "fused_add_rms_norm_"])
def test_opcheck(op):
    rng = np.random.default_rng(3)
    for dtype, res_dtype in (("bfloat16", "float32"), ("float16", "float16"), ("float32", "float32")):
        x = to_torch(random_rows(rng, (3, 40), dtype))
        w = to_torch(random_weight(rng, 40, dtype))
        r = to_torch(random_rows(rng, (3, 40), res_dtype))
        if op == "rms_norm":
            args = (x, w, 1e-6, "llama", 0.0)
        elif op == "add_rms_norm":
            args = (x, r, w, 1e-5, "fp32", 1.0)
        else:
            args = (x, r, w, 1e-6, "llama", 0.0)
        torch.library.opcheck(getattr(torch.ops.bi_norm, op).default, args)


# --------------------------------------------------------------------------------------------
# bi_torch.RMSNorm
# --------------------------------------------------------------------------------------------


class LlamaRMSNorm(torch.nn.Module):
    """HF transformers' LlamaRMSNorm, as written there."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _ulp_distance_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bfloat16 units in the last place (sign-magnitude bits mapped to a monotone integer line)."""
    def line(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (line(a) - line(b)).abs()


def test_rmsnorm_constructor():
    m = bi_torch.RMSNorm(64)
    assert (m.hidden_size, m.eps, m.mode, m.weight_offset) == (64, 1e-6, "llama", 0.0)
    assert m.weight.shape == (64,) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    assert torch.equal(m.weight.detach(), torch.ones(64))
    assert list(m.state_dict()) == ["weight"]
    g = bi_torch.RMSNorm(48, 1e-5, mode="fp32", weight_offset=1.0, dtype=torch.bfloat16, device="cpu")
    assert (g.hidden_size, g.eps, g.mode, g.weight_offset) == (48, 1e-5, "fp32", 1.0)
    assert g.weight.dtype == torch.bfloat16 and g.weight.shape == (48,)
    assert torch.equal(g.weight.detach(), torch.zeros(48, dtype=torch.bfloat16))  # Gemma: (1 + w), w = 0
    assert "48" in repr(g) and "fp32" in repr(g)
    # The Gemma convention: zero weights with offset 1 give the same bits as unit weights without offset.
    x = to_torch(random_rows(np.random.default_rng(4), (3, 48), "bfloat16"))
    with torch.no_grad():
        assert_bits(bi_torch.rms_norm(x, torch.ones(48, dtype=torch.bfloat16), 1e-5, mode="fp32"), g(x), "gemma")


@pytest.mark.parametrize("n", [64, 5120])
def test_rmsnorm_loads_hf_state_dict(n):
    torch.manual_seed(n)
    eps = 1e-5
    hf = LlamaRMSNorm(n, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_((1 + 0.3 * torch.randn(n)).to(torch.bfloat16))
    m = bi_torch.RMSNorm(n, eps=eps, dtype=torch.bfloat16)
    m.load_state_dict(hf.state_dict())  # strict: same keys, same shapes
    assert_bits(hf.weight.detach(), m.weight.detach(), "loaded weight")
    x = (torch.randn(33, n) * 3).to(torch.bfloat16)
    r = torch.randn(33, n)
    with torch.no_grad():
        out = m(x)
        expected = bi_torch.rms_norm(x, hf.weight, eps)
        assert_bits(expected, out, "module vs rms_norm")
        assert_bits(ref(to_numpy(x), to_numpy(hf.weight), eps)[0], out, "module vs reference")
        hf_out = hf(x)
        assert hf_out.dtype == torch.bfloat16
        dist = _ulp_distance_bf16(out, hf_out)
        assert int(dist.max()) <= 2, f"bi_torch vs HF LlamaRMSNorm: {int(dist.max())} bf16 ulps apart"
        assert float((dist == 0).float().mean()) > 0.9
        # forward(x, residual) returns (out, new_residual).
        result = m(x, r)
        assert isinstance(result, tuple) and len(result) == 2
        e_out, e_res = bi_torch.rms_norm(x, hf.weight, eps, r)
        assert_bits(e_out, result[0], "module(x, residual) out")
        assert_bits(e_res, result[1], "module(x, residual) new_residual")
        assert_bits(ref(to_numpy(x), to_numpy(hf.weight), eps, to_numpy(r))[1], result[1], "new_residual vs ref")


def test_rmsnorm_grad_mode():
    """With grad on, the module's output requires grad and has the no_grad bits (its gradients:
    test_torch_autograd_cpu.py)."""
    m = bi_torch.RMSNorm(32, dtype=torch.bfloat16)
    assert m.weight.requires_grad
    x = torch.randn(2, 32).to(torch.bfloat16)
    out = m(x)
    assert out.requires_grad
    with torch.no_grad():
        assert_bits(bi_torch.rms_norm(x, torch.ones(32, dtype=torch.bfloat16)), m(x), "no_grad module")
        assert_bits(m(x), out.detach(), "grad mode vs no_grad")


# --------------------------------------------------------------------------------------------
# Property: bi_torch equals bridge.reference bitwise on random calls.
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.one_of(st.integers(1, 300), st.sampled_from([511, 1024, 4097, 16384, 16385])),
    rows=st.integers(1, 6),  # empty batches: test_empty_batch*
    layout=st.sampled_from(["flat", "lead1", "inner1", "padded"]),
    residual=st.sampled_from(["none", "same", "float32"]),
    mode=st.sampled_from(["llama", "fp32"]),
    weight_offset=st.sampled_from([0.0, 1.0, -0.5]),
    eps=st.sampled_from([1e-6, 1e-5, 0.25, 1e-30]),
    specials=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(dtype, n, rows, layout, residual, mode, weight_offset, eps, specials, seed):
    rng = np.random.default_rng(seed)
    xn = random_rows(rng, (rows, n), dtype, specials=specials)
    wn = random_weight(rng, n, dtype)
    rn = None if residual == "none" else random_rows(rng, (rows, n), dtype if residual == "same" else "float32",
                                                     specials=specials)
    e_out, e_res = ref(xn, wn, eps, rn, mode, weight_offset)
    x, r = to_torch(xn), to_torch(rn)
    if layout == "lead1":
        x, r = x.reshape(1, rows, n), None if r is None else r.reshape(1, rows, n)
    elif layout == "inner1":
        x, r = x.reshape(rows, 1, n), None if r is None else r.reshape(rows, 1, n)
    elif layout == "padded":
        x = torch.cat([x, torch.zeros(rows, 3, dtype=x.dtype)], dim=1)[:, :n]
    out, new_res = bi(x, to_torch(wn), eps, r, mode, weight_offset)
    assert out.shape == x.shape
    assert_bits(e_out, out.reshape(rows, n), "out vs reference")
    if rn is not None:
        assert_bits(e_res, new_res.reshape(rows, n), "new_residual vs reference")
