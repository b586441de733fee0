"""bi_jax's FP8 output (contract v1.2) on a GPU: the compiled Pallas kernel (Triton lowering), bit for bit.

Skipped without a GPU as JAX's default backend (jax_gpu_marks.py). The FP8 golden corpus;
bridge.reference on the CPU tests' inputs (and a float32-subnormal scale, which XLA:CPU would
flush); compiled vs interpret mode; batch invariance of out and the scales over batches of 1 to
4096 rows (255 and 300 among them, as vLLM's tests use) and long rows; and the kernel's hardware
FP8 conversion (to_fp8) against the bit-pattern encoder on every float32 pattern.
"""

from __future__ import annotations

import functools
import os

# torch and JAX may share the GPU in one pytest process (see test_jax_gpu.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

import bi_jax  # noqa: E402
from bi_jax.pallas_fp8 import clamp_fp8, encode_fp8, to_fp8  # noqa: E402
from bi_jax.pallas_kernel import ExactOps  # noqa: E402

from fp8_helpers import FP8_CASE_NAMES  # noqa: E402
from jax_fp8_helpers import (COMBOS, E4M3, HUGE_WEIGHT_COLUMN, QUANTS, assert_fp8_result, call,  # noqa: E402
                             check_fp8_corpus_case, expected, fp8_rows, fp8_weight, quant_kwargs)
from jax_gpu_marks import JAX_GPU_MARKS  # noqa: E402
from jax_helpers import _seed, residual_dtype  # noqa: E402

pytestmark = JAX_GPU_MARKS

STATIC = ("eps", "mode", "weight_offset", "out_dtype", "group_size")
COMPILED = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False), static_argnames=STATIC)
INTERPRETED = jax.jit(functools.partial(bi_jax.rms_norm, interpret=True), static_argnames=STATIC)

# FP8's normal range, its subnormals, 2**-126 (t overflows) and 2**-127, a float32 subnormal whose
# reciprocal is finite: the GPU keeps subnormals (XLA:CPU would read it as 0, hence not in the CPU tests).
STATIC_SCALES = (np.float32(0.0123), np.float32(150.0), np.float32(2.0**-126), np.float32(2.0**-127))


@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_fp8_corpus_case_compiled(fp8_cases, name):
    check_fp8_corpus_case(COMPILED, fp8_cases[name], name)


@pytest.mark.parametrize("n", [256, 4096, 16512, 20480])
@pytest.mark.parametrize("dtype,kind,mode,offset,quant", COMBOS)
def test_compiled_matches_reference(dtype, kind, mode, offset, quant, n):
    rng = np.random.default_rng(_seed("fp8-gpu-ref", dtype, kind, mode, offset, quant, n))
    rows = 64 if n <= 4096 else 4
    x = fp8_rows(rng, (rows, n), dtype)
    x[-1] = rng.standard_normal(n)
    x[-1, HUGE_WEIGHT_COLUMN] = 8.0  # an inf u (float32 and bfloat16 weights)
    x[-2, :128] = 0.0  # a zero group
    w = fp8_weight(rng, n, dtype)
    r = None if kind == "none" else fp8_rows(rng, (rows, n), residual_dtype(dtype, kind), specials=False)
    for scale in STATIC_SCALES if quant == "static" else (None,):
        kwargs = quant_kwargs(quant, scale)
        got = call(COMPILED, x, w, r, mode=mode, weight_offset=offset, **kwargs)
        assert_fp8_result(expected(x, w, r, mode=mode, weight_offset=offset, **kwargs), got,
                          f"{dtype} {kind} {mode} {offset} {quant} n={n} scale={scale}")


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("n", [1024, 16512])
def test_compiled_matches_interpret(quant, n):
    rng = np.random.default_rng(_seed("fp8-gpu-agree", quant, n))
    x, w = fp8_rows(rng, (37, n), "bfloat16"), fp8_weight(rng, n, "bfloat16")
    r = fp8_rows(rng, (37, n), "float32", specials=False)
    kwargs = quant_kwargs(quant, np.float32(0.02))
    gpu, cpu = jax.devices()[0], jax.devices("cpu")[0]

    def run(fn, device):
        args = [jax.device_put(a, device) for a in (x, w, r)]
        if "scale" in kwargs:
            kw = {**kwargs, "scale": jax.device_put(kwargs["scale"], device)}
        else:
            kw = kwargs
        result = fn(args[0], args[1], 1e-6, args[2], **kw)
        return tuple(np.asarray(a) for a in result) if isinstance(result, tuple) else (np.asarray(result),)

    assert_fp8_result(run(INTERPRETED, cpu), run(COMPILED, gpu), f"compiled vs interpret {quant} n={n}")


