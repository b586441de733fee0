"""bridge.reference.rms_norm_backward against float64 autodiff, finite differences, the golden
corpus, and NUMERICS.md's stated backward outcomes (contract v1.1)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch

from bridge import golden
from bridge.golden.backward import VARIANTS, output_names
from bridge.numerics.contract import next_power_of_two
from bridge.numerics.reference import dtype_name, numpy_dtype, pairwise_sum, rms_norm, rms_norm_backward
from bridge.verify.compare import assert_bitwise_equal, first_mismatch

DTYPES = ("float32", "bfloat16", "float16")
# Unit roundoff (half an ulp, relative) and the smallest subnormal of each dtype.
UNIT = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
SUBNORMAL = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}
U32 = UNIT["float32"]


def _as(a, dtype: str) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float32).astype(numpy_dtype(dtype))


def _inputs(rng: np.random.Generator, rows: int, n: int, dtype: str, kind: str, has_gr: bool, offset: float):
    """x, weight (around 1, or around 0 for Gemma's 1 + w), grad_out, residual, grad_new_residual."""
    r_dtype = {"none": None, "same": dtype, "float32": "float32"}[kind]
    x = _as(rng.standard_normal((rows, n)), dtype)
    weight = _as((0.1 if offset else 0.25) * rng.standard_normal(n) + (0.0 if offset else 1.0), dtype)
    g = _as(rng.standard_normal((rows, n)), dtype)
    residual = None if r_dtype is None else _as(rng.standard_normal((rows, n)), r_dtype)
    g_r = _as(rng.standard_normal((rows, n)), r_dtype) if has_gr else None
    return x, weight, g, residual, g_r


# --- against float64 autodiff ----------------------------------------------------------------


def _grads_f64(z: np.ndarray, weight: np.ndarray, g: np.ndarray, g_r: Optional[np.ndarray], eps: float,
               offset: float):
    """torch.autograd in float64 of out = z * inv * (w + offset), plus sum(g_r * z): (dz, dw).

    z is the forward's (the residual rounded to R, as the contract returns it); nothing else is
    rounded. Llama mode's rounding of xhat to D passes the gradient straight through, so its float64
    formula is this one too.
    """
    zt = torch.tensor(z.astype(np.float64), requires_grad=True)
    wt = torch.tensor(weight.astype(np.float64), requires_grad=True)
    inv = 1.0 / torch.sqrt((zt * zt).mean(-1, keepdim=True) + float(np.float32(eps)))
    loss = (zt * inv * (wt + offset) * torch.tensor(g.astype(np.float64))).sum()
    if g_r is not None:
        loss = loss + (zt * torch.tensor(g_r.astype(np.float64))).sum()
    dz, dw = torch.autograd.grad(loss, [zt, wt])
    return dz.numpy(), dw.numpy()


def _bounds(z, weight, g, eps, offset, mode, dtype):
    """Error bounds of grad_x's float32 dv and of grad_weight's float32 tree T, before rnD.

    First-order sums of the float32 roundings of B1-B7: inv carries (log2 P + 4) units (squares,
    tree, mean, + eps, sqrt, 1/r); dv = inv * (a - xhat * c) adds them to |a| and to
    |xhat| * sum|a * xhat| / n (t's tree and c), hence (3 log2 P + 20) units of
    inv * (|a| + |xhat| sum|b| / n). T: (log2 P + log2 P_rows + 8) units of sum|g * xhat| over
    rows, plus llama's rounding of h to D (one unit of D) when D is not float32.
    """
    n = z.shape[-1]
    v, w = z.astype(np.float64), weight.astype(np.float64) + offset
    inv = 1.0 / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + float(np.float32(eps)))
    xhat, a = v * inv, g.astype(np.float64) * w
    log2p = math.log2(next_power_of_two(n))
    dv = (3 * log2p + 20) * U32 * inv * (np.abs(a) + np.abs(xhat) * np.sum(np.abs(a * xhat), -1, keepdims=True) / n)
    rows = z.reshape(-1, n).shape[0]
    h_unit = UNIT[dtype] if mode == "llama" and dtype != "float32" else 0.0
    t_units = h_unit + (log2p + math.log2(next_power_of_two(rows)) + 8) * U32
    tree = t_units * np.sum(np.abs(g.astype(np.float64) * xhat).reshape(-1, n), axis=0)
    return dv, tree


