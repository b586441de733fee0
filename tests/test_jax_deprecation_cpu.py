"""JAX's Pallas-Triton DeprecationWarning kept out of bi_jax's calls (bi_jax/deprecation.py), on the CPU.

jax 0.10.2 (this machine) does not raise it. JAX 0.11.0 raises it in pallas_call's GPU lowering
(jax/_src/pallas/pallas_call.py, `deprecations.warn("jax-pallas-triton", ...)`), on the path taken
when no lowering rule is registered for the call's compiler params; here the Pallas-Triton lowering
rule is patched to raise JAX's message first, so that a lowering for CUDA meets it wherever a
later jax puts it. Every test runs with warnings as errors.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.extend.core import Primitive
from jax.interpreters import mlir

import bi_jax
from bi_jax import ops
from bi_jax.deprecation import TRITON_DEPRECATION, quiet_call

# JAX 0.11.0's message, word for word (jax/_src/pallas/pallas_call.py).
JAX_MESSAGE = ("The Pallas Triton backend is deprecated and will be removed in a future JAX version. To keep "
               "using Pallas on GPU, please migrate to the Mosaic GPU backend. To keep using Triton, switch to "
               "the official Triton bindings and jax_triton.")


@pytest.fixture(autouse=True)
def errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_the_filter_matches_jax_message_only():
    assert re.match(TRITON_DEPRECATION, JAX_MESSAGE)
    assert not re.match(TRITON_DEPRECATION, "Using ``pl.pallas_call`` for Mosaic GPU kernels is deprecated.")


# A primitive whose lowering warns as JAX's Pallas-Triton lowering does (or with another message).
_warns_p = Primitive("warns_at_lowering")
_warns_p.def_abstract_eval(lambda a, message: a)
_warns_p.def_impl(lambda a, message: a)


def _warning_lowering(ctx, a, message):
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    return [a]


mlir.register_lowering(_warns_p, _warning_lowering)


def _warns(a, message=JAX_MESSAGE):
    return _warns_p.bind(a, message=message)


def test_quiet_call_hides_the_warning_at_lowering_under_jit():
    x = jnp.arange(3.0)
    got = jax.jit(lambda a: quiet_call(lambda b: (_warns(b) * 2, None), a))(x)
    assert got[1] is None and (got[0] == x * 2).all()
    with pytest.raises(DeprecationWarning, match="The Pallas Triton backend is deprecated"):
        jax.jit(lambda a: _warns(a) * 3)(x)  # the same lowering outside quiet_call warns


def test_quiet_call_hides_nothing_else():
    with pytest.raises(DeprecationWarning, match="something else"):
        jax.jit(lambda a: quiet_call(lambda b: _warns(b, "something else is deprecated"), a))(jnp.arange(4.0))


def test_quiet_call_evaluates_eagerly():
    with jax.disable_jit():
        got = quiet_call(lambda b: _warns(b) + 1, jnp.arange(5.0))
    assert (got == jnp.arange(5.0) + 1).all()


@pytest.fixture
def warning_triton_lowering(monkeypatch):
    """jax's Pallas-Triton lowering rule raising JAX's message first, as 0.11 does on its fallback path."""
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import pallas_call_registration as registration

    original = registration.pallas_call_lowering

    def rule(*args, **kwargs):
        warnings.warn(JAX_MESSAGE, DeprecationWarning, stacklevel=2)
        return original(*args, **kwargs)

    monkeypatch.setattr(registration, "pallas_call_lowering", rule)
    monkeypatch.setitem(pallas_core._backend_lowering_rules, pltriton.CompilerParams, (rule, "gpu"))
    monkeypatch.setattr(ops, "device_kind", lambda: "NVIDIA H100 80GB HBM3")  # the launch rule's GPU
    jax.clear_caches()  # a cached lowering would not lower again
    yield
    jax.clear_caches()


def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_a_bare_pallas_triton_call_warns(warning_triton_lowering):
    """The control: the patched rule is what a lowering for CUDA runs."""
    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    call = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                          compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1))
    with pytest.raises(DeprecationWarning, match="The Pallas Triton backend is deprecated"):
        _lower_for_cuda(call, jnp.zeros(16, jnp.float32))


@pytest.mark.parametrize("n", [256, 20480])  # 20480: the backward's column tree too (16 row blocks)
def test_bi_jax_forward_and_backward_lower_without_it(warning_triton_lowering, n):
    x, w, r = jnp.zeros((64, n), jnp.bfloat16), jnp.ones(n, jnp.bfloat16), jnp.zeros((64, n), jnp.float32)

    def loss(a, b, c):
        out, new_r = bi_jax.rms_norm(a, b, 1e-6, c, interpret=False, pallas_backend="triton")
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(new_r)

    _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), x, w, r)
    _lower_for_cuda(lambda a, b: bi_jax.rms_norm(a, b, out_dtype=jnp.float8_e4m3fn, group_size=128,
                                                 interpret=False, pallas_backend="triton"), x, w)


def test_bi_jax_on_this_cpu_warns_nothing():
    x, w = jnp.ones((3, 2, 64), jnp.float32), jnp.ones(64, jnp.float32)
    bi_jax.rms_norm(x, w)
    jax.jit(lambda a, b: bi_jax.rms_norm(a, b, mode="fp32"))(x, w)
    jax.grad(lambda a: jnp.sum(bi_jax.rms_norm(a, w, weight_offset=1.0)))(x)
