"""bi_torch on CPU tensors (the Triton interpreter): calls that must agree bit for bit. A row alone vs in a batch,
(B, n) vs leading shapes, strided views vs contiguous (no copy, nothing outside the view written), empty batches
and n = 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bi_torch
import bi_torch.ops
from torch_helpers import (DTYPES, NUMPY_DTYPES, assert_bits, bi, random_rows, random_weight, ref, seeded_rng,
                           to_numpy, to_torch)

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    rng = seeded_rng("batch", n, dtype, res_dtype)
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
    rng = seeded_rng("lead", n, dtype, res_dtype)
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


def _strided_views(a: np.ndarray, dtype: str, pad: int = 5):
    """a's rows as two strided torch views, each with its NaN-poisoned parent: big[:, :n] of a
    wider buffer (any over-read of the padding shows) and big[::2] (the rows in between NaN)."""
    b, n = a.shape
    big = _poisoned((b, n + pad), dtype)
    big[:, :n] = a
    tall = _poisoned((2 * b, n), dtype)
    tall[::2] = a
    big_t, tall_t = to_torch(big), to_torch(tall)
    return (big_t[:, :n], big_t), (tall_t[::2], tall_t)


@pytest.mark.parametrize("res_dtype", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("n,dtype", [(7, "bfloat16"), (128, "float16"), (1000, "float32"), (5120, "bfloat16"),
                                     (20000, "bfloat16"), (20000, "float32")])
def test_strided_row_views(n, dtype, res_dtype, launched):
    rng = seeded_rng("strided", n, dtype, res_dtype)
    b = 3
    wn = random_weight(rng, n, dtype)
    w = to_torch(wn)
    xn = random_rows(rng, (b, n), dtype)
    rn = None if res_dtype is None else random_rows(rng, (b, n), res_dtype)
    e_out, e_res = ref(xn, wn, 1e-6, rn)

    (x_cols, big_t), (x_rows, tall_t) = _strided_views(xn, dtype)
    (r_cols, r_big_t), (r_rows, r_tall_t) = _strided_views(rn, res_dtype) if rn is not None else ((None,) * 2,) * 2

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
    rng = seeded_rng("n1", dtype)
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
