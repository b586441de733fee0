"""bi_jax.mosaic_call on the CPU: the Mosaic GPU kernels' in-place calls, lowered for CUDA.

Two properties a CPU can check: the kernel module is the one plgpu.kernel builds from the same
body (byte for byte but its name), so the aliases change no instruction; and the custom call
carries the aliases of the Pallas-Triton kernels (out over x and the new residual over the
residual in the forward, grad_x over g and grad_residual over g_r in the backward). That XLA then
keeps no copy in a loop over layers needs a GPU: tests/test_jax_gpu.py, test_jax_backward_gpu.py.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from bi_jax import mosaic_backward, mosaic_call
from bi_jax import mosaic_kernel as mk

ALIAS = re.compile(r"output_operand_alias<output_tuple_indices = \[(\d+)\], operand_index = (\d+)")


def _plgpu_kernel(body, out_type, *, aliases, grid, grid_names, scratch_types, compiler_params, name,
                  num_threads=None, thread_name=None):
    """mosaic_call.kernel's arguments through plgpu.kernel, which has no aliases."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    del aliases, name
    return plgpu.kernel(body, out_type=list(out_type), grid=grid, grid_names=grid_names, scratch_types=scratch_types,
                        compiler_params=compiler_params, num_threads=num_threads, thread_name=thread_name)


def _forward(dtype, residual):
    n = 1000
    x = jax.ShapeDtypeStruct((3, n), dtype)
    r = None if residual is None else jax.ShapeDtypeStruct((3, n), residual)
    fn = jax.jit(lambda x, w, r: mk.rms_norm(x, w, 1e-6, r, mode="llama"))
    return fn.trace(x, jax.ShapeDtypeStruct((n,), dtype), r).lower(lowering_platforms=("cuda",))


def _backward(dtype, has_gr, warpgroups):
    n = 4096
    z = jax.ShapeDtypeStruct((64, n), dtype)
    gr = z if has_gr else None
    fn = jax.jit(lambda z, w, g, gr: mosaic_backward.rms_norm_backward(
        z, w, g, gr, eps=1e-6, mode="llama", weight_offset=0.0, has_residual=has_gr, steps=8, reload=False,
        warpgroups=warpgroups))
    return fn.trace(z, jax.ShapeDtypeStruct((n,), dtype), z, gr).lower(lowering_platforms=("cuda",))


def _modules(lowered):
    return [re.sub(r"bi_norm_rms_norm(_backward)?", "body", re.sub(r"loc\(.*?\)", "", t))
            for t in mk.mosaic_modules(lowered)]


def _fresh(monkeypatch, kernel=None):
    if kernel is not None:
        monkeypatch.setattr(mosaic_call, "kernel", kernel)
    mk._kernel.cache_clear()
    mosaic_backward._kernel.cache_clear()


LOWERINGS = [("forward", lambda: _forward("bfloat16", "float32")), ("forward-fp16", lambda: _forward("float16", None)),
             ("backward", lambda: _backward("bfloat16", True, 1)), ("pairs", lambda: _backward("float32", False, 2))]


@pytest.mark.parametrize("make", [m for _, m in LOWERINGS], ids=[i for i, _ in LOWERINGS])
def test_module_is_plgpu_kernels(monkeypatch, make):
    _fresh(monkeypatch)
    ours = _modules(make())
    _fresh(monkeypatch, _plgpu_kernel)
    theirs = _modules(make())
    _fresh(monkeypatch)
    assert len(ours) == len(theirs) == 1
    lines = [(i, a, b) for i, (a, b) in enumerate(zip(ours[0].splitlines(), theirs[0].splitlines())) if a != b]
    assert not lines and len(ours[0]) == len(theirs[0]), f"first differing line {lines[0] if lines else 'length'}"


@pytest.mark.parametrize("residual,expected", [(None, set()), ("float32", {(0, 0), (1, 2)}),
                                               ("bfloat16", {(0, 0), (1, 2)})])
