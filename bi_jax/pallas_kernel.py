"""The Pallas kernel: NUMERICS.md contract v1 (and v1.2's FP8 output), one program per block of ROWS rows.

Mirrors bi_torch/triton_kernel.py line for line. Pallas on GPU lowers `/`, jnp.sqrt and
lax.rsqrt to approximate instructions and lets ptxas fuse a plain mul into a following add,
so the exact steps go through `ExactOps`: PTX div.rn / sqrt.rn / mul.rn inline assembly on GPU,
and in interpret mode (XLA on CPU) plain jnp ops behind optimization barriers, with a
slice-based tree, because XLA's CPU simplifier rewrites 1/sqrt into rsqrt, x / const into
x * (1/const), and reorders reshape-based reductions. The FP8 steps are in pallas_fp8.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.numerics.contract import CANONICAL_NAN_BITS

from .pallas_fp8 import NO_QUANT, Quant, quantize_groups, quantize_static

NAN_F32 = CANONICAL_NAN_BITS["float32"]
NAN_BF16 = CANONICAL_NAN_BITS["bfloat16"]
NAN_F16 = CANONICAL_NAN_BITS["float16"]


def _ptx(asm: str, *args: jax.Array) -> jax.Array:
    """One float32 PTX instruction applied elementwise (on a tensor: 0-d scalars do not lower)."""
    constraints = ",".join(["=r"] + ["r"] * len(args))
    (out,) = plgpu.elementwise_inline_asm(asm, args=list(args), constraints=constraints, pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])
    return out


@dataclasses.dataclass(frozen=True)
class ExactOps:
    """The contract's IEEE float32 operations, one lowering for the GPU and one for interpret mode."""

    interpret: bool

    def square(self, v: jax.Array) -> jax.Array:
        if self.interpret:
            # XLA's CPU backend always lets LLVM fuse a multiply into the add that consumes it
            # (FPOpFusion::Fast, no flag turns it off); a data-dependent select in between keeps
            # v * v a rounding of its own. Both branches are NaN exactly when v is.
            return jnp.where(v == v, v * v, v)
        return _ptx("mul.rn.f32 $0, $1, $1;", v)

    def mul(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """a * b rounded on its own, for a product that feeds an add or a subtraction (no FMA)."""
        if self.interpret:
            # As in square, a data-dependent select keeps LLVM from fusing the product into its
            # consumer. It tests both operands: a predicate on a broadcast operand alone is loop
            # invariant, and LLVM unswitches the loop on it (seen: inv * (...) + g_r became an FMA).
            # The branches differ only when a or b is NaN, and then both are NaN (the payload is
            # never stored: encode writes every NaN canonically).
            return jnp.where((a == a) & (b == b), a * b, a + b)
        shape = jnp.broadcast_shapes(a.shape, b.shape)  # the inline assembly takes equal shapes only
        return _ptx("mul.rn.f32 $0, $1, $2;", jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape))

    def div(self, a: jax.Array, b: jax.Array) -> jax.Array:
        # Barriers on both sides: XLA would turn a / const into a * (1/const), and v * (1/r) into v / r.
        # The operands are broadcast first (the inline assembly takes equal shapes only), the divisor
        # inside its barrier: XLA also turns a / broadcast(b) into a * broadcast(1/b) (seen: FP8 groups).
        shape = jnp.broadcast_shapes(a.shape, b.shape)
        a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
        if self.interpret:
            return lax.optimization_barrier(a / lax.optimization_barrier(b))
        return _ptx("div.rn.f32 $0, $1, $2;", a, b)

    def fma(self, a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
        """rn(a * b + c), one rounding: GPU only (the interpreters keep the contract's division)."""
        assert not self.interpret, "XLA:CPU has no single-rounding fma to lower to"
        shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
        return _ptx("fma.rn.f32 $0, $1, $2, $3;", *(jnp.broadcast_to(v, shape) for v in (a, b, c)))

    def neg(self, a: jax.Array) -> jax.Array:
        """-a (GPU only) as one instruction ptxas folds into an FMA: Pallas-Triton lowers -a to 0 - a."""
        assert not self.interpret, "interpret mode needs no true negation"
        return _ptx("neg.f32 $0, $1;", a)

    def sqrt(self, a: jax.Array) -> jax.Array:
        return lax.optimization_barrier(jnp.sqrt(a)) if self.interpret else _ptx("sqrt.rn.f32 $0, $1;", a)

    def pairwise_sum(self, q: jax.Array, rows: int, width: int, split: int) -> jax.Array:
        """Step 3 on a (rows, width) block, width a power of two: q = q[0::2] + q[1::2] to one column.

        On GPU as in the Triton kernel: a reduction over an axis of 2 down to `split` sums per
        row, then pairs split apart and added (Pallas-Triton cannot lower value slicing).
        """
        while width > 1:
            width //= 2
            if self.interpret:
                q = q[:, 0::2] + q[:, 1::2]
            elif width >= split:
                q = q.reshape(rows, width, 2).sum(-1)
            else:
                even, odd = jnp.unstack(q.reshape(rows, width, 2), axis=-1)
                q = even + odd
        return q.reshape(rows)

    def row_tree(self, p: jax.Array, rows: int, width: int) -> jax.Array:
        """B7 inside a tile: the pairwise tree over the rows of a (rows, width) block, per column.

        On GPU each level is a reduction over an axis of 2 (one add, exact in any order), as in
        pairwise_sum; in interpret mode slices, which XLA does not reorder.
        """
        while rows > 1:
            rows //= 2
            p = p[0::2] + p[1::2] if self.interpret else p.reshape(rows, 2, width).sum(1)
        return p.reshape(width)

    def positive_zero(self, shape: tuple) -> jax.Array:
        """+0.0 to add to a value: XLA's CPU simplifier folds x + 0.0 into x, which keeps -0.0."""
        zero = jnp.zeros(shape, jnp.float32)
        return lax.optimization_barrier(zero) if self.interpret else zero

    def barrier(self) -> None:
        if not self.interpret:  # one program is one thread in interpret mode
            plgpu.debug_barrier()


def encode(y: jax.Array, dtype) -> jax.Array:
    """Step 6, rnD: round float32 to dtype to nearest even, every NaN as dtype's canonical NaN."""
    is_nan = y != y
    if dtype == jnp.bfloat16:
        b = lax.bitcast_convert_type(y.astype(jnp.bfloat16), jnp.uint16)  # cvt.rn on GPU; XLA rounds alike
        out = lax.bitcast_convert_type(jnp.where(is_nan, NAN_BF16, b).astype(jnp.uint16), jnp.bfloat16)
    elif dtype == jnp.float16:
        b = lax.bitcast_convert_type(y.astype(jnp.float16), jnp.uint16)
        out = lax.bitcast_convert_type(jnp.where(is_nan, NAN_F16, b).astype(jnp.uint16), jnp.float16)
    else:
        b = lax.bitcast_convert_type(y, jnp.uint32)
        out = lax.bitcast_convert_type(jnp.where(is_nan, NAN_F32, b), jnp.float32)
    return out


def round_to(y: jax.Array, dtype) -> jax.Array:
    """rn(y) to dtype, back in float32, NaN bits unspecified: for a value only a later encode stores."""
    return y.astype(dtype).astype(jnp.float32)


def inverse_rms(ops: ExactOps, s: jax.Array, n_cols: int, eps: float, rows: int) -> jax.Array:
    """Step 4: mean = s / n, r = sqrt(mean + eps), inv = 1 / r, each an IEEE float32 operation."""
    mean = ops.div(s, jnp.full((rows,), float(n_cols), jnp.float32))
    r = ops.sqrt(mean + jnp.float32(eps))
    return ops.div(jnp.full((rows,), 1.0, jnp.float32), r)


def load_z(x_ref, r_ref, new_r_ref, offsets, mask, has_residual: bool, keep: str | None,
           stream: str | None) -> jax.Array:
    """Step 1: v = f32(z), z = rnR(x + residual) stored as the new residual (or z = x).

    keep and stream are the eviction policies for z, which a second pass reads again, and for the rest.
    """
    v = plgpu.load(x_ref.at[offsets], mask=mask, other=0.0,
                   eviction_policy=stream if has_residual else keep).astype(jnp.float32)
    if has_residual:
        res = plgpu.load(r_ref.at[offsets], mask=mask, other=0.0, eviction_policy=stream).astype(jnp.float32)
        z = encode(v + res, new_r_ref.dtype)
        plgpu.store(new_r_ref.at[offsets], z, mask=mask, eviction_policy=keep)
        v = z.astype(jnp.float32)
    return v


def load_weight(w_ref, cols, n_cols: int, weight_offset: float) -> jax.Array:
    """Step 5: w = f32(weight), plus the offset when it is non-zero."""
    w = plgpu.load(w_ref.at[cols], mask=cols < n_cols, other=0.0).astype(jnp.float32)
    if weight_offset != 0:
        w = w + jnp.float32(weight_offset)
    return w


def scale_store(ops: ExactOps, v, inv, w, out_ref, offsets, mask, dtype, llama: bool, stream: str | None,
                quant: Quant, inv_scale, scales_ref, rows, row_mask, chunk, n_cols: int, ROWS: int, CHUNK: int) -> None:
    """Step 6: u = rn(v * inv) [rounded to dtype, x's dtype, in llama mode] * w (Q1), then
    out = rnD(u) (quant "none"), or u quantized to FP8 with the static scale or per group."""
    normed = v * inv
    if llama:
        normed = round_to(normed, dtype)
    u = normed * w
    if quant.kind == "static":
        q = quantize_static(ops, u, inv_scale, quant)
    elif quant.kind == "group":
        q = quantize_groups(ops, u, scales_ref, rows, row_mask, chunk, n_cols, ROWS, CHUNK, quant)
    else:
        q = encode(u, dtype)
    plgpu.store(out_ref.at[offsets], q, mask=mask, eviction_policy=stream)


def rms_norm_kernel(
    x_ref, r_ref, w_ref, scale_ref, out_ref, scales_ref, new_r_ref, *,
    n_rows: int, n_cols: int, eps: float, weight_offset: float,
    has_residual: bool, llama: bool, rows_per_program: int, chunk: int, num_chunks: int, split: int,
    interpret: bool, quant: Quant = NO_QUANT,
):
    # quant "none": out in x's dtype. FP8 (out_ref uint8 codes): "static" multiplies by the
    # reciprocal of the float32 scalar in scale_ref; "group" writes one float32 scale per group of
    # columns to scales_ref (row-major, n_cols // group per row). Refs a call does not use are None.
    ops, R = ExactOps(interpret), rows_per_program
    # Rows are contiguous (stride n_cols); offsets are int32, so the wrapper bounds rows * n below 2**31.
    rows = (pl.program_id(0) * R + jnp.arange(R, dtype=jnp.int32))[:, None]
    row_mask = rows < n_rows
    cols = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    # Two passes: what the second reads again is kept in L2 as long as it can be (the rows of the
    # resident programs are about as large as an H100's L2); what neither reads again streams past it.
    keep = "evict_last" if num_chunks > 1 else None
    stream = "evict_first" if num_chunks > 1 else None
    if quant.kind == "static":
        # Q2: rn(1 / scale), once per program.
        inv_scale = ops.div(jnp.full((1, 1), 1.0, jnp.float32), plgpu.load(scale_ref.at[jnp.zeros((1, 1), jnp.int32)]))
    else:
        inv_scale = 1.0
    if num_chunks == 1:
        # The whole row stays in registers: one read of x (and residual), one write per output.
        mask = row_mask & (cols < n_cols)
        offsets = rows * n_cols + cols
        v = load_z(x_ref, r_ref, new_r_ref, offsets, mask, has_residual, keep, stream)
        w = load_weight(w_ref, cols, n_cols, weight_offset)  # issued before the reduction
        s = ops.pairwise_sum(ops.square(v), R, chunk, split)
    else:
        # Long rows: sum aligned chunks (each a subtree of the row's tree), then the chunk sums.
        chunk_ids = jnp.arange(num_chunks, dtype=jnp.int32)[None, :]

        def chunk_sum(c, sums):
            ccols = c * chunk + cols
            mask = row_mask & (ccols < n_cols)
            v = load_z(x_ref, r_ref, new_r_ref, rows * n_cols + ccols, mask, has_residual, keep, stream)
            return jnp.where(chunk_ids == c, ops.pairwise_sum(ops.square(v), R, chunk, split)[:, None], sums)

        sums = lax.fori_loop(0, num_chunks, chunk_sum, jnp.zeros((R, num_chunks), jnp.float32))
        s = ops.pairwise_sum(sums, R, num_chunks, num_chunks)
        # The second pass re-reads the new residual this program's other threads wrote.
        ops.barrier()
    inv = inverse_rms(ops, s, n_cols, eps, R)[:, None]
    if num_chunks == 1:
        scale_store(ops, v, inv, w, out_ref, offsets, mask, x_ref.dtype, llama, stream, quant, inv_scale, scales_ref,
                    rows, row_mask, 0, n_cols, R, chunk)
    else:
        # The second pass reads z again (the new residual, or x), last chunk first: the most
        # recently read chunks are the likeliest still in L2.
        z_ref = new_r_ref if has_residual else x_ref

        def chunk_scale(i, carry):
            ccols = (num_chunks - 1 - i) * chunk + cols
            mask = row_mask & (ccols < n_cols)
            offsets = rows * n_cols + ccols
            v = plgpu.load(z_ref.at[offsets], mask=mask, other=0.0, eviction_policy=stream).astype(jnp.float32)
            w = load_weight(w_ref, ccols, n_cols, weight_offset)
            scale_store(ops, v, inv, w, out_ref, offsets, mask, x_ref.dtype, llama, stream, quant, inv_scale,
                        scales_ref, rows, row_mask, num_chunks - 1 - i, n_cols, R, chunk)
            return carry

        lax.fori_loop(0, num_chunks, chunk_scale, 0)
