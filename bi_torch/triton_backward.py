"""The Triton backward kernels: NUMERICS.md contract v1.1, steps B1-B7.

Mirrors bi_jax/pallas_backward.py line for line, and reuses the forward's helpers (rounding,
the pairwise tree, steps 1-5), so the backward recomputes exactly the forward's v and inv.
Like the forward, this file is loaded twice by bi_torch/launch.py (compiled, and under the
interpreter for CPU tensors), with enable_fp_fusion=False and IEEE division and square root.

grad_weight is the pairwise tree over rows without atomics. A program owns an aligned block of
STEPS * ROWS rows (a power of two, so a subtree of the row tree): each step's ROWS rows are summed
by a tree over the tile's rows, and the steps' sums are combined by a binary counter (push), whose
levels hold the left siblings still waiting for their right half. The blocks' float32 sums go to
a partials buffer and column_tree_kernel combines them in aligned groups: the tree's upper
levels, one launch per level. Nothing depends on the number of programs, SMs or warps.
"""

import sys

import triton
import triton.language as tl

from . import triton_kernel

# The interpreted copy of this file takes the interpreted forward's helpers (bi_torch/launch.py
# registers that copy first), so both run under the interpreter with its bfloat16 rounding.
_forward = (sys.modules.get("bi_torch._triton_kernel_interpreted", triton_kernel)
            if triton.knobs.runtime.interpret else triton_kernel)
encode, inverse_rms, load_weight = _forward.encode, _forward.inverse_rms, _forward.load_weight
pairwise_sum, round_to, widen = _forward.pairwise_sum, _forward.round_to, _forward.widen
INTERPRETED = _forward.INTERPRETED


@triton.jit
def row_tree(p, ROWS: tl.constexpr, WIDTH: tl.constexpr, LOG2_ROWS: tl.constexpr):
    """B7 inside a tile: the pairwise tree over the ROWS rows of a (ROWS, WIDTH) block, per column.

    Each level is a reduction over an axis of 2 (one add, exact in any order), as in pairwise_sum;
    under the interpreter the pairs are split apart and added (its sum turns -0.0 + -0.0 into +0.0).
    """
    for level in tl.static_range(LOG2_ROWS):
        pairs = tl.reshape(p, (ROWS >> (level + 1), 2, WIDTH))
        if INTERPRETED:
            even, odd = tl.split(tl.permute(pairs, (0, 2, 1)))
            p = even + odd
        else:
            p = tl.reduce(pairs, 1, tl.standard._sum_combine)
    return tl.reshape(p, (WIDTH,))


@triton.jit
def push_level(p, left, step, LEVEL: tl.constexpr, TOP: tl.constexpr):
    """One level of the binary counter: the carry reaches LEVEL when step's lower LEVEL bits are all
    ones; then an odd bit means a left sibling is waiting (p = left + p), an even one parks p there.
    The top level's odd arrival is the last step's: its slot takes the root, so no register carries
    a running total through the loop."""
    arrives = (step & ((1 << LEVEL) - 1)) == ((1 << LEVEL) - 1)
    odd = ((step >> LEVEL) & 1) == 1
    merged = tl.where(arrives & odd, left + p, p)
    parked = tl.where(arrives & (~odd), p, left)
    if TOP:
        parked = tl.where(arrives & odd, merged, parked)
    return merged, parked


@triton.jit
def push(p, lefts, step, LEVELS: tl.constexpr):
    """Add the step-th leaf sum p to the counter; after the last step (all bits ones) the top
    level holds the root. With one step (LEVELS 1) level 0 parks the leaf: the root."""
    parked = ()
    for level in tl.static_range(LEVELS):
        p, left = push_level(p, lefts[level], step, level, level == LEVELS - 1)
        parked = parked + (left,)
    return parked


@triton.jit
def load_rows(ptr, stride, rows, cols, mask):
    return widen(tl.load(ptr + rows * stride + cols, mask=mask, other=0.0))


