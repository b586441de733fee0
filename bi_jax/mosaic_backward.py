"""A Pallas Mosaic GPU backward for NUMERICS.md's contract v1.1 (B1-B7; stage 2 of issue 26).

A program (one warpgroup) owns an aligned block of `steps` rows (a power of two, never more than
the row count's power of two: bridge.numerics.tiling.mosaic_backward_steps) and walks it one row
at a time, the row held in registers in mosaic_kernel's layout. The next row's loads are issued
before the current row's trees (the loop carries them), so memory stays busy. Per row: the
forward's v and inv (mosaic_kernel.inverse_rms, the same code, so the same bits), B1-B6, and the
row's B7 leaves p = g * h, pushed into a binary counter whose level k (in shared memory) holds a
left sibling until its right half arrives; the last row is peeled off the loop and takes every
level, giving the block's float32 sum: a node of B7's tree. The blocks' sums go to a (blocks, n)
partials output and `block_tree` adds them pairwise outside the kernel (plain XLA adds, no
products), padded with +0.0 blocks up to the row count's power of two only.

Variants, the same bits (tiling.mosaic_backward_variant picks; the probe's --sweep times them):
`reload` has B5 load z, g and w again after B4's tree instead of holding xhat and a across it
(fewer registers); two warpgroups per program (mosaic_backward_pairs) walk two rows per step.

Every float operation is inline PTX (mosaic_ops.MosaicOps); B4's tree is exact_row_tree, which
stops at P. `backward_block` is the body, written once: `rms_norm_backward` lowers it for the GPU,
`rms_norm_backward_emulated` runs it on numpy (mosaic_backward_ops.NumpyBackwardOps).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bridge.numerics.contract import as_float32, next_power_of_two
from bridge.numerics.reference import encode as encode_np
from bridge.numerics.tiling import mosaic_backward_steps, mosaic_backward_variant

from . import mosaic_call
from .mosaic_backward_ops import MosaicBackwardOps, NumpyBackwardOps, exact_row_tree
from .mosaic_backward_pairs import MosaicPairOps, NumpyPairOps, level_floats
from .mosaic_kernel import MAX_N, SEMANTICS, effective_weight, inverse_rms
from .mosaic_ops import NUMPY_DTYPES, WARPS, RowLayout, row_layout
from .pallas_kernel import encode


def _backward_row(ops, lay: RowLayout, raw, step, refs, sink, *, dtype: str, z_dtype: str, has_residual: bool,
                  has_gr: bool, eps: float, weight_offset: float, llama: bool, width: int, reload: bool) -> None:
    """B1-B6 of one row from its loaded vectors (z, g[, g_r] per register); stores grad_x (and
    grad_residual) and hands the row's B7 leaves p[reg][j] (+0.0 for a row past the batch) to
    sink before B4's tree, so that they are dead (in the counter) while the tree runs. reload: B5
    loads z, g and w again instead of holding xhat and a across the tree (fewer registers; a
    recomputation from the same registers would be merged back by LLVM's CSE)."""
    z_ref, g_ref, w_ref, dx_ref, dr_ref = refs
    regs = lay.regs
    # The forward's step 1 (z is the new residual, or x) and steps 2-4.
    v = [[ops.widen(e, z_dtype) for e in ops.unpack(raw[reg])] for reg in range(regs)]
    inv = inverse_rms(ops.exchange(0), lay, v, eps)
    valid = ops.row_valid(step)

    def xhat_a(reg, vz, g_raw):
        # B1: xhat in float32; B3: a = g * w.
        xh = [ops.mul(e, inv) for e in vz]
        g = [ops.widen(e, dtype) for e in ops.unpack(g_raw)]
        ws = ops.load(w_ref, reg)
        return xh, g, [ops.mul(ge, effective_weight(ops, e, dtype, weight_offset)) for ge, e in zip(g, ws)]

    p, held, b = [], [], []
    for reg in range(regs):
        xh, g, ar = xhat_a(reg, v[reg], raw[regs + reg])
        # B2: h the factor the forward multiplied w by; B7's leaf.
        h = [ops.round_to(e, dtype) for e in xh] if llama and dtype != "float32" else xh
        p.append(ops.keep(valid, [ops.mul(ge, he) for ge, he in zip(g, h)]))
        # B4's leaves; columns past n are +0.0 (a = 0 * offset is -0.0 for a negative offset).
        b.append(ops.mask_cols(reg, [ops.mul(ae, xe) for ae, xe in zip(ar, xh)]))
        held.append(None if reload else (xh, ar))
    sink(p)
    c = ops.div(exact_row_tree(ops.exchange(1), lay, b, width), ops.f32(float(lay.n)))
    for reg in range(regs):
        if reload:
            vz = [ops.widen(e, z_dtype) for e in ops.unpack(ops.load_row(z_ref, step, reg))]
            xh, _, ar = xhat_a(reg, vz, ops.load_row(g_ref, step, reg))
        else:
            xh, ar = held[reg]
        # B5: dv = inv * (a - xhat * c). B6: an absent g_r is +0.0 and the add is kept.
        dz = [ops.mul(inv, ops.sub(ae, ops.mul(xe, c))) for ae, xe in zip(ar, xh)]
        if has_residual:
            grs = [ops.widen(e, z_dtype) for e in ops.unpack(raw[2 * regs + reg])] if has_gr else None
            dz = [ops.add(d, grs[j] if has_gr else ops.f32(0.0)) for j, d in enumerate(dz)]
            ops.store_row(dr_ref, step, reg, [ops.encode(d, z_dtype) for d in dz], valid)
        ops.store_row(dx_ref, step, reg, [ops.encode(d, dtype) for d in dz], valid)


def backward_block(ops, lay: RowLayout, z, g, gr, w, dx, dr, partial, *, steps: int, **row_args) -> None:
    """One program: the block's rows' gradients and its B7 sum into partial's row `block`.

    ops: MosaicBackwardOps or NumpyBackwardOps (or their pair forms, two rows a step); z, g, gr,
    dx, dr: the row refs (gr, dr None when absent); w: the weight; row_args: _backward_row's keywords.
    """
    levels = (steps // ops.rows_per_step).bit_length() - 1
    inputs = [r for r in (z, g, gr) if r is not None]

    def loads(step):
        return [ops.load_row(ref, step, reg) for ref in inputs for reg in range(lay.regs)]

    def row(step, raw, sink):
        _backward_row(ops, lay, raw, step, (z, g, w, dx, dr), sink, **row_args)

    def flat(p):
        return [e for vals in p for e in vals]

    def nested(values):
        return [values[s * lay.vec:(s + 1) * lay.vec] for s in range(ops.slots)]

    def merge(k):
        # Level k's left sibling + the right subtree just completed, column by column.
        return lambda values: flat([[ops.add(lf, e) for lf, e in zip(ops.level_load(k, reg), vals)]
                                    for reg, vals in enumerate(nested(values))])

    def push(step):
        def sink(p):
            p = flat(ops.leaves(p, step))
            # The carry climbs while the step's low bits are ones, then parks at the first zero bit.
            for k in range(levels):
                p = ops.cond(ops.low_bits_ones(step, k + 1), merge(k), p)
            for k in range(levels):
                ops.when(ops.parks_at(step, k), lambda k=k, p=p: [ops.level_store(k, reg, vals)
                                                                   for reg, vals in enumerate(nested(p))])
        return sink

    def step_body(step, raw):
        following = loads(ops.add_step(step, 1))  # the next row's loads, before this row's trees
        row(step, raw, push(step))
        return following

    def root(step):
        # The last step: every low bit is one, so the carry climbs through every level: the root.
        return lambda p: finish(flat(ops.leaves(p, step)))

    def finish(p):
        for k in range(levels):
            p = merge(k)(p)
        for reg, vals in enumerate(nested(p)):
            ops.store_block(partial, reg, vals)

    raw = ops.loop(steps // ops.rows_per_step - 1, loads(ops.step_at(0)), step_body)
    last = ops.last_step()
    row(last, raw, root(last))


def block_tree(partials, xp=jnp):
    """The pairwise tree over the rows of (blocks, n) float32 block sums, padded with +0.0 rows to
    the blocks' power of two: B7's upper levels (aligned blocks are subtrees). xp: jnp (XLA adds
    of slices outside any kernel: no product to fuse, no reordering) or numpy (the emulation)."""
    blocks, n = partials.shape
    tree = xp.concatenate([partials, xp.zeros((next_power_of_two(blocks) - blocks, n), xp.float32)])
    while tree.shape[0] > 1:
        tree = tree[0::2] + tree[1::2]
    return tree[0]


def _plan(n_rows: int, n: int, z_itemsize: int, steps: Optional[int], reload: Optional[bool] = None,
          warpgroups: Optional[int] = None) -> Tuple[RowLayout, int, int, bool, int]:
    """(layout, steps, blocks, reload, warpgroups); None: tiling's rule. The layout follows z's
    dtype (x's, or the residual's), the widest loads."""
    lay = row_layout(n, z_itemsize)
    rule_reload, rule_wgs = mosaic_backward_variant(n_rows, lay.regs * lay.vec, level_floats(lay, 2))
    reload = rule_reload if reload is None else reload
    warpgroups = warpgroups or rule_wgs
    if warpgroups not in (1, 2):
        raise ValueError(f"warpgroups: 1 or 2; got {warpgroups}")
    steps = steps or mosaic_backward_steps(n_rows, level_floats(lay, warpgroups), warpgroups)
    if steps < warpgroups:
        raise ValueError(f"warpgroups: 2 need a pair of rows and room for them; got steps {steps}")
    if steps & (steps - 1) or steps > next_power_of_two(n_rows):
        raise ValueError(f"steps: a power of two up to the row count's ({next_power_of_two(n_rows)}); got {steps}")
    return lay, steps, -(-n_rows // steps), reload, warpgroups


def _check(z, weight, g, gr, has_residual: bool) -> None:
    if z.ndim != 2 or g.shape != z.shape or weight.shape != z.shape[1:]:
        raise ValueError(f"the Mosaic backward takes (rows, n) arrays and an (n,) weight; got z {z.shape}, "
                         f"g {g.shape}, weight {weight.shape}")
    if z.shape[1] > MAX_N:
        raise NotImplementedError(f"rows of at most {MAX_N} columns in this stage; got {z.shape[1]}")
    if gr is not None and (not has_residual or gr.shape != z.shape or gr.dtype != z.dtype):
        raise ValueError("grad of the new residual: only with a residual, of its shape and dtype")


@functools.lru_cache(maxsize=None)
def _kernel(n_rows: int, n: int, dtype: str, z_dtype: str, has_residual: bool, has_gr: bool, eps: float,
            weight_offset: float, llama: bool, steps: int, reload: bool, warpgroups: int, semantics: str = SEMANTICS):
    """The kernel for one shape: (z, g[, gr], w) -> [dx, [dr,] partials (blocks, n) float32]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lay, steps, blocks, _, _ = _plan(n_rows, n, NUMPY_DTYPES[z_dtype].itemsize, steps, reload, warpgroups)
    levels = (steps // warpgroups).bit_length() - 1
    out_type = [jax.ShapeDtypeStruct((n_rows, n), jnp.dtype(dtype))]
    if has_residual:
        out_type.append(jax.ShapeDtypeStruct((n_rows, n), jnp.dtype(z_dtype)))
    out_type.append(jax.ShapeDtypeStruct((blocks, n), jnp.float32))
    row_args = dict(dtype=dtype, z_dtype=z_dtype, has_residual=has_residual, has_gr=has_gr, eps=eps,
                    weight_offset=weight_offset, llama=llama, width=next_power_of_two(n), reload=reload)
    pairs = warpgroups == 2
    floats = level_floats(lay, warpgroups)

    def body(*refs):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs), return_type=None)
        def emit(ctx, *mrefs):
            it = iter(mrefs)
            z, g = next(it), next(it)
            gr = next(it) if has_gr else None
            w, dx = next(it), next(it)
            dr = next(it) if has_residual else None
            partial, tree_a, tree_b, counter, *exchange = it
            ops = (MosaicPairOps(lay, (tree_a, tree_b), counter, exchange[0], steps, n_rows) if pairs else
                   MosaicBackwardOps(lay, (tree_a, tree_b), counter, steps, n_rows))
            backward_block(ops, lay, z, g, gr, w, dx, dr, partial, steps=steps, **row_args)

        emit(*refs)

    # Per warpgroup: its row trees' exchange (one float32 per warp and register).
    tree = plgpu.SMEM((warpgroups, WARPS * lay.regs) if pairs else (WARPS * lay.regs,), jnp.float32)
    # The counter's levels: one float32 per padded column each (at least one float: no empty scratch).
    scratch = [tree, tree, plgpu.SMEM((max(1, levels * floats),), jnp.float32)]
    if pairs:  # the pair's leaves, two rows used in turn
        scratch.append(plgpu.SMEM((2, floats), jnp.float32))
    params = plgpu.CompilerParams(lowering_semantics=getattr(plgpu.LoweringSemantics, semantics))
    threads = dict(num_threads=2, thread_name="warpgroup") if pairs else {}
    # The Pallas-Triton backward's aliases (bi_jax.backward): grad_x over g, grad_residual over
    # g_r; every stored element is computed from the one loaded at its address.
    aliases = {1: 0} | ({2: 1} if has_gr else {})
    return mosaic_call.kernel(body, out_type, aliases=aliases, grid=(blocks,), grid_names=("blocks",),
                              scratch_types=scratch, compiler_params=params, name="bi_norm_rms_norm_backward",
                              **threads)


def rms_norm_backward(z: jax.Array, weight: jax.Array, g: jax.Array, gr: Optional[jax.Array] = None, *,
                      eps: float, mode: str, weight_offset: float, has_residual: bool, root: bool = False,
                      steps: Optional[int] = None, reload: Optional[bool] = None, warpgroups: Optional[int] = None,
                      semantics: str = SEMANTICS) -> Tuple[jax.Array, Optional[jax.Array], jax.Array]:
    """(grad_x, grad_residual or None, grad_weight) of (rows, n) arrays through the Mosaic GPU kernel.

    bi_jax.backward.backward_rows's contract: z is what the forward normalised (x, or the new
    residual), g the gradient of out, gr that of the new residual (None: absent, +0.0). root=True
    gives B7's float32 T instead of rnD(T). steps: rows per program; reload, warpgroups: the variant
    (_backward_row, mosaic_backward_pairs); None: the tiling rule. Every variant gives the same bits.
    Needs a Hopper GPU to run; a CPU can only lower it.
    """
    _check(z, weight, g, gr, has_residual)
    n_rows, n = z.shape
    dw_dtype = jnp.float32 if root else weight.dtype
    if n_rows == 0:
        return (jnp.empty(z.shape, weight.dtype), jnp.empty(z.shape, z.dtype) if has_residual else None,
                jnp.zeros((n,), dw_dtype))
    _, steps, _, reload, warpgroups = _plan(n_rows, n, z.dtype.itemsize, steps, reload, warpgroups)
    kernel = _kernel(n_rows, n, jnp.dtype(weight.dtype).name, jnp.dtype(z.dtype).name, has_residual, gr is not None,
                     as_float32(eps), as_float32(weight_offset), mode == "llama", steps, reload, warpgroups, semantics)
    results = kernel(z, g, *(() if gr is None else (gr,)), weight)
    total = block_tree(results[-1])
    return results[0], results[1] if has_residual else None, total if root else encode(total, weight.dtype)


def emulate_kernel(z: np.ndarray, weight: np.ndarray, g: np.ndarray, gr: Optional[np.ndarray], *, eps: float,
                   mode: str, weight_offset: float, has_residual: bool, steps: Optional[int],
                   reload: Optional[bool] = None, warpgroups: Optional[int] = None):
    """What the kernel writes, by backward_block on numpy: [dx, [dr,] partials (blocks, n) float32]."""
    n_rows, n = z.shape
    lay, steps, blocks, reload, warpgroups = _plan(n_rows, n, z.dtype.itemsize, steps, reload, warpgroups)
    pad = blocks * steps - n_rows

    def blocked(a):
        return np.concatenate([a, np.zeros((pad, n), a.dtype)]).reshape(blocks, steps, n)

    dx = np.zeros((blocks, steps, n), weight.dtype)
    dr = np.zeros((blocks, steps, n), z.dtype) if has_residual else None
    partial = np.zeros((blocks, n), np.float32)
    ops = (NumpyPairOps if warpgroups == 2 else NumpyBackwardOps)(lay, blocks, steps, n_rows)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        backward_block(ops, lay, blocked(z), blocked(g), None if gr is None else blocked(gr), weight, dx, dr, partial,
                       steps=steps, dtype=weight.dtype.name, z_dtype=z.dtype.name, has_residual=has_residual,
                       has_gr=gr is not None, eps=as_float32(eps), weight_offset=as_float32(weight_offset),
                       llama=mode == "llama", width=next_power_of_two(n), reload=reload)
    outs = [dx.reshape(-1, n)[:n_rows]] + ([dr.reshape(-1, n)[:n_rows]] if has_residual else [])
    return outs + [partial]


def rms_norm_backward_emulated(z: np.ndarray, weight: np.ndarray, g: np.ndarray, gr: Optional[np.ndarray] = None, *,
                               eps: float, mode: str, weight_offset: float, has_residual: bool, root: bool = False,
                               steps: Optional[int] = None, reload: Optional[bool] = None,
                               warpgroups: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """rms_norm_backward with the kernel's body on numpy and block_tree in numpy: the schedule the
    GPU runs (its loads, masks, trees and counter), not the GPU's bits. bfloat16 as ml_dtypes'."""
    _check(z, weight, g, gr, has_residual)
    n_rows, n = z.shape
    if n_rows == 0:
        return (np.zeros(z.shape, weight.dtype), np.zeros(z.shape, z.dtype) if has_residual else None,
                np.zeros((n,), np.float32 if root else weight.dtype))
    results = emulate_kernel(z, weight, g, gr, eps=eps, mode=mode, weight_offset=weight_offset,
                             has_residual=has_residual, steps=steps, reload=reload, warpgroups=warpgroups)
    with np.errstate(over="ignore", invalid="ignore"):
        total = block_tree(results[-1], np)
    return results[0], results[1] if has_residual else None, total if root else encode_np(total, weight.dtype.name)


__all__ = ["backward_block", "block_tree", "emulate_kernel", "rms_norm_backward", "rms_norm_backward_emulated"]
