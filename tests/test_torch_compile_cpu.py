"""bi_torch's torch.library ops on CPU tensors: torch.compile (fullgraph, inductor and eager backends) gives
eager's bits exactly, and torch.library.opcheck passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bi_torch
from torch_helpers import assert_bits, random_rows, random_weight, to_numpy, to_torch

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


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
