"""bi_jax's FP8 output (contract v1.2) on a GPU: the compiled Pallas-Triton kernel, bit for bit.

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
from bi_jax.pallas_fp8 import clamp_fp8, encode_fp8, quotient, to_fp8  # noqa: E402
from bi_jax.pallas_kernel import ExactOps  # noqa: E402

from fp8_helpers import FP8_CASE_NAMES, QUOTIENT_SCALES  # noqa: E402
from jax_fp8_helpers import (COMBOS, E4M3, GPU_STATIC_SCALES, HUGE_WEIGHT_COLUMN, QUANTS,  # noqa: E402
                             assert_fp8_result, call, check_fp8_corpus_case, expected, fp8_rows, fp8_weight, quant_kwargs)
from jax_gpu_marks import JAX_GPU_MARKS  # noqa: E402
from jax_helpers import _seed, residual_dtype  # noqa: E402

pytestmark = JAX_GPU_MARKS

STATIC = ("eps", "mode", "weight_offset", "out_dtype", "group_size")
# The Pallas-Triton kernel, named: on compute capability 9.0 and later the FP8 output's default is the
# Mosaic GPU kernel (tests/test_jax_mosaic_fp8_gpu.py).
COMPILED = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="triton"),
                   static_argnames=STATIC)
INTERPRETED = jax.jit(functools.partial(bi_jax.rms_norm, interpret=True), static_argnames=STATIC)


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
    for scale in GPU_STATIC_SCALES if quant == "static" else (None,):
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


@pytest.mark.parametrize("n", [128, 4096, 8192, 16512])
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


def _quotient_vs_division_kernel(scales_ref, differ_ref, first_ref, *, u_start: int, span: int, block: int,
                                 codes: bool):
    """Program (i, j): scale i against the span patterns u_start + j * span + k, the kernel's
    quotient against IEEE division (ExactOps.div): their float32 bits, or (codes) their FP8 codes."""
    ops = ExactOps(interpret=False)
    s = plgpu.load(scales_ref.at[pl.program_id(0) + jnp.zeros((1,), jnp.int32)])
    lanes = jnp.arange(block, dtype=jnp.uint32)
    base = jnp.uint32(u_start) + pl.program_id(1).astype(jnp.uint32) * jnp.uint32(span)

    def step(k, carry):
        count, first = carry
        bits = base + k.astype(jnp.uint32) * jnp.uint32(block) + lanes
        u = jax.lax.bitcast_convert_type(bits, jnp.float32)
        got, want = quotient(ops, u, s), ops.div(u, s)
        if codes:
            # Q2 meets |u| <= amax and s = rn(max(amax, floor) / 448) only: |u / s| <= 448 (1 + 2**-24)
            # (or NaN). Kept: |u| * 2**-9 <= s (exact; an infinite u only at s = inf).
            wrong = ~(jnp.abs(u) * jnp.float32(0.001953125) > s) & (to_fp8(ops, got, E4M3) != to_fp8(ops, want, E4M3))
        else:
            wrong = (jax.lax.bitcast_convert_type(got, jnp.uint32) != jax.lax.bitcast_convert_type(want, jnp.uint32))
        return count + wrong.astype(jnp.int32), jnp.minimum(first, jnp.where(wrong, bits, jnp.uint32(0xFFFFFFFF)))

    count, first = jax.lax.fori_loop(0, span // block, step, (jnp.zeros((block,), jnp.int32),
                                                              jnp.full((block,), 0xFFFFFFFF, jnp.uint32)))
    lane = (pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)) * block + jnp.arange(block, dtype=jnp.int32)
    plgpu.store(differ_ref.at[lane], count)
    plgpu.store(first_ref.at[lane], first)


def _quotient_mismatches(scales: np.ndarray, u_start: int, span: int, splits: int, codes: bool):
    """(count, [(scale, a differing u pattern)]) of the quotient against division over (scales x u)."""
    block = 256
    size = scales.size * splits * block
    differ, first = pl.pallas_call(
        functools.partial(_quotient_vs_division_kernel, u_start=u_start, span=span, block=block, codes=codes),
        out_shape=(jax.ShapeDtypeStruct((size,), jnp.int32), jax.ShapeDtypeStruct((size,), jnp.uint32)),
        grid=(scales.size, splits), compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=False)(jnp.asarray(scales, jnp.float32))
    differ = np.asarray(differ).reshape(scales.size, -1)
    first = np.asarray(first).reshape(scales.size, -1)
    bad = np.flatnonzero(differ.sum(1))[:3]
    return int(differ.sum()), [(float(scales[i]), f"0x{int(first[i][differ[i] > 0][0]):08x}") for i in bad]


def test_group_quotient_equals_division_on_pairs_of_significands():
    """The compiled kernel's per-group u / s (quotient) equals IEEE division bit for bit for 2**17
    scales in [1, 2) (every 64th significand, the low bits varied) against all 2**23 u in [1, 2).
    bi_torch's twin covers every pair of significands, and why that covers Q2's domain
    (tests/test_torch_fp8_gpu.py); this checks the Pallas lowering of the same operations."""
    k = np.arange(1 << 17, dtype=np.uint32)
    scales = (np.uint32(0x3F800000) + k * np.uint32(64) + (k % np.uint32(64))).view(np.float32)
    count, first = _quotient_mismatches(scales, 0x3F800000, 1 << 23, 1, codes=False)
    assert count == 0, f"{count} quotients differ from division; (scale, u): {first}"


def test_group_quotient_fp8_codes_over_every_u():
    """For scales across Q2's whole domain (fp8_helpers.QUOTIENT_SCALES), the FP8 code of the
    kernel's quotient equals that of IEEE division for every float32 pattern u the kernel can meet
    with that scale (|u| <= amax and s = rn(max(amax, floor) / 448): |u / s| <= 448 (1 + 2**-24); the
    test keeps every u with |u| <= 512 s, and NaNs) out of all 2**32: zeros of both signs,
    subnormals, tiny quotients and, at s = inf, infinities included. (Far beyond, rn(u * rn(1 / s))
    can overflow where u / s saturates to 448.)"""
    count, first = _quotient_mismatches(QUOTIENT_SCALES, 0, 1 << 22, 1 << 10, codes=True)
    assert count == 0, f"{count} FP8 codes differ from division's; (scale, u): {first}"
