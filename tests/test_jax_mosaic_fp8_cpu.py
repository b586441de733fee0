"""bi_jax's FP8 output in the Mosaic GPU forward (bi_jax/mosaic_fp8.py, issue 26, stage 3) on the CPU.

As tests/test_jax_mosaic_cpu.py for the forward: the kernel body on numpy (mosaic_fp8.NumpyFp8Ops,
the conversion emulated by the contract's encoder, the quotient by division: both proven equal to
the PTX on the GPU) against the FP8 golden corpus and bridge.reference bit for bit (codes, scales,
new residual); the cvt pair's byte order; and that the kernel lowers for CUDA with every float
operation inline PTX. The compiled kernel's bits: tests/test_jax_mosaic_fp8_gpu.py,
scripts/probes/mosaic_fp8.py.
"""

from __future__ import annotations

import re

import jax
import ml_dtypes
import numpy as np
import pytest
from fp8_helpers import FP8_CASE_NAMES
from jax_fp8_helpers import HUGE_WEIGHT_COLUMN, assert_fp8_result, expected, fp8_rows, fp8_weight, quant_kwargs
from jax_helpers import _seed, residual_dtype
from test_jax_mosaic_cpu import FLOAT_OPS

from bi_jax import mosaic_kernel as mk
from bi_jax.mosaic_fp8 import NumpyFp8Ops, to_fp8
from bi_jax.mosaic_ops import row_layout
from bi_jax.pallas_fp8 import Quant

E4M3 = "float8_e4m3fn"


def quant_of(quant: str) -> Quant:
    """"static", "group64" or "group128" as the kernel's Quant."""
    return Quant.fp8("static", E4M3) if quant == "static" else Quant.fp8("group", E4M3, int(quant[len("group"):]))


def emulated(x, w, r, quant: str, scale=None, eps: float = 1e-6, **kwargs) -> tuple:
    got = mk.rms_norm_emulated(x, w, eps, r, quant=quant_of(quant),
                               scale=None if scale is None else np.asarray(scale, np.float32).reshape(1), **kwargs)
    return got if isinstance(got, tuple) else (got,)


@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_emulated_body_on_fp8_corpus(fp8_cases, name):
    case = fp8_cases[name]
    quant = "static" if case.scale is not None else f"group{case.spec.group_size}"
    for mode, offset in case.out:
        got = emulated(case.x, case.weight, case.residual, quant, case.scale, case.spec.eps, mode=mode,
                       weight_offset=offset)
        want = tuple(a for a in case.expected(mode, offset) if a is not None)
        assert_fp8_result(want, got, f"{name} ({mode}, {offset})")


