"""The Triton kernel: NUMERICS.md contract v1 (and v1.2's FP8 output), one program per block of ROWS rows.

Mirrors bi_jax/pallas_kernel.py line for line. Every rounding step of the contract is one
float32 operation here: IEEE division and square root (div_rn, sqrt_rn), and the launcher
disables FMA contraction (enable_fp_fusion=False), so v*v + ... never fuses.

This file is loaded twice by bi_torch/launch.py: once compiled for CUDA tensors and once
under the Triton interpreter for CPU tensors. So it calls only Triton builtins and its own
jit functions (tl.sum and friends are jit functions of the compiled library and cannot run
inside an interpreted kernel; tl.reduce is a builtin), and under the interpreter, whose float32 ->
bfloat16 conversion truncates, it rounds to bfloat16 on the bit pattern instead.

FP8 output (QUANT "static" or "group", steps Q1-Q4) is triton_fp8.py's, called from step 6.
"""

import sys

import triton
import triton.language as tl

from bridge.numerics.contract import CANONICAL_NAN_BITS

from . import triton_fp8

# Whether this copy of the module was loaded under the interpreter (bi_torch/launch.py).
INTERPRETED: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))
# The interpreted copy of this file takes the interpreted FP8 helpers (bi_torch/launch.py loads them first).
_fp8 = sys.modules.get("bi_torch._triton_fp8_interpreted", triton_fp8) if INTERPRETED else triton_fp8
quantize_groups, quantize_static = _fp8.quantize_groups, _fp8.quantize_static

NAN_F32: tl.constexpr = tl.constexpr(CANONICAL_NAN_BITS["float32"])
NAN_BF16: tl.constexpr = tl.constexpr(CANONICAL_NAN_BITS["bfloat16"])
NAN_F16: tl.constexpr = tl.constexpr(CANONICAL_NAN_BITS["float16"])


@triton.jit
def encode(y, DTYPE: tl.constexpr):
    """Step 6, rnD: round float32 to DTYPE to nearest even, every NaN as DTYPE's canonical NaN."""
    is_nan = y != y
    if DTYPE == tl.bfloat16:
        if INTERPRETED:
            b = y.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        else:
            b = y.to(tl.bfloat16).to(tl.uint16, bitcast=True)  # cvt.rn: one instruction per pair
        out = tl.where(is_nan, NAN_BF16, b).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        b = y.to(tl.float16).to(tl.uint16, bitcast=True)
        out = tl.where(is_nan, NAN_F16, b).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        b = y.to(tl.uint32, bitcast=True)
        out = tl.where(is_nan, NAN_F32, b).to(tl.float32, bitcast=True)
    return out


