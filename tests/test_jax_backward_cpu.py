"""bi_jax's gradients on the CPU: the Pallas backward in interpret mode, bit for bit.

Every numeric assertion is bitwise (integer views): against the golden gradient corpus and
bridge.reference.rms_norm_backward, and between calls that must agree (a row alone vs in a batch,
eager vs jit, scan and checkpoint vs an unrolled loop, donated vs not, the flax module vs the
function). XLA:CPU flushes float32 subnormals (bridge/numerics/subnormals.py): the corpus test
leaves out exactly the rows and columns that pass through one, and says how many.
Sharding and jax.vmap of gradients are in test_jax_backward_sharding_cpu.py.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_backward_helpers import (assert_bits, assert_grads, expected, grads, norm_fn, random_rows,
                                  random_weight)

import bi_jax
from bridge.numerics.subnormals import flushed

N = 100  # pads to 128: masked columns in every tree


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


# --------------------------------------------------------------------------------------------
# A) The golden gradient corpus through jax.vjp (interpret mode: the default on the CPU).
# --------------------------------------------------------------------------------------------


def test_corpus_bits(backward_corpus):
    """Every case and stored (mode, offset). One test: each case compiles its own interpret-mode
    kernels, which is where the time goes."""
    failures, left_out, total = [], 0, 0
    for name, case in backward_corpus.items():
        for (mode, offset), want in case.expected.items():
            got = grads(case.x, case.weight, case.grad_out, case.spec.eps, case.residual, case.grad_new_residual,
                        mode=mode, offset=offset)
            rows, cols = flushed(case.x, case.weight, case.grad_out, case.spec.eps, case.residual,
                                 case.grad_new_residual, mode, offset)
            left_out, total = left_out + int(rows.sum()), total + rows.size
            try:
                assert_grads(want, got, f"{name} ({mode}, offset {offset})", rows, cols)
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:10])
    # The corpus's tiny patterns put subnormals in about one row in seven; the rest must be compared.
    assert left_out < 0.2 * total, f"{left_out} of {total} rows left out as flushed"


def test_corpus_absent_residual_gradient_equals_zeros(backward_corpus):
    """An absent grad_new_residual (symbolic zero) and explicit zeros give the same bits (B6): a few
    cases with signed-zero gradients, where dv + 0.0 matters."""
    cases = [c for c in backward_corpus.values() if c.residual is not None and c.grad_new_residual is None
             and "signed_zeros" in c.spec.g_patterns and c.spec.n <= 1000][:4]
    assert len(cases) == 4
    for case in cases:
        (mode, offset), want = next(iter(case.expected.items()))
        rows, cols = flushed(case.x, case.weight, case.grad_out, case.spec.eps, case.residual, None, mode, offset)
        got = grads(case.x, case.weight, case.grad_out, case.spec.eps, case.residual, None, mode=mode, offset=offset,
                    zeros_for_absent=True)
        assert_grads(want, got, f"{case.spec.name} with zeros for the absent gradient", rows, cols)


def test_xla_cpu_flushes_subnormals():
    """Why the corpus test leaves rows out: a float32 subnormal g gives 0 here, not the reference's
    bits. If JAX stops flushing on the CPU this fails, and the exclusion (`flushed`) can go."""
    x = np.ones((1, 4), np.float32)
    w = np.ones(4, np.float32)
    g = np.full((1, 4), 2.0**-140, np.float32)
    want = expected(x, w, g)
    rows, cols = flushed(x, w, g, 1e-6, None, None, "llama", 0.0)
    assert rows.all() and cols.all()
    got = grads(x, w, g)
    assert np.count_nonzero(np.asarray(want[1])) == 4 and not np.asarray(got[1]).any()


# --------------------------------------------------------------------------------------------
# B) Generated inputs: every dtype, residual kind, mode and offset (a negative one too), full
#    float32 mantissas (a fused multiply-add anywhere would change bits), short and long rows.
# --------------------------------------------------------------------------------------------

COMBOS = [("float32", "none", "llama", 0.0, 1, 7), ("float32", "float32", "fp32", 1.0, 2, 5),
          ("float32", "float32", "llama", -0.5, 3, 9), ("float32", "none", "fp32", 0.0, N, 37),
          ("bfloat16", "float32", "llama", 1.0, N, 16), ("bfloat16", "same", "fp32", 0.0, N, 3),
          ("float16", "same", "llama", 0.0, N, 33), ("float16", "float32", "fp32", -2.0, N, 5),
          ("float32", "float32", "llama", 0.0, 16385, 2), ("bfloat16", "none", "fp32", 1.0, 16385, 3)]


def _inputs(rng, dtype, kind, rows, n, with_gr=True):
    x, g = random_rows(rng, (rows, n), dtype), random_rows(rng, (rows, n), dtype)
    w = random_weight(rng, n, dtype)
    rdt = None if kind == "none" else (dtype if kind == "same" else "float32")
    r = None if rdt is None else random_rows(rng, (rows, n), rdt)
    gr = None if rdt is None or not with_gr else random_rows(rng, (rows, n), rdt)
    return x, w, g, r, gr


@pytest.mark.parametrize("dtype,kind,mode,offset,n,rows", COMBOS)
def test_generated_inputs_match_the_reference(dtype, kind, mode, offset, n, rows):
    rng = np.random.default_rng(_seed("generated", dtype, kind, mode, offset, n, rows))
    x, w, g, r, gr = _inputs(rng, dtype, kind, rows, n)
    for eps in (1e-6, 0.25):
        want = expected(x, w, g, eps, r, gr, mode=mode, offset=offset)
        assert_grads(want, grads(x, w, g, eps, r, gr, mode=mode, offset=offset), f"eps {eps}")
        if r is not None:  # the new residual unused: its gradient absent
            assert_grads(expected(x, w, g, eps, r, None, mode=mode, offset=offset),
                         grads(x, w, g, eps, r, None, mode=mode, offset=offset), f"eps {eps}, absent g_r")


def test_eager_vjp_equals_jit():
    rng = np.random.default_rng(_seed("eager"))
    x, w, g, r, gr = _inputs(rng, "bfloat16", "float32", 5, N)
    _, vjp = jax.vjp(norm_fn(1e-6, "llama", 0.0, "both"), jnp.asarray(x), jnp.asarray(w), jnp.asarray(r))
    gx, gw, grr = vjp((jnp.asarray(g), jnp.asarray(gr)))
    assert_grads(grads(x, w, g, 1e-6, r, gr), (gx, grr, gw), "eager jax.vjp vs jit")


def test_negative_zero_dv_becomes_positive_without_grad_new_residual():
    """B6: dv + 0.0 is kept (XLA would fold it), so -0.0 in dv is +0.0 in grad_x and grad_residual."""
    rng = np.random.default_rng(_seed("negzero"))
    x, w, _, r, _ = _inputs(rng, "float32", "float32", 4, N)
    g = np.full((4, N), -0.0, np.float32)  # a = -0.0 where w > 0; some dv = -0.0 - (+0.0) = -0.0
    z = x + r  # float32 residual: rnR is exact here (no NaN)
    dv = expected(z, w, g)[0]  # without a residual grad_x = rnD(dv) = dv in float32
    assert np.count_nonzero(np.signbit(dv)) > N, "the data must give -0.0 in dv"
    want = expected(x, w, g, 1e-6, r)
    assert not np.signbit(want[0]).any() and not np.signbit(want[1]).any()
    assert_grads(want, grads(x, w, g, 1e-6, r), "absent grad_new_residual")
    assert_grads(want, grads(x, w, g, 1e-6, r, zeros_for_absent=True), "zeros for grad_new_residual")


@pytest.mark.parametrize("n", [N, 16385])
def test_masked_columns_are_positive_zero_leaves_with_a_negative_offset(n):
    """With weight_offset < 0 a masked column's a = 0 * offset is -0.0; B4's padding must stay +0.0:
    rows of -0.0 products then sum to +0.0 (padded), and grad_x keeps -0.0."""
    rng = np.random.default_rng(_seed("masked", n))
    x = np.abs(random_rows(rng, (2, n), "float32")) + np.float32(0.5)
    w = np.ones(n, np.float32)
    g = np.full((2, n), -0.0, np.float32)
    want = expected(x, w, g, offset=-0.5)
    assert np.signbit(want[0]).all(), "the reference keeps -0.0 here"
    assert_grads(want, grads(x, w, g, offset=-0.5), f"n={n}, offset -0.5")


def test_empty_batch():
    for shape, kind in (((0, N), "none"), ((2, 0, N), "float32")):
        x, g = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        w = np.ones(N, np.float32)
        r = None if kind == "none" else np.zeros(shape, np.float32)
        got = grads(x, w, g, 1e-6, r)
        assert got[0].shape == shape and got[-1].shape == (N,)
        assert_bits(np.zeros(N, np.float32), got[-1], "grad_weight of no rows is +0.0")


# --------------------------------------------------------------------------------------------
# C) The JAX transformations a training step uses.
# --------------------------------------------------------------------------------------------


def test_grad_and_value_and_grad_of_a_loss():
    rng = np.random.default_rng(_seed("loss"))
    x, w, g, r, _ = _inputs(rng, "bfloat16", "same", 6, N)

    def loss(a, b, c):  # d loss / d out = g exactly, the new residual unused
        out, _ = bi_jax.rms_norm(a, b, 1e-6, c, mode="fp32", weight_offset=1.0)
        return jnp.sum(out.astype(jnp.float32) * jnp.asarray(g, jnp.float32))

    want = expected(x, w, g, 1e-6, r, mode="fp32", offset=1.0)
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(r))
    gx, gw, grr = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    assert_grads(want, (gx, grr, gw), "jit(grad)")
    value, (gx, gw, grr) = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    assert_grads(want, (gx, grr, gw), "value_and_grad")
    assert value.dtype == jnp.float32


def _layers(h, r, ws, eps, remat):
    """A residual stream through a norm per layer: out_l feeds layer l + 1, the new residual carries."""
    def layer(carry, w):
        out, res = bi_jax.rms_norm(carry[0], w, eps, carry[1])
        return (out, res), None

    step = jax.checkpoint(layer) if remat else layer
    return jax.lax.scan(step, (h, r), ws)[0][0]


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_layers_with_checkpoint(remat):
    rng = np.random.default_rng(_seed("scan"))
    layers, eps = 3, 1e-6
    x, g = random_rows(rng, (8, N), "bfloat16"), random_rows(rng, (8, N), "bfloat16")
    r = random_rows(rng, (8, N), "float32")
    ws = np.stack([random_weight(rng, N, "bfloat16") for _ in range(layers)])
    loss = lambda a, b, c: jnp.sum(_layers(a, c, b, eps, remat).astype(jnp.float32) * jnp.asarray(g, jnp.float32))  # noqa: E731
    gx, gws, grr = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(ws), jnp.asarray(r))
    # The reference, layer by layer: forward to get each layer's input, then the chain backward.
    inputs, h, res = [], x, r
    for w in ws:
        inputs.append((h, res))
        h, res = bi_jax.rms_norm(jnp.asarray(h), jnp.asarray(w), eps, jnp.asarray(res))
        h, res = np.asarray(h), np.asarray(res)
    g_out, g_res = g, None
    for layer in reversed(range(layers)):
        gx_l, g_res, gw_l = expected(inputs[layer][0], ws[layer], g_out, eps, inputs[layer][1], g_res)
        assert_bits(gw_l, gws[layer], f"layer {layer} grad_weight")
        g_out = gx_l
    assert_bits(g_out, gx, "grad_x of the first layer")
    assert_bits(g_res, grr, "grad_residual of the first layer")


def test_donated_gradients_take_the_backward_outputs():
    """grad_x is written over the donated gradient of out, grad_residual over that of the new residual."""
    rng = np.random.default_rng(_seed("donate"))
    x, w, g, r, gr = _inputs(rng, "bfloat16", "float32", 8, N)
    step = lambda a, b, c, d, e: jax.vjp(norm_fn(1e-6, "llama", 0.0, "both"), a, b, c)[1]((d, e))  # noqa: E731
    plain = jax.jit(step)(*(jnp.asarray(a) for a in (x, w, r, g, gr)))
    args = [jnp.asarray(a) for a in (x, w, r, g, gr)]
    pointers = [args[3].unsafe_buffer_pointer(), args[4].unsafe_buffer_pointer()]
    donated = jax.jit(step, donate_argnums=(3, 4))(*args)
    assert args[3].is_deleted() and args[4].is_deleted()
    assert [donated[0].unsafe_buffer_pointer(), donated[2].unsafe_buffer_pointer()] == pointers
    assert_grads(expected(x, w, g, 1e-6, r, gr), (donated[0], donated[2], donated[1]), "donated")
    for a, b, name in zip(plain, donated, ("grad_x", "grad_weight", "grad_residual")):
        assert_bits(a, b, f"donated vs not: {name}")


def test_jvp_is_refused_with_a_clear_error():
    x, w = jnp.ones((2, N)), jnp.ones((N,))
    with pytest.raises(TypeError, match="forward-mode.*custom_vjp"):
        jax.jvp(lambda a: bi_jax.rms_norm(a, w), (x,), (x,))


# --------------------------------------------------------------------------------------------
# D) Batch invariance of grad_x (and grad_residual): a row alone vs the same row among others.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,kind,n", [("float32", "none", N), ("bfloat16", "float32", N),
                                          ("float16", "same", 16385)])
def test_grad_x_batch_invariance(dtype, kind, n):
    rng = np.random.default_rng(_seed("invariance", dtype, kind, n))
    x1, w, g1, r1, gr1 = _inputs(rng, dtype, kind, 1, n)
    alone = grads(x1, w, g1, 1e-6, r1, gr1)
    assert_grads(expected(x1, w, g1, 1e-6, r1, gr1), alone, "alone vs reference")
    for batch in (2, 5, 33) if n == N else (2, 3):
        for pos in sorted({0, batch // 2, batch - 1}):
            x, _, g, r, gr = _inputs(rng, dtype, kind, batch, n)
            for a, a1 in ((x, x1), (g, g1), (r, r1), (gr, gr1)):
                if a is not None:
                    a[pos] = a1[0]
            got = grads(x, w, g, 1e-6, r, gr)
            for name, e, a in zip(("grad_x", "grad_residual"), alone[:-1], got[:-1]):
                assert_bits(e[0], a[pos], f"{name} of row {pos} of {batch}")


# --------------------------------------------------------------------------------------------
# E) The flax.nnx module: nnx.grad w.r.t. its weight and the input.
# --------------------------------------------------------------------------------------------


def test_nnx_grad_of_the_module():
    nnx = pytest.importorskip("flax.nnx", reason="flax is not installed")
    rng = np.random.default_rng(_seed("nnx"))
    x, w, g, r, _ = _inputs(rng, "bfloat16", "float32", 6, N)
    norm = bi_jax.RMSNorm(N, 1e-5, mode="fp32", weight_offset=1.0, dtype=jnp.bfloat16)
    norm.weight.set_value(jnp.asarray(w))

    @functools.partial(nnx.grad, argnums=(0, 1, 2))
    def grad_fn(module, a, c):
        out, _ = module(a, c)
        return jnp.sum(out.astype(jnp.float32) * jnp.asarray(g, jnp.float32))

    module_grads, gx, grr = nnx.jit(grad_fn)(norm, jnp.asarray(x), jnp.asarray(r))
    want = expected(x, w, g, 1e-5, r, mode="fp32", offset=1.0)
    assert_grads(want, (gx, grr, module_grads["weight"][...]), "nnx.grad")
