"""bi_jax.rms_norm's Mosaic GPU path on the CPU, with the kernel's body emulated on the host.

No CPU runs the Mosaic GPU kernel, so mosaic_kernel._kernel (the kernel for one shape) is
replaced by a jax.pure_callback into mosaic_kernel.rms_norm_emulated: the very body the GPU runs,
on numpy (tests/test_jax_mosaic_cpu.py checks it against the corpus). What this checks is the
wiring around the kernel: that every call shape rms_norm takes (1-D x, leading batch dims, 0 rows,
a residual), jax.jit, jax.vmap, jax.grad, rows sharded over devices and the split above
MAX_ELEMENTS reach it as (rows, n) arrays and come back with the reference's bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jax_backward_helpers import assert_grads
from jax_fp8_helpers import FP8_JIT, QUANTS, assert_fp8_result, call, expected, quant_kwargs
from jax_helpers import N, _seed, assert_pair_bits, pair, random_rows, random_weight, ref

import bi_jax
from bi_jax import mosaic_kernel, ops
from bi_jax.pallas_fp8 import NO_QUANT


def _stand_in(built: list, body: str):
    """A stand-in for mosaic_kernel._kernel: "emulated" (the kernel's body on numpy, through
    jax.pure_callback) or "triton" (the Pallas-Triton body in interpret mode, for the sharded test:
    a host callback inside custom_partitioning's per-shard lowering segfaulted XLA:CPU, jax 0.10.2)."""
    def kernel(rows, n, dtype, res_dtype, eps, weight_offset, llama, interpret=None, semantics=None, quant=NO_QUANT):
        built.append((rows, n))
        mode = "llama" if llama else "fp32"
        if body == "triton":
            assert quant == NO_QUANT, "the sharded test runs no FP8 output"

            def run(x, w, *r):
                got = ops._rows_call(x, w, r[0] if r else None, None, eps=eps, mode=mode, weight_offset=weight_offset,
                                     interpret=True)
                return list(got) if r else [got]

            return run
        # The kernel's own outputs (FP8 as uint8 codes), in its order.
        shapes = [jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
                  for shape, dt in mosaic_kernel._outputs(rows, n, dtype, res_dtype, quant)]

        def host(x, w, *rest):
            r = np.asarray(rest[0]) if res_dtype is not None else None
            scale = np.asarray(rest[-1]) if quant.kind == "static" else None
            got = mosaic_kernel.rms_norm_emulated(np.asarray(x), np.asarray(w), eps, r, mode=mode,
                                                  weight_offset=weight_offset, quant=quant, scale=scale)
            got = list(got) if isinstance(got, tuple) else [got]
            return [np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else a for a in got]

        return lambda *args: jax.pure_callback(host, shapes, *args)

    return kernel


@pytest.fixture
def emulated(monkeypatch):
    """The forward's selection forced to "mosaic", its kernel a stand-in; the (rows, n) of each kernel built."""
    built = []
    monkeypatch.setattr(mosaic_kernel, "_kernel", _stand_in(built, "emulated"))
    monkeypatch.setattr(ops, "forward_kernel", lambda backend, n, interpret: "mosaic")
    _clear()
    yield built
    _clear()  # no trace of a stand-in outlives the test


def _clear() -> None:
    for fn in (ops._rows_fn, ops._differentiable, ops._fp8_fn):
        fn.cache_clear()
    jax.clear_caches()


def _inputs(tag, shape, dtype="bfloat16", residual=None):
    rng = np.random.default_rng(_seed("mosaic-wiring", tag, shape, dtype, residual))
    x, w = random_rows(rng, shape, dtype), random_weight(rng, shape[-1], dtype)
    r = None if residual is None else random_rows(rng, shape, residual)
    return x, w, r


def _call(fn, x, w, r, **kwargs):
    return pair(fn(jnp.asarray(x), jnp.asarray(w), 1e-6, None if r is None else jnp.asarray(r), **kwargs),
                r is not None)


@pytest.mark.parametrize("shape,residual", [((N,), None), ((2, 3, N), "float32"), ((0, N), None),
                                            ((0, N), "bfloat16"), ((5, 1), "bfloat16"), ((4, 1000), None)])
def test_call_shapes_reach_the_kernel_as_rows(emulated, shape, residual):
    x, w, r = _inputs("shapes", shape, residual=residual)
    for mode, offset in (("llama", 0.0), ("fp32", 1.0)):
        got = _call(bi_jax.rms_norm, x, w, r, mode=mode, weight_offset=offset)
        assert_pair_bits(ref(x, w, 1e-6, r, mode, offset), got, f"{shape} {mode}/{offset}")
    rows = int(np.prod(shape[:-1]))
    # 0 rows: mosaic_kernel.rms_norm returns empty arrays before building a kernel.
    assert emulated == ([] if rows == 0 else [(rows, shape[-1])] * 2)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("shape,residual", [((2, 3, 256), "float32"), ((5, 128), None), ((0, 128), "bfloat16")])
def test_fp8_output_reaches_the_kernel(emulated, quant, shape, residual):
    """bi_jax.rms_norm's FP8 output through the Mosaic path: the reference's codes, scales and new residual."""
    x, w, r = _inputs("fp8", shape, residual=residual)
    kwargs = quant_kwargs(quant, np.float32(0.0125))
    want = expected(x, w, r, mode="fp32", weight_offset=1.0, **kwargs)
    assert_fp8_result(want, call(FP8_JIT, x, w, r, mode="fp32", weight_offset=1.0, **kwargs), f"{quant} {shape}")
    rows = int(np.prod(shape[:-1]))
    assert emulated == ([] if rows == 0 else [(rows, shape[-1])])


def test_jit_and_vmap(emulated):
    x, w, r = _inputs("vmap", (3, 4, N), residual="float32")
    want = ref(x, w, 1e-6, r)
    jitted = jax.jit(lambda a, b, eps, c: bi_jax.rms_norm(a, b, eps, c), static_argnums=2)
    assert_pair_bits(want, _call(jitted, x, w, r), "jit")
    # A shared weight: the batch is folded into the rows, one kernel of 12 rows.
    mapped = jax.vmap(lambda a, c: bi_jax.rms_norm(a, jnp.asarray(w), 1e-6, c))(jnp.asarray(x), jnp.asarray(r))
    assert_pair_bits(want, pair(mapped, True), "vmap, shared weight")
    assert (12, N) in emulated
    # A batched weight: each element by its own call (lax.map), rows of 4.
    ws = np.stack([w] * 3)
    mapped = jax.vmap(lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c))(jnp.asarray(x), jnp.asarray(ws), jnp.asarray(r))
    assert_pair_bits(want, pair(mapped, True), "vmap, batched weight")
    assert (4, N) in emulated


