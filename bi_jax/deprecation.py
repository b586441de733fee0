"""JAX's deprecation warning for Pallas-Triton, kept out of bi_jax's calls (and only those).

JAX 0.11 deprecated the Pallas-Triton backend: `pallas_call`'s GPU lowering rule warns, with
`deprecations.warn("jax-pallas-triton", "The Pallas Triton backend is deprecated and will be
removed in a future JAX version. ...")` (jax/_src/pallas/pallas_call.py, 0.11.0 and later), a
DeprecationWarning raised whenever a Pallas-Triton call is lowered. jax 0.10 does not raise it.

It is raised at lowering, not where bi_jax builds the call: under a user's jax.jit the lowering
runs after bi_jax.rms_norm has returned, outside any filter bi_jax could put around its own code.
So bi_jax's Pallas-Triton calls go through `quiet_call`: a primitive whose lowering (and eager
evaluation) lowers the calls under a filter that ignores exactly that message, and nothing else.
A process-wide filter would also hide the warning from the user's own Pallas-Triton kernels.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterator

import jax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import mlir

# The start of JAX's message (a regex, matched at the message's start by the warnings module).
TRITON_DEPRECATION = re.escape("The Pallas Triton backend is deprecated")


@contextlib.contextmanager
def no_triton_deprecation() -> Iterator[None]:
    """Ignore JAX's Pallas-Triton DeprecationWarning inside the block (warnings.catch_warnings:
    the filter list is restored on exit, as that context manager does)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
        yield


# Holds a traced function's jaxpr; lowering it lowers the jaxpr's own equations, so the compiled
# program is the same as without the wrapper.
_quiet_p = Primitive("bi_norm_quiet_lowering")
_quiet_p.multiple_results = True
_quiet_p.def_effectful_abstract_eval(lambda *avals, jaxpr: (jaxpr.out_avals, jaxpr.effects))


def _impl(*args, jaxpr):
    # Eager evaluation (under jax.disable_jit) compiles each equation right here.
    with no_triton_deprecation():
        return jaxpr_as_fun(jaxpr)(*args)


def _lowering(ctx, *args, jaxpr):
    with no_triton_deprecation():
        return mlir.lower_fun(jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *args)


_quiet_p.def_impl(_impl)
mlir.register_lowering(_quiet_p, _lowering)


def quiet_call(fn: Callable, *args):
    """fn(*args), with JAX's Pallas-Triton deprecation warning ignored wherever its calls are lowered.

    args and fn's results are pytrees of arrays (None for an absent one). fn is traced once, here;
    the primitive has no differentiation or batching rule: bi_jax calls it inside its own
    custom_vjp and custom_vmap wrappers, which never hand it a JVP or batch tracer.
    """
    flat, in_tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(in_tree, leaves)),
                                       return_shape=True)(*flat)
    results = _quiet_p.bind(*flat, jaxpr=closed)
    return jax.tree.unflatten(jax.tree.structure(out_shape), results)
