"""bi_torch on CPU tensors: bad input is raised before anything is written, naming the argument (functional,
in place and the vLLM drop-in; aliasing and overlapping memory in place; requires_grad under no_grad).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bi_torch
from torch_helpers import assert_bits, ref, to_numpy

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


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
