"""Running the Pallas backward kernels on (rows, n) arrays: bi_torch.launch.launch_backward's twin.

On a GPU that runs Mosaic GPU (bi_jax.selection) backward_rows hands the rows to
bi_jax/mosaic_backward.py instead: the same results, bit for bit.

The launch configuration is bridge.numerics.tiling.backward_config, the one the Triton launcher takes.
`backward_rows` returns grad_weight rounded to the weight's dtype, or the float32 root of the row
tree (NUMERICS.md B7's `T`), which a batch sharded over rows combines across shards.

`backward_fn` is what bi_jax.rms_norm's custom_vjp calls. Sharded over rows, each shard computes
its rows' gradients and its tree's float32 root; the roots are all-gathered (one float32 row per
shard, never x) and combined by the pairwise tree in shard order. With equal power-of-two shards
those are aligned subtrees, so grad_weight has the bits of one call on all rows; otherwise it is
deterministic for that mesh. Under jax.vmap every gradient is per batch element (per-example
gradients), so the batch is mapped: each element's bits are those of an unbatched call.
Each pallas_call goes through bi_jax.deprecation.quiet_call (JAX 0.11's Pallas-Triton warning).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import custom_batching, lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec

from bridge.numerics.contract import as_float32
from bridge.numerics.tiling import backward_config, column_tree_width

from . import mosaic_backward
from .deprecation import quiet_call
from .pallas_backward import column_tree_kernel, rms_norm_backward_kernel, row_stats_kernel
from .pallas_kernel import encode

# The order of rms_norm_backward_kernel's refs; a call passes the ones it has, None stands for the rest.
_KERNEL_REFS = ("z", "g", "gr", "w", "dx", "dr", "stats", "partial", "dw")


def _params(num_warps: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def backward_rows(
    z2: jax.Array,
    weight: jax.Array,
    g2: jax.Array,
    gr2: Optional[jax.Array],
    *,
    eps: float,
    mode: str,
    weight_offset: float,
    interpret: bool,
    has_residual: bool,
    root: bool = False,
    kernel: str = "triton",
) -> Tuple[jax.Array, Optional[jax.Array], jax.Array]:
    """(grad_x, grad_residual or None, grad_weight) of (rows, n) arrays; inputs already validated.

    z2 is what the forward normalised (x, or the new residual when has_residual); g2 the gradient
    of out; gr2 that of the new residual, None when absent (+0.0, NUMERICS.md B6). root=True gives
    the float32 tree root T instead of grad_weight = rnD(T) (NaNs canonical, which rnD keeps NaN).
    kernel: "mosaic" (bi_jax/mosaic_backward.py, compiled on a GPU that runs it: bi_jax.selection)
    or "triton" (the kernels below, interpret mode included); the same bits either way.
    """
    if kernel == "mosaic":
        return mosaic_backward.rms_norm_backward(z2, weight, g2, gr2, eps=eps, mode=mode, weight_offset=weight_offset,
                                                 has_residual=has_residual, root=root)
    n_rows, n = z2.shape
    dtype = weight.dtype
    dw_dtype = jnp.float32 if root else dtype
    if n_rows == 0:
        # No rows: T is the empty tree, all +0.0.
        return (jnp.empty(z2.shape, dtype), jnp.empty(z2.shape, z2.dtype) if has_residual else None,
                jnp.zeros((n,), dw_dtype))
    cfg = backward_config(n, n_rows, z2.dtype.itemsize)
    eps32, offset32 = as_float32(eps), as_float32(weight_offset)
    flat = (n_rows * n,)
    z, g = z2.reshape(flat), g2.reshape(flat)
    inputs = {"z": z, "g": g, "w": weight}
    if gr2 is not None:
        inputs["gr"] = gr2.reshape(flat)
    if cfg.num_chunks > 1:
        stats_kernel = functools.partial(
            row_stats_kernel, n_cols=n, eps=eps32, weight_offset=offset32, chunk=cfg.stats_chunk,
            num_chunks=cfg.stats_chunks, split=cfg.split, interpret=interpret)
        inputs["stats"] = quiet_call(pl.pallas_call(
            stats_kernel, out_shape=jax.ShapeDtypeStruct((n_rows * 2,), jnp.float32), grid=(n_rows,),
            compiler_params=_params(cfg.num_warps), interpret=interpret, name="bi_norm_row_stats"), z, g, weight)
    final = cfg.blocks == 1
    outputs = {"dx": jax.ShapeDtypeStruct(flat, dtype)}
    if has_residual:
        outputs["dr"] = jax.ShapeDtypeStruct(flat, z2.dtype)
    if final:
        outputs["dw"] = jax.ShapeDtypeStruct((n,), dw_dtype)
    else:
        outputs["partial"] = jax.ShapeDtypeStruct((cfg.blocks * n,), jnp.float32)
    in_names = [k for k in _KERNEL_REFS if k in inputs]
    out_names = [k for k in _KERNEL_REFS if k in outputs]
    kernel = functools.partial(
        rms_norm_backward_kernel, n_rows=n_rows, n_cols=n, eps=eps32, weight_offset=offset32,
        has_residual=has_residual, has_grad_residual=gr2 is not None, llama=mode == "llama",
        rows_per_tile=cfg.rows, steps=cfg.steps, levels=cfg.counter_levels, chunk=cfg.chunk,
        num_chunks=cfg.num_chunks, split=cfg.split, final=final, interpret=interpret)

    def body(*refs):
        named = dict(zip(in_names + out_names, refs))
        kernel(*(named.get(k) for k in _KERNEL_REFS))

    # grad_x is written over the gradient of out, grad_residual over that of the new residual
    # (same dtype and shape; each element is read before the same thread writes it): inside a
    # jitted train step both gradients are dead after the norm, so that costs no allocation.
    aliases = {in_names.index("g"): out_names.index("dx")}
    if "gr" in inputs:
        aliases[in_names.index("gr")] = out_names.index("dr")
    results = dict(zip(out_names, quiet_call(pl.pallas_call(
        body, out_shape=[outputs[k] for k in out_names], grid=(cfg.blocks, cfg.num_chunks),
        input_output_aliases=aliases, compiler_params=_params(cfg.num_warps), interpret=interpret,
        name="bi_norm_rms_norm_backward"), *(inputs[k] for k in in_names))))
    # The tree's upper levels: each level sums aligned groups of the previous level's rows.
    n_src, level = cfg.blocks, results.get("partial")
    for group in cfg.tree_groups:
        n_dst, width = -(-n_src // group), column_tree_width(group, n)
        tree_kernel = functools.partial(column_tree_kernel, n_src=n_src, n_cols=n, group=group, width=width,
                                        final=n_dst == 1, interpret=interpret)
        shape = ((n,), dw_dtype) if n_dst == 1 else ((n_dst * n,), jnp.float32)
        level = quiet_call(pl.pallas_call(
            tree_kernel, out_shape=jax.ShapeDtypeStruct(*shape), grid=(pl.cdiv(n, width), n_dst),
            compiler_params=_params(4), interpret=interpret, name="bi_norm_column_tree"), level)
        n_src = n_dst
    if not final:
        results["dw"] = level
    grad_residual = results["dr"].reshape(z2.shape) if has_residual else None
    return results["dx"].reshape(z2.shape), grad_residual, results["dw"]


def combine_roots(roots: jax.Array, dtype) -> jax.Array:
    """rnD of the pairwise tree over the float32 roots of consecutive equal row blocks, (blocks, n).

    When every block has the same power-of-two row count this is B7's tree over all their rows
    (NUMERICS.md: aligned blocks are subtrees); +0.0 roots pad the count to a power of two.
    """
    return encode(mosaic_backward.block_tree(roots), dtype)


def _row_axes(mesh, shape) -> Optional[Tuple[str, ...]]:
    """The mesh axes that split the rows into equal shards, or None: then the call runs unsplit.

    Uneven shards would hand the kernel padding rows, which would join grad_weight's tree.
    """
    sharding = shape.sharding
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    axes = spec[0] if spec else None
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes if shape.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0 else None


def _sharded(rows_fn: Callable, has_residual: bool, n_inputs: int):
    """rows_fn(z2, weight, g2[, gr2], root=...) partitioned over sharded rows (see the docstring above)."""

    def unsplit(*args):
        grad_x, grad_residual, grad_weight = rows_fn(*args, root=False)
        return (grad_x, grad_residual, grad_weight) if has_residual else (grad_x, grad_weight)

    wrapped = custom_partitioning(unsplit)

    def out_shardings(mesh, axes):
        rows, replicated = NamedSharding(mesh, PartitionSpec(axes, None)), NamedSharding(mesh, PartitionSpec(None))
        return rows, ((rows, rows, replicated) if has_residual else (rows, replicated))

    def infer(mesh, arg_shapes, result_shape):
        return out_shardings(mesh, _row_axes(mesh, arg_shapes[0]))[1]

    def partition(mesh, arg_shapes, result_shape):
        axes = _row_axes(mesh, arg_shapes[0])
        rows, outs = out_shardings(mesh, axes)
        dtype = arg_shapes[1].dtype

        def per_shard(*args):
            if axes is None:
                return unsplit(*args)
            grad_x, grad_residual, root = rows_fn(*args, root=True)
            grad_weight = combine_roots(lax.all_gather(root, axes), dtype)
            return (grad_x, grad_residual, grad_weight) if has_residual else (grad_x, grad_weight)

        args = (rows, NamedSharding(mesh, PartitionSpec(None))) + (rows,) * (n_inputs - 2)
        return mesh, per_shard, outs, args

    rule = "r n, n, r n" + ", r n" * (n_inputs - 3) + (" -> r n, r n, n" if has_residual else " -> r n, n")
    wrapped.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)
    return wrapped


def _batched(fn):
    """fn for jax.vmap: each batch element's gradients, grad_weight included, by its own call.

    A gradient under vmap is per example (jax.vmap(jax.grad(loss))), so the batch is not folded
    into the rows as the forward folds it: grad_weight is one tree per element.
    """
    wrapped = custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        def one(slices):
            it = iter(slices)
            return wrapped(*(next(it) if b else a for a, b in zip(args, in_batched)))

        result = lax.map(one, tuple(a for a, b in zip(args, in_batched) if b))
        return result, jax.tree.map(lambda _: True, result)

    return wrapped


@functools.lru_cache(maxsize=None)
def backward_fn(eps: float, mode: str, weight_offset: float, interpret: bool, has_residual: bool,
                has_grad_residual: bool, kernel: str = "triton") -> Callable:
    """(z2, weight, g2[, gr2]) -> (grad_x, [grad_residual,] grad_weight), partitioned and batched.

    kernel: backward_rows's ("mosaic" or "triton")."""

    def rows_fn(z2, weight, g2, *gr2, root):
        return backward_rows(z2, weight, g2, gr2[0] if gr2 else None, eps=eps, mode=mode,
                             weight_offset=weight_offset, interpret=interpret, has_residual=has_residual,
                             root=root, kernel=kernel)

    return _batched(_sharded(rows_fn, has_residual, 3 + has_grad_residual))
