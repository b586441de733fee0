"""bi_jax's public function: validation at trace time, then one pallas_call over row blocks.

Rows are independent, so a batch sharded over its leading axes runs the kernel on each shard's
rows (custom_partitioning, no gather), and jax.vmap batches the pallas_call itself: either
way each row's bits equal a single-device, unbatched run. A custom_vjp, outermost (JAX cannot
differentiate custom_partitioning or custom_vmap), gives the contract's backward (bi_jax.backward).

Above MAX_ELEMENTS (Pallas-Triton indexes with int32) the rows are split into pieces of `piece`
rows, the largest power of two under the limit, one kernel call each (the last piece shorter).
Rows are independent, so out, the new residual, grad_x and grad_residual keep their bits. For
grad_weight each piece gives its float32 tree root and combine_roots adds them by the pairwise
tree: aligned power-of-two blocks are subtrees of B7's tree over all rows (NUMERICS.md), so
grad_weight has the bits of one call on all rows. The limit applies to the array rms_norm sees
(under jax.vmap, one example); the pieces' backward kernels have no partitioning rule, so the
split is meant for arrays on one device (a sharded batch's shards are usually under the limit).
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import custom_batching, lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec

from bridge.contract import as_float32, check_rms_norm_args, next_power_of_two
from bridge.tiling import launch_config

from .backward import backward_fn, backward_rows, combine_roots
from .pallas_kernel import rms_norm_kernel

# Pallas-Triton indexes with int32: a larger call is split into row pieces (piece_rows).
MAX_ELEMENTS = 2**31 - 1

_NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}


def dtype_name(dtype) -> str:
    """The contract's name for a JAX dtype, else its own name (which the contract rejects)."""
    return _NAMES.get(jnp.dtype(dtype), jnp.dtype(dtype).name)


def piece_rows(n: int) -> int:
    """The rows of one piece of a split call: the largest power of two with rows * n <= MAX_ELEMENTS."""
    return next_power_of_two(MAX_ELEMENTS // n + 1) // 2


def default_interpret() -> bool:
    """Interpret mode unless JAX's default backend is a GPU."""
    return jax.default_backend() != "gpu"


@functools.lru_cache(maxsize=None)
def device_kind() -> str:
    """The GPU's name (jax's device_kind), which picks the launch rule's per-device knob."""
    return jax.local_devices(backend="gpu")[0].device_kind


def _rows_call(x2, weight, residual2, *, eps, mode, weight_offset, interpret):
    """The pallas_call on (rows, n) arrays; returns out, or (out, new_residual)."""
    n_rows, n = x2.shape
    if n_rows == 0:
        out = jnp.empty(x2.shape, x2.dtype)
        return out if residual2 is None else (out, jnp.empty(residual2.shape, residual2.dtype))
    cfg = launch_config(n, n_rows, x2.dtype.itemsize, 0 if residual2 is None else residual2.dtype.itemsize,
                        "" if interpret else device_kind(), "pallas")
    has_residual = residual2 is not None
    kernel = functools.partial(
        rms_norm_kernel, n_rows=n_rows, n_cols=n, eps=as_float32(eps), weight_offset=as_float32(weight_offset),
        has_residual=has_residual, llama=mode == "llama", rows_per_program=cfg.rows, chunk=cfg.chunk,
        num_chunks=cfg.num_chunks, split=cfg.split, interpret=interpret)
    flat = (n_rows * n,)
    out_shape = [jax.ShapeDtypeStruct(flat, x2.dtype)]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct(flat, residual2.dtype))
        args = (x2.reshape(flat), residual2.reshape(flat), weight)
        body = kernel
    else:
        args = (x2.reshape(flat), weight)
        body = lambda x_ref, w_ref, out_ref: kernel(x_ref, None, w_ref, out_ref, None)  # noqa: E731
    results = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(pl.cdiv(n_rows, cfg.rows),),
        # With a residual, out is written over x and the new residual over the residual, as vLLM's
        # in-place add+norm does (each element is read before it is written, by the same thread):
        # inside a jitted model, where both are dead after the norm or carried through a loop over
        # layers, that costs no allocation and no copy. Without one, x usually lives on.
        input_output_aliases={} if not has_residual else {0: 0, 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="bi_norm_rms_norm",
    )(*args)
    out = results[0].reshape(x2.shape)
    return out if not has_residual else (out, results[1].reshape(x2.shape))