@triton.jit
def widen(x):
    """f32(x), exact. The interpreter's bfloat16 -> float32 conversion flushes or garbles subnormals
    (Triton 3.9: 0x0004 -> 0): there the 16 bits are shifted into a float32 pattern instead."""
    if INTERPRETED and x.dtype == tl.bfloat16:
        out = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def round_to(y, DTYPE: tl.constexpr):
    """rn(y) to DTYPE, back in float32, NaN bits unspecified: for a value only a later encode stores."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        out = widen(encode(y, DTYPE))  # the bit-pattern rounding needs NaNs set apart
    else:
        out = y.to(DTYPE).to(tl.float32)
    return out


@triton.jit
def pairwise_sum(q, ROWS: tl.constexpr, WIDTH: tl.constexpr, LOG2_WIDTH: tl.constexpr, LOG2_SPLIT: tl.constexpr):
    """Step 3 on a (ROWS, WIDTH) block, WIDTH a power of two: q = q[0::2] + q[1::2] to one column.

    Down to 2**LOG2_SPLIT sums per row, each level is a reduction over an axis of 2, i.e. one add:
    exact whatever the reduction order. A reduction anchors the layout, so Triton 3.6 keeps the
    row spread over the threads (a tl.split of the whole row would replicate it in every thread).
    The last levels split pairs apart and add them: one shared-memory exchange for all of them
    instead of two barriers per level (bridge/numerics/tiling.py). The interpreter splits every level: it
    runs a _sum_combine reduction as numpy's sum, which starts from +0.0 (-0.0 + -0.0 gives +0.0).
    """
    SPLIT_LEVELS: tl.constexpr = LOG2_WIDTH if INTERPRETED or LOG2_WIDTH <= LOG2_SPLIT else LOG2_SPLIT
    for level in tl.static_range(LOG2_WIDTH - SPLIT_LEVELS):
        q = tl.reduce(tl.reshape(q, (ROWS, WIDTH >> (level + 1), 2)), 2, tl.standard._sum_combine)
    for level in tl.static_range(LOG2_WIDTH - SPLIT_LEVELS, LOG2_WIDTH):
        even, odd = tl.split(tl.reshape(q, (ROWS, WIDTH >> (level + 1), 2)))
        q = even + odd
    return tl.reshape(q, (ROWS,))


@triton.jit
def inverse_rms(s, n_cols_f32, eps, ROWS: tl.constexpr):
    """Step 4: mean = s / n, r = sqrt(mean + eps), inv = 1 / r, each an IEEE float32 operation."""
    mean = tl.div_rn(s, tl.full((ROWS,), n_cols_f32, tl.float32))
    r = tl.sqrt_rn(mean + eps)
    return tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), r)


@triton.jit
def load_z(x_ptr, x_stride, r_ptr, r_stride, new_r_ptr, new_r_stride, rows, cols, mask,
           HAS_RESIDUAL: tl.constexpr, KEEP: tl.constexpr, STREAM: tl.constexpr):
    """Step 1: v = f32(z), z = rnR(x + residual) stored as the new residual (or z = x).

    KEEP and STREAM are the eviction policies for z, which a second pass reads again, and for the rest.
    """
    v = widen(tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0,
                      eviction_policy=STREAM if HAS_RESIDUAL else KEEP))
    if HAS_RESIDUAL:
        res = widen(tl.load(r_ptr + rows * r_stride + cols, mask=mask, other=0.0, eviction_policy=STREAM))
        z = encode(v + res, new_r_ptr.dtype.element_ty)
        tl.store(new_r_ptr + rows * new_r_stride + cols, z, mask=mask, eviction_policy=KEEP)
        v = widen(z)
    return v


@triton.jit
def load_weight(w_ptr, cols, n_cols, weight_offset, HAS_OFFSET: tl.constexpr):
    """Step 5: w = f32(weight), plus the offset when it is non-zero."""
    w = widen(tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0))
    if HAS_OFFSET:
        w = w + weight_offset
    return w


@triton.jit
def scale_store(v, inv, w, out_ptr, out_stride, rows, cols, mask, DTYPE: tl.constexpr, LLAMA: tl.constexpr,
                STREAM: tl.constexpr, QUANT: tl.constexpr, inv_scale, scales_ptr, scales_stride, row_mask, chunk,
                n_cols, ROWS: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr,
                MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    """Step 6: u = rn(v * inv) [rounded to DTYPE, x's dtype, in llama mode] * w (Q1), then
    out = rnD(u) (QUANT "none"), or u quantized to FP8 with the static scale or per group."""
    normed = v * inv
    if LLAMA:
        normed = round_to(normed, DTYPE)
    u = normed * w
    if QUANT == "static":
        q = quantize_static(u, inv_scale, FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    elif QUANT == "group":
        q = quantize_groups(u, scales_ptr, scales_stride, rows, row_mask, chunk, n_cols, ROWS, CHUNK, GROUP,
                            FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    else:
        q = encode(u, DTYPE)
    tl.store(out_ptr + rows * out_stride + cols, q, mask=mask, eviction_policy=STREAM)


@triton.jit
def rms_norm_kernel(
    x_ptr, x_stride, r_ptr, r_stride, w_ptr, out_ptr, out_stride, new_r_ptr, new_r_stride,
    scale_ptr, scales_ptr, scales_stride, n_rows, n_cols, n_cols_f32, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, LLAMA: tl.constexpr,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, LOG2_NUM_CHUNKS: tl.constexpr, LOG2_SPLIT: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
    EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr,
):
    # QUANT "none": out in x's dtype. FP8 (out_ptr a uint8 view): "static" multiplies by the
    # reciprocal of the float32 scalar at scale_ptr; "group" writes one float32 scale per GROUP
    # columns to scales_ptr (row-major, scales_stride per row).
    # int64 row offsets: rows * stride can pass 2**31 elements.
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    row_mask = rows < n_rows
    cols = tl.arange(0, CHUNK)[None, :]
    # Two passes: what the second reads again is kept in L2 as long as it can be (the rows of the
    # resident programs are about as large as an H100's L2); what neither reads again streams past it.
    KEEP: tl.constexpr = "evict_last" if NUM_CHUNKS > 1 else ""
    STREAM: tl.constexpr = "evict_first" if NUM_CHUNKS > 1 else ""
    if QUANT == "static":
        # Q2: rn(1 / scale), once per program.
        inv_scale = tl.div_rn(tl.full((1, 1), 1.0, tl.float32), tl.load(scale_ptr + tl.full((1, 1), 0, tl.int32)))
    else:
        inv_scale = 1.0
    if NUM_CHUNKS == 1:
        # The whole row stays in registers: one read of x (and residual), one write per output.
        mask = row_mask & (cols < n_cols)
        v = load_z(x_ptr, x_stride, r_ptr, r_stride, new_r_ptr, new_r_stride, rows, cols, mask, HAS_RESIDUAL,
                   KEEP, STREAM)
        w = load_weight(w_ptr, cols, n_cols, weight_offset, HAS_OFFSET)  # issued before the reduction
        s = pairwise_sum(v * v, ROWS, CHUNK, LOG2_CHUNK, LOG2_SPLIT)
    else:
        # Long rows: sum aligned chunks (each a subtree of the row's tree), then the chunk sums.
        chunk_ids = tl.arange(0, NUM_CHUNKS)[None, :]
        sums = tl.full((ROWS, NUM_CHUNKS), 0.0, tl.float32)
        for c in tl.range(0, NUM_CHUNKS):
            ccols = c * CHUNK + cols
            mask = row_mask & (ccols < n_cols)
            v = load_z(x_ptr, x_stride, r_ptr, r_stride, new_r_ptr, new_r_stride, rows, ccols, mask, HAS_RESIDUAL,
                       KEEP, STREAM)
            sums = tl.where(chunk_ids == c, pairwise_sum(v * v, ROWS, CHUNK, LOG2_CHUNK, LOG2_SPLIT)[:, None], sums)
        s = pairwise_sum(sums, ROWS, NUM_CHUNKS, LOG2_NUM_CHUNKS, LOG2_NUM_CHUNKS)
        # The second pass re-reads the new residual this program's other threads wrote.
        tl.debug_barrier()
    inv = inverse_rms(s, n_cols_f32, eps, ROWS)[:, None]
    if NUM_CHUNKS == 1:
        scale_store(v, inv, w, out_ptr, out_stride, rows, cols, mask, x_ptr.dtype.element_ty, LLAMA, STREAM, QUANT,
                    inv_scale, scales_ptr, scales_stride, row_mask, 0, n_cols, ROWS, CHUNK, GROUP, FP8_MAX,
                    MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    else:
        # The second pass reads z again (the new residual, or x), last chunk first: the most
        # recently read chunks are the likeliest still in L2.
        z_ptr = new_r_ptr if HAS_RESIDUAL else x_ptr
        z_stride = new_r_stride if HAS_RESIDUAL else x_stride
        for i in tl.range(0, NUM_CHUNKS):
            ccols = (NUM_CHUNKS - 1 - i) * CHUNK + cols
            mask = row_mask & (ccols < n_cols)
            v = widen(tl.load(z_ptr + rows * z_stride + ccols, mask=mask, other=0.0, eviction_policy=STREAM))
            w = load_weight(w_ptr, ccols, n_cols, weight_offset, HAS_OFFSET)
            scale_store(v, inv, w, out_ptr, out_stride, rows, ccols, mask, x_ptr.dtype.element_ty, LLAMA, STREAM,
                        QUANT, inv_scale, scales_ptr, scales_stride, row_mask, NUM_CHUNKS - 1 - i, n_cols, ROWS,
                        CHUNK, GROUP, FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