def _assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray, unit: float, sub: float, what: str):
    """|got - want| <= one rounding to the output dtype (unit, and half a subnormal) plus bound."""
    err = np.abs(got.astype(np.float64) - want)
    allowed = unit * np.abs(want) + (1 + unit) * bound + sub
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert np.all(err <= allowed), (f"{what}: {got[worst]!r} vs float64 {want[worst]!r} at {worst}, "
                                    f"error {err[worst]:.3g} > allowed {allowed[worst]:.3g}")


# float32's same-dtype residual is its float32 one.
@pytest.mark.parametrize("dtype,mode,kind,has_gr", [(d, m, k, g) for d in DTYPES for m in ("llama", "fp32")
                                                    for k, g in VARIANTS if not (d == "float32" and k == "same")])
def test_close_to_float64_autodiff(dtype: str, mode: str, kind: str, has_gr: bool) -> None:
    rng = np.random.default_rng([len(dtype), len(mode), len(kind), has_gr])
    for n in (1, 7, 128, 1000, 4096):
        for offset in (0.0, 1.0):
            x, weight, g, residual, g_r = _inputs(rng, 5, n, dtype, kind, has_gr, offset)
            got = rms_norm_backward(x, weight, g, 1e-6, residual, g_r, mode=mode, weight_offset=offset)
            z = x if residual is None else rms_norm(x, weight, 1e-6, residual)[1]
            dz, dw = _grads_f64(z, weight, g, g_r, 1e-6, offset)
            dv_bound, tree_bound = _bounds(z, weight, g, 1e-6, offset, mode, dtype)
            # With a residual dz = rn(dv + g_r) adds one float32 rounding before rnD and rnR.
            dz_bound = dv_bound + (U32 * np.abs(dz) if residual is not None else 0.0)
            where = f"n={n} offset={offset}"
            _assert_within(got[0], dz, dz_bound, UNIT[dtype], SUBNORMAL[dtype], f"{where} grad_x")
            if residual is not None:
                r_dtype = {"same": dtype, "float32": "float32"}[kind]
                _assert_within(got[1], dz, dz_bound, UNIT[r_dtype], SUBNORMAL[r_dtype], f"{where} grad_residual")
            _assert_within(got[-1], dw, tree_bound, UNIT[dtype], SUBNORMAL[dtype], f"{where} grad_weight")


# --- against central finite differences ------------------------------------------------------


def _loss_f64(z: np.ndarray, w: np.ndarray, g: np.ndarray, g_r: Optional[np.ndarray], eps: float,
              offset: float) -> float:
    """The float64 formula: sum(g * out) (+ sum(g_r * z)) as a function of z and w."""
    inv = 1.0 / np.sqrt(np.mean(z * z, -1, keepdims=True) + float(np.float32(eps)))
    loss = np.sum(g * z * inv * (w + offset))
    return float(loss + (np.sum(g_r * z) if g_r is not None else 0.0))


