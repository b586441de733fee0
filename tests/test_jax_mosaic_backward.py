"""bi_jax's Mosaic GPU backward (bi_jax/mosaic_backward.py, stage 2 of issue 26) on the CPU.

No CPU runs the kernel (Mosaic GPU's interpreter has no rule for inline_mgpu). What a CPU checks:
the kernel body on numpy (mosaic_backward_ops.NumpyBackwardOps), the very code that emits its MLIR,
against bridge.numerics.reference's backward bit for bit (the golden backward corpus and targeted
cases, with block sizes that give one block, several, and a partial last one, so that the counter
and the upper levels over blocks are exercised); B4's tree node for node; the steps rule; that
the kernel lowers for CUDA with every float operation inline PTX; and the wiring through
bi_jax.rms_norm's custom_vjp with the kernel's body standing in for the kernel. The compiled
kernel's bits: tests/test_jax_mosaic_backward_gpu.py and scripts/probes/mosaic_backward.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bi_jax import mosaic_backward as mb
from bi_jax import mosaic_kernel as mk
from bi_jax.mosaic_backward_ops import exact_row_tree
from bi_jax.mosaic_ops import NumpyOps, row_layout
from bridge import golden
from bridge.numerics import reference as ref
from bridge.numerics import tiling
from bridge.numerics.contract import next_power_of_two

BACKWARD_NAMES = [e["name"] for e in golden.load_manifest()["backward_cases"]]
FLOAT_OPS = re.compile(r'"stable_mosaic_gpu\.(arith\.(?:add|sub|mul|div|neg|rem|cmp|trunc|ext)f|'
                       r'arith\.(?:maximumf|minimumf|sitofp|uitofp)|math\.[a-z_.]+|llvm\.f[a-z]+|'
                       r'llvm\.intr\.(?:fma|fmuladd)|vector\.fma)"')


def _bits_equal(expected, got, what):
    e, g = ref.bits(np.asarray(expected)), ref.bits(np.asarray(got))
    assert e.shape == g.shape, f"{what}: shape {g.shape}, want {e.shape}"
    bad = [tuple(int(k) for k in i) for i in np.argwhere(e != g)]
    assert not bad, f"{what}: {len(bad)} differ, first {bad[0]}: got {g[bad[0]]:#x}, want {e[bad[0]]:#x}"


def check(x, w, g, eps, r, gr, mode, offset, steps, what, want=None, **variant):
    """The emulated kernel (with `steps` rows per block, and the variant's keywords: reload,
    warpgroups) against the reference, every output."""
    want = want or ref.rms_norm_backward(x, w, g, eps, r, gr, mode=mode, weight_offset=offset)
    z = x if r is None else ref.rms_norm(x, w, eps, r)[1]
    got = mb.rms_norm_backward_emulated(z, w, g, gr, eps=eps, mode=mode, weight_offset=offset,
                                        has_residual=r is not None, steps=steps, **variant)
    got = [a for a in got if a is not None]
    names = ("grad_x", "grad_residual", "grad_weight") if r is not None else ("grad_x", "grad_weight")
    for name, e, a in zip(names, want, got):
        _bits_equal(e, a, f"{what} steps={steps} {name}")


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_emulated_body_on_backward_corpus(backward_corpus, name):
    case = backward_corpus[name]
    n = case.spec.n
    if n > mk.MAX_N:
        pytest.skip(f"n = {n} > MAX_N: chunked rows are a later stage")
    x = case.x.reshape(-1, n)
    rows = x.shape[0]
    shape2 = (lambda a: None if a is None else a.reshape(x.shape))
    for (mode, offset), want in case.expected.items():
        want = tuple(a.reshape(x.shape) if a.shape != (n,) else a for a in want)
        # The rule's blocks, blocks of 4 rows (several, the last partial), and one block of all rows.
        for steps in sorted({None, min(4, next_power_of_two(rows)), next_power_of_two(rows)}, key=str):
            check(x, case.weight, case.grad_out.reshape(x.shape), case.spec.eps, shape2(case.residual),
                  shape2(case.grad_new_residual), mode, offset, steps, f"{name} ({mode}, {offset})", want)


def _signed_inputs(rng, rows, n, dtype, residual, gr):
    """Positive x and weight, g with whole -0.0 columns and a whole -0.0 row: -0.0 leaves of B4's
    and B7's trees (roots -0.0 at powers of two, +0.0 once padded), and normal values elsewhere."""
    d = ref.numpy_dtype(dtype)
    x = (np.abs(rng.standard_normal((rows, n))) + 0.25).astype(np.float32).astype(d)
    w = (np.abs(rng.standard_normal(n)) + 0.25).astype(np.float32).astype(d)
    g = rng.standard_normal((rows, n)).astype(np.float32)
    g[:, ::3] = -0.0
    g[rows // 2] = -0.0
    r = None if residual is None else (np.abs(rng.standard_normal((rows, n))) * 0.1).astype(np.float32)
    r = None if r is None else r.astype(ref.numpy_dtype(residual))
    grs = None
    if gr:
        grs = rng.standard_normal((rows, n)).astype(np.float32)
        grs[rows // 2] = -0.0
        grs = grs.astype(ref.numpy_dtype(residual))
    return x, w, g.astype(d), r, grs


TARGETED = [  # rows, n, dtype, residual, gr
    (1, 4096, "bfloat16", None, False), (5, 100, "bfloat16", None, False), (3, 1, "float16", "float16", False),
    (7, 3, "float32", "float32", True), (13, 1000, "bfloat16", "float32", True), (8, 128, "float32", None, False),
    (33, 5120, "float16", "float16", True), (4, 96, "bfloat16", "bfloat16", False), (17, 2048, "float32", None, False),
    (2, 20000, "bfloat16", "float32", False),
]


@pytest.mark.parametrize("rows, n, dtype, residual, gr", TARGETED)
@pytest.mark.parametrize("mode, offset", [("llama", 0.0), ("fp32", -0.5), ("llama", 1.0)])
def test_emulated_body_on_targeted_cases(rows, n, dtype, residual, gr, mode, offset):
    rng = np.random.default_rng(rows * 1000 + n)
    x, w, g, r, grs = _signed_inputs(rng, rows, n, dtype, residual, gr)
    for steps in sorted({None, 1, 2, next_power_of_two(rows)}, key=str):
        if steps is None or steps <= next_power_of_two(rows):
            check(x, w, g, 1e-6, r, grs, mode, offset, steps, f"{rows}x{n} {dtype} res={residual} gr={gr}")


def test_all_negative_zero_gradient_keeps_negative_zero_roots():
    """g all -0.0 on a power-of-two width: every b and p leaf is -0.0, so t = -0.0 per row, and T =
    -0.0 per column over 4 rows; over 5 the tree's +0.0 padding rows make T +0.0."""
    for rows in (4, 5):
        x = np.full((rows, 128), 0.5, np.float32)
        w = np.ones(128, np.float32)
        g = np.full((rows, 128), -0.0, np.float32)
        want = ref.rms_norm_backward(x, w, g, 1e-6)
        assert np.signbit(want[1]).all() == (rows == 4)
        for steps in (1, 2, 4):
            check(x, w, g, 1e-6, None, None, "llama", 0.0, steps, f"-0.0 g, {rows} rows", want)


@pytest.mark.parametrize("n, itemsize", [(1, 4), (3, 2), (7, 4), (100, 2), (96, 2), (1000, 4), (1540, 2),
                                         (5120, 2), (2564, 4)])
def test_exact_tree_is_the_contracts_tree_to_p(n, itemsize):
    """exact_row_tree on column names, with +0.0 as a name of its own ("z"): the contract's tree over
    P leaves, node for node, every add of padding to a sum included, none above P. Only z + z is z
    (+0.0 + +0.0 = +0.0 exactly: a subtree of padding is one +0.0)."""
    def add(a, b):
        both = (a == "z") & (b == "z")
        return np.where(both, "z", np.char.add(np.char.add(np.char.add("(", a), np.char.add("+", b)), ")"))

    class Symbolic(NumpyOps):
        def add(self, a, b):
            return add(a, b)

        def f32(self, value):
            return np.array("z")

        def lane_select(self, mask, partner, s):
            return np.where((self.thread & mask) != 0, partner, s)

    lay = row_layout(n, itemsize)
    ops = Symbolic(lay, 1)
    cols = [[reg * 128 * lay.vec + ops.thread * lay.vec + j for j in range(lay.vec)] for reg in range(lay.regs)]
    q = [[np.where(c < n, np.char.add("c", c.astype(str)), "z")[None, :] for c in reg] for reg in cols]
    width = next_power_of_two(n)
    got = exact_row_tree(ops, lay, q, width)
    assert np.all(got == got[:, :1])  # every thread ends with the root
    expected = [np.array(f"c{c}") for c in range(n)] + [np.array("z")] * (width - n)
    while len(expected) > 1:
        expected = [add(expected[i], expected[i + 1]) for i in range(0, len(expected), 2)]
    assert str(got[0, 0]) == str(expected[0])


@pytest.mark.parametrize("n_rows", [1, 3, 100, 1024, 4096, 16384, 65536, 10**6])
@pytest.mark.parametrize("n, itemsize", [(1, 2), (100, 2), (4096, 2), (8192, 2), (4096, 4), (32768, 4)])
def test_steps_rule(n_rows, n, itemsize):
    lay = row_layout(n, itemsize)
    row_floats = lay.regs * 128 * lay.vec
    steps = tiling.mosaic_backward_steps(n_rows, row_floats)
    assert steps & (steps - 1) == 0 and 1 <= steps <= min(next_power_of_two(n_rows), tiling.MOSAIC_MAX_STEPS)
    # The counter's levels fit their shared memory (one level needs none when steps == 1).
    assert (steps.bit_length() - 1) * 4 * row_floats <= tiling.MOSAIC_COUNTER_BYTES
    if n_rows >= 65536 and n == 4096 and itemsize == 2:
        assert steps == 64
    if n_rows == 4096 and n == 8192 and itemsize == 2:
        assert steps == 8


@pytest.mark.parametrize("dtype, residual, gr, n, rows, steps", [
    ("bfloat16", None, False, 4096, 16, None), ("bfloat16", "float32", True, 100, 7, 4),
    ("float16", "float16", False, 1000, 5, 2), ("float32", "float32", True, 3, 9, 8), ("bfloat16", None, False, 8192, 64, 8)])
@pytest.mark.parametrize("semantics", ["Warpgroup", "Lane"])
def test_lowers_for_cuda_with_only_ptx_floats(dtype, residual, gr, n, rows, steps, semantics):
    z = jax.ShapeDtypeStruct((rows, n), residual or dtype)
    grs = jax.ShapeDtypeStruct((rows, n), residual) if gr else None

    def fn(z, w, g, gr):
        return mb.rms_norm_backward(z, w, g, gr, eps=1e-6, mode="llama", weight_offset=1.0,
                                    has_residual=residual is not None, steps=steps, semantics=semantics)

    lowered = jax.jit(fn).trace(z, jax.ShapeDtypeStruct((n,), dtype), jax.ShapeDtypeStruct((rows, n), dtype),
                                grs).lower(lowering_platforms=("cuda",))
    (text,) = mk.mosaic_modules(lowered)
    assert not FLOAT_OPS.findall(text)
    asm = re.findall(r'asm_string = "([^"]*)"', text)
    for instr in ("mul.rn.f32", "add.rn.f32", "sub.rn.f32", "div.rn.f32", "sqrt.rn.f32"):
        assert any(instr in a for a in asm), instr
    # The upper levels over blocks: adds of slices in XLA, no multiply.
    hlo = lowered.as_text()
    assert "stablehlo.multiply" not in hlo


def test_rejects_what_this_stage_does_not_cover():
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="rows, n"):
        mb.rms_norm_backward_emulated(np.ones((2, 2, 8), np.float32), w, np.ones((2, 2, 8), np.float32),
                                      eps=1e-6, mode="llama", weight_offset=0.0, has_residual=False)
    big = mk.MAX_N * 2
    with pytest.raises(NotImplementedError, match="at most"):
        mb.rms_norm_backward_emulated(np.ones((1, big), np.float32), np.ones(big, np.float32),
                                      np.ones((1, big), np.float32), eps=1e-6, mode="llama", weight_offset=0.0,
                                      has_residual=False)
    with pytest.raises(ValueError, match="power of two"):
        mb.rms_norm_backward_emulated(np.ones((3, 8), np.float32), w, np.ones((3, 8), np.float32), eps=1e-6,
                                      mode="llama", weight_offset=0.0, has_residual=False, steps=8)


def test_block_tree_pads_only_to_the_blocks_power_of_two():
    """Three -0.0 block sums: ((a + b) + (c + 0)) with +0.0 for the fourth block = +0.0; two: -0.0."""
    neg = np.full((3, 2), -0.0, np.float32)
    assert not np.signbit(mb.block_tree(neg, np)).any()
    assert np.signbit(mb.block_tree(neg[:2], np)).all()
    assert np.signbit(np.asarray(mb.block_tree(jnp.asarray(neg[:2])))).all()