SIZES = (1, 2, 3, 7, 8, 16, 17, 64, 127, 255, 256, 300, 1000, 4095, 4096)


@pytest.mark.parametrize("n", [128, 4096, 16512])
@pytest.mark.parametrize("quant,kind", [("static", "float32"), ("group128", "none"), ("group64", "same")])
def test_batch_invariance_1_to_4096(quant, kind, n):
    """Every row of x[:B] and x[-B:] equals the same row of one 4096-row call: out and the scales."""
    rng = np.random.default_rng(_seed("fp8-gpu-invariance", quant, kind, n))
    dtype, total = "bfloat16", 4096 if n <= 4096 else 512
    x = jnp.asarray(fp8_rows(rng, (total, n), dtype))
    w = jnp.asarray(fp8_weight(rng, n, dtype))
    rdt = residual_dtype(dtype, kind)
    r = None if rdt is None else jnp.asarray(fp8_rows(rng, (total, n), rdt, specials=False))
    kwargs = quant_kwargs(quant, jnp.float32(0.02))
    full = tuple(np.asarray(a) for a in call(COMPILED, x, w, r, **kwargs))
    pick = np.array([0, 1, total // 2, total - 1])
    assert_fp8_result(expected(np.asarray(x)[pick], np.asarray(w), None if r is None else np.asarray(r)[pick],
                               **quant_kwargs(quant, np.float32(0.02))),
                      tuple(a[pick] for a in full), "full call vs reference")
    for batch in (b for b in SIZES if b <= total):
        for part in (slice(None, batch), slice(total - batch, None)):
            got = call(COMPILED, x[part], w, None if r is None else r[part], **kwargs)
            assert_fp8_result(tuple(a[part] for a in full), tuple(np.asarray(a) for a in got),
                              f"B={batch} rows {part}")


def _hardware_vs_bits_kernel(t_ref, differ_ref, *, block: int):
    offsets = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    t = plgpu.load(t_ref.at[offsets])
    hardware = to_fp8(ExactOps(interpret=False), t, E4M3)
    by_bits = encode_fp8(clamp_fp8(t, E4M3.fp8_max), E4M3.mantissa_bits, E4M3.exponent_bias, E4M3.nan_fp8)
    plgpu.store(differ_ref.at[offsets], (hardware != by_bits).astype(jnp.uint8))


def test_to_fp8_compiled_equals_bit_pattern_on_every_float32():
    """The compiled kernel's Q3-Q4 (to_fp8: the device's cvt.rn.satfinite.e4m3x2.f32, no clamp, no
    NaN select) against encode_fp8(clamp_fp8(t)), the contract's form, compiled in the same kernel,
    on all 2**32 float32 patterns t: infinities, out-of-range values, every NaN, subnormals and both
    zeros included. (encode_fp8 itself is checked against the reference in test_jax_fp8_cpu.py.)"""
    block, chunk = 4096, 1 << 28
    differ = pl.pallas_call(functools.partial(_hardware_vs_bits_kernel, block=block),
                            out_shape=jax.ShapeDtypeStruct((chunk,), jnp.uint8), grid=(chunk // block,),
                            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=False)

    @jax.jit
    def count(start):
        bits = start + jnp.arange(chunk, dtype=jnp.uint32)
        wrong = differ(jax.lax.bitcast_convert_type(bits, jnp.float32)) != 0
        return jnp.count_nonzero(wrong), jnp.min(jnp.where(wrong, bits, jnp.uint32(0xFFFFFFFF)))

    for start in range(0, 1 << 32, chunk):
        n, first = count(jnp.uint32(start))
        assert int(n) == 0, f"{int(n)} codes differ in 0x{start:08x}-0x{start + chunk - 1:08x}; first 0x{int(first):08x}"