@triton.jit
def row_stats_kernel(
    z_ptr, z_stride, g_ptr, g_stride, w_ptr, stats_ptr, n_rows, n_cols, n_cols_f32, eps, weight_offset,
    HAS_OFFSET: tl.constexpr, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    LOG2_NUM_CHUNKS: tl.constexpr, LOG2_SPLIT: tl.constexpr,
):
    """Long rows: inv (steps 2-4) and c (B4) of one row, from aligned chunks of the row's trees."""
    rows = tl.program_id(0).to(tl.int64) + tl.full((1, 1), 0, tl.int64)
    cols = tl.arange(0, CHUNK)[None, :]
    chunk_ids = tl.arange(0, NUM_CHUNKS)[None, :]
    sums = tl.full((1, NUM_CHUNKS), 0.0, tl.float32)
    for k in tl.range(0, NUM_CHUNKS):
        ccols = k * CHUNK + cols
        v = load_rows(z_ptr, z_stride, rows, ccols, ccols < n_cols)
        sums = tl.where(chunk_ids == k, pairwise_sum(v * v, 1, CHUNK, LOG2_CHUNK, LOG2_SPLIT)[:, None], sums)
    inv = inverse_rms(pairwise_sum(sums, 1, NUM_CHUNKS, LOG2_NUM_CHUNKS, LOG2_NUM_CHUNKS), n_cols_f32, eps, 1)
    sums = tl.full((1, NUM_CHUNKS), 0.0, tl.float32)
    for k in tl.range(0, NUM_CHUNKS):
        ccols = k * CHUNK + cols
        mask = ccols < n_cols
        xhat = load_rows(z_ptr, z_stride, rows, ccols, mask) * inv[:, None]
        a = load_rows(g_ptr, g_stride, rows, ccols, mask) * load_weight(w_ptr, ccols, n_cols, weight_offset,
                                                                         HAS_OFFSET)
        # Masked columns are +0.0 leaves (a = 0 * offset would be -0.0 for a negative offset).
        b = tl.where(mask, a * xhat, 0.0)
        sums = tl.where(chunk_ids == k, pairwise_sum(b, 1, CHUNK, LOG2_CHUNK, LOG2_SPLIT)[:, None], sums)
    t = pairwise_sum(sums, 1, NUM_CHUNKS, LOG2_NUM_CHUNKS, LOG2_NUM_CHUNKS)
    c = tl.div_rn(t, tl.full((1,), n_cols_f32, tl.float32))
    row = tl.reshape(rows, (1,))
    tl.store(stats_ptr + row * 2, inv)
    tl.store(stats_ptr + row * 2 + 1, c)