def _sharded(fn, n_inputs: int):
    """Wrap fn(x2, weight[, residual2]) so a batch sharded over rows runs per shard, without a gather."""
    wrapped = custom_partitioning(fn)

    def row_spec(sharding):
        spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
        return PartitionSpec(spec[0] if spec else None, None)

    def infer(mesh, arg_shapes, result_shape):
        spec = row_spec(arg_shapes[0].sharding)
        n_out = len(result_shape) if isinstance(result_shape, (tuple, list)) else 1
        out = NamedSharding(mesh, spec)
        return out if n_out == 1 else tuple(out for _ in range(n_out))

    def partition(mesh, arg_shapes, result_shape):
        spec = row_spec(arg_shapes[0].sharding)
        row_sharding, replicated = NamedSharding(mesh, spec), NamedSharding(mesh, PartitionSpec(None))
        arg_shardings = (row_sharding, replicated) + (row_sharding,) * (n_inputs - 2)
        n_out = len(result_shape) if isinstance(result_shape, (tuple, list)) else 1
        out = row_sharding if n_out == 1 else tuple(row_sharding for _ in range(n_out))
        return mesh, fn, out, arg_shardings

    rule = "r n, n -> r n" if n_inputs == 2 else "r n, n, r n -> r n, r n"
    wrapped.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule)
    return wrapped


def _batched(fn):
    """Wrap fn(x2, weight[, residual2]) for jax.vmap: a batch of row blocks is just more rows.

    With an unbatched weight the batch is folded into the rows and run in one call, whose rows'
    bits equal the unbatched ones by construction; a batched weight maps over the batch.
    """
    wrapped = custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, x2, weight, *residual2):
        if in_batched[1]:
            args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                    for a, b in zip((x2, weight) + residual2, in_batched)]
            result = lax.map(lambda a: wrapped(*a), tuple(args))
        else:
            rows = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                    for a, b in zip((x2,) + residual2, in_batched[:1] + in_batched[2:])]
            flat = [a.reshape(-1, a.shape[-1]) for a in rows]
            result = wrapped(flat[0], weight, *flat[1:])
            result = jax.tree.map(lambda r: r.reshape((axis_size,) + x2.shape[-2:]), result)
        return result, jax.tree.map(lambda _: True, result)

    return wrapped


@functools.lru_cache(maxsize=None)
def _rows_fn(eps: float, mode: str, weight_offset: float, interpret: bool, has_residual: bool):
    """The kernel on (rows, n) arrays, partitioned over sharded rows and batched under vmap."""
    if has_residual:
        def fn(x2, weight, residual2):
            return _rows_call(x2, weight, residual2, eps=eps, mode=mode, weight_offset=weight_offset,
                              interpret=interpret)
        return _batched(_sharded(fn, 3))

    def fn(x2, weight):
        return _rows_call(x2, weight, None, eps=eps, mode=mode, weight_offset=weight_offset, interpret=interpret)
    return _batched(_sharded(fn, 2))


def _pieces(a: jax.Array, piece: int) -> List[jax.Array]:
    return [a[i:i + piece] for i in range(0, a.shape[0], piece)]


def _split_forward(forward: Callable, has_residual: bool, piece: int) -> Callable:
    """forward over `piece`-row slices, results concatenated: each row's bits are its own."""
    def run(x2, weight, *residual2):
        slices = zip(_pieces(x2, piece), *(_pieces(a, piece) for a in residual2))
        results = [forward(x, weight, *r) for x, *r in slices]
        return tuple(map(jnp.concatenate, zip(*results))) if has_residual else jnp.concatenate(results)
    return run


