"""bi_torch's FP8 output (contract v1.2) on CPU tensors, the Triton interpreter, bit for bit: rnFP8 on
its own over float32 patterns, and the FP8 golden corpus. Random and special rows against
bridge.reference and batch invariance are in test_torch_fp8_rows_cpu.py; bad input, no gradient,
torch.compile and opcheck, and the vLLM drop-ins in test_torch_fp8_api_cpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from bi_torch import launch
from bridge.numerics import reference_fp8
from fp8_helpers import FP8_CASE_NAMES
from torch_fp8_helpers import FP8, assert_fp8_bits, check_fp8_corpus_case, fp8_codes, fp8_patterns

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# --------------------------------------------------------------------------------------------
# Q3-Q4 alone: encode_fp8(clamp_fp8(c)) of the interpreted kernel module over float32 patterns.
# --------------------------------------------------------------------------------------------

# The interpreted copy of triton_fp8.py, whose helpers the interpreted test kernel calls (the
# interpreter runs the kernel's source with its module's globals: no closures).
_KERNELS = launch.interpreted_fp8_kernels()


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
# The FP8 golden corpus, bit for bit.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_fp8_corpus_case(fp8_cases, name):
    check_fp8_corpus_case(fp8_cases[name], name)


def test_fp8_corpus_is_there():
    assert len(FP8_CASE_NAMES) >= 30
