"""A Pallas Mosaic GPU forward for NUMERICS.md's contract (stage 1 of issue 26).

bi_jax.rms_norm runs it where bi_jax.selection says "mosaic" (compiled, compute capability 9.0
or later, rows of at most MAX_N columns); its backward is bi_jax/mosaic_backward.py, which
recomputes v and inv with this module's inverse_rms.

One program (one warpgroup, 128 threads) per row, the row held in registers in Mosaic's WG_STRIDED
layout (mosaic_ops.RowLayout): GMEM -> registers -> GMEM, which ran at 98 % of an XLA copy in
scripts/probes/probe_mosaic.py. The whole row is one `plgpu.inline_mgpu` call whose MLIR does
every float operation as one PTX instruction (mosaic_ops.MosaicOps) and builds step 3's tree
from in-thread adds, lane shuffles and one shared-memory exchange (mosaic_ops.row_tree).

`normalize_row` is the kernel body, written once: `rms_norm` lowers it to MLIR for the GPU,
`rms_norm_emulated` runs it on numpy (mosaic_ops.NumpyOps) so that a CPU can check its tree,
masks and steps against bridge.numerics.reference bit for bit.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bridge.numerics.contract import as_float32, check_rms_norm_args

from .mosaic_ops import NUMPY_DTYPES, WARPS, MosaicOps, NumpyOps, RowLayout, row_layout, row_tree

# Every thread keeps its whole share of the row in registers (n / 128 floats, plus the weight's):
# past this the row needs chunks (a later stage), as the Pallas-Triton kernel's num_chunks > 1.
MAX_N = 32768
# Floats per thread up to which the weight is loaded before the reduction (normalize_row).
EARLY_WEIGHT = 64
# Mosaic GPU's lowering semantics, named explicitly: jax 0.10 defaults to Lane, 0.11 to Warpgroup.
# The kernel passes only refs to inline_mgpu, so its MLIR is the same under both (both lower on a CPU).
SEMANTICS = "Warpgroup"


def _name(dtype) -> str:
    return jnp.dtype(dtype).name


def inverse_rms(ops, lay: RowLayout, v, eps: float):
    """Steps 2-4 on a row held as v[reg][j]: squares, the pairwise tree (row_tree), mean, root, inverse.

    The backward recomputes inv with this very function, so its bits are the forward's.
    """
    s = row_tree(ops, lay, [[ops.mul(a, a) for a in vr] for vr in v])
    # IEEE division and square root, once per thread.
    mean = ops.div(s, ops.f32(float(lay.n)))
    return ops.div(ops.f32(1.0), ops.sqrt(ops.add(mean, ops.f32(eps))))


def effective_weight(ops, e, dtype: str, weight_offset: float):
    """Step 5 on one loaded weight element: the offset is added only when it is non-zero in float32."""
    wf = ops.widen(e, dtype)
    return ops.add(wf, ops.f32(weight_offset)) if weight_offset != 0 else wf


def normalize_row(ops, lay: RowLayout, x, w, res, out, new_res, *, dtype: str, res_dtype: Optional[str],
                  eps: float, weight_offset: float, llama: bool) -> None:
    """NUMERICS.md steps 1-6 for one row (per thread of its warpgroup): refs in, refs out.

    x, out: the row; w: the weight; res, new_res: the residual row and the new one, or None.
    """
    # 1. z = rnR(x + residual), stored as the new residual; v = f32(z).
    v = []
    for reg in range(lay.regs):
        xs = [ops.widen(e, dtype) for e in ops.load(x, reg)]
        if res is not None:
            rs = [ops.widen(e, res_dtype) for e in ops.load(res, reg)]
            zs = [ops.encode(ops.add(a, b), res_dtype) for a, b in zip(xs, rs)]
            ops.store(new_res, reg, zs)
            xs = [ops.widen(z, res_dtype) for z in zs]
        v.append(xs)
    # Short rows read the weight before the reduction, so that its latency hides behind the tree;
    # long ones after it, when the row's floats no longer need their registers (fewer spills).
    early = lay.regs * lay.vec <= EARLY_WEIGHT
    ws = [ops.load(w, reg) for reg in range(lay.regs)] if early else None
    inv = inverse_rms(ops, lay, v, eps)
    for reg in range(lay.regs):
        outs = []
        for a, e in zip(v[reg], ws[reg] if early else ops.load(w, reg)):
            wf = effective_weight(ops, e, dtype, weight_offset)
            # 6. llama: y = rnD(v * inv), out = rnD(f32(y) * w); fp32: out = rnD((v * inv) * w).
            y = ops.mul(a, inv)
            if llama and dtype != "float32":  # rnD to float32 changes only NaN bits, which are never stored
                y = ops.round_to(y, dtype)
            outs.append(ops.encode(ops.mul(y, wf), dtype))
        ops.store(out, reg, outs)


def _check(x, weight, eps, residual, mode, weight_offset) -> None:
    check_rms_norm_args(
        x_shape=x.shape, x_dtype=_name(x.dtype), weight_shape=weight.shape, weight_dtype=_name(weight.dtype),
        eps=eps, residual_shape=None if residual is None else residual.shape,
        residual_dtype=None if residual is None else _name(residual.dtype), mode=mode, weight_offset=weight_offset)
    if x.ndim != 2:
        raise ValueError(f"x: the Mosaic kernel takes (rows, n) arrays; got shape {x.shape}")
    if x.shape[1] > MAX_N:
        raise NotImplementedError(f"x: rows of at most {MAX_N} columns in this stage; got {x.shape[1]}")


@functools.lru_cache(maxsize=None)
def _kernel(rows: int, n: int, dtype: str, res_dtype: Optional[str], eps: float, weight_offset: float,
            llama: bool, interpret=None, semantics: str = SEMANTICS):
    """The plgpu.kernel for one shape and set of arguments: grid of one program per row.

    interpret: Mosaic GPU's interpret params, for a probe (jax 0.10.2's interpreter has no rule for
    inline_mgpu); semantics: "Warpgroup" or "Lane".
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lay = row_layout(n, NUMPY_DTYPES[dtype].itemsize)
    has_res = res_dtype is not None
    out_type = [jax.ShapeDtypeStruct((rows, n), jnp.dtype(dtype))]
    if has_res:
        out_type.append(jax.ShapeDtypeStruct((rows, n), jnp.dtype(res_dtype)))

    def body(*refs):
        if has_res:
            x_ref, w_ref, r_ref, out_ref, new_r_ref, smem = refs
        else:
            (x_ref, w_ref, out_ref, smem), r_ref, new_r_ref = refs, None, None
        row = lax.axis_index("rows")
        # The row's refs are sliced here (memrefs with the row's offset); the weight is whole.
        args = [x_ref.at[row], w_ref, out_ref.at[row], smem]
        if has_res:
            args += [r_ref.at[row], new_r_ref.at[row]]

        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(args), return_type=None)
        def emit(ctx, x, w, out, sm, *rest):
            res, new_res = rest if has_res else (None, None)
            normalize_row(MosaicOps(lay, sm), lay, x, w, res, out, new_res, dtype=dtype, res_dtype=res_dtype,
                          eps=eps, weight_offset=weight_offset, llama=llama)

        emit(*args)

    # Shared memory: one float32 per warp and register (the tree's levels above a warp).
    params = plgpu.CompilerParams(lowering_semantics=getattr(plgpu.LoweringSemantics, semantics))
    return plgpu.kernel(body, out_type=out_type, grid=(rows,), grid_names=("rows",), compiler_params=params,
                        scratch_types=[plgpu.SMEM((WARPS * lay.regs,), jnp.float32)], interpret=interpret)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6, residual: Optional[jax.Array] = None, *,
             mode: str = "llama", weight_offset: float = 0.0, semantics: str = SEMANTICS
             ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """The contract's forward on a (rows, n) x through the Mosaic GPU kernel: out, or (out, new_residual).

    semantics: Mosaic GPU's lowering semantics ("Warpgroup" or "Lane"), the same kernel either way.

    Needs a Hopper GPU to run; on a CPU it can only be lowered
    (jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))). Unlike bi_jax.rms_norm the
    outputs do not alias the inputs.
    """
    _check(x, weight, eps, residual, mode, weight_offset)
    rows, n = x.shape
    res_dtype = None if residual is None else _name(residual.dtype)
    if rows == 0:
        out = jnp.empty(x.shape, x.dtype)
        return out if residual is None else (out, jnp.empty(residual.shape, residual.dtype))
    kernel = _kernel(rows, n, _name(x.dtype), res_dtype, as_float32(eps), as_float32(weight_offset),
                     mode == "llama", semantics=semantics)
    results = kernel(x, weight, *(() if residual is None else (residual,)))
    return results[0] if residual is None else tuple(results)


