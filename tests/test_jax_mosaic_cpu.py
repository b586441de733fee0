"""bi_jax's Mosaic GPU forward (bi_jax/mosaic_kernel.py, stage 1 of issue 26) on the CPU.

No CPU runs the kernel: Mosaic GPU's interpreter has no rule for inline_mgpu. What a CPU can check:
the kernel body, run on numpy by the very code that emits its MLIR (mosaic_ops.NumpyOps), against
the golden corpus bit for bit (its tree, masks and steps); and that the kernel lowers for CUDA
under both lowering semantics with every float operation inline PTX. The compiled kernel's bits:
scripts/probes/mosaic_forward.py on a GPU.
"""

from __future__ import annotations

import re

import jax
import ml_dtypes
import numpy as np
import pytest

from bi_jax import mosaic_kernel as mk
from bi_jax.mosaic_ops import NumpyOps, row_layout, row_tree
from bridge import golden
from bridge.numerics import reference as ref

CASES = [e["name"] for e in golden.load_manifest()["cases"]]
# A float operation in the module that is not inline assembly (Pallas's and Mosaic's own code has none here).
FLOAT_OPS = re.compile(r'"stable_mosaic_gpu\.(arith\.(?:add|sub|mul|div|neg|rem|cmp|trunc|ext)f|'
                       r'arith\.(?:maximumf|minimumf|sitofp|uitofp)|math\.[a-z_.]+|llvm\.f[a-z]+|'
                       r'llvm\.intr\.(?:fma|fmuladd)|vector\.fma)"')


def _bits_equal(expected, got, what):
    e, g = ref.bits(np.asarray(expected)), ref.bits(np.asarray(got))
    bad = [tuple(i) for i in np.argwhere(e != g)]
    assert not bad, f"{what}: {len(bad)} differ, first {bad[0]}: got {g[bad[0]]:#x}, want {e[bad[0]]:#x}"


@pytest.mark.parametrize("name", CASES)
def test_emulated_body_on_corpus(cases_by_name, name):
    case = cases_by_name[name]
    if case.spec.n > mk.MAX_N:
        pytest.skip(f"n = {case.spec.n} > MAX_N: chunked rows are a later stage")
    x = case.x.reshape(-1, case.spec.n)
    r = None if case.residual is None else case.residual.reshape(x.shape)
    for (mode, offset), expected in case.out.items():
        got = mk.rms_norm_emulated(x, case.weight, case.spec.eps, r, mode=mode, weight_offset=offset)
        out, new_res = got if r is not None else (got, None)
        _bits_equal(expected.reshape(x.shape), out, f"{name} ({mode}, {offset}) out")
        if r is not None:
            _bits_equal(case.new_residual.reshape(x.shape), new_res, f"{name} new_residual")


@pytest.mark.parametrize("n, itemsize, vec, regs", [(1, 2, 1, 1), (100, 2, 4, 1), (1000, 4, 4, 2), (4096, 2, 8, 4),
                                                    (5120, 2, 8, 5), (20000, 4, 4, 40), (20000, 2, 8, 20)])
def test_row_layout(n, itemsize, vec, regs):
    lay = row_layout(n, itemsize)
    assert (lay.vec, lay.regs) == (vec, regs)
    assert lay.full(regs - 2) if regs > 1 else True


@pytest.mark.parametrize("n", [1, 7, 1540, 2564])
def test_tree_pairs_columns_as_the_contract(n):
    """row_tree on column names instead of numbers: the very pairs of the contract's tree.

    An add of "0" (a column past n, or a padded subtree) gives the other operand, as a + 0 = a does
    for sums of squares, so the kernel's padding (to 128 * vec * a power of two) and its carrying
    of a lone subtree compare equal to the contract's padding to the next power of two of n.
    """
    def add(a, b):
        return np.where(a == "0", b, np.where(b == "0", a, np.char.add(np.char.add("(", a), np.char.add(
            np.char.add("+", b), ")"))))

    class Symbolic(NumpyOps):
        def add(self, a, b):
            return add(a, b)

    lay = row_layout(n, 4)
    ops = Symbolic(lay, 1)
    cols = [[reg * 128 * lay.vec + ops.thread * lay.vec + j for j in range(lay.vec)] for reg in range(lay.regs)]
    q = [[np.where(c < n, np.char.add("c", c.astype(str)), "0")[None, :] for c in reg] for reg in cols]
    got = row_tree(ops, lay, q)
    assert np.all(got == got[:, :1])  # every thread ends with the same expression
    expected = [np.array(f"c{c}") for c in range(n)] + [np.array("0")] * ((1 << (n - 1).bit_length()) - n)
    while len(expected) > 1:
        expected = [add(expected[i], expected[i + 1]) for i in range(0, len(expected), 2)]
    assert str(got[0, 0]) == str(expected[0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("residual", ["none", "same", "float32"])
@pytest.mark.parametrize("n", [7, 1000, 5120])
@pytest.mark.parametrize("semantics", ["Warpgroup", "Lane"])
def test_lowers_for_cuda_with_only_ptx_floats(dtype, residual, n, semantics):
    if dtype == "float32" and residual == "same":
        pytest.skip("the same as a float32 residual")
    x = jax.ShapeDtypeStruct((3, n), dtype)
    r = None if residual == "none" else jax.ShapeDtypeStruct((3, n), dtype if residual == "same" else "float32")
    fn = jax.jit(lambda x, w, r: mk.rms_norm(x, w, 1e-6, r, mode="llama", weight_offset=1.0, semantics=semantics))
    lowered = fn.trace(x, jax.ShapeDtypeStruct((n,), dtype), r).lower(lowering_platforms=("cuda",))
    (text,) = mk.mosaic_modules(lowered)
    assert not FLOAT_OPS.findall(text)
    asm = re.findall(r'asm_string = "([^"]*)"', text)
    for instr in ("mul.rn.f32", "add.rn.f32", "div.rn.f32", "sqrt.rn.f32"):
        assert any(instr in a for a in asm), instr


def test_rejects_what_this_stage_does_not_cover():
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="rows, n"):
        mk.rms_norm_emulated(np.ones((2, 2, 8), np.float32), w)
    with pytest.raises(NotImplementedError, match="MAX_N|at most"):
        mk.rms_norm_emulated(np.ones((1, mk.MAX_N + 2), ml_dtypes.bfloat16), np.ones(mk.MAX_N + 2, ml_dtypes.bfloat16))
