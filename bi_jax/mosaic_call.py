"""A Mosaic GPU kernel call whose chosen outputs are written over inputs, as pallas_call's
input_output_aliases do for the Pallas-Triton kernels.

plgpu.kernel takes no aliases, so XLA copied the Mosaic kernels' new buffers into a scan's carry
(README, "Which Pallas backend"). Two public routes failed on the H100 (jax 0.11.2): pl.kernel
with jax.new_ref operands aliases them, but inside lax.scan gave wrong gradients
(tests/test_jax_layer_stack.py); pl.pallas_call no longer lowers Mosaic GPU kernels at all
(its GPU rule asserts the Triton one). So this builds what plgpu.kernel builds (a Mesh, the
scratch in run_scoped, the mpmd_map primitive it lowers through) and hands the primitive the
aliases plgpu.kernel leaves empty: the same kernel module, with XLA passing an aliased pair one
buffer. mpmd_map's binder is private (jax._src.pallas.mpmd._mpmd_map), as is the switch
plgpu.kernel sets around it (jax._src.config._check_vma); bi_jax.selection checks both are there.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence

import jax


def kernel(body: Callable, out_type: Sequence[jax.ShapeDtypeStruct], *, aliases: Dict[int, int], grid: tuple,
           grid_names: tuple, scratch_types: Sequence, compiler_params, name: str, num_threads: Optional[int] = None,
           thread_name: Optional[str] = None, interpret: Any = False) -> Callable:
    """plgpu.kernel's call with aliases {input index: output index}, as pallas_call's:
    body(*input_refs, *output_refs, *scratch_refs), one program per grid point (lax.axis_index).
    interpret: Mosaic GPU's interpreter params, as plgpu.kernel's (a CPU test of the call's
    transformations; the interpreter has no rule for inline_mgpu, so not for bi_jax's bodies)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax._src import config
    from jax._src.pallas.mpmd import _mpmd_map

    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=num_threads, thread_name=thread_name)

    def kernel_body(*refs):  # scratch through run_scoped, as plgpu.kernel: mpmd_map's GPU lowering takes none
        pl.run_scoped(functools.partial(body, *refs), *scratch_types,
                      collective_axes=thread_name if thread_name is not None else ())

    def run(*operands):
        # XLA's dynamic-slice fusion moves a typed-FFI custom call whose operand is a dynamic slice or
        # whose result feeds a dynamic-update-slice (a scan's stacked weights, the residuals it saves
        # for the backward) into a fusion of its own; on jax 0.11.2 it also kept the original call,
        # so the kernel ran twice and its in-place operands were copied (H200: 3 copies in the
        # layer-loop gradient test). Barriers on both sides keep the slices apart from the call.
        operands = jax.lax.optimization_barrier(operands)
        # As plgpu.kernel: the outputs' varying mesh axes are not declared, which jax.shard_map's
        # check_vma would otherwise refuse when the call's output types are read.
        with config._check_vma(False):
            outs = _mpmd_map([(mesh, kernel_body)], tuple(out_type), input_output_aliases=aliases,
                             compiler_params=compiler_params, name=name, interpret=interpret)(*operands)
        return jax.lax.optimization_barrier(outs)

    return run