@triton.jit
def rms_norm_backward_kernel(
    z_ptr, z_stride, g_ptr, g_stride, gr_ptr, gr_stride, w_ptr, dx_ptr, dx_stride, dr_ptr, dr_stride,
    stats_ptr, partial_ptr, dw_ptr, n_rows, n_cols, n_cols_f32, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_GRAD_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, LLAMA: tl.constexpr,
    ROWS: tl.constexpr, LOG2_ROWS: tl.constexpr, STEPS: tl.constexpr, LEVELS: tl.constexpr,
    CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, LOG2_SPLIT: tl.constexpr,
    FINAL: tl.constexpr,
):
    """grad_x (and grad_residual) of a block of STEPS * ROWS rows, and that block's grad_weight sum.

    z is what the forward normalised (x, or the new residual). With NUM_CHUNKS == 1 a tile holds
    whole rows and inv and c are computed here; long rows take them from row_stats_kernel and the
    grid's second axis walks the chunks. FINAL: a single block, whose sum is grad_weight itself.
    """
    block = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)[None, :]
    col_mask = cols < n_cols
    # LEVELS: BackwardConfig.counter_levels.
    lefts = (tl.full((CHUNK,), 0.0, tl.float32),) * LEVELS
    # int64 row offsets: rows * stride can pass 2**31 elements.
    first_rows = block * STEPS * ROWS + tl.arange(0, ROWS)[:, None]
    first_mask = (first_rows < n_rows) & col_mask
    z_next = tl.load(z_ptr + first_rows * z_stride + cols, mask=first_mask, other=0.0)
    g_next = tl.load(g_ptr + first_rows * g_stride + cols, mask=first_mask, other=0.0)
    if HAS_GRAD_RESIDUAL:
        gr_next = tl.load(gr_ptr + first_rows * gr_stride + cols, mask=first_mask, other=0.0)
    for step in tl.range(0, STEPS):
        rows = (block * STEPS + step) * ROWS + tl.arange(0, ROWS)[:, None]
        mask = (rows < n_rows) & col_mask
        v, g = widen(z_next), widen(g_next)
        if HAS_GRAD_RESIDUAL:
            g_r = widen(gr_next)
        # The next tile's loads are issued before this tile's trees, so that memory stays busy while
        # they run; the last step loads nothing (the next block is another program's).
        next_rows = rows + ROWS
        next_mask = (next_rows < n_rows) & col_mask & (step + 1 < STEPS)
        z_next = tl.load(z_ptr + next_rows * z_stride + cols, mask=next_mask, other=0.0)
        g_next = tl.load(g_ptr + next_rows * g_stride + cols, mask=next_mask, other=0.0)
        if HAS_GRAD_RESIDUAL:
            gr_next = tl.load(gr_ptr + next_rows * gr_stride + cols, mask=next_mask, other=0.0)
        if NUM_CHUNKS == 1:
            inv = inverse_rms(pairwise_sum(v * v, ROWS, CHUNK, LOG2_CHUNK, LOG2_SPLIT), n_cols_f32, eps, ROWS)[:, None]
        else:
            inv = tl.load(stats_ptr + rows * 2, mask=rows < n_rows, other=1.0)
        # B1-B3, and B7 first: g and h are then dead before the row's second tree.
        xhat = v * inv
        h = round_to(xhat, dx_ptr.dtype.element_ty) if LLAMA else xhat
        # The weight again each step, where it is used (an L1 hit), for registers: at 1 x 8192 on 16
        # warps 12 bytes spill so, 48 loaded with the prefetch, 96 held (scripts/kernel_resources.py).
        a = g * load_weight(w_ptr, cols, n_cols, weight_offset, HAS_OFFSET)
        # B7: rows past the end are the tree's +0.0 padding.
        lefts = push(row_tree(tl.where(mask, g * h, 0.0), ROWS, CHUNK, LOG2_ROWS), lefts, step, LEVELS)
        # B4: c from the row's tree over b (masked columns are +0.0 leaves, whatever the offset).
        if NUM_CHUNKS == 1:
            t = pairwise_sum(tl.where(mask, a * xhat, 0.0), ROWS, CHUNK, LOG2_CHUNK, LOG2_SPLIT)
            c = tl.div_rn(t, tl.full((ROWS,), n_cols_f32, tl.float32))[:, None]
        else:
            c = tl.load(stats_ptr + rows * 2 + 1, mask=rows < n_rows, other=0.0)
        # B5, B6.
        dv = inv * (a - xhat * c)
        if HAS_RESIDUAL:
            # An absent grad of the new residual is +0.0, and the add is kept: -0.0 becomes +0.0.
            dz = dv + (g_r if HAS_GRAD_RESIDUAL else 0.0)
            tl.store(dr_ptr + rows * dr_stride + cols, encode(dz, dr_ptr.dtype.element_ty), mask=mask)
        else:
            dz = dv
        tl.store(dx_ptr + rows * dx_stride + cols, encode(dz, dx_ptr.dtype.element_ty), mask=mask)
    total = lefts[LEVELS - 1]
    wcols = tl.reshape(cols, (CHUNK,))
    if FINAL:
        tl.store(dw_ptr + wcols, encode(total, dw_ptr.dtype.element_ty), mask=wcols < n_cols)
    else:
        tl.store(partial_ptr + block * n_cols + wcols, total, mask=wcols < n_cols)


@triton.jit
def column_tree_kernel(src_ptr, dst_ptr, n_src, n_cols, GROUP: tl.constexpr, LOG2_GROUP: tl.constexpr,
                       WIDTH: tl.constexpr, FINAL: tl.constexpr):
    """One of B7's upper levels: the tree over an aligned group of GROUP rows of float32 sums
    (+0.0 past the last) for WIDTH columns; the last level rounds to D, into grad_weight."""
    group = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * WIDTH + tl.arange(0, WIDTH)[None, :]
    rows = group * GROUP + tl.arange(0, GROUP)[:, None]
    p = tl.load(src_ptr + rows * n_cols + cols, mask=(rows < n_src) & (cols < n_cols), other=0.0)
    total = row_tree(p, GROUP, WIDTH, LOG2_GROUP)
    wcols = tl.reshape(cols, (WIDTH,))
    if FINAL:
        tl.store(dst_ptr + wcols, encode(total, dst_ptr.dtype.element_ty), mask=wcols < n_cols)
    else:
        tl.store(dst_ptr + group * n_cols + wcols, total, mask=wcols < n_cols)