def rms_norm_emulated(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
                      *, mode: str = "llama", weight_offset: float = 0.0
                      ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """normalize_row on numpy (NumpyOps), all rows at once: the schedule the GPU runs, not its bits.

    Takes numpy arrays (bfloat16 as ml_dtypes.bfloat16), returns what the kernel would write.
    """
    _check(x, weight, eps, residual, mode, weight_offset)
    rows, n = x.shape
    dtype, res_dtype = x.dtype.name, None if residual is None else residual.dtype.name
    lay = row_layout(n, x.dtype.itemsize)
    out = np.zeros_like(x)
    new_res = None if residual is None else np.zeros_like(residual)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        normalize_row(NumpyOps(lay, rows), lay, x, weight, residual, out, new_res, dtype=dtype, res_dtype=res_dtype,
                      eps=as_float32(eps), weight_offset=as_float32(weight_offset), llama=mode == "llama")
    return out if residual is None else (out, new_res)


def mosaic_modules(lowered) -> List[str]:
    """The Mosaic GPU modules of a lowered computation as MLIR text, for inspection without a GPU.

    Each kernel is a custom call whose backend config holds its module as MLIR bytecode (op names
    prefixed "stable_mosaic_gpu."); this parses them back with jax's MLIR context (jax internals).
    """
    from jax._src.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir

    texts = []

    def walk(op) -> None:
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.name == "stablehlo.custom_call" and "mhlo.backend_config" in o.attributes:
                        ctx = jax_mlir.make_ir_context()
                        ctx.allow_unregistered_dialects = True
                        with ctx:
                            data = ir.StringAttr(o.attributes["mhlo.backend_config"]["module"]).value_bytes
                            texts.append(str(ir.Module.parse(data)))
                    walk(o)

    walk(lowered.compiler_ir("stablehlo").operation)
    return texts


__all__ = ["MAX_N", "SEMANTICS", "effective_weight", "inverse_rms", "mosaic_modules", "normalize_row", "rms_norm",
           "rms_norm_emulated"]
