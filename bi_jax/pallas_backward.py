"""The Pallas backward kernels: NUMERICS.md contract v1.1, steps B1-B7.

Mirrors bi_torch/triton_backward.py line for line, and reuses the forward's helpers (rounding,
ExactOps with the pairwise trees, steps 1-5), so the backward recomputes exactly the forward's v
and inv. Every product that feeds an add or a subtraction is ExactOps.mul (ptxas would fuse a
plain one into an FMA, and so would LLVM in interpret mode); the row tree is ExactOps.row_tree.

grad_weight is the pairwise tree over rows without atomics. A program owns an aligned block of
steps * rows rows (a power of two, so a subtree of the row tree): each step's rows are summed
by a tree over the tile's rows, and the steps' sums are combined by a binary counter (push), whose
levels hold the left siblings still waiting for their right half. The blocks' float32 sums go to
a partials buffer and column_tree_kernel combines them in aligned groups: the tree's upper
levels, one launch per level. Nothing depends on the number of programs, SMs or warps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .pallas_kernel import ExactOps, encode, inverse_rms, load_weight, round_to


def push_level(p, left, step, level: int, top: bool):
    """One level of the binary counter: the carry reaches level when step's lower level bits are all
    ones; then an odd bit means a left sibling is waiting (p = left + p), an even one parks p there.
    The top level's odd arrival is the last step's: its slot takes the root, so no register carries
    a running total through the loop."""
    arrives = (step & ((1 << level) - 1)) == ((1 << level) - 1)
    odd = ((step >> level) & 1) == 1
    merged = jnp.where(arrives & odd, left + p, p)
    parked = jnp.where(arrives & ~odd, p, left)
    if top:
        parked = jnp.where(arrives & odd, merged, parked)
    return merged, parked


def push(p, lefts, step, levels: int):
    """Add the step-th leaf sum p to the counter; after the last step (all bits ones) the top
    level holds the root. With one step (levels 1) level 0 parks the leaf: the root."""
    parked = ()
    for level in range(levels):
        p, left = push_level(p, lefts[level], step, level, level == levels - 1)
        parked = parked + (left,)
    return parked


def load_rows(ref, offsets, mask) -> jax.Array:
    return plgpu.load(ref.at[offsets], mask=mask, other=0.0).astype(jnp.float32)


def row_stats_kernel(
    z_ref, g_ref, w_ref, stats_ref, *, n_cols: int, eps: float, weight_offset: float, chunk: int, num_chunks: int,
    split: int, interpret: bool,
):
    """Long rows: inv (steps 2-4) and c (B4) of one row, from aligned chunks of the row's trees."""
    ops = ExactOps(interpret)
    rows = pl.program_id(0) + jnp.zeros((1, 1), jnp.int32)
    cols = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    chunk_ids = jnp.arange(num_chunks, dtype=jnp.int32)[None, :]

    def square_sum(k, sums):
        ccols = k * chunk + cols
        v = load_rows(z_ref, rows * n_cols + ccols, ccols < n_cols)
        return jnp.where(chunk_ids == k, ops.pairwise_sum(ops.square(v), 1, chunk, split)[:, None], sums)

    sums = lax.fori_loop(0, num_chunks, square_sum, jnp.zeros((1, num_chunks), jnp.float32))
    inv = inverse_rms(ops, ops.pairwise_sum(sums, 1, num_chunks, num_chunks), n_cols, eps, 1)

    def grad_sum(k, sums):
        ccols = k * chunk + cols
        mask = ccols < n_cols
        xhat = load_rows(z_ref, rows * n_cols + ccols, mask) * inv[:, None]
        a = ops.mul(load_rows(g_ref, rows * n_cols + ccols, mask), load_weight(w_ref, ccols, n_cols, weight_offset))
        # Masked columns are +0.0 leaves (a = 0 * offset would be -0.0 for a negative offset).
        b = jnp.where(mask, ops.mul(a, xhat), 0.0)
        return jnp.where(chunk_ids == k, ops.pairwise_sum(b, 1, chunk, split)[:, None], sums)

    sums = lax.fori_loop(0, num_chunks, grad_sum, jnp.zeros((1, num_chunks), jnp.float32))
    t = ops.pairwise_sum(sums, 1, num_chunks, num_chunks)
    c = ops.div(t, jnp.full((1,), float(n_cols), jnp.float32))
    row = rows.reshape(1)
    plgpu.store(stats_ref.at[row * 2], inv)
    plgpu.store(stats_ref.at[row * 2 + 1], c)


