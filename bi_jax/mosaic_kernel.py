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
masks and steps against bridge.numerics.reference bit for bit. With an FP8 output (stage 3,
a pallas_fp8.Quant) step 6 stops at u and bi_jax/mosaic_fp8.py's quantize_row writes the codes.
"""

from __future__ import annotations

import functools
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bridge.numerics.contract import as_float32, check_fp8_args, check_rms_norm_args
from bridge.numerics.reference_fp8 import fp8_numpy_dtype

from . import mosaic_call
from .mosaic_fp8 import MosaicFp8Ops, NumpyFp8Ops, quantize_row
from .mosaic_ops import NUMPY_DTYPES, WARPS, RowLayout, row_layout, row_tree
from .pallas_fp8 import NO_QUANT, Quant

# Every thread keeps its whole share of the row in registers (n / 128 floats, plus the weight's):
# past this the row needs chunks (a later stage), as the Pallas-Triton kernel's num_chunks > 1.
MAX_N = 32768
# Floats per thread up to which a row is short (step6_values): its loads are issued together, the
# row's and the residual's before the first store, the weight's before the reduction.
SHORT_ROW = 64
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
                  eps: float, weight_offset: float, llama: bool, quant: Quant = NO_QUANT, scale=None,
                  scales=None) -> None:
    """NUMERICS.md steps 1-6 for one row (per thread of its warpgroup): refs in, refs out.

    x, out: the row; w: the weight; res, new_res: the residual row and the new one, or None.
    With an FP8 quant, out takes the codes (uint8), and scale (static) or scales (the row's group
    scales) are refs as mosaic_fp8.quantize_row takes them.
    """
    us = step6_values(ops, lay, x, w, res, new_res, dtype=dtype, res_dtype=res_dtype, eps=eps,
                      weight_offset=weight_offset, llama=llama)
    if quant.kind != "none":
        quantize_row(ops, lay, us, out, scale, scales, quant)
        return
    for reg, u in us:
        ops.store(out, reg, [ops.encode(a, dtype) for a in u])


def step6_values(ops, lay: RowLayout, x, w, res, new_res, *, dtype: str, res_dtype: Optional[str], eps: float,
                 weight_offset: float, llama: bool) -> Iterator[Tuple[int, List]]:
    """Steps 1-5 and step 6 up to its final rnD (Q1's u): (reg, u values) per register, in order."""
    # 1. z = rnR(x + residual), stored as the new residual; v = f32(z).
    # A store may alias a later load (the new residual may be written over the residual), so no
    # compiler moves a load above one. A short row issues all its loads (x, the residual, the
    # weight) before the first store rather than waiting on memory once per register, and the
    # weight's latency hides behind the tree; a long one keeps fewer values live (fewer spills),
    # and loads the weight after the tree, when the row's floats no longer need their registers.
    short = lay.regs * lay.vec <= SHORT_ROW

    def row_loads(reg: int):
        return ops.load(x, reg), None if res is None else ops.load(res, reg)

    loaded = [row_loads(reg) for reg in range(lay.regs)] if short else None
    ws = [ops.load(w, reg) for reg in range(lay.regs)] if short else None
    v = []
    for reg in range(lay.regs):
        x_elems, res_elems = loaded[reg] if short else row_loads(reg)
        xs = [ops.widen(e, dtype) for e in x_elems]
        if res is not None:
            rs = [ops.widen(e, res_dtype) for e in res_elems]
            zs = [ops.encode(ops.add(a, b), res_dtype) for a, b in zip(xs, rs)]
            ops.store(new_res, reg, zs)
            xs = [ops.widen(z, res_dtype) for z in zs]
        v.append(xs)
    inv = inverse_rms(ops, lay, v, eps)
    for reg in range(lay.regs):
        us = []
        for a, e in zip(v[reg], ws[reg] if short else ops.load(w, reg)):
            wf = effective_weight(ops, e, dtype, weight_offset)
            # 6. llama: y = rnD(v * inv), u = f32(y) * w; fp32: u = (v * inv) * w; out = rnD(u).
            y = ops.mul(a, inv)
            if llama and dtype != "float32":  # rnD to float32 changes only NaN bits, which are never stored
                y = ops.round_to(y, dtype)
            us.append(ops.mul(y, wf))
        yield reg, us


def _check(x, weight, eps, residual, mode, weight_offset, quant: Quant = NO_QUANT, scale=None) -> None:
    check_rms_norm_args(
        x_shape=x.shape, x_dtype=_name(x.dtype), weight_shape=weight.shape, weight_dtype=_name(weight.dtype),
        eps=eps, residual_shape=None if residual is None else residual.shape,
        residual_dtype=None if residual is None else _name(residual.dtype), mode=mode, weight_offset=weight_offset)
    if x.ndim != 2:
        raise ValueError(f"x: the Mosaic kernel takes (rows, n) arrays; got shape {x.shape}")
    if x.shape[1] > MAX_N:
        raise NotImplementedError(f"x: rows of at most {MAX_N} columns in this stage; got {x.shape[1]}")
    if quant.kind != "none":
        # Its value is not read: the kernels follow Q2-Q4 for whatever the scale holds.
        check_fp8_args(n=x.shape[1], out_dtype=quant.fmt_name, x_dtype=_name(x.dtype),
                       scale_shape=None if scale is None else tuple(scale.shape),
                       scale_dtype=None if scale is None else _name(scale.dtype),
                       group_size=quant.group if quant.kind == "group" else None)


def _outputs(rows: int, n: int, dtype: str, res_dtype: Optional[str], quant: Quant) -> List[Tuple[tuple, str]]:
    """(shape, dtype) of each output, in order: out (FP8 as its uint8 codes), the group scales, the new residual."""
    outputs = [((rows, n), dtype if quant.kind == "none" else "uint8")]
    if quant.kind == "group":
        outputs.append(((rows, n // quant.group), "float32"))
    if res_dtype is not None:
        outputs.append(((rows, n), res_dtype))
    return outputs


def _results(results: Sequence, quant: Quant):
    """The kernel's outputs as rms_norm returns them: FP8 codes viewed as the format, one output alone."""
    results = list(results)
    if quant.kind != "none":
        results[0] = (results[0].view(fp8_numpy_dtype(quant.fmt_name)) if isinstance(results[0], np.ndarray)
                      else lax.bitcast_convert_type(results[0], jnp.dtype(quant.fmt_name)))
    return results[0] if len(results) == 1 else tuple(results)


@functools.lru_cache(maxsize=None)
def _kernel(rows: int, n: int, dtype: str, res_dtype: Optional[str], eps: float, weight_offset: float,
            llama: bool, semantics: str = SEMANTICS, quant: Quant = NO_QUANT):
    """The kernel for one shape and set of arguments: grid of one program per row.

    semantics: "Warpgroup" or "Lane"; quant: the FP8 output, if any.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lay = row_layout(n, NUMPY_DTYPES[dtype].itemsize)
    out_type = [jax.ShapeDtypeStruct(shape, jnp.dtype(dt)) for shape, dt in _outputs(rows, n, dtype, res_dtype, quant)]
    ins = ["x", "w"] + ["res"] * (res_dtype is not None) + ["scale"] * (quant.kind == "static")
    outs = ["out"] + ["scales"] * (quant.kind == "group") + ["new_res"] * (res_dtype is not None)

    def body(*refs):
        row = lax.axis_index("rows")
        # The row's refs are sliced here (memrefs with the row's offset); the weight and scale are whole.
        args = [ref if name in ("w", "scale") else ref.at[row] for name, ref in zip(ins + outs, refs)] + [refs[-1]]

        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(args), return_type=None)
        def emit(ctx, *mems):
            m = dict(zip(ins + outs, mems))
            normalize_row(MosaicFp8Ops(lay, mems[-1]), lay, m["x"], m["w"], m.get("res"), m["out"], m.get("new_res"),
                          dtype=dtype, res_dtype=res_dtype, eps=eps, weight_offset=weight_offset, llama=llama,
                          quant=quant, scale=m.get("scale"), scales=m.get("scales"))

        emit(*args)

    # The Pallas-Triton forward's aliases (bi_jax.ops), safe here too: every stored element is
    # computed from the element loaded at its address, a data dependency no compiler reorders.
    aliases = {ins.index("res"): outs.index("new_res")} if res_dtype is not None else {}
    if res_dtype is not None and quant.kind == "none":
        aliases[ins.index("x")] = outs.index("out")
    params = plgpu.CompilerParams(lowering_semantics=getattr(plgpu.LoweringSemantics, semantics))
    # Shared memory: one float32 per warp and register (the tree's levels above a warp).
    return mosaic_call.kernel(body, out_type, aliases=aliases, grid=(rows,), grid_names=("rows",),
                              scratch_types=[plgpu.SMEM((WARPS * lay.regs,), jnp.float32)], compiler_params=params,
                              name="bi_norm_rms_norm")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6, residual: Optional[jax.Array] = None, *,
             mode: str = "llama", weight_offset: float = 0.0, semantics: str = SEMANTICS, quant: Quant = NO_QUANT,
             scale: Optional[jax.Array] = None) -> Union[jax.Array, Tuple[jax.Array, ...]]:
    """The contract's forward on a (rows, n) x through the Mosaic GPU kernel: out, [scales,] [new_residual].

    semantics: Mosaic GPU's lowering semantics ("Warpgroup" or "Lane"), the same kernel either way.
    quant: an FP8 output (pallas_fp8.Quant.fp8), with scale a (1,) float32 array for kind "static";
    out is then FP8, and kind "group" returns the (rows, n / group) float32 scales after it.

    Needs a Hopper GPU to run; on a CPU it can only be lowered
    (jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))). With a residual, out and the
    new residual are written over x and the residual, as bi_jax.rms_norm's Pallas-Triton kernel does.
    """
    _check(x, weight, eps, residual, mode, weight_offset, quant, scale)
    rows, n = x.shape
    res_dtype = None if residual is None else _name(residual.dtype)
    if rows == 0:
        return _results([jnp.empty(shape, dt) for shape, dt in _outputs(rows, n, _name(x.dtype), res_dtype, quant)],
                        quant)
    kernel = _kernel(rows, n, _name(x.dtype), res_dtype, as_float32(eps), as_float32(weight_offset),
                     mode == "llama", semantics=semantics, quant=quant)
    inputs = [x, weight] + ([] if residual is None else [residual])
    inputs += [] if scale is None else [jnp.reshape(scale, (1,))]
    return _results(kernel(*inputs), quant)


def rms_norm_emulated(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6, residual: Optional[np.ndarray] = None,
                      *, mode: str = "llama", weight_offset: float = 0.0, quant: Quant = NO_QUANT,
                      scale: Optional[np.ndarray] = None) -> Union[np.ndarray, Tuple[np.ndarray, ...]]:
    """normalize_row on numpy (mosaic_fp8.NumpyFp8Ops), all rows at once: the schedule the GPU runs,
    not its bits (but for the FP8 conversion and quotient, see mosaic_fp8).

    Takes numpy arrays (bfloat16 as ml_dtypes.bfloat16), returns what the kernel would write.
    """
    _check(x, weight, eps, residual, mode, weight_offset, quant, scale)
    rows, n = x.shape
    dtype, res_dtype = x.dtype.name, None if residual is None else residual.dtype.name
    lay = row_layout(n, x.dtype.itemsize)
    outputs = [np.zeros(shape, NUMPY_DTYPES.get(dt, dt)) for shape, dt in _outputs(rows, n, dtype, res_dtype, quant)]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        normalize_row(NumpyFp8Ops(lay, rows), lay, x, weight, residual, outputs[0],
                      outputs[-1] if residual is not None else None, dtype=dtype, res_dtype=res_dtype,
                      eps=as_float32(eps), weight_offset=as_float32(weight_offset), llama=mode == "llama",
                      quant=quant, scale=scale, scales=outputs[1] if quant.kind == "group" else None)
    return _results(outputs, quant)


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