@pytest.mark.parametrize("kind,has_gr", [("none", False), ("float32", False), ("float32", True)])
def test_close_to_central_differences(kind: str, has_gr: bool) -> None:
    rng = np.random.default_rng([7, len(kind), has_gr])
    step = 2.0**-16
    for n, offset in ((1, 0.0), (7, 1.0), (128, 0.0)):
        x, weight, g, residual, g_r = _inputs(rng, 3, n, "float32", kind, has_gr, offset)
        got = rms_norm_backward(x, weight, g, 1e-6, residual, g_r, mode="fp32", weight_offset=offset)
        # The residual add passes the gradient straight through: differentiate in z, the forward's.
        z = (x if residual is None else rms_norm(x, weight, 1e-6, residual)[1]).astype(np.float64)
        w, g64 = weight.astype(np.float64), g.astype(np.float64)
        g_r64 = None if g_r is None else g_r.astype(np.float64)
        for row, col in ((0, 0), (1, n // 2), (2, n - 1)):
            dz = np.zeros_like(z)
            dz[row, col] = step
            fd = (_loss_f64(z + dz, w, g64, g_r64, 1e-6, offset) - _loss_f64(z - dz, w, g64, g_r64, 1e-6, offset))
            fd /= 2 * step
            # Central differences err by O(step^2) here, the reference by a few float32 units.
            assert abs(float(got[0][row, col]) - fd) <= 1e-5 * (1 + abs(fd)), (n, row, col, got[0][row, col], fd)
            dw = np.zeros_like(w)
            dw[col] = step
            fd = (_loss_f64(z, w + dw, g64, g_r64, 1e-6, offset) - _loss_f64(z, w - dw, g64, g_r64, 1e-6, offset))
            fd /= 2 * step
            assert abs(float(got[-1][col]) - fd) <= 1e-5 * (1 + abs(fd)), (n, col, got[-1][col], fd)


# --- the golden corpus ----------------------------------------------------------------------

BACKWARD_NAMES = [entry["name"] for entry in golden.load_manifest()["backward_cases"]]


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_reproduces_backward_corpus(backward_corpus: dict, name: str) -> None:
    case = backward_corpus[name]
    for (mode, offset), expected in case.expected.items():
        got = rms_norm_backward(case.x, case.weight, case.grad_out, case.spec.eps, case.residual,
                                case.grad_new_residual, mode=mode, weight_offset=offset)
        assert len(got) == len(expected)
        for what, want, have in zip(output_names(case.residual is not None), expected, got):
            assert_bitwise_equal(want, have, f"{name} {mode}/{offset:g} {what}")


# --- batch invariance of grad_x, and grad_weight's aligned blocks -----------------------------


def _row_grads(case, rows, mode: str, offset: float):
    """grad_x (and grad_residual) of the case's arrays at `rows` (an index or slice of rows)."""
    arrays = [None if a is None else a[rows] for a in (case.x, case.grad_out, case.residual, case.grad_new_residual)]
    x, g, r, g_r = arrays
    return rms_norm_backward(x, case.weight, g, case.spec.eps, r, g_r, mode=mode, weight_offset=offset)[:-1]


def test_grad_x_rows_alone_equal_rows_in_batch(backward_corpus: dict) -> None:
    """A row's grad_x and grad_residual do not depend on the batch, its position or the leading shape."""
    rng = np.random.default_rng(5)
    for case in backward_corpus.values():
        mode, offset = case.spec.outputs[0]
        batch = case.expected[(mode, offset)][:-1]
        for i in range(case.x.shape[0]):
            for what, whole, alone in zip(("grad_x", "grad_residual"), batch, _row_grads(case, slice(i, i + 1),
                                                                                          mode, offset)):
                assert_bitwise_equal(whole[i:i + 1], alone, f"{case.spec.name} row {i} {what} alone")
        # Leading shape (2, rows, n): other rows first, then the case's rows reversed.
        x3, g3, r3, g_r3 = (None if a is None else np.stack([_as(4 * rng.standard_normal(a.shape), dtype_name(a.dtype)),
                                                            a[::-1]])
                            for a in (case.x, case.grad_out, case.residual, case.grad_new_residual))
        got = rms_norm_backward(x3, case.weight, g3, case.spec.eps, r3, g_r3, mode=mode, weight_offset=offset)
        for what, whole, three in zip(("grad_x", "grad_residual"), batch, got[:-1]):
            assert_bitwise_equal(whole[::-1], three[1], f"{case.spec.name} {what}, shape (2, rows, n)")


@pytest.mark.parametrize("kind", ["none", "float32"])
@pytest.mark.parametrize("mode", ["llama", "fp32"])
def test_grad_weight_of_aligned_blocks_is_the_tree_of_their_partials(mode: str, kind: str) -> None:
    """m aligned blocks of 2^k rows: grad_weight equals the pairwise tree (padded with +0.0 blocks)
    over the blocks' float32 partial sums. In float32 a block's grad_weight is its partial T
    (rnD only canonicalises NaNs, and these data are finite)."""
    rng = np.random.default_rng([len(mode), len(kind)])
    n = 100
    for m, block in ((1, 8), (2, 4), (3, 4), (5, 2), (3, 16), (6, 1)):
        rows = m * block
        # Magnitudes over many octaves, so that another summation order gives other bits.
        g = (rng.standard_normal((rows, n)) * np.exp2(rng.uniform(-12, 12, (rows, n)))).astype(np.float32)
        x, weight, _, residual, _ = _inputs(rng, rows, n, "float32", kind, False, 0.0)
        whole = rms_norm_backward(x, weight, g, 1e-6, residual, mode=mode)[-1]
        partials = np.stack([rms_norm_backward(x[j:j + block], weight, g[j:j + block], 1e-6,
                                               None if residual is None else residual[j:j + block], mode=mode)[-1]
                             for j in range(0, rows, block)])
        assert_bitwise_equal(whole, pairwise_sum(np.ascontiguousarray(partials.T)), f"{m} blocks of {block}")
        if rows >= 8:  # the check can fail: summing the rows in order gives other bits
            leaves = np.stack([rms_norm_backward(x[j:j + 1], weight, g[j:j + 1], 1e-6,
                                                 None if residual is None else residual[j:j + 1], mode=mode)[-1]
                               for j in range(rows)])
            assert first_mismatch(whole, np.cumsum(leaves, axis=0, dtype=np.float32)[-1]) is not None