def _targeted_rows(rng, rows: int, n: int, dtype: str) -> np.ndarray:
    """fp8_rows (zeros, -0.0, huge, tiny, and inf / NaN / overflowing squares in row 7) plus: an inf
    u at the huge weight's column (row 0), a zero group and a -0.0 group (row 1), a row of -0.0
    (row 2), a NaN in an otherwise normal row (row 3), magnitudes over 2**-14..1 (row 4: FP8
    subnormals inside a group), a row ten thousand times its neighbours' (row 5: saturation)."""
    x = fp8_rows(rng, (rows, n), dtype).astype(np.float32)
    x[0] = rng.standard_normal(n)
    x[0, HUGE_WEIGHT_COLUMN] = 8.0
    x[1, :64], x[1, 64:128] = 0.0, -0.0
    x[2] = -0.0
    x[3, n // 2] = np.nan
    x[4] = np.where(rng.random(n) < 0.5, -1, 1) * 2.0 ** rng.uniform(-14, 0, n)
    x[5] = 1e4 * rng.standard_normal(n)
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


@pytest.mark.parametrize("quant", ["static", "group64", "group128"])
@pytest.mark.parametrize("n", [64, 128, 4096, 5120])
@pytest.mark.parametrize("dtype,kind,mode,offset", [("bfloat16", "none", "llama", 0.0),
                                                    ("bfloat16", "same", "fp32", 1.0),
                                                    ("float16", "float32", "llama", 1.0),
                                                    ("float32", "float32", "fp32", 0.0)])
def test_emulated_body_on_targeted_rows(quant, n, dtype, kind, mode, offset):
    if quant == "group128" and n == 64:
        pytest.skip("group_size 128 does not divide n = 64")
    rng = np.random.default_rng(_seed("mosaic-fp8", quant, n, dtype, kind, mode, offset))
    x, w = _targeted_rows(rng, 9, n, dtype), fp8_weight(rng, n, dtype)
    r = None if kind == "none" else fp8_rows(rng, x.shape, residual_dtype(dtype, kind), specials=False)
    # Static: FP8's normal range, its subnormals (150) and saturation (1e-4, and 2**-126: t overflows).
    for scale in (0.0123, 150.0, 1e-4, 2.0 ** -126) if quant == "static" else (None,):
        kwargs = quant_kwargs(quant, None if scale is None else np.float32(scale))
        want = expected(x, w, r, mode=mode, weight_offset=offset, **kwargs)
        got = emulated(x, w, r, quant, scale, mode=mode, weight_offset=offset)
        assert_fp8_result(want, got, f"{quant} n={n} {dtype} {kind} {mode} {offset} scale={scale}")


@pytest.mark.parametrize("n", [7, 100, 1000, 20000])
def test_emulated_static_on_rows_that_no_group_divides(n):
    """Static scales take any n: vectors of 1, 4 or 8 (a lone value's pair, a masked last register)."""
    rng = np.random.default_rng(_seed("mosaic-fp8-odd", n))
    x, w = fp8_rows(rng, (9, n), "bfloat16"), fp8_weight(rng, n, "bfloat16")
    kwargs = quant_kwargs("static", np.float32(0.02))
    assert_fp8_result(expected(x, w, None, **kwargs), emulated(x, w, None, "static", 0.02), f"static n={n}")


def test_cvt_pair_puts_its_first_source_in_the_upper_byte():
    """PTX cvt.rn.satfinite.e4m3x2.f32 d, a, b: a's code in d's upper byte; to_fp8 passes (u[2k + 1],
    u[2k]), so that little-endian stores put u[2k]'s code at column 2k."""
    ops = NumpyFp8Ops(row_layout(128, 2), 1)
    one, two = np.float32([[1.0]]), np.float32([[2.0]])  # e4m3fn codes 0x38, 0x40
    assert int(ops.cvt_pair(one, two)[0, 0]) == 0x3840
    assert [int(p[0, 0]) for p in to_fp8(ops, [one, two, np.float32([[np.nan]]), np.float32([[-1e9]])])] == \
        [0x4038, 0xFE7F]


@pytest.mark.parametrize("dtype,residual,n,quant", [("bfloat16", "none", 4096, "static"),
                                                   ("bfloat16", "same", 5120, "group128"),
                                                   ("float16", "float32", 1024, "group64"),
                                                   ("float32", "float32", 192, "group64"),
                                                   ("float32", "none", 7, "static")])
@pytest.mark.parametrize("semantics", ["Warpgroup", "Lane"])
def test_fp8_lowers_for_cuda_with_only_ptx_floats(dtype, residual, n, quant, semantics):
    x = jax.ShapeDtypeStruct((3, n), dtype)
    r = None if residual == "none" else jax.ShapeDtypeStruct((3, n), dtype if residual == "same" else "float32")
    scale = jax.ShapeDtypeStruct((1,), "float32") if quant == "static" else None
    fn = jax.jit(lambda x, w, r, s: mk.rms_norm(x, w, 1e-6, r, mode="llama", weight_offset=1.0, semantics=semantics,
                                                quant=quant_of(quant), scale=s))
    lowered = fn.trace(x, jax.ShapeDtypeStruct((n,), dtype), r, scale).lower(lowering_platforms=("cuda",))
    (text,) = mk.mosaic_modules(lowered)
    assert not FLOAT_OPS.findall(text)
    asm = re.findall(r'asm_string = "([^"]*)"', text)
    wanted = ["cvt.rn.satfinite.e4m3x2.f32", "mul.rn.f32", "div.rn.f32"]
    if quant != "static":  # the quotient, the group's amax and its sign flip
        wanted += ["fma.rn.f32", "max.f32", "xor.b32", "abs.f32"]
    for instr in wanted:
        assert any(instr in a for a in asm), instr
    # The codes are stored as bytes, one vector per thread and register.
    assert re.search(r"vector<\d+xi8>, memref<\d+xi8", text)
