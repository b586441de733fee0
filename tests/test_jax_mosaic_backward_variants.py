"""The Mosaic GPU backward's variants on the CPU: B5 reloading z, g and w instead of holding xhat
and a (reload), and two warpgroups walking a pair of rows per step (mosaic_backward_pairs).

Each variant's body on numpy against the reference bit for bit (-0.0 columns, rows not a power of
two, one block, several and a partial last one), the shared-memory rule for two warpgroups, the
launch rule, and each variant's CUDA lowering (only PTX floats; reload's extra loads; the pair's
block-wide barrier). The compiled variants: scripts/probes/mosaic_backward.py --sweep on a GPU.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from test_jax_mosaic_backward import FLOAT_OPS, _signed_inputs, check

from bi_jax import mosaic_backward as mb
from bi_jax import mosaic_kernel as mk
from bi_jax.mosaic_backward_pairs import pair_regs
from bi_jax.mosaic_ops import row_layout
from bridge.numerics import reference as ref
from bridge.numerics import tiling
from bridge.numerics.contract import next_power_of_two

VARIANTS = [(False, 1), (True, 1), (False, 2), (True, 2)]  # (reload, warpgroups)
CASES = [  # rows, n, dtype, residual, gr
    (5, 100, "bfloat16", None, False), (13, 1000, "bfloat16", "float32", True), (7, 3, "float32", "float32", True),
    (33, 5120, "float16", "float16", True), (6, 1540, "bfloat16", None, False), (2, 4096, "bfloat16", None, False),
    (3, 20000, "bfloat16", "float32", False),
]


@pytest.mark.parametrize("reload, warpgroups", VARIANTS)
@pytest.mark.parametrize("rows, n, dtype, residual, gr", CASES)
def test_variant_emulation_is_the_reference(reload, warpgroups, rows, n, dtype, residual, gr):
    rng = np.random.default_rng(rows * 1000 + n)
    x, w, g, r, grs = _signed_inputs(rng, rows, n, dtype, residual, gr)
    lay = row_layout(n, ref.numpy_dtype(residual or dtype).itemsize)
    # The rule's steps where two warpgroups' shared memory fits (not at 20000 float32), and more.
    room = warpgroups == 1 or tiling.mosaic_backward_steps(rows, pair_regs(lay) * 128 * lay.vec, 2)
    for mode, offset in (("llama", 0.0), ("fp32", -0.5)):
        want = ref.rms_norm_backward(x, w, g, 1e-6, r, grs, mode=mode, weight_offset=offset)
        for steps in sorted({None, 2, 4, next_power_of_two(rows)}, key=str):
            if (steps is None and room) or (steps and warpgroups <= steps <= next_power_of_two(rows)):
                check(x, w, g, 1e-6, r, grs, mode, offset, steps, f"{rows}x{n} {dtype} reload={reload} "
                      f"warpgroups={warpgroups}", want, reload=reload, warpgroups=warpgroups)


@pytest.mark.parametrize("reload, warpgroups", VARIANTS)
def test_variant_keeps_negative_zero_roots(reload, warpgroups):
    """g all -0.0: the pair's leaf -0.0 + -0.0 is -0.0, so T is -0.0 over 4 rows, +0.0 over 5 (padding)."""
    for rows in (4, 5):
        x = np.full((rows, 128), 0.5, np.float32)
        w = np.ones(128, np.float32)
        g = np.full((rows, 128), -0.0, np.float32)
        want = ref.rms_norm_backward(x, w, g, 1e-6)
        for steps in (2, 4):
            check(x, w, g, 1e-6, None, None, "llama", 0.0, steps, f"-0.0 g, {rows} rows", want, reload=reload,
                  warpgroups=warpgroups)


@pytest.mark.parametrize("n_rows", [1, 2, 3, 100, 16384, 65536])
@pytest.mark.parametrize("n, itemsize", [(1, 2), (100, 2), (4096, 2), (8192, 2), (32768, 4)])
def test_two_warpgroup_steps_fit_shared_memory(n_rows, n, itemsize):
    lay = row_layout(n, itemsize)
    pair_floats = pair_regs(lay) * 128 * lay.vec
    steps = tiling.mosaic_backward_steps(n_rows, pair_floats, 2)
    if n_rows < 2 or 8 * pair_floats > tiling.MOSAIC_COUNTER_BYTES:
        assert steps == 0
        assert tiling.mosaic_backward_variant(n_rows, lay.regs * lay.vec, pair_floats)[1] == 1
        return
    # log2(steps) - 1 counter levels and two exchange rows.
    assert steps & (steps - 1) == 0 and 2 <= steps <= min(next_power_of_two(n_rows), tiling.MOSAIC_MAX_STEPS)
    assert steps.bit_length() * 4 * pair_floats <= tiling.MOSAIC_COUNTER_BYTES


def test_rule_reloads_past_the_knob_and_rejects_a_lone_pair():
    assert tiling.mosaic_backward_variant(4096, 32, 4096)[0] is (32 > tiling.MOSAIC_BACKWARD_RELOAD_FLOATS)
    assert tiling.mosaic_backward_variant(4096, 64, 8192)[0] is (64 > tiling.MOSAIC_BACKWARD_RELOAD_FLOATS)
    one = np.ones((1, 8), np.float32)
    with pytest.raises(ValueError, match="warpgroups"):
        mb.rms_norm_backward_emulated(one, one[0], one, eps=1e-6, mode="llama", weight_offset=0.0,
                                      has_residual=False, warpgroups=2)


def _module(reload, warpgroups, rows=64, n=4096, steps=8, residual=None):
    dtype = "bfloat16"
    z = jax.ShapeDtypeStruct((rows, n), residual or dtype)
    grs = jax.ShapeDtypeStruct((rows, n), residual) if residual else None

    def fn(z, w, g, gr):
        return mb.rms_norm_backward(z, w, g, gr, eps=1e-6, mode="llama", weight_offset=1.0,
                                    has_residual=residual is not None, steps=steps, reload=reload,
                                    warpgroups=warpgroups)

    lowered = jax.jit(fn).trace(z, jax.ShapeDtypeStruct((n,), dtype), jax.ShapeDtypeStruct((rows, n), dtype),
                                grs).lower(lowering_platforms=("cuda",))
    (text,) = mk.mosaic_modules(lowered)
    return text


def _count(text, op):
    return len(re.findall(rf'"stable_mosaic_gpu\.{op}"', text))


@pytest.mark.parametrize("reload, warpgroups", VARIANTS)
def test_variant_lowers_for_cuda_with_only_ptx_floats(reload, warpgroups):
    for args in (dict(), dict(rows=7, n=100, steps=4, residual="float32")):
        text = _module(reload, warpgroups, **args)
        assert not FLOAT_OPS.findall(text)
        assert "mul.rn.f32" in text and "div.rn.f32" in text
    text, hold = _module(reload, warpgroups), _module(False, warpgroups)
    # reload: z, g and w once more per register in the loop's row and the last row's (4 registers).
    assert _count(text, "vector.load") - _count(hold, "vector.load") == (24 if reload else 0)
    # Two warpgroups: one block-wide barrier per step for the pair's leaves (loop and last row),
    # besides Mosaic's own (one more for a 256-thread program under jax 0.10.2).
    more = _count(text, "gpu.barrier") - _count(_module(reload, 1), "gpu.barrier")
    assert more >= 2 if warpgroups == 2 else more == 0
