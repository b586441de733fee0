"""bi_jax's FP8 output on the Mosaic GPU kernel (bi_jax/mosaic_fp8.py, issue 26, stage 3), bit for bit.

Skipped without a Hopper GPU (jax_gpu_marks.py, selection's checks). The FP8 golden corpus; the
reference on the FP8 tests' inputs (specials, saturation, inf groups, zero groups, FP8
subnormals); equality with the Pallas-Triton FP8 kernel; batch invariance of out and the scales;
and that "auto" picks Mosaic for FP8 on Hopper. The conversion and the quotient themselves are
checked exhaustively on the GPU by tests/test_jax_fp8_gpu.py (the same PTX instructions).
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from fp8_helpers import FP8_CASE_NAMES  # noqa: E402
from jax_fp8_helpers import (COMBOS, GPU_STATIC_SCALES, HUGE_WEIGHT_COLUMN, QUANTS,  # noqa: E402
                             assert_fp8_result, call, check_fp8_corpus_case, expected, fp8_rows, fp8_weight, quant_kwargs)
from jax_gpu_marks import JAX_GPU_MARKS, jax_gpu  # noqa: E402
from jax_helpers import _seed, residual_dtype  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax import selection  # noqa: E402

_WHY_NOT = (selection.jax_lacks() or selection.gpu_lacks()) if jax_gpu() else None
pytestmark = JAX_GPU_MARKS + [pytest.mark.skipif(_WHY_NOT is not None, reason=f"no Mosaic GPU here: {_WHY_NOT}")]

STATIC = ("eps", "mode", "weight_offset", "out_dtype", "group_size")
MOSAIC = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="mosaic"), static_argnames=STATIC)
TRITON = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="triton"), static_argnames=STATIC)
SIZES = (1, 2, 3, 7, 8, 32, 255, 256, 300, 1024, 4096)


def test_auto_picks_mosaic_for_fp8():
    assert selection.forward_kernel(None, 4096, interpret=False) == "mosaic"


@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_fp8_corpus_case_mosaic(fp8_cases, name):
    check_fp8_corpus_case(MOSAIC, fp8_cases[name], name)


def _inputs(tag, rows: int, n: int, dtype: str, kind: str):
    rng = np.random.default_rng(_seed("mosaic-fp8-gpu", tag, rows, n, dtype, kind))
    x = fp8_rows(rng, (rows, n), dtype)
    x[-1] = rng.standard_normal(n)
    x[-1, HUGE_WEIGHT_COLUMN] = 8.0  # an inf u (float32 and bfloat16 weights)
    x[-2, :128] = 0.0  # a zero group
    rdt = residual_dtype(dtype, kind)
    r = None if rdt is None else fp8_rows(rng, (rows, n), rdt, specials=False)
    return x, fp8_weight(rng, n, dtype), r


@pytest.mark.parametrize("n", [256, 4096, 5120, 16512, 20480])
@pytest.mark.parametrize("dtype,kind,mode,offset,quant", COMBOS)
def test_mosaic_matches_reference_and_triton(dtype, kind, mode, offset, quant, n):
    x, w, r = _inputs("ref", 64 if n <= 5120 else 4, n, dtype, kind)
    for scale in GPU_STATIC_SCALES if quant == "static" else (None,):
        kwargs = quant_kwargs(quant, scale)
        got = call(MOSAIC, x, w, r, mode=mode, weight_offset=offset, **kwargs)
        what = f"{dtype} {kind} {mode} {offset} {quant} n={n} scale={scale}"
        assert_fp8_result(expected(x, w, r, mode=mode, weight_offset=offset, **kwargs), got, what)
        assert_fp8_result(tuple(np.asarray(a) for a in call(TRITON, x, w, r, mode=mode, weight_offset=offset,
                                                             **kwargs)), got, f"{what} vs Pallas-Triton")


@pytest.mark.parametrize("n", [128, 4096, 8192])
@pytest.mark.parametrize("quant,kind", [(QUANTS[0], "float32"), (QUANTS[1], "none"), (QUANTS[2], "same")])
def test_batch_invariance_1_to_4096(quant, kind, n):
    """Every row of x[:B] and x[-B:] equals the same row of one 4096-row call: out and the scales."""
    total = 4096 if n <= 4096 else 512
    x, w, r = (None if a is None else jnp.asarray(a) for a in _inputs("inv", total, n, "bfloat16", kind))
    kwargs = quant_kwargs(quant, jnp.float32(0.02))
    full = tuple(np.asarray(a) for a in call(MOSAIC, x, w, r, **kwargs))
    for batch in (b for b in SIZES if b <= total):
        for part in (slice(None, batch), slice(total - batch, None)):
            got = call(MOSAIC, x[part], w, None if r is None else r[part], **kwargs)
            assert_fp8_result(tuple(a[part] for a in full), tuple(np.asarray(a) for a in got),
                              f"B={batch} rows {part}")
