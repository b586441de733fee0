"""A Mosaic GPU kernel call whose chosen outputs are written over inputs, as pallas_call's
input_output_aliases do for the Pallas-Triton kernels.

plgpu.kernel takes no aliases. pl.kernel aliases the jax Refs it is passed, but inside lax.scan
those calls gave wrong gradients on the H100 (jax 0.11.2; tests/test_jax_layer_stack.py), so this
uses pl.pallas_call with Mosaic GPU's CompilerParams, GMEM operands and input_output_aliases: the
same kernel module as plgpu.kernel's (byte for byte, but for its name), with XLA passing an
aliased pair the same buffer. JAX 0.11 deprecates pallas_call for Mosaic GPU
("jax-pallas-call-mgpu"); bi_jax.deprecation keeps that warning out of bi_jax's own calls.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import jax

from .deprecation import quiet_call


def kernel(body: Callable, out_type: Sequence[jax.ShapeDtypeStruct], *, aliases: Dict[int, int], grid: tuple,
           scratch_types: Sequence, compiler_params, name: str) -> Callable:
    """body(*input_refs, *output_refs, *scratch_refs), one program per grid point (pl.program_id);
    aliases {input index: output index}, as pallas_call's."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    # jax 0.11.2's pallas_call looks the Mosaic GPU rule up by CompilerParams type and asserts it is
    # there; only this module registers it, and plgpu.kernel's path no longer imports it.
    from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401

    gmem = pl.BlockSpec(memory_space=plgpu.GMEM)

    def call(*operands):
        fn = pl.pallas_call(body, out_shape=list(out_type), grid=grid, in_specs=[gmem] * len(operands),
                            out_specs=[gmem] * len(out_type), input_output_aliases=aliases,
                            compiler_params=compiler_params, scratch_shapes=list(scratch_types), name=name)
        return quiet_call(fn, *operands)

    return call