@pytest.mark.parametrize("residual", [None, "bfloat16"])
def test_grad_uses_the_mosaic_forward_and_the_triton_backward(emulated, monkeypatch, residual):
    """The same gradients as the Pallas-Triton path: the backward recomputes inv from z and the weight."""
    x, w, r = _inputs("grad", (6, N), residual=residual)
    rng = np.random.default_rng(_seed("mosaic-wiring-g", residual))
    g = random_rows(rng, x.shape, "bfloat16")

    def grads():
        def loss(*args):
            out = bi_jax.rms_norm(args[0], args[1], 1e-6, *args[2:])
            out = out[0] if r is not None else out
            return jnp.sum(out.astype(jnp.float32) * jnp.asarray(g, jnp.float32))

        primals = [jnp.asarray(a) for a in (x, w, r) if a is not None]
        return jax.grad(loss, argnums=tuple(range(len(primals))))(*primals)

    with_mosaic = grads()
    assert emulated, "the forward did not run the (emulated) Mosaic kernel"
    monkeypatch.setattr(ops, "forward_kernel", lambda backend, n, interpret: "triton")
    assert_grads(tuple(np.asarray(a) for a in grads()), tuple(np.asarray(a) for a in with_mosaic),
                 "mosaic forward vs triton forward")


def test_sharded_rows_run_per_shard(emulated, mesh, monkeypatch):
    monkeypatch.setattr(mosaic_kernel, "_kernel", _stand_in(emulated, "triton"))
    x, w, r = _inputs("sharded", (8, N), residual="float32")
    rows = NamedSharding(mesh, PartitionSpec("b", None))
    args = [jax.device_put(x, rows), jax.device_put(w, NamedSharding(mesh, PartitionSpec())),
            jax.device_put(r, rows)]
    got = pair(jax.jit(lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c))(*args), True)
    assert_pair_bits(ref(x, w, 1e-6, r), got, "sharded")
    assert (2, N) in emulated  # 8 rows over 4 devices
    for out in got:
        assert out.sharding.is_equivalent_to(rows, 2), out.sharding


def test_split_above_max_elements(emulated, monkeypatch):
    """MAX_ELEMENTS patched to 1000: 11 rows of 100 are pieces of 8 and 3 rows, each its own kernel."""
    monkeypatch.setattr(ops, "MAX_ELEMENTS", 1000)
    x, w, r = _inputs("split", (11, N), residual="bfloat16")
    assert_pair_bits(ref(x, w, 1e-6, r), _call(bi_jax.rms_norm, x, w, r), "split")
    assert sorted(emulated) == [(3, N), (8, N)]
