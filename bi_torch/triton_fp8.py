"""The Triton kernel's FP8 output: NUMERICS.md contract v1.2, steps Q2-Q4, called from step 6.

Mirrors bi_jax/pallas_fp8.py line for line. Compiled, Q3-Q4 are one hardware conversion,
cvt.rn.satfinite.e4m3x2.f32 (two elements per instruction), which equals the contract's clamp and
rnFP8 on all 2**32 float32 patterns; the interpreter rounds on the bit pattern (encode_fp8).
A group's u / s is compiled as one reciprocal per group and a correction per element (quotient),
which equals IEEE division on every input the kernel meets (tests/test_torch_fp8_gpu.py, both
frameworks); the interpreter divides. Like triton_kernel.py, this file is loaded twice by
bi_torch/launch.py (compiled, and under the interpreter). The format's fields
(bridge.numerics.contract.FP8_FORMATS) arrive as constexprs.
"""

import triton
import triton.language as tl

from bridge.numerics.contract import GROUP_AMAX_FLOOR, as_float32

# Whether this copy of the module was loaded under the interpreter (bi_torch/launch.py).
INTERPRETED: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))
# Q2's floor on a group's amax, rn(1e-10).
AMAX_FLOOR: tl.constexpr = tl.constexpr(as_float32(GROUP_AMAX_FLOOR))


@triton.jit
def div_rn(a, b):
    """IEEE division of two blocks that broadcast together."""
    a, b = tl.broadcast(a, b)
    return tl.div_rn(a, b)


@triton.jit
def quotient(u, s):
    """rn(u / s) for a group's values u and its scale s (Q2: s >= rn(rn(1e-10) / 448), or +inf).

    Compiled: Markstein's correction of q0 = rn(u * r) by the exact residual u - q0 * s, with
    r = rn(1 / s) once per group: a multiply and two FMAs per element instead of a division.
    The residual is formed negated, m = fma(q0, s, -u), and added through -r, so that u = -0 gives
    -0 (fma(-q0, s, u) would give +0); s = +inf enters the residual as FLT_MAX, so that finite u
    give q0 = +-0 exactly (inf * 0 would be NaN) and an infinite u NaN, as u / inf. The GPU tests
    compare it with div_rn on every pair of float32 significands and on every u the kernel can meet at
    scales across the domain (tests/test_torch_fp8_gpu.py).
    """
    if INTERPRETED:
        return div_rn(u, s)
    r = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    # -r by its sign bit: Triton 3.6 lowers -r to 0 - r, which is +0 where r = +0 (s = inf), and the
    # zeros of negative u then come out +0 (H100: every negative finite u at s = inf). For -u either
    # lowering gives the same m.
    neg_r = (r.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)
    q0 = u * r
    m = tl.fma(q0, tl.minimum(s, 3.4028234663852886e38), -u)
    return tl.fma(m, neg_r, q0)


@triton.jit
def clamp_fp8(t, FP8_MAX: tl.constexpr):
    """Q3: min(max(t, -M), M), a NaN kept as NaN."""
    return tl.where(t != t, t, tl.minimum(tl.maximum(t, -FP8_MAX), FP8_MAX))


@triton.jit
def encode_fp8(c, MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    """Q4, rnFP8 on the bit pattern: c clamped to the format's range (or NaN) to its 8 bits (uint8),
    nearest even straight from float32, subnormals kept, every NaN as NAN_FP8.

    Normal results: drop the float32 mantissa's low bits with round-half-even and rebias the
    exponent. Below the smallest normal 2**(1 - bias) the code is |c| / 2**(2 - bias - mantissa bits)
    rounded to an integer: the 24-bit significand shifted right with round-half-even (integers, exact;
    bi_jax's twin cannot round with float32 adds of 2**23, which XLA:CPU folds away).
    """
    SHIFT: tl.constexpr = 23 - MANTISSA_BITS
    HALF: tl.constexpr = (1 << (SHIFT - 1)) - 1
    REBIAS: tl.constexpr = (127 - EXPONENT_BIAS) << MANTISSA_BITS
    MIN_NORMAL: tl.constexpr = 2.0 ** (1 - EXPONENT_BIAS)
    # |c| * 2**(bias - 1 + mantissa bits) = significand >> (SUBNORMAL_SHIFT - exponent field), exactly.
    SUBNORMAL_SHIFT: tl.constexpr = 127 + 23 - (EXPONENT_BIAS - 1 + MANTISSA_BITS)
    b = c.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    magnitude = a.to(tl.float32, bitcast=True)
    normal = ((a + HALF + ((a >> SHIFT) & 1)) >> SHIFT) - REBIAS
    # >= 6 for |c| <= M; beyond 25 every significand rounds to 0 (NaN's exponent wraps it there).
    sub_shift = tl.minimum(SUBNORMAL_SHIFT - (a >> 23), 25)
    significand = (a & 0x7FFFFF) | 0x800000
    subnormal = (significand + ((1 << (sub_shift - 1)) - 1) + ((significand >> sub_shift) & 1)) >> sub_shift
    code = tl.where(magnitude < MIN_NORMAL, subnormal, normal) | ((b >> 31) << 7)
    return tl.where(c != c, NAN_FP8, code).to(tl.uint8)


@triton.jit
def to_fp8(t, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr,
           NAN_FP8: tl.constexpr):
    """Q3-Q4: rnFP8(clamp(t)) as uint8 codes. Compiled: cvt.rn.satfinite.e4m3x2.f32, which saturates
    to +-448 (infinities too) and writes 0x7F for every NaN: the contract's codes for every float32
    pattern, compared exhaustively on the GPU (tests/test_torch_fp8_gpu.py, both frameworks)."""
    if INTERPRETED:
        code = encode_fp8(clamp_fp8(t, FP8_MAX), MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    else:
        tl.static_assert(MANTISSA_BITS == 3 and EXPONENT_BIAS == 7 and NAN_FP8 == 0x7F, "e4m3fn only")
        code = t.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return code


@triton.jit
def quantize_static(u, inv_scale, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                    EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    """Q2-Q4 static: rnFP8(clamp(rn(u * inv_scale))), inv_scale = rn(1 / scale) once per program."""
    return to_fp8(u * inv_scale, FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)


@triton.jit
def quantize_groups(u, scales_ptr, scales_stride, rows, row_mask, chunk, n_cols, ROWS: tl.constexpr,
                    CHUNK: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                    EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    """Q2-Q4 per-token-group on the (ROWS, CHUNK) block of chunk `chunk`, CHUNK a multiple of GROUP:
    per aligned group, amax = max |u| over its non-NaN values (exact in any order),
    s = rn(max(amax, rn(1e-10)) / M), stored to the row-major scales; q = rnFP8(clamp(rn(u / s)))
    (quotient).
    GROUP divides n, so a group lies wholly inside the row or wholly in the padding."""
    group_cols = chunk * (CHUNK // GROUP) + tl.arange(0, CHUNK // GROUP)[None, :]
    group_mask = row_mask & (group_cols * GROUP < n_cols)
    groups = tl.reshape(u, (ROWS, CHUNK // GROUP, GROUP))
    amax = tl.reduce(tl.where(groups == groups, tl.abs(groups), 0.0), 2, tl.standard._elementwise_max)
    s = tl.div_rn(tl.maximum(amax, AMAX_FLOOR), tl.full((ROWS, CHUNK // GROUP), FP8_MAX, tl.float32))
    tl.store(scales_ptr + rows * scales_stride + group_cols, s, mask=group_mask)
    q = to_fp8(quotient(groups, s[:, :, None]), FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    return tl.reshape(q, (ROWS, CHUNK))
