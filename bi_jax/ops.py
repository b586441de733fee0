"""bi_jax's public function: validation at trace time, then one kernel call over row blocks.

The forward (FP8 output included) and its backward run the Mosaic GPU kernels
(bi_jax/mosaic_kernel.py, mosaic_fp8.py, mosaic_backward.py) or the Pallas-Triton ones
(bi_jax/pallas_kernel.py, pallas_fp8.py, pallas_backward.py), as bi_jax.selection picks. Both
bodies give the contract's bits, so the choice changes no result.

Rows are independent, so a batch sharded over its leading axes runs the kernel on each shard's
rows (custom_partitioning, no gather), and jax.vmap batches the kernel call itself: either
way each row's bits equal a single-device, unbatched run (bi_jax.transforms). A custom_vjp,
outermost (JAX cannot differentiate custom_partitioning or custom_vmap), gives the contract's
backward (bi_jax.backward); FP8 outputs (contract v1.2, bi_jax.fp8) have none.

Above MAX_ELEMENTS (Pallas-Triton indexes with int32) the rows are split into pieces of `piece`
rows, the largest power of two under the limit, one kernel call each (the last piece shorter;
bi_jax.pieces). The Mosaic GPU forward is split the same way: no call of either kernel meets
more than 2**31 - 1 elements. Rows are independent, so out, the new residual, grad_x and
grad_residual keep their bits; grad_weight is combined from the pieces' float32 tree roots, the
bits of one call on all rows (bi_jax.pieces). The limit applies to the array rms_norm sees
(under jax.vmap, one example); the pieces' backward kernels have no partitioning rule, so the
split is meant for arrays on one device (a sharded batch's shards are usually under the limit).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bridge.numerics.contract import as_float32, check_rms_norm_args, next_power_of_two
from bridge.numerics.tiling import launch_config

from . import mosaic_kernel
from .backward import backward_fn
from .deprecation import quiet_call
from .fp8 import fp8_arguments, without_gradient
from .pallas_fp8 import NO_QUANT, Quant
from .pallas_kernel import rms_norm_kernel
from .pieces import split_backward, split_forward
from .selection import backward_kernel, forward_kernel
from .transforms import batched, sharded

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


# The order of rms_norm_kernel's refs; a call passes the ones it has, None stands for the rest.
_KERNEL_REFS = ("x", "r", "w", "scale", "out", "scales", "new_r")


def _rows_call(x2, weight, residual2, scale, *, eps, mode, weight_offset, interpret, quant=NO_QUANT):
    """The pallas_call on (rows, n) arrays: out, then the group scales and the new residual if any.
    quant "static" takes scale, a (1,) float32 array; an FP8 out is the kernel's uint8 codes, bitcast."""
    n_rows, n = x2.shape
    out_dtype = x2.dtype if quant.kind == "none" else jnp.dtype(quant.fmt_name)
    shapes = {"out": (x2.shape, out_dtype)}
    if quant.kind == "group":
        shapes["scales"] = ((n_rows, n // quant.group), jnp.float32)
    if residual2 is not None:
        shapes["new_r"] = (residual2.shape, residual2.dtype)
    if n_rows == 0:
        results = tuple(jnp.empty(*shape) for shape in shapes.values())
        return results if len(results) > 1 else results[0]
    cfg = launch_config(n, n_rows, x2.dtype.itemsize, 0 if residual2 is None else residual2.dtype.itemsize,
                        "" if interpret else device_kind(), "pallas", quant.kind)
    has_residual = residual2 is not None
    kernel = functools.partial(
        rms_norm_kernel, n_rows=n_rows, n_cols=n, eps=as_float32(eps), weight_offset=as_float32(weight_offset),
        has_residual=has_residual, llama=mode == "llama", rows_per_program=cfg.rows, chunk=cfg.chunk,
        num_chunks=cfg.num_chunks, split=cfg.split, interpret=interpret, quant=quant)
    flat = (n_rows * n,)
    inputs = {"x": x2.reshape(flat), "w": weight}
    if has_residual:
        inputs["r"] = residual2.reshape(flat)
    if scale is not None:
        inputs["scale"] = scale
    outputs = {k: jax.ShapeDtypeStruct((math.prod(shape),), jnp.uint8 if k == "out" and quant.kind != "none" else dt)
               for k, (shape, dt) in shapes.items()}
    in_names = [k for k in _KERNEL_REFS if k in inputs]
    out_names = [k for k in _KERNEL_REFS if k in outputs]

    def body(*refs):
        named = dict(zip(in_names + out_names, refs))
        kernel(*(named.get(k) for k in _KERNEL_REFS))

    # With a residual, out is written over x and the new residual over the residual, as vLLM's
    # in-place add+norm does (each element is read before it is written, by the same thread):
    # inside a jitted model, where both are dead after the norm or carried through a loop over
    # layers, that costs no allocation and no copy. Without one, x usually lives on. An FP8 out
    # is smaller than x: only the new residual takes a buffer over.
    aliases = {}
    if has_residual:
        aliases[in_names.index("r")] = out_names.index("new_r")
        if quant.kind == "none":
            aliases[in_names.index("x")] = out_names.index("out")
    # quiet_call: JAX 0.11's Pallas-Triton deprecation warning is not shown for bi_jax's own calls.
    results = quiet_call(pl.pallas_call(
        body,
        out_shape=[outputs[k] for k in out_names],
        grid=(pl.cdiv(n_rows, cfg.rows),),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="bi_norm_rms_norm",
    ), *(inputs[k] for k in in_names))
    results = [r.reshape(shapes[k][0]) for k, r in zip(out_names, results)]
    if quant.kind != "none":
        results[0] = lax.bitcast_convert_type(results[0], out_dtype)
    return tuple(results) if len(results) > 1 else results[0]


@functools.lru_cache(maxsize=None)
def _rows_fn(eps: float, mode: str, weight_offset: float, interpret: bool, has_residual: bool,
             quant: Quant = NO_QUANT, kernel: str = "triton"):
    """The kernel on (x2, weight[, residual2][, scale]), partitioned over sharded rows and batched under vmap.

    kernel: "mosaic" or "triton" (bi_jax.selection.forward_kernel).
    """
    static = quant.kind == "static"
    args = "rw" + "r" * has_residual + "s" * static
    results = "r" + "g" * (quant.kind == "group") + "r" * has_residual

    def fn(x2, weight, *rest):
        residual2 = rest[0] if has_residual else None
        scale = rest[-1] if static else None
        if kernel == "mosaic":
            return mosaic_kernel.rms_norm(x2, weight, eps, residual2, mode=mode, weight_offset=weight_offset,
                                          quant=quant, scale=scale)
        return _rows_call(x2, weight, residual2, scale, eps=eps, mode=mode, weight_offset=weight_offset,
                          interpret=interpret, quant=quant)
    return batched(sharded(fn, args, results), args)


@functools.lru_cache(maxsize=None)
def _differentiable(eps: float, mode: str, weight_offset: float, interpret: bool, has_residual: bool,
                    piece: Optional[int], kernel: str, backward: str = "triton"):
    """_rows_fn with the contract's gradients w.r.t. x, weight and the residual (jax.custom_vjp).

    The backward keeps what the forward normalised (x, or the new residual) and the weight, and
    recomputes inv from them (NUMERICS.md: the same bits). Forward mode (jax.jvp) is not defined.
    piece: None for one call on all rows, else the rows of each piece of a split call. kernel: the
    forward's ("mosaic" or "triton"); backward: the backward's (bi_jax.selection.backward_kernel).
    Either body gives the same bits.
    """
    forward = _rows_fn(eps, mode, weight_offset, interpret, has_residual, NO_QUANT, kernel)
    if piece is not None:
        forward = split_forward(forward, has_residual, piece)

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
            fn = backward_fn(eps, mode, weight_offset, interpret, has_residual, g_r is not None, backward)
            grads = fn(z2, weight, g, *(() if g_r is None else (g_r,)))
            grad_x, grad_residual, grad_weight = grads[0], grads[1] if has_residual else None, grads[-1]
        else:
            grad_x, grad_residual, grad_weight = split_backward(
                z2, weight, g, g_r, piece=piece, eps=eps, mode=mode, weight_offset=weight_offset,
                interpret=interpret, has_residual=has_residual, kernel=backward)
        return (grad_x, grad_weight) + ((grad_residual,) if has_residual else ())

    rows.defvjp(rows_fwd, rows_bwd, symbolic_zeros=True)
    return rows


@functools.lru_cache(maxsize=None)
def _fp8_fn(eps: float, mode: str, weight_offset: float, interpret: bool, has_residual: bool, piece: Optional[int],
            quant: Quant, kernel: str):
    """_rows_fn with an FP8 out: no gradient (a clear error under jax.grad, bi_jax.fp8)."""
    forward = _rows_fn(eps, mode, weight_offset, interpret, has_residual, quant, kernel)
    if piece is not None:
        forward = split_forward(forward, has_residual, piece)
    return without_gradient(forward, quant.fmt_name)


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    eps: float = 1e-6,
    residual: Optional[jax.Array] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype=None,
    scale=None,
    group_size: Optional[int] = None,
    interpret: Optional[bool] = None,
    pallas_backend: Optional[str] = None,
) -> Union[jax.Array, Tuple[jax.Array, ...]]:
    """Batch-invariant RMSNorm over the last axis (NUMERICS.md).

    Returns out, or (out, new_residual) when a residual (x's dtype or float32) is given. With a
    residual the Pallas-Triton kernel writes out over x and the new residual over the residual:
    free inside a jitted model (x and the residual dead after the norm, or carried through a loop
    over layers) or when both are donated (jax.jit donate_argnums=(x, residual)); XLA copies an
    input that is still alive or not donated first, so the caller's arrays never change. The
    Mosaic GPU kernel writes new buffers (plgpu.kernel has no input_output_aliases).

    FP8 output (contract v1.2): out_dtype=jnp.float8_e4m3fn with either a static `scale` (a
    float32 array of shape () or (1,), or a Python float; an operand, traced under jit, its value
    checked where it is concrete) or `group_size` (64 or 128, dividing n: per row and group of
    columns a float32 scale). Returns out (FP8), or (out, new_residual); with group_size
    (out, scales) or (out, scales, new_residual), scales of shape x.shape[:-1] + (n // group_size,).
    FP8 outputs have no gradient: jax.grad through one raises. out_dtype=None or x's dtype: no FP8.
    interpret=None picks the compiled GPU kernel when JAX's default backend is a GPU, else interpret mode.
    pallas_backend: "auto", "mosaic" or "triton", the forward's kernel body; None reads the environment
    variable BI_NORM_PALLAS_BACKEND, else "auto" (bi_jax.selection: Mosaic GPU on compute capability
    9.0 and later where it can run, else Pallas-Triton), for the forward (FP8 output included) and
    its backward; interpret mode is the Pallas-Triton body.
    """
    for name, a in (("x", x), ("weight", weight), ("residual", residual)):
        if a is not None and not hasattr(a, "shape"):
            raise TypeError(f"{name}: expected a jax.Array; got {type(a).__name__}")
    check_rms_norm_args(
        x_shape=x.shape, x_dtype=dtype_name(x.dtype), weight_shape=weight.shape, weight_dtype=dtype_name(weight.dtype),
        eps=eps, residual_shape=None if residual is None else residual.shape,
        residual_dtype=None if residual is None else dtype_name(residual.dtype),
        mode=mode, weight_offset=weight_offset)
    quant, scale = fp8_arguments(x.shape[-1], dtype_name(x.dtype), out_dtype, scale, group_size)
    n = x.shape[-1]
    if n > MAX_ELEMENTS:
        raise ValueError(f"x: at most {MAX_ELEMENTS} elements per row (Pallas-Triton indexes with int32); "
                         f"got shape {x.shape}")
    # Above the limit: pieces of piece_rows(n) rows (module docstring), the bits of one call.
    piece = piece_rows(n) if x.size > MAX_ELEMENTS else None
    interpret = default_interpret() if interpret is None else bool(interpret)
    kernel = forward_kernel(pallas_backend, n, interpret)
    backward = backward_kernel(pallas_backend, n, interpret) if quant.kind == "none" else "triton"
    return _apply(x, weight, residual, scale, eps=float(eps), mode=mode, weight_offset=float(weight_offset),
                  interpret=interpret, piece=piece, quant=quant, kernel=kernel, backward=backward)


@functools.partial(jax.jit, static_argnames=("eps", "mode", "weight_offset", "interpret", "piece", "quant", "kernel",
                                             "backward"))
def _apply(x, weight, residual, scale, *, eps, mode, weight_offset, interpret, piece, quant, kernel, backward):
    """Jitted so eager calls hit a compile cache; inlined into the caller's jit otherwise."""
    n = x.shape[-1]
    has_residual = residual is not None
    x2 = x.reshape(-1, n)
    args = (x2, weight) + ((residual.reshape(-1, n),) if has_residual else ())
    if quant.kind == "none":
        fn = _differentiable(eps, mode, weight_offset, interpret, has_residual, piece, kernel, backward)
    else:
        fn = _fp8_fn(eps, mode, weight_offset, interpret, has_residual, piece, quant, kernel)
        args += (scale,) if quant.kind == "static" else ()
    results = fn(*args)
    if not isinstance(results, tuple):
        return results.reshape(x.shape)
    # The group scales have x's leading shape; out and the new residual x's shape.
    return tuple(r.reshape(x.shape[:-1] + r.shape[-1:]) for r in results)
