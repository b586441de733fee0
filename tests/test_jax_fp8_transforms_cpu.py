"""bi_jax's FP8 output (contract v1.2) under JAX's transformations, on the CPU, bit for bit.

jax.jit (with a traced scale) vs eager, jax.vmap (an unbatched scale folds the batch into the
rows; a batched one maps it), rows sharded over the 4 host devices (tests/conftest.py) without
a collective, and the split into row pieces above MAX_ELEMENTS (patched down); each against
bridge.reference. The rest of the FP8 tests: test_jax_fp8_cpu.py.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jax_fp8_helpers import FP8_JIT, QUANTS, assert_fp8_result, call, expected, fp8_rows, fp8_weight, quant_kwargs
from jax_helpers import _seed

import bi_jax
from bi_jax import ops

# --------------------------------------------------------------------------------------------
# jax.jit, jax.vmap, sharded rows and the split above MAX_ELEMENTS keep the bits.
# --------------------------------------------------------------------------------------------

def _small_inputs(tag: str, lead=(3, 4), n: int = 128, kind: str = "float32"):
    rng = np.random.default_rng(_seed("fp8-small", tag))
    x = fp8_rows(rng, lead + (n,), "bfloat16")
    r = None if kind == "none" else fp8_rows(rng, lead + (n,), "float32", specials=False)
    return x, fp8_weight(rng, n, "bfloat16"), r


@pytest.mark.parametrize("quant", QUANTS)
def test_jit_matches_eager(quant):
    x, w, r = _small_inputs("jit")
    kwargs = quant_kwargs(quant, np.float32(0.02))
    eager = call(bi_jax.rms_norm, x, w, r, **kwargs)
    assert_fp8_result(expected(x, w, r, **kwargs), eager, "eager vs reference")
    assert_fp8_result(eager, call(FP8_JIT, x, w, r, **kwargs), "jit vs eager")
    if quant == "static":  # the scale traced: a jit argument, shape () or (1,)
        f = jax.jit(lambda a, b, c, s: bi_jax.rms_norm(a, b, 1e-6, c, out_dtype=jnp.float8_e4m3fn, scale=s))
        for s in (np.float32(0.02), np.full((1,), 0.02, np.float32)):
            got = f(jnp.asarray(x), jnp.asarray(w), jnp.asarray(r), jnp.asarray(s))
            assert_fp8_result(eager, got, f"traced scale of shape {s.shape}")


@pytest.mark.parametrize("quant", QUANTS)
def test_vmap(quant):
    x, w, r = _small_inputs("vmap")
    kwargs = quant_kwargs(quant, np.float32(0.02))
    jw = jnp.asarray(w)
    f = jax.vmap(lambda a, b: bi_jax.rms_norm(a, jw, 1e-6, b, **kwargs), in_axes=(1, 1), out_axes=1)
    got = f(jnp.asarray(x), jnp.asarray(r))
    assert_fp8_result(expected(x, w, r, **kwargs), got, "vmap over axis 1 vs reference")


def test_vmap_with_a_batched_scale():
    """Per-example static scales: the batch is mapped, each element's bits those of its own call."""
    x, w, r = _small_inputs("vmap-scale", kind="none")
    scales = np.array([0.02, 1.5, 2.0**-20], np.float32)
    got = jax.vmap(lambda a, s: bi_jax.rms_norm(a, jnp.asarray(w), out_dtype=jnp.float8_e4m3fn, scale=s))(
        jnp.asarray(x), jnp.asarray(scales))
    for i, s in enumerate(scales):
        assert_fp8_result(expected(x[i], w, None, out_dtype=jnp.float8_e4m3fn, scale=s), (got[i],), f"scale {s}")


@pytest.mark.parametrize("quant", ["static", "group64"])
def test_sharded_rows(mesh, quant):
    x, w, r = _small_inputs("sharded", lead=(8,))
    rows = NamedSharding(mesh, PartitionSpec("b", None))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.device_put(x, rows), jax.device_put(w, replicated), jax.device_put(r, rows)]
    kwargs = quant_kwargs(quant, None)
    if quant == "static":
        args.append(jax.device_put(np.float32(0.02), replicated))
        f = jax.jit(lambda a, b, c, s: bi_jax.rms_norm(a, b, 1e-6, c, out_dtype=jnp.float8_e4m3fn, scale=s))
        kwargs = quant_kwargs(quant, np.float32(0.02))
    else:
        f = jax.jit(lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c, **kwargs))
    got = f(*args)
    assert_fp8_result(expected(x, w, r, **kwargs), got, "sharded vs reference")
    for out in got:
        assert out.sharding.is_equivalent_to(rows, out.ndim), out.sharding
        assert {s.data.shape[0] for s in out.addressable_shards} == {2}
    hlo = f.lower(*args).compile().as_text()
    assert not [c for c in ("all-gather", "all-to-all", "all-reduce", "collective-permute") if c in hlo]


@pytest.mark.parametrize("quant", ["static", "group64"])
def test_split_above_max_elements(monkeypatch, quant):
    """MAX_ELEMENTS patched to 1000: 11 rows of 128 are pieces of 4 rows (the last one short)."""
    monkeypatch.setattr(ops, "MAX_ELEMENTS", 1000)
    x, w, r = _small_inputs("split", lead=(11,))
    kwargs = quant_kwargs(quant, np.float32(0.02))
    got = call(bi_jax.rms_norm, x, w, r, **kwargs)
    assert_fp8_result(expected(x, w, r, **kwargs), got, "split vs reference")
    jaxpr = str(jax.make_jaxpr(lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c, **quant_kwargs(quant, 0.02)))(
        jnp.asarray(x), jnp.asarray(w), jnp.asarray(r)))
    assert re.findall(r"name=(\w+)", jaxpr).count("bi_norm_rms_norm") == 3


def test_eager_fp8_call_reuses_its_compiled_kernel(caplog):
    """A second eager call (a new Python float scale: an operand, not a static argument) compiles nothing."""
    x, w = jnp.ones((4, 128), jnp.float32), jnp.ones((128,), jnp.float32)
    jax.block_until_ready(bi_jax.rms_norm(x, w, out_dtype=jnp.float8_e4m3fn, scale=0.5))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        jax.block_until_ready(bi_jax.rms_norm(x, w, out_dtype=jnp.float8_e4m3fn, scale=0.25))
    compiles = [r.getMessage().split(" with ")[0] for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == [], f"the second eager call compiled again: {compiles}"
