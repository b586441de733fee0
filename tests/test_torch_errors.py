"""The errors and warnings a new bi_torch user meets first: each names the argument and the fix.

(a) CPU tensors on a machine with a GPU run under the Triton interpreter: one InterpreterWarning.
(b) A tensor that requires grad on the in-place API: RuntimeError pointing to rms_norm / no_grad.
(c) Mixed dtypes (a float32 weight with 16-bit x, as under torch.autocast): TypeError naming the casts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import bi_torch
from bi_torch import ops
from torch_helpers import assert_bits, bi_backward, random_rows, random_weight, ref, ref_backward, seeded_rng, to_torch


@pytest.fixture
def gpu_visible(monkeypatch):
    """A machine that reports a CUDA GPU, with the once-per-process warning not given yet."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_warned_cpu", False)


def _interpreter_warnings(record):
    return [w for w in record if issubclass(w.category, bi_torch.InterpreterWarning)]


def test_cpu_tensor_with_a_gpu_warns_once(gpu_visible):
    rng = seeded_rng("cpu-warning")
    xn, wn = random_rows(rng, (3, 40), "bfloat16"), random_weight(rng, 40, "bfloat16")
    x, w = to_torch(xn), to_torch(wn)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # so the once-only rule is bi_torch's, not the warnings filter's
        out = bi_torch.rms_norm(x, w, 1e-6)
        bi_torch.rms_norm(x, w, 1e-6)
        bi_torch.fused_add_rms_norm_(x.clone(), x.clone(), w, 1e-6)
    got = _interpreter_warnings(record)
    assert len(got) == 1, [str(w.message) for w in got]
    message = str(got[0].message)
    assert message.startswith("x: a CPU tensor") and ".cuda()" in message and "bi_torch.InterpreterWarning" in message
    assert got[0].filename == __file__, "stacklevel should point at the caller's line"
    assert_bits(ref(xn, wn, 1e-6)[0], out, "the warning changes nothing")


def test_cpu_tensor_without_a_gpu_is_silent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ops, "_warned_cpu", False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bi_torch.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    assert not _interpreter_warnings(record)


def test_the_warning_can_be_filtered_by_category(gpu_visible):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=bi_torch.InterpreterWarning)
        bi_torch.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
    assert not _interpreter_warnings(record)


def test_the_warning_check_keeps_fullgraph_compile(monkeypatch):
    """Under torch.compile the check is skipped (no host-side state in the graph): no graph break.
    (torch.cuda.is_available is not patched here: torch.compile itself asks it.)"""
    def called(*args):
        raise AssertionError("the CPU warning check ran inside a compiled graph")

    monkeypatch.setattr(ops, "_warn_cpu_once", called)
    x, w = torch.randn(4, 32), torch.randn(32)
    fn = torch.compile(lambda x, w: bi_torch.rms_norm(x, w, 1e-6), fullgraph=True, backend="eager")
    assert_bits(ref(x.numpy(), w.numpy(), 1e-6)[0], fn(x, w))


def test_inplace_with_a_parameter_names_no_grad_and_rms_norm():
    """The first in-place call most users write: a module's weight (a Parameter, requires grad)
    outside no_grad. Nothing is written; under inference_mode the same call works."""
    norm = bi_torch.RMSNorm(24, dtype=torch.float16)
    rng = seeded_rng("inplace-parameter")
    xn, rn = random_rows(rng, (5, 24), "float16"), random_rows(rng, (5, 24), "float16")
    x, r = to_torch(xn), to_torch(rn)
    with pytest.raises(RuntimeError, match=r"^weight: requires grad.*bi_torch\.rms_norm\(x, weight, eps, residual\).*"
                                           r"torch\.no_grad\(\) or torch\.inference_mode\(\)"):
        bi_torch.fused_add_rms_norm_(x, r, norm.weight, 1e-6)
    assert_bits(xn, x, "x written by a refused call")
    assert_bits(rn, r, "residual written by a refused call")
    with torch.inference_mode():
        bi_torch.fused_add_rms_norm_(x, r, norm.weight, 1e-6)
    out, new_residual = ref(xn, np.ones(24, np.float16), 1e-6, rn)
    assert_bits(out, x, "in place under inference_mode: x")
    assert_bits(new_residual, r, "in place under inference_mode: residual")


@pytest.mark.parametrize("x_dtype,w_dtype", [("bfloat16", "float32"), ("float16", "float32"), ("float32", "bfloat16")])
def test_mixed_dtypes_name_both_casts(x_dtype, w_dtype):
    x = torch.ones(2, 8, dtype=getattr(torch, x_dtype))
    w = torch.ones(8, dtype=getattr(torch, w_dtype))
    with pytest.raises(TypeError, match=rf"^weight: expected dtype {x_dtype} \(x's dtype\); got {w_dtype}\. .*"
                                        rf"weight\.to\(x\.dtype\).*module\.to\(torch\.{x_dtype}\)$"):
        bi_torch.rms_norm(x, w, 1e-6)


def test_mixed_dtypes_under_autocast_say_so():
    """A float32 module fed autocast's bfloat16 activations (a float32 HF model's q/k norms under
    autocast, tests/test_hf_patch.py): the message says what autocast did and names model.to."""
    norm = bi_torch.RMSNorm(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.linear(torch.randn(3, 16), torch.randn(16, 16))  # autocast makes it bfloat16
        assert x.dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"^weight: expected dtype bfloat16 \(x's dtype\); got float32\..*"
                                            r"Under torch\.autocast, x arrived in bfloat16 while the weight stayed "
                                            r"float32.*model\.to\(torch\.bfloat16\)"):
            norm(x)


def test_the_named_weight_cast_trains_with_the_rounded_weights_bits():
    """The fix the message names, weight.to(x.dtype): the output is the contract's for the rounded
    weight, and the float32 weight's gradient is the bfloat16 grad_weight widened exactly."""
    rng = seeded_rng("weight-cast")
    xn, gn = random_rows(rng, (6, 48), "bfloat16"), random_rows(rng, (6, 48), "bfloat16")
    w32 = torch.randn(48, generator=torch.Generator().manual_seed(3)).requires_grad_()
    rounded = w32.detach().to(torch.bfloat16)
    x, g = to_torch(xn).requires_grad_(), to_torch(gn)
    out = bi_torch.rms_norm(x, w32.to(x.dtype), 1e-6, mode="fp32")
    assert_bits(ref(xn, bi_torch.to_numpy(rounded), 1e-6, mode="fp32")[0], out, "out")
    out.backward(g)
    _, _, grad_weight = ref_backward(xn, bi_torch.to_numpy(rounded), gn, 1e-6, mode="fp32")
    assert w32.grad.dtype == torch.float32
    assert_bits(to_torch(grad_weight).float(), w32.grad, "grad of the float32 weight")
    assert_bits(bi_backward(to_torch(xn), rounded, g, 1e-6, mode="fp32")[0], x.grad, "grad_x")
