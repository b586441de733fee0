"""FP8 output inside the Pallas forward kernel: NUMERICS.md contract v1.2, steps Q2-Q4.

Mirrors bi_torch/triton_fp8.py line for line (quotient, clamp_fp8, encode_fp8, to_fp8,
quantize_static, quantize_groups; its div_rn is ExactOps.div here). On the GPU, Q3-Q4 are one
hardware conversion (cvt.rn.satfinite.e4m3x2.f32, as in the Triton kernel), equal to the contract's
clamp and rnFP8 on all 2**32 float32 patterns (tests/test_jax_fp8_gpu.py); interpret mode rounds on
the bit pattern (encode_fp8). A group's u / s is one reciprocal per group and a correction per
element on the GPU (quotient), equal to IEEE division on every input the kernel meets; interpret
mode divides. Below FP8's smallest normal encode_fp8 rounds with integer shifts:
adding and subtracting 2**23 in float32 would be exact too, but XLA's CPU backend folds
(a + 2**23) - 2**23 back into a (seen: jax 0.10.2).
The kernel writes the FP8 codes as uint8; bi_jax.ops bitcasts them to the format outside it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from bridge.numerics.contract import CANONICAL_NAN_BITS, FP8_FORMATS, GROUP_AMAX_FLOOR, as_float32

# Q2's floor on a group's amax, rn(1e-10).
AMAX_FLOOR = as_float32(GROUP_AMAX_FLOOR)


@dataclasses.dataclass(frozen=True)
class Quant:
    """What step 6 stores, static in the kernel: kind "none" (rnD, as in v1), "static" or "group",
    and the FP8 format's fields (bi_torch.launch.fp8_constexprs' twin)."""

    kind: str = "none"
    group: int = 1  # group_size for kind "group"
    fmt_name: str = "float8_e4m3fn"
    fp8_max: float = 448.0
    mantissa_bits: int = 3
    exponent_bias: int = 7
    nan_fp8: int = 0x7F

    @classmethod
    def fp8(cls, kind: str, fmt_name: str, group: int = 1) -> "Quant":
        """kind "static" or "group" with the fields of bridge.numerics.contract.FP8_FORMATS[fmt_name]."""
        fmt = FP8_FORMATS[fmt_name]
        return cls(kind=kind, group=group, fmt_name=fmt_name, fp8_max=fmt.max, mantissa_bits=fmt.mantissa_bits,
                   exponent_bias=fmt.exponent_bias, nan_fp8=CANONICAL_NAN_BITS[fmt_name])


NO_QUANT = Quant()


def quotient(ops, u: jax.Array, s: jax.Array) -> jax.Array:
    """rn(u / s) for a group's values u and its scale s (Q2: s >= rn(rn(1e-10) / 448), or +inf).

    On the GPU: Markstein's correction of q0 = rn(u * r) by the exact residual u - q0 * s, with
    r = rn(1 / s) once per group: a multiply and two FMAs per element instead of a division.
    The residual is formed negated, m = fma(q0, s, -u), and added through -r, so that u = -0 gives
    -0 (fma(-q0, s, u) would give +0); s = +inf enters the residual as FLT_MAX, so that finite u
    give q0 = +-0 exactly (inf * 0 would be NaN) and an infinite u NaN, as u / inf. The GPU tests
    compare it with division on every pair of float32 significands (bi_torch's twin) and on every u the kernel
    can meet at scales across the domain (tests/test_jax_fp8_gpu.py).
    """
    if ops.interpret:
        return ops.div(u, s)
    r = ops.div(jnp.ones(s.shape, jnp.float32), s)
    # -r by its sign bit: -r lowers to 0 - r, which is +0 where r = +0 (s = inf). For -u either
    # lowering gives the same m (ops.neg: one that ptxas folds into the FMA).
    neg_r = lax.bitcast_convert_type(lax.bitcast_convert_type(r, jnp.uint32) ^ jnp.uint32(0x80000000), jnp.float32)
    q0 = ops.mul(u, r)
    m = ops.fma(q0, jnp.minimum(s, jnp.float32(3.4028234663852886e38)), ops.neg(u))
    return ops.fma(m, neg_r, q0)


def clamp_fp8(t: jax.Array, fp8_max: float) -> jax.Array:
    """Q3: min(max(t, -M), M), a NaN kept as NaN."""
    return jnp.where(t != t, t, jnp.minimum(jnp.maximum(t, jnp.float32(-fp8_max)), jnp.float32(fp8_max)))


def encode_fp8(c: jax.Array, mantissa_bits: int, exponent_bias: int, nan_fp8: int) -> jax.Array:
    """Q4, rnFP8 on the bit pattern: c clamped to the format's range (or NaN) to its 8 bits (uint8),
    nearest even straight from float32, subnormals kept, every NaN as nan_fp8.

    Normal results: drop the float32 mantissa's low bits with round-half-even and rebias the
    exponent. Below the smallest normal 2**(1 - bias) the code is |c| / 2**(2 - bias - mantissa bits)
    rounded to an integer: the 24-bit significand shifted right with round-half-even (integers, exact).
    """
    shift = 23 - mantissa_bits
    half = (1 << (shift - 1)) - 1
    rebias = (127 - exponent_bias) << mantissa_bits
    min_normal = 2.0 ** (1 - exponent_bias)
    # |c| * 2**(bias - 1 + mantissa bits) = significand >> (subnormal_shift - exponent field), exactly.
    subnormal_shift = 127 + 23 - (exponent_bias - 1 + mantissa_bits)
    b = lax.bitcast_convert_type(c, jnp.uint32)
    a = b & 0x7FFFFFFF
    magnitude = lax.bitcast_convert_type(a, jnp.float32)
    normal = ((a + half + ((a >> shift) & 1)) >> shift) - rebias
    # >= 6 for |c| <= M; beyond 25 every significand rounds to 0 (NaN's exponent wraps it there).
    sub_shift = jnp.minimum(subnormal_shift - (a >> 23), 25)
    significand = (a & 0x7FFFFF) | 0x800000
    subnormal = (significand + ((jnp.uint32(1) << (sub_shift - 1)) - 1)
                 + ((significand >> sub_shift) & 1)) >> sub_shift
    code = jnp.where(magnitude < min_normal, subnormal, normal) | ((b >> 31) << 7)
    return jnp.where(c != c, jnp.uint32(nan_fp8), code).astype(jnp.uint8)


def to_fp8(ops, t: jax.Array, quant: Quant) -> jax.Array:
    """Q3-Q4: rnFP8(clamp(t)) as uint8 codes. On the GPU: cvt.rn.satfinite.e4m3x2.f32, which saturates
    to +-448 (infinities too) and writes 0x7F for every NaN: the contract's codes for every float32
    pattern, compared exhaustively on the GPU (tests/test_jax_fp8_gpu.py, both frameworks)."""
    if ops.interpret:
        return encode_fp8(clamp_fp8(t, quant.fp8_max), quant.mantissa_bits, quant.exponent_bias, quant.nan_fp8)
    assert quant.fmt_name == "float8_e4m3fn", "e4m3fn only"
    return lax.bitcast_convert_type(t.astype(jnp.float8_e4m3fn), jnp.uint8)


def quantize_static(ops, u: jax.Array, inv_scale: jax.Array, quant: Quant) -> jax.Array:
    """Q2-Q4 static: rnFP8(clamp(rn(u * inv_scale))), inv_scale = rn(1 / scale) once per program."""
    return to_fp8(ops, u * inv_scale, quant)


def quantize_groups(ops, u: jax.Array, scales_ref, rows, row_mask, chunk, n_cols: int, ROWS: int, CHUNK: int,
                    quant: Quant) -> jax.Array:
    """Q2-Q4 per-token-group on the (ROWS, CHUNK) block of chunk `chunk`, CHUNK a multiple of GROUP:
    per aligned group, amax = max |u| over its non-NaN values (exact in any order),
    s = rn(max(amax, rn(1e-10)) / M), stored to the row-major scales; q = rnFP8(clamp(rn(u / s)))
    (quotient).
    GROUP divides n, so a group lies wholly inside the row or wholly in the padding."""
    GROUP = quant.group
    group_cols = chunk * (CHUNK // GROUP) + jnp.arange(CHUNK // GROUP, dtype=jnp.int32)[None, :]
    group_mask = row_mask & (group_cols * GROUP < n_cols)
    groups = u.reshape(ROWS, CHUNK // GROUP, GROUP)
    amax = jnp.where(groups == groups, jnp.abs(groups), 0.0).max(axis=2)
    s = ops.div(jnp.maximum(amax, jnp.float32(AMAX_FLOOR)),
                jnp.full((ROWS, CHUNK // GROUP), quant.fp8_max, jnp.float32))
    plgpu.store(scales_ref.at[rows * (n_cols // GROUP) + group_cols], s, mask=group_mask)
    q = to_fp8(ops, quotient(ops, groups, s[:, :, None]), quant)
    return q.reshape(ROWS, CHUNK)
