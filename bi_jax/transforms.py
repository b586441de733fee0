"""The forward's rules under sharding (custom_partitioning) and jax.vmap (custom_vmap).

Rows are independent, so a batch sharded over its leading axes runs the kernel on each shard's
rows, without a gather, and a vmapped batch of row blocks is just more rows: either way each
row's bits equal a single-device, unbatched run.

A function's operands and results are described by one letter each: "r" a (rows, n) array,
sharded and batched by rows; "g" a (rows, n // group_size) array of FP8 group scales, likewise;
"w" the (n,) weight and "s" the (1,) FP8 scale, both replicated on every shard.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import custom_batching, lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_RULE_DIMS = {"r": "r n", "g": "r g", "w": "n", "s": "o"}


def sharded(fn: Callable, args: str, results: str) -> Callable:
    """Wrap fn so a batch sharded over rows runs per shard, without a gather (see the module docstring)."""
    wrapped = custom_partitioning(fn)

    def row_spec(sharding):
        spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
        return PartitionSpec(spec[0] if spec else None, None)

    def shardings(mesh, spec, kinds: str):
        rows, replicated = NamedSharding(mesh, spec), NamedSharding(mesh, PartitionSpec(None))
        return tuple(rows if k in "rg" else replicated for k in kinds)

    def infer(mesh, arg_shapes, result_shape):
        out = shardings(mesh, row_spec(arg_shapes[0].sharding), results)
        return out[0] if len(results) == 1 else out

    def partition(mesh, arg_shapes, result_shape):
        spec = row_spec(arg_shapes[0].sharding)
        out = shardings(mesh, spec, results)
        return mesh, fn, out[0] if len(results) == 1 else out, shardings(mesh, spec, args)

    rule = ", ".join(_RULE_DIMS[k] for k in args) + " -> " + ", ".join(_RULE_DIMS[k] for k in results)
    wrapped.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)
    return wrapped


def batched(fn: Callable, args: str) -> Callable:
    """Wrap fn for jax.vmap: a batch of row blocks is just more rows.

    With the replicated operands (weight, scale) unbatched the batch is folded into the rows and
    run in one call, whose rows' bits equal the unbatched ones by construction; a batched weight
    or scale maps over the batch.
    """
    wrapped = custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *operands):
        full = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(operands, in_batched)]
        if any(b for b, k in zip(in_batched, args) if k not in "rg"):
            result = lax.map(lambda a: wrapped(*a), tuple(full))
        else:
            flat = [a.reshape((-1,) + a.shape[2:]) if k in "rg" else o for a, o, k in zip(full, operands, args)]
            result = wrapped(*flat)
            rows = operands[0].shape[-2]
            result = jax.tree.map(lambda r: r.reshape((axis_size, rows) + r.shape[1:]), result)
        return result, jax.tree.map(lambda _: True, result)

    return wrapped
