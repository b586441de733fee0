"""FP8 output (NUMERICS.md contract v1.2, Q2-Q4) in the Mosaic GPU forward (issue 26, stage 3).

bi_jax/mosaic_kernel.py's body stops step 6 at u (Q1) and hands each register's values to
`quantize_row`, which is written once against the ops interface, as the forward is: `MosaicFp8Ops`
emits inline PTX, `NumpyFp8Ops` runs it on numpy. The rules are bi_jax/pallas_fp8.py's:

- static: t = rn(u * sinv), sinv = rn(1 / scale) once per program;
- per group: a group of 64 or 128 consecutive columns lies in one register of group // vec
  consecutive lanes of one warp (RowLayout: a register's vectors cover 128 * vec consecutive
  columns, and vec = 16 / itemsize divides the group, n being a multiple of 64), aligned on that
  lane count; those lanes reduce amax by butterfly shuffles with xor masks below it, which never
  leave the aligned block (max is exact in any order, NaNs are replaced by 0 first). Every lane of
  the group then holds s, the group's first lane stores it, and each lane divides its own values
  (`divider`: pallas_fp8.quotient's reciprocal and correction, in PTX);
- Q3-Q4: cvt.rn.satfinite.e4m3x2.f32, two values per instruction into 16 bits: its first source
  goes to the upper byte (as in CUDA's cuda_fp8.hpp, which passes the value second to get it in
  the low byte), so the pair (u[2k], u[2k + 1]) is converted as (u[2k + 1], u[2k]) and the 16-bit
  results, stored little-endian, put u[2k]'s code at column 2k.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import numpy as np

from bridge.numerics import reference_fp8

from .mosaic_ops import MosaicOps, NumpyOps, RowLayout
from .pallas_fp8 import AMAX_FLOOR, Quant

FLT_MAX = float(np.finfo(np.float32).max)


def to_fp8(ops, ts: List) -> List:
    """Q3-Q4 on one thread's vector: one 16-bit pair of codes per two values (see the module docstring);
    a lone value (vec = 1, static scales on odd n) is paired with +0, whose code is never stored."""
    ts = ts + [ops.f32(0.0)] * (len(ts) % 2)
    return [ops.cvt_pair(ts[j + 1], ts[j]) for j in range(0, len(ts), 2)]


def divider(ops, s):
    """u -> rn(u / s) for one group's scale s: pallas_fp8.quotient, which NUMERICS.md proves equal
    to IEEE division on the kernel's domain. The emulation divides: numpy has no float32 FMA, and
    float64 products then a float32 rounding could round twice."""
    if ops.emulated:
        return lambda u: ops.div(u, s)
    r = ops.div(ops.f32(1.0), s)
    # -r by its sign bit (r = +0 for s = inf, whose negation must be -0); s = inf as FLT_MAX in the residual.
    neg_r, s_finite = ops.flip_sign(r), ops.min(s, ops.f32(FLT_MAX))

    def divide(u):
        q0 = ops.mul(u, r)
        return ops.fma(ops.fma(q0, s_finite, ops.neg(u)), neg_r, q0)
    return divide


def group_amax(ops, lay: RowLayout, u: List, group: int):
    """Q2's amax of the group this thread's vector belongs to, in every lane of the group."""
    amax = ops.abs_or_zero(u[0])
    for a in u[1:]:
        amax = ops.max(amax, ops.abs_or_zero(a))
    mask = 1
    while mask < group // lay.vec:
        amax = ops.max(amax, ops.shfl_xor(amax, mask))
        mask *= 2
    return amax


def quantize_row(ops, lay: RowLayout, us: Iterable[Tuple[int, List]], out, scale, scales, quant: Quant) -> None:
    """Q2-Q4 for one row whose u arrive per register as (reg, values): codes to out, group scales to scales.

    scale: the static scale's (1,) ref (kind "static"); scales: the row's (n / group,) ref (kind "group").
    """
    if quant.kind == "static":
        sinv = ops.div(ops.f32(1.0), ops.load_scalar(scale))
        for reg, u in us:
            ops.store_codes(out, reg, to_fp8(ops, [ops.mul(a, sinv) for a in u]))
        return
    for reg, u in us:
        amax = group_amax(ops, lay, u, quant.group)
        s = ops.div(ops.max(amax, ops.f32(AMAX_FLOOR)), ops.f32(quant.fp8_max))
        ops.store_scale(scales, reg, quant.group, s)
        divide = divider(ops, s)
        ops.store_codes(out, reg, to_fp8(ops, [divide(a) for a in u]))


class NumpyFp8Ops(NumpyOps):
    """NumpyOps with the FP8 operations; the conversion is the contract's (reference_fp8), which
    equals cvt.rn.satfinite.e4m3x2.f32 on all 2**32 float32 patterns (NUMERICS.md)."""

    emulated = True

    def max(self, a, b):
        return np.maximum(a, b)  # never NaN here: amax's operands went through abs_or_zero

    def abs_or_zero(self, a):
        return np.where(a != a, np.float32(0.0), np.abs(a))

    def load_scalar(self, ref):
        return np.float32(np.asarray(ref).reshape(-1)[0])

    def cvt_pair(self, hi, lo):
        def code(t):
            return reference_fp8.encode_fp8(reference_fp8.clamp(t, "float8_e4m3fn"), "float8_e4m3fn").view(np.uint8)
        return (code(hi).astype(np.uint16) << 8) | code(lo)

    def store_codes(self, ref, reg: int, pairs: List) -> None:
        # Little-endian: each pair's low byte at the lower column.
        codes = []
        for p in pairs:
            codes += [(p & 0xFF).astype(np.uint8), (p >> 8).astype(np.uint8)]
        self.store(ref, reg, codes[:self.lay.vec])

    def store_scale(self, ref, reg: int, group: int, s) -> None:
        cols = self._columns(reg, 0)
        first = (cols % group == 0) & (cols < self.lay.n)
        ref[:, cols[first] // group] = s[:, first]


class MosaicFp8Ops(MosaicOps):
    """MosaicOps with the FP8 operations, each one PTX instruction (or a few in one asm block)."""

    emulated = False

    def max(self, a, b):
        return self._asm(self.f32t, "max.f32 $0, $1, $2;", "=f,f,f", a, b)

    def min(self, a, b):
        return self._asm(self.f32t, "min.f32 $0, $1, $2;", "=f,f,f", a, b)

    def fma(self, a, b, c):
        return self._asm(self.f32t, "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", a, b, c)

    def neg(self, a):
        return self._asm(self.f32t, "neg.f32 $0, $1;", "=f,f", a)

    def flip_sign(self, a):
        return self._asm(self.f32t, "xor.b32 $0, $1, 0x80000000;", "=f,f", a)

    def abs_or_zero(self, a):
        """|a|, or +0 where a is NaN (max.f32 would skip a NaN too, but the contract replaces it first)."""
        return self._asm(self.f32t, "{ .reg .pred p; .reg .f32 m; abs.f32 m, $1; setp.nan.f32 p, $1, $1; "
                                    "selp.f32 $0, 0f00000000, m, p; }", "=f,f", a)

    def load_scalar(self, ref):
        return self.memref.load(ref, [self._idx(0)])

    def cvt_pair(self, hi, lo):
        return self._asm(self.i16, "cvt.rn.satfinite.e4m3x2.f32 $0, $1, $2;", "=h,f,f", hi, lo)

    def store_codes(self, ref, reg: int, pairs: List) -> None:
        # vector.bitcast of i16 pairs to bytes is the little-endian view, as the emulation's.
        i8 = self.ir.IntegerType.get_signless(8)
        if self.lay.vec == 1:  # the low byte of the lone pair
            codes = self.pack([self.arith.trunci(i8, pairs[0])])
        else:
            codes = self.vector.bitcast(self.ir.VectorType.get((2 * len(pairs),), i8), self.pack(pairs))
        self.store_vector(ref, reg, codes)

    def store_scale(self, ref, reg: int, group: int, s) -> None:
        """The group's first lane stores s at column // group (groups past n store nothing)."""
        arith = self.arith
        col, inside = self._start(reg)
        first = arith.cmpi(arith.CmpIPredicate.eq, arith.remui(col, self._idx(group)), self._idx(0))
        with self.utils.when(first if inside is None else arith.andi(first, inside)):
            self.memref.store(s, ref, [arith.divui(col, self._idx(group))])


__all__ = ["FLT_MAX", "MosaicFp8Ops", "NumpyFp8Ops", "divider", "group_amax", "quantize_row", "to_fp8"]
