"""bi_torch's gradients on CPU tensors (the Triton backward under the interpreter), through autograd.

Every numeric assertion but one is bitwise: against the golden backward corpus and
bridge.reference.rms_norm_backward on generated inputs, and between
calls that must agree (a row alone vs in a batch, leading shapes and strided rows vs flat, launch
configurations). The exception compares with float64 autograd of the HF formula, with the error
bound stated there. Autograd's plumbing (absent gradients, strides, torch.compile, the in-place
calls, RMSNorm) is tested in test_torch_autograd_cpu.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bi_torch
import bi_torch.launch
from bridge import golden, reference
from bridge.golden import backward as golden_backward
from torch_helpers import (BACKWARD_CONFIGS, DTYPES, assert_bits, backward_inputs, bi_backward, check_backward,
                           patch_backward_config, seeded_rng, to_numpy, to_torch)

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
COMBOS = (("llama", 0.0), ("fp32", 1.0), ("llama", -0.5), ("fp32", 0.0))
# (residual dtype: None, "same" or "float32"; whether the new residual gets a gradient)
VARIANTS = ((None, False), ("same", False), ("same", True), ("float32", False), ("float32", True))


# --------------------------------------------------------------------------------------------
# The golden backward corpus, bit for bit, through autograd.
# --------------------------------------------------------------------------------------------

BACKWARD_CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["backward_cases"]]


@pytest.mark.parametrize("name", BACKWARD_CASE_NAMES)
def test_backward_corpus_case(backward_corpus, name):
    """An absent grad_new_residual stays absent: the new residual is left out of autograd.grad."""
    case = backward_corpus[name]
    x, w, g, r, g_r = (to_torch(a) for a in (case.x, case.weight, case.grad_out, case.residual,
                                             case.grad_new_residual))
    for (mode, offset), expected in case.expected.items():
        got = bi_backward(x, w, g, case.spec.eps, r, g_r, mode, offset)
        names = golden_backward.output_names(r is not None)
        for what, e, a in zip(names, expected, got if r is not None else (got[0], got[2])):
            assert_bits(e, a, f"{name} {what} ({mode}, offset {offset})")
    for what, a, t in (("x", case.x, x), ("grad_out", case.grad_out, g), ("residual", case.residual, r)):
        if a is not None:
            assert_bits(a, t, f"{name}: {what} was modified")


# --------------------------------------------------------------------------------------------
# Against the reference: dtypes, modes, offsets, residual kinds, with and without g_r.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 127, 128, 129, 1000, 4096])
def test_matches_reference(n, dtype):
    for k, (res_kind, with_gr) in enumerate(VARIANTS):
        if dtype == "float32" and res_kind == "same":
            continue  # the float32 residual
        rows = (33, 7, 3)[(n > 129) + (n > 1000)]  # not powers of two: the row tree's +0.0 padding
        mode, offset = COMBOS[(k + n) % len(COMBOS)]
        args = backward_inputs(seeded_rng("ref", n, dtype, k), (rows, n), dtype, res_kind, with_gr,
                               specials=k % 2 == 0)
        got = check_backward(args, 1e-5 if k % 3 else 1e-6, mode, offset,
                             f"n={n} {dtype} {res_kind} gr={with_gr} {mode} {offset}")
        if res_kind == "float32":
            assert got[1].dtype == torch.float32  # a float32 residual stream gets a float32 gradient


@pytest.mark.parametrize("n,rows,dtype,res_kind,with_gr,mode,offset", [
    (65536, 2, "bfloat16", "float32", True, "llama", 0.0), (65536, 3, "float16", None, False, "fp32", 1.0),
    (20000, 3, "float32", "float32", False, "llama", 1.0)])
def test_long_rows_match_reference(n, rows, dtype, res_kind, with_gr, mode, offset):
    """Rows past 16384 elements: chunks, with inv and c from the stats pass."""
    args = backward_inputs(seeded_rng("long", n, dtype), (rows, n), dtype, res_kind, with_gr, specials=True)
    check_backward(args, 1e-6, mode, offset, f"n={n} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    """No rows: empty grad_x and grad_residual, grad_weight all +0.0 (NUMERICS.md's table)."""
    for shape in ((0, 129), (2, 0, 129)):
        args = backward_inputs(seeded_rng("empty"), shape, dtype, "float32", True)
        got = check_backward(args, 1e-6, "llama", 0.0, f"{shape} {dtype}")
        assert got[0].shape == shape and got[1].shape == shape and not to_numpy(got[2]).view(np.uint8).any()


# --------------------------------------------------------------------------------------------
# Batch invariance of grad_x; grad_weight of leading shapes and strided rows.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res_kind", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("n,dtype", [(128, "bfloat16"), (1000, "float16"), (20000, "float32")])
def test_grad_x_batch_invariance(n, dtype, res_kind):
    rng = seeded_rng("batch", n, dtype, res_kind)
    alone_args = backward_inputs(rng, (1, n), dtype, res_kind, res_kind is not None)
    alone = check_backward(alone_args, 1e-6, "llama", 0.0, f"n={n} the row alone")
    plan = ((2, [1]), (3, [0, 2]), (17, [9])) if n > 16384 else ((2, [0, 1]), (3, [1]), (17, [0, 16]), (64, [37]))
    for b, positions in plan:
        for p in positions:
            args = list(backward_inputs(rng, (b, n), dtype, res_kind, res_kind is not None))
            for a, row in zip(args, alone_args):
                if a is not None and a.ndim == 2:
                    a[p] = row[0]  # x, grad_out, residual and grad_new_residual: the row's own
            args[1] = alone_args[1]  # the same weight
            got = check_backward(args, 1e-6, "llama", 0.0, f"n={n} batch {b}")
            assert_bits(alone[0][0], got[0][p], f"n={n} batch {b} position {p}: grad_x vs the row alone")
            if res_kind is not None:
                assert_bits(alone[1][0], got[1][p], f"n={n} batch {b} position {p}: grad_residual vs alone")


@pytest.mark.parametrize("res_kind", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("n,dtype", [(7, "float16"), (1000, "bfloat16")])
def test_leading_shapes_and_strided_rows(n, dtype, res_kind):
    """(2, B, n) and (B, 1, n) give the flat call's bits, grad_weight included (the rows flattened
    row-major are the same leaves); so do x[::2] and x[:, :n] of NaN-filled bigger tensors."""
    b = 6
    args = backward_inputs(seeded_rng("lead", n, dtype, res_kind), (2 * b, n), dtype, res_kind, res_kind is not None)
    flat = check_backward(args, 1e-6, "fp32", 0.0, "flat")
    x, w, g, r, g_r = (to_torch(a) for a in args)
    for shape in ((2, b, n), (2 * b, 1, n)):
        got = bi_backward(x.reshape(shape), w, g.reshape(shape), 1e-6, None if r is None else r.reshape(shape),
                          None if g_r is None else g_r.reshape(shape), "fp32")
        for e, a, name in zip(flat, got, ("grad_x", "grad_residual", "grad_weight")):
            if e is not None:
                assert a.shape == (e.shape if name == "grad_weight" else shape)
                assert_bits(e, a.reshape(e.shape), f"{shape}: {name} vs flat")

    def strided(t, how):
        if t is None:
            return None
        wide = torch.full((2 * b, n + 3) if how == "cols" else (4 * b, n), math.nan, dtype=t.dtype)
        view = wide[:, :n] if how == "cols" else wide[::2]
        view.copy_(t)
        return view

    for how in ("cols", "rows"):
        got = bi_backward(strided(x, how), w, strided(g, how), 1e-6, strided(r, how), strided(g_r, how), "fp32")
        for e, a, name in zip(flat, got, ("grad_x", "grad_residual", "grad_weight")):
            if e is not None:
                assert_bits(e, a, f"strided {how}: {name} vs contiguous")


# --------------------------------------------------------------------------------------------
# grad_weight: deterministic, and independent of the launch configuration.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,rows,dtype,res_kind", [(128, 300, "bfloat16", "float32"), (20000, 24, "float32", None)])
def test_grad_weight_launch_configurations(n, rows, dtype, res_kind, monkeypatch):
    args = backward_inputs(seeded_rng("configs", n), (rows, n), dtype, res_kind, res_kind is not None, specials=True)
    used, results = [], []
    original = bi_torch.launch.backward_config
    # Records the configuration of every launch, to show that the overrides reached the kernel.
    monkeypatch.setattr(bi_torch.launch, "backward_config", lambda *a: used.append(original(*a)) or used[-1])
    for overrides in BACKWARD_CONFIGS + BACKWARD_CONFIGS[:1]:  # the default twice: two runs, the same bits
        with monkeypatch.context() as patch:
            patch_backward_config(patch, overrides)
            results.append(check_backward(args, 1e-6, "llama", 0.0, f"config {overrides}"))
    shapes = {(c.rows, c.steps, c.blocks, c.chunk, c.num_chunks, c.tree_groups) for c in used}
    assert len(shapes) == len(BACKWARD_CONFIGS), f"the overrides did not change the launch: {used}"
    assert min(c.blocks for c in used) == 1 < max(c.blocks for c in used)
    for got in results[1:]:
        for e, a in zip(results[0], got):
            if e is not None:
                assert_bits(e, a, "gradients across launch configurations")


# --------------------------------------------------------------------------------------------
# Against float64 autograd of the HF formula.
# --------------------------------------------------------------------------------------------


def _float64_grads(z, w, g, eps, mode, offset):
    """float64 autograd of out = rnD-straight-through(z * rsqrt(mean(z^2) + eps)) * (w + offset)."""
    z, w = z.double().requires_grad_(), w.double().requires_grad_()
    xhat = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "llama":  # HF rounds to D before the weight; its gradient passes straight through (B3)
        xhat = xhat + (xhat.to(g.dtype).double() - xhat).detach()
    return torch.autograd.grad(xhat * (w + offset), (z, w), g.double()), xhat.detach()


@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("fp32", 1.0)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 128, 1000])
def test_close_to_float64(n, dtype, mode, offset):
    """Bound: the float32 steps (B1-B5, each rounded to 2^-24) and the pairwise trees (log2 n levels)
    keep |grad_x - exact| <= 2^-20 * inv * max|a| * (1 + log2(n) * max xhat^2) per row, to which
    rounding to D adds one ulp of D; grad_weight: one ulp of D + 2^-20 * log2(rows) * sum_rows |g h|."""
    rows, eps = 9, 1e-6
    args = backward_inputs(seeded_rng("f64", n, dtype, mode), (rows, n), dtype, "float32", True)
    x, w, g, r, g_r = (to_torch(a) for a in args)
    grad_x, grad_r, grad_w = bi_backward(x, w, g, eps, r, g_r, mode, offset)
    new_res = bi_torch.rms_norm(x, w, eps, r, mode=mode, weight_offset=offset)[1]
    (dz, dw), xhat = _float64_grads(new_res, w, g, eps, mode, offset)
    ulp = 2.0 ** -{"float32": 23, "bfloat16": 7, "float16": 10}[dtype]
    tiny = 2.0 ** -{"float32": 149, "bfloat16": 133, "float16": 24}[dtype]  # D's smallest subnormal
    inv = torch.rsqrt(new_res.double().pow(2).mean(-1, keepdim=True) + eps)
    a_max = (g.double() * (w.double() + offset)).abs().amax(-1, keepdim=True)
    scale = inv * a_max * (1 + math.log2(max(n, 2)) * xhat.pow(2).amax(-1, keepdim=True))
    want_x = dz + g_r.double()
    err = (grad_x.double() - want_x).abs()
    assert (err <= ulp * want_x.abs() + 2.0 ** -20 * scale + tiny).all(), f"grad_x: max error {err.max()}"
    assert_bits(grad_r.to(grad_x.dtype), grad_x, "grad_residual rounded to D vs grad_x")
    bound = ulp * dw.abs() + 2.0 ** -20 * math.log2(rows) * (g.double() * xhat).abs().sum(0) + tiny
    assert ((grad_w.double() - dw).abs() <= bound).all(), f"grad_weight: max error {(grad_w.double() - dw).abs().max()}"


@pytest.mark.parametrize("mode", ["llama", "fp32"])
def test_bfloat16_subnormals_are_exact(mode):
    """Triton 3.9's interpreter converts bfloat16 subnormals to float32 wrongly (0x0004 -> 0): the
    kernels widen bfloat16 on the bit pattern there. Subnormal x, weight, grad_out and residual."""
    bf16 = reference.numpy_dtype("bfloat16")
    x = np.array([[4, 0x80, 0x8004, 1, 0x7F, 0x3F80, 0x8001, 0x0200]], np.uint16).view(bf16)
    w, residual, g_r = np.roll(x[0], 3).copy(), np.roll(x, 1, axis=1).copy(), np.roll(x, 2, axis=1).copy()
    check_backward((x, w, x.copy(), residual, g_r), 1e-6, mode, 0.0, "bfloat16 subnormals")
    out, new_residual = bi_torch.rms_norm(to_torch(x), to_torch(w), 1e-6, to_torch(residual), mode=mode)
    expected_out, expected_residual = reference.rms_norm(x, w, 1e-6, residual, mode=mode)
    assert_bits(expected_out, out, "out")
    assert_bits(expected_residual, new_residual, "new_residual")