def rms_norm_backward_kernel(
    z_ref, g_ref, gr_ref, w_ref, dx_ref, dr_ref, stats_ref, partial_ref, dw_ref, *,
    n_rows: int, n_cols: int, eps: float, weight_offset: float, has_residual: bool, has_grad_residual: bool,
    llama: bool, rows_per_tile: int, steps: int, levels: int, chunk: int, num_chunks: int, split: int, final: bool,
    interpret: bool,
):
    """grad_x (and grad_residual) of a block of steps * rows rows, and that block's grad_weight sum.

    z is what the forward normalised (x, or the new residual). With num_chunks == 1 a tile holds
    whole rows and inv and c are computed here; long rows take them from row_stats_kernel and the
    grid's second axis walks the chunks. final: a single block, whose sum is grad_weight itself.
    """
    ops, R = ExactOps(interpret), rows_per_tile
    block = pl.program_id(0)
    cols = pl.program_id(1) * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    col_mask = cols < n_cols
    # levels: BackwardConfig.counter_levels.
    lefts = (jnp.zeros((chunk,), jnp.float32),) * levels

    def load_tile(rows, mask):
        offsets = rows * n_cols + cols
        refs = (z_ref, g_ref, gr_ref) if has_grad_residual else (z_ref, g_ref)
        return tuple(plgpu.load(ref.at[offsets], mask=mask, other=0.0) for ref in refs)

    # Offsets are int32 (Pallas-Triton indexes with int32): the wrapper bounds rows * n below 2**31.
    first_rows = block * steps * R + jnp.arange(R, dtype=jnp.int32)[:, None]

    def tile(step, carry):
        rows = (block * steps + step) * R + jnp.arange(R, dtype=jnp.int32)[:, None]
        mask = (rows < n_rows) & col_mask
        offsets = rows * n_cols + cols
        v, g, *g_r = (x.astype(jnp.float32) for x in carry[1])
        # The next tile's loads are issued before this tile's trees, so that memory stays busy while
        # they run; the last step loads nothing (the next block is another program's).
        next_rows = rows + R
        next_tile = load_tile(next_rows, (next_rows < n_rows) & col_mask & (step + 1 < steps))
        if num_chunks == 1:
            inv = inverse_rms(ops, ops.pairwise_sum(ops.square(v), R, chunk, split), n_cols, eps, R)[:, None]
        else:
            inv = plgpu.load(stats_ref.at[rows * 2], mask=rows < n_rows, other=1.0)
        # B1-B3, and B7 first: g and h are then dead before the row's second tree.
        xhat = v * inv
        h = round_to(xhat, dx_ref.dtype) if llama else xhat
        # The weight again each step, where it is used (an L1 hit), for registers: at 1 x 8192 on 16
        # warps 12 bytes spill so, 48 loaded with the prefetch, 96 held (scripts/kernel_resources.py).
        a = ops.mul(g, load_weight(w_ref, cols, n_cols, weight_offset))
        # B7: rows past the end are the tree's +0.0 padding.
        lefts = push(ops.row_tree(jnp.where(mask, ops.mul(g, h), 0.0), R, chunk), carry[0], step, levels)
        # B4: c from the row's tree over b (masked columns are +0.0 leaves, whatever the offset).
        if num_chunks == 1:
            t = ops.pairwise_sum(jnp.where(mask, ops.mul(a, xhat), 0.0), R, chunk, split)
            c = ops.div(t, jnp.full((R,), float(n_cols), jnp.float32))[:, None]
        else:
            c = plgpu.load(stats_ref.at[rows * 2 + 1], mask=rows < n_rows, other=0.0)
        # B5, B6.
        dv = ops.mul(inv, a - ops.mul(xhat, c))
        if has_residual:
            # An absent grad of the new residual is +0.0, and the add is kept: -0.0 becomes +0.0.
            dz = dv + (g_r[0] if has_grad_residual else ops.positive_zero(dv.shape))
            plgpu.store(dr_ref.at[offsets], encode(dz, dr_ref.dtype), mask=mask)
        else:
            dz = dv
        plgpu.store(dx_ref.at[offsets], encode(dz, dx_ref.dtype), mask=mask)
        return lefts, next_tile

    first_tile = load_tile(first_rows, (first_rows < n_rows) & col_mask)
    total = lax.fori_loop(0, steps, tile, (lefts, first_tile))[0][levels - 1]
    wcols = cols.reshape(chunk)
    if final:
        plgpu.store(dw_ref.at[wcols], encode(total, dw_ref.dtype), mask=wcols < n_cols)
    else:
        plgpu.store(partial_ref.at[block * n_cols + wcols], total, mask=wcols < n_cols)


def column_tree_kernel(src_ref, dst_ref, *, n_src: int, n_cols: int, group: int, width: int, final: bool,
                       interpret: bool):
    """One of B7's upper levels: the tree over an aligned group of `group` rows of float32 sums
    (+0.0 past the last) for `width` columns; the last level rounds to D, into grad_weight."""
    ops, block = ExactOps(interpret), pl.program_id(1)
    cols = pl.program_id(0) * width + jnp.arange(width, dtype=jnp.int32)[None, :]
    rows = block * group + jnp.arange(group, dtype=jnp.int32)[:, None]
    p = plgpu.load(src_ref.at[rows * n_cols + cols], mask=(rows < n_src) & (cols < n_cols), other=0.0)
    total = ops.row_tree(p, group, width)
    wcols = cols.reshape(width)
    if final:
        plgpu.store(dst_ref.at[wcols], encode(total, dst_ref.dtype), mask=wcols < n_cols)
    else:
        plgpu.store(dst_ref.at[block * n_cols + wcols], total, mask=wcols < n_cols)