def test_forward_writes_over_x_and_the_residual(monkeypatch, residual, expected):
    _fresh(monkeypatch)
    pairs = {(int(o), int(i)) for o, i in ALIAS.findall(_forward("bfloat16", residual).as_text())}
    assert pairs == expected  # (output, operand): as bi_jax.ops's Pallas-Triton forward; none without a residual


@pytest.mark.parametrize("warpgroups", [1, 2])
@pytest.mark.parametrize("has_gr,expected", [(False, {(0, 1)}), (True, {(0, 1), (1, 2)})])
def test_backward_writes_over_the_gradients(monkeypatch, warpgroups, has_gr, expected):
    _fresh(monkeypatch)
    pairs = {(int(o), int(i)) for o, i in ALIAS.findall(_backward("bfloat16", has_gr, warpgroups).as_text())}
    assert pairs == expected  # grad_x over g, grad_residual over g_r


def _interpreted(body, aliases, *operands):
    """mosaic_call.kernel on Mosaic GPU's interpreter: one program per row, one float32 output."""
    interp = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params").InterpretGPUParams
    out = jax.ShapeDtypeStruct(operands[0].shape, operands[0].dtype)
    return mosaic_call.kernel(body, [out], aliases=aliases, grid=(operands[0].shape[0],), grid_names=("rows",),
                              scratch_types=[], compiler_params=None, name="t", interpret=interp())(*operands)[0]


def _twice_plus(x_ref, c_ref, o_ref):
    i = jax.lax.axis_index("rows")
    o_ref[i] = c_ref[i] * 2.0 + x_ref[i]


def test_aliased_call_under_shard_map_on_the_interpreter(mesh):
    """Inside jax.shard_map (check_vma on, its default) as plgpu.kernel's call is: each shard's rows."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    x = jnp.arange(4 * 8 * 128, dtype=jnp.float32).reshape(32, 128)
    c = jnp.full_like(x, 0.5)
    fn = jax.jit(jax.shard_map(lambda x, c: _interpreted(_twice_plus, {1: 0}, x, c), mesh=mesh,
                               in_specs=(P("b"), P("b")), out_specs=P("b")))
    got, want = np.asarray(fn(x, c)), np.asarray(x + 2 * c)
    bad = np.argwhere(got != want)
    assert not len(bad), f"{len(bad)} differ, first at {tuple(bad[0])}"


def test_aliased_call_in_a_scan_under_grad_on_the_interpreter():
    """The call's transformations (scan, custom_vjp, grad, XLA's buffer reuse) on Mosaic GPU's
    interpreter: a body of plain Pallas ops, the in-place pattern of bi_jax's kernels (forward
    over its second input, backward over the cotangent); values against jnp, exactly."""
    import jax.numpy as jnp
    from jax import lax

    rows, n = 8, 128

    def bwd_body(c_ref, o_ref):
        i = lax.axis_index("rows")
        o_ref[i] = c_ref[i] * 2.0

    @jax.custom_vjp
    def step(x, c):
        return _interpreted(_twice_plus, {1: 0}, x, c)

    step.defvjp(lambda x, c: (step(x, c), None), lambda _, ct: (ct, _interpreted(bwd_body, {0: 0}, ct)))

    def loss(f):
        def fn(x, c0):
            c, _ = lax.scan(lambda c, _: (f(x, c) * 1.5, None), c0, None, length=4)
            return jnp.sum(c * c)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))

    rng = np.random.RandomState(0)
    x, c = (jnp.asarray(rng.randn(rows, n), jnp.float32) for _ in range(2))
    (want, want_grads), (got, got_grads) = loss(lambda x, c: c * 2.0 + x)(x, c), loss(step)(x, c)
    for name, a, b in [("loss", want, got), ("grad x", *[g[0] for g in (want_grads, got_grads)]),
                       ("grad c", *[g[1] for g in (want_grads, got_grads)])]:
        bad = np.argwhere(np.asarray(a) != np.asarray(b))
        assert not len(bad), f"{name}: {len(bad)} differ, first at {tuple(bad[0])}"
