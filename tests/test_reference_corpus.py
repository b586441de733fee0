"""bridge.reference's forward and the golden corpus (reproduction, batch invariance), step 3's tiling
independence, and bridge.verify.compare."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import pytest

from bridge import golden
from bridge.golden import forward as golden_forward
from bridge.numerics.contract import CANONICAL_NAN_BITS, next_power_of_two
from bridge.numerics.reference import bits, pairwise_sum, rms_norm
from bridge.verify.compare import assert_bitwise_equal, first_mismatch
from reference_helpers import rounded, from_bits


# --- the golden corpus ----------------------------------------------------------------------

CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["cases"]]


@pytest.fixture(scope="module")
def cases(corpus) -> dict:
    return {case.spec.name: case for case in corpus}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reproduces_corpus(cases: dict, name: str) -> None:
    case = cases[name]
    for (mode, offset), expected in case.out.items():
        got = rms_norm(case.x, case.weight, case.spec.eps, case.residual, mode=mode, weight_offset=offset)
        if case.residual is None:
            assert_bitwise_equal(expected, got, f"{name} {mode}/{offset:g} out")
        else:
            assert_bitwise_equal(expected, got[0], f"{name} {mode}/{offset:g} out")
            assert_bitwise_equal(case.new_residual, got[1], f"{name} {mode}/{offset:g} new_residual")


def _outputs(x, case: golden_forward.GoldenCase, residual: Optional[np.ndarray], mode: str, offset: float):
    got = rms_norm(x, case.weight, case.spec.eps, residual, mode=mode, weight_offset=offset)
    return (got, None) if residual is None else got


def test_rows_alone_equal_rows_in_batch(corpus) -> None:
    """Row invariance: a row's bits do not depend on the batch, its position or the leading shape."""
    rng = np.random.default_rng(1)
    for case in corpus:
        rows = case.x.shape[0]
        mode, offset = case.spec.outputs[0]
        batch_out, batch_res = _outputs(case.x, case, case.residual, mode, offset)
        for i in range(rows):
            res_i = None if case.residual is None else case.residual[i:i + 1]
            out_i, new_res_i = _outputs(case.x[i:i + 1], case, res_i, mode, offset)
            assert_bitwise_equal(batch_out[i:i + 1], out_i, f"{case.spec.name} row {i} alone")
            if res_i is not None:
                assert_bitwise_equal(batch_res[i:i + 1], new_res_i, f"{case.spec.name} row {i} residual alone")
        # Leading shape (2, rows, n) with other rows beside and the rows reversed in the second half.
        other = rounded(4 * rng.standard_normal(case.x.shape), case.spec.dtype)
        x3 = np.stack([other, case.x[::-1]])
        res3 = None if case.residual is None else np.stack([case.residual, case.residual[::-1]])
        out3, res_out3 = _outputs(x3, case, res3, mode, offset)
        assert_bitwise_equal(batch_out[::-1], out3[1], f"{case.spec.name} leading shape (2, rows, n)")
        if res3 is not None:
            assert_bitwise_equal(batch_res[::-1], res_out3[1], f"{case.spec.name} residual, shape (2, rows, n)")


def test_strided_rows_equal_contiguous_rows(corpus) -> None:
    case = next(c for c in corpus if c.spec.name == "bfloat16-n128-res_same")
    mode, offset = case.spec.outputs[0]
    wide = np.zeros((case.x.shape[0], 3 * case.spec.n), case.x.dtype)
    wide[:, case.spec.n:2 * case.spec.n] = case.x
    strided = wide[:, case.spec.n:2 * case.spec.n]  # rows 3n apart
    assert_bitwise_equal(_outputs(case.x, case, None, mode, offset)[0], _outputs(strided, case, None, mode, offset)[0])


# --- step 3: the pairwise tree --------------------------------------------------------------


def _chunked_sum(q: np.ndarray, chunk: int) -> np.ndarray:
    """How a kernel sums a long row: aligned chunks of `chunk` (a power of two), then the chunk sums."""
    width = max(next_power_of_two(q.shape[-1]), chunk)
    padded = np.concatenate([q, np.zeros(q.shape[:-1] + (width - q.shape[-1],), np.float32)], axis=-1)
    chunk_sums = pairwise_sum(padded.reshape(q.shape[:-1] + (width // chunk, chunk)))
    return pairwise_sum(chunk_sums)


def test_pairwise_sum_is_tiling_independent() -> None:
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 7, 100, 1000, 1024, 1025, 5000):
        # Mixed signs and magnitudes so that rounding differs between summation orders.
        q = (rng.standard_normal((3, n)) * np.exp2(rng.uniform(-20, 20, (3, n)))).astype(np.float32)
        whole = pairwise_sum(q)
        assert whole.shape == (3,)
        sequential = np.cumsum(q, axis=-1, dtype=np.float32)[:, -1]
        if n >= 100:  # the check can fail: another order gives other bits
            assert first_mismatch(whole, sequential) is not None
        for log2_chunk in range(0, (4 * next_power_of_two(n)).bit_length()):
            assert_bitwise_equal(whole, _chunked_sum(q, 1 << log2_chunk), f"n={n} chunk={1 << log2_chunk}")
        for extra in (next_power_of_two(n), 3 * next_power_of_two(n) + 5):  # pad further: same bits
            padded = np.concatenate([q, np.zeros((3, extra), np.float32)], axis=-1)
            assert_bitwise_equal(whole, pairwise_sum(padded), f"n={n} padded by {extra}")


# --- bridge.verify.compare ----------------------------------------------------------------------


def test_first_mismatch() -> None:
    a = rounded(np.arange(12.0).reshape(3, 4), "bfloat16")
    assert first_mismatch(a, a.copy()) is None
    nan = from_bits([CANONICAL_NAN_BITS["bfloat16"]] * 2, "bfloat16")
    assert first_mismatch(nan, nan.copy()) is None  # same bits: equal, although NaN != NaN
    b = a.copy()
    bits(b)[2, 1] ^= 1  # one bit: 9.0 -> 9.0625
    problem = first_mismatch(a, b)
    assert problem is not None and "1 of 12 elements differ" in problem and "index (2, 1)" in problem
    assert re.search(r"got 9\.0625 \(0x4111\), expected 9(\.0)? \(0x4110\)", problem), problem
    with pytest.raises(AssertionError, match=r"case x: 1 of 12 elements differ; first at index \(2, 1\)"):
        assert_bitwise_equal(a, b, "case x")
    zeros = np.float32([0.0])
    assert first_mismatch(zeros, -zeros) is not None  # +0 and -0 differ bitwise
    assert "shape" in first_mismatch(a, a[:2])
    assert "dtype" in first_mismatch(a, a.astype(np.float32))