def _split_backward(z2, weight, g, g_r, *, piece: int, **kwargs):
    """backward_rows per `piece`-row slice; grad_weight from the pieces' float32 roots (see the module docstring)."""
    g_rs = [None] * -(-z2.shape[0] // piece) if g_r is None else _pieces(g_r, piece)
    grads = [backward_rows(z, weight, gp, grp, root=True, **kwargs)
             for z, gp, grp in zip(_pieces(z2, piece), _pieces(g, piece), g_rs)]
    roots = [grad[2] for grad in grads]
    last = z2.shape[0] % piece
    if last and next_power_of_two(last) < piece:
        # In the tree over all rows the short last piece's root is added to its +0.0 padding
        # rows' subtree up to `piece` rows, which turns a -0.0 root into +0.0.
        roots[-1] = jnp.where(roots[-1] == 0, jnp.float32(0.0), roots[-1])
    grad_weight = combine_roots(jnp.stack(roots), weight.dtype)
    grad_residual = jnp.concatenate([grad[1] for grad in grads]) if kwargs["has_residual"] else None
    return jnp.concatenate([grad[0] for grad in grads]), grad_residual, grad_weight


@functools.lru_cache(maxsize=None)
def _differentiable(eps: float, mode: str, weight_offset: float, interpret: bool, has_residual: bool,
                    piece: Optional[int]):
    """_rows_fn with the contract's gradients w.r.t. x, weight and the residual (jax.custom_vjp).

    The backward keeps what the forward normalised (x, or the new residual) and the weight, and
    recomputes inv from them (NUMERICS.md: the same bits). Forward mode (jax.jvp) is not defined.
    piece: None for one call on all rows, else the rows of each piece of a split call.
    """
    forward = _rows_fn(eps, mode, weight_offset, interpret, has_residual)
    if piece is not None:
        forward = _split_forward(forward, has_residual, piece)

    @jax.custom_vjp
    def rows(*args):
        return forward(*args)

    def rows_fwd(*primals):
        args = [p.value for p in primals]
        result = forward(*args)
        return result, (result[1] if has_residual else args[0], args[1])

    def rows_bwd(saved, cotangent):
        z2, weight = saved
        g, g_r = cotangent if has_residual else (cotangent, None)
        if isinstance(g, SymbolicZero):  # only the new residual was used: out's gradient is zeros
            g = jnp.zeros(z2.shape, weight.dtype)
        # An unused new residual has a symbolic-zero gradient: absent, which B6 counts as +0.0.
        g_r = None if isinstance(g_r, SymbolicZero) else g_r
        if piece is None:
            fn = backward_fn(eps, mode, weight_offset, interpret, has_residual, g_r is not None)
            grads = fn(z2, weight, g, *(() if g_r is None else (g_r,)))
            grad_x, grad_residual, grad_weight = grads[0], grads[1] if has_residual else None, grads[-1]
        else:
            grad_x, grad_residual, grad_weight = _split_backward(
                z2, weight, g, g_r, piece=piece, eps=eps, mode=mode, weight_offset=weight_offset,
                interpret=interpret, has_residual=has_residual)
        return (grad_x, grad_weight) + ((grad_residual,) if has_residual else ())

    rows.defvjp(rows_fwd, rows_bwd, symbolic_zeros=True)
    return rows


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    eps: float = 1e-6,
    residual: Optional[jax.Array] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    interpret: Optional[bool] = None,
) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """Batch-invariant RMSNorm over the last axis (NUMERICS.md).

    Returns out, or (out, new_residual) when a residual (x's dtype or float32) is given. With a
    residual the kernel writes out over x and the new residual over the residual: free inside a
    jitted model (x and the residual dead after the norm, or carried through a loop over layers)
    or when both are donated (jax.jit donate_argnums=(x, residual)); XLA copies an input that
    is still alive or not donated first, so the caller's arrays never change.
    interpret=None picks the compiled GPU kernel when JAX's default backend is a GPU, else interpret mode.
    """
    for name, a in (("x", x), ("weight", weight), ("residual", residual)):
        if a is not None and not hasattr(a, "shape"):
            raise TypeError(f"{name}: expected a jax.Array; got {type(a).__name__}")
    check_rms_norm_args(
        x_shape=x.shape, x_dtype=dtype_name(x.dtype), weight_shape=weight.shape, weight_dtype=dtype_name(weight.dtype),
        eps=eps, residual_shape=None if residual is None else residual.shape,
        residual_dtype=None if residual is None else dtype_name(residual.dtype),
        mode=mode, weight_offset=weight_offset)
    n = x.shape[-1]
    if n > MAX_ELEMENTS:
        raise ValueError(f"x: at most {MAX_ELEMENTS} elements per row (Pallas-Triton indexes with int32); "
                         f"got shape {x.shape}")
    # Above the limit: pieces of piece_rows(n) rows (module docstring), the bits of one call.
    piece = piece_rows(n) if x.size > MAX_ELEMENTS else None
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _apply(x, weight, residual, eps=float(eps), mode=mode, weight_offset=float(weight_offset),
                  interpret=interpret, piece=piece)


@functools.partial(jax.jit, static_argnames=("eps", "mode", "weight_offset", "interpret", "piece"))
def _apply(x, weight, residual, *, eps, mode, weight_offset, interpret, piece):
    """Jitted so eager calls hit a compile cache; inlined into the caller's jit otherwise."""
    n = x.shape[-1]
    fn = _differentiable(eps, mode, weight_offset, interpret, residual is not None, piece)
    x2 = x.reshape(-1, n)
    if residual is None:
        return fn(x2, weight).reshape(x.shape)
    out, new_residual = fn(x2, weight, residual.reshape(-1, n))
    return out.reshape(x.shape), new_residual.reshape(x.shape)
