"""bi_torch on CPU tensors (the Triton interpreter) against the golden corpus and bridge.reference, bit for bit:
the corpus cases (functional and in place), rows past the whole-row limit in place, the vLLM drop-in, and a
property test over random calls (integer views, no tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bi_torch
from bridge import golden
from torch_helpers import DTYPES, assert_bits, bi, random_rows, random_weight, ref, seeded_rng, to_numpy, to_torch

_MANIFEST_CASES = golden.load_manifest()["cases"]
CASE_NAMES = [entry["name"] for entry in _MANIFEST_CASES]
RESIDUAL_CASE_NAMES = [entry["name"] for entry in _MANIFEST_CASES if entry["residual"] != "none"]
# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


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
    rng = seeded_rng("chunked-inplace", n, dtype, res_dtype)
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
    rng = seeded_rng("vllm", dtype)
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
