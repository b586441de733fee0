"""JAX's deprecation warnings for Pallas-Triton and for pallas_call on Mosaic GPU, kept out of
bi_jax's calls (and only those).

JAX 0.11 deprecated the Pallas-Triton backend: `pallas_call`'s GPU lowering rule warns, with
`deprecations.warn("jax-pallas-triton", "The Pallas Triton backend is deprecated and will be
removed in a future JAX version. ...")` (jax/_src/pallas/pallas_call.py, 0.11.0 and later), a
DeprecationWarning raised whenever a Pallas-Triton call is lowered. jax 0.10 does not raise it.

JAX 0.10.2 and later warn the same way for `pallas_call` with Mosaic GPU's compiler params
("jax-pallas-call-mgpu", "Using ``pl.pallas_call`` for Mosaic GPU kernels is deprecated ..."),
which bi_jax.mosaic_call uses for its input_output_aliases (plgpu.kernel takes none).

Both are raised at lowering, not where bi_jax builds the call: under a user's jax.jit the lowering
runs after bi_jax.rms_norm has returned, outside any filter bi_jax could put around its own code.
So bi_jax's Pallas calls go through `quiet_call`: a primitive whose lowering (and eager
evaluation) lowers the calls under a filter that ignores exactly those two messages, and nothing
else. A process-wide filter would also hide them from the user's own Pallas kernels.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterator

import jax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import mlir

# The start of JAX's messages (regexes, matched at the message's start by the warnings module):
# Pallas-Triton's, and pallas_call's for Mosaic GPU kernels (bi_jax.mosaic_call).
TRITON_DEPRECATION = re.escape("The Pallas Triton backend is deprecated")
MOSAIC_CALL_DEPRECATION = re.escape("Using ``pl.pallas_call`` for Mosaic GPU kernels is deprecated")


@contextlib.contextmanager
def no_pallas_deprecation() -> Iterator[None]:
    """Ignore the two DeprecationWarnings inside the block (warnings.catch_warnings:
    the filter list is restored on exit, as that context manager does)."""
    with warnings.catch_warnings():
        for message in (TRITON_DEPRECATION, MOSAIC_CALL_DEPRECATION):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield


# Holds a traced function's jaxpr; lowering it lowers the jaxpr's own equations, so the compiled
# program is the same as without the wrapper.
_quiet_p = Primitive("bi_norm_quiet_lowering")
_quiet_p.multiple_results = True
_quiet_p.def_effectful_abstract_eval(lambda *avals, jaxpr: (jaxpr.out_avals, jaxpr.effects))


def _impl(*args, jaxpr):
    # Eager evaluation (under jax.disable_jit) compiles each equation right here.
    with no_pallas_deprecation():
        return jaxpr_as_fun(jaxpr)(*args)


def _lowering(ctx, *args, jaxpr):
    with no_pallas_deprecation():
        return mlir.lower_fun(jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *args)


_quiet_p.def_impl(_impl)
mlir.register_lowering(_quiet_p, _lowering)


def quiet_call(fn: Callable, *args):
    """fn(*args), with the two deprecation warnings ignored wherever its calls are lowered.

    args and fn's results are pytrees of arrays (None for an absent one). fn is traced once, here;
    the primitive has no differentiation or batching rule: bi_jax calls it inside its own
    custom_vjp and custom_vmap wrappers, which never hand it a JVP or batch tracer.
    """
    flat, in_tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(in_tree, leaves)),
                                       return_shape=True)(*flat)
    results = _quiet_p.bind(*flat, jaxpr=closed)
    return jax.tree.unflatten(jax.tree.structure(out_shape), results)
