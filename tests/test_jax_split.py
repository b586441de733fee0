"""bi_jax above MAX_ELEMENTS: the call split into power-of-two row pieces keeps one call's bits (CPU).

MAX_ELEMENTS is patched down to 1000, so with n = 100 the pieces are 8 rows (piece_rows) and the
split runs in interpret mode on small arrays. Forward and every gradient (grad_x, grad_residual,
grad_weight) must equal bridge.reference on all rows, bit for bit; row counts with a full last
piece, a short one, and a short one of a power-of-two row count (whose -0.0 root the tree over
all rows turns into +0.0). Each test also checks that the traced call really has one kernel per piece.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_backward_helpers import assert_bits, assert_grads, expected, random_rows, random_weight

import bi_jax
from bi_jax import ops
from bridge import reference

N, LIMIT, PIECE = 100, 1000, 8


@pytest.fixture(autouse=True)
def small_limit(monkeypatch):
    monkeypatch.setattr(ops, "MAX_ELEMENTS", LIMIT)


def test_piece_rows():
    assert [ops.piece_rows(n) for n in (100, 125, 126, 500, 501, 1000)] == [8, 8, 4, 2, 1, 1]
    with pytest.raises(ValueError, match="x: at most 1000 elements per row"):
        bi_jax.rms_norm(jnp.ones((1, 1001)), jnp.ones(1001))


def _vjp(x, w, g, eps, r, gr, mode, offset):
    """(out[, new_residual]), (grad_x[, grad_residual], grad_weight) by an eager jax.vjp, and the
    jaxpr's kernel counts (forward, backward); gr None leaves the new residual unused."""
    def f(*args):
        result = bi_jax.rms_norm(args[0], args[1], eps, *args[2:], mode=mode, weight_offset=offset)
        return result[0] if r is not None and gr is None else result

    def run(*primals):
        result, vjp = jax.vjp(f, *primals)
        cotangent = jnp.asarray(g) if r is None or gr is None else (jnp.asarray(g), jnp.asarray(gr))
        return result, vjp(cotangent)

    primals = tuple(jnp.asarray(a) for a in (x, w, r) if a is not None)
    names = re.findall(r"name=(\w+)", str(jax.make_jaxpr(run)(*primals)))
    counts = (names.count("bi_norm_rms_norm"), names.count("bi_norm_rms_norm_backward"))
    result, grads = run(*primals)
    grads = grads if r is None else (grads[0], grads[2], grads[1])
    return result, grads, counts


CASES = [  # rows (leading shape), dtype, residual: None, "x" (x's dtype) or "fp32"; gr given; mode; offset
    ((16,), "bfloat16", None, False, "llama", 0.0),
    ((3, 7), "bfloat16", "x", True, "llama", 0.0),
    ((26,), "float16", "fp32", False, "fp32", 1.0),
    ((2, 13), "float32", "x", True, "llama", -0.5),
]


@pytest.mark.parametrize("lead,dtype,residual,has_gr,mode,offset", CASES)
def test_split_matches_one_call(lead, dtype, residual, has_gr, mode, offset):
    rng = np.random.default_rng(sum(lead) + len(dtype))
    shape = lead + (N,)
    x, g = random_rows(rng, shape, dtype), random_rows(rng, shape, dtype)
    w = random_weight(rng, N, dtype)
    r_dtype = None if residual is None else ("float32" if residual == "fp32" else dtype)
    r = None if r_dtype is None else random_rows(rng, shape, r_dtype)
    gr = random_rows(rng, shape, r_dtype) if has_gr else None
    result, grads, counts = _vjp(x, w, g, 1e-6, r, gr, mode, offset)
    pieces = -(-x.size // N // PIECE)
    assert counts == (pieces, pieces), f"kernel calls (forward, backward) {counts}, expected {pieces} pieces"
    want = reference.rms_norm(x.reshape(-1, N), w, 1e-6, None if r is None else r.reshape(-1, N), mode=mode,
                              weight_offset=offset)
    for name, e, a in zip(("out", "new_residual"), want if r is not None else (want,),
                          result if isinstance(result, tuple) else (result,)):
        assert_bits(e.reshape(shape), a, f"{lead}: {name}")
    assert_grads(expected(x, w, g, 1e-6, r, gr, mode=mode, offset=offset), grads, f"{lead} {dtype}")


def test_short_power_of_two_last_piece_signs():
    """26 rows = 3 pieces of 8 and one of 2: a column whose every product is -0.0 has a -0.0 root in
    each piece, but B7's tree pads the last piece's 2 rows with +0.0 rows (to 32), which gives +0.0;
    4 roots need no padding in combine_roots, so only the split's own rule gets +0.0 there."""
    rng = np.random.default_rng(26)
    x = np.abs(random_rows(rng, (26, N), "bfloat16"))
    w = (np.abs(random_weight(rng, N, "float32")) + 0.5).astype(reference.numpy_dtype("bfloat16"))
    g = random_rows(rng, (26, N), "bfloat16")
    g[:, 5] = -0.0
    want = expected(x, w, g)
    assert reference.bits(want[1])[5] == 0, "the reference's tree gives +0.0 in column 5"
    _, grads, counts = _vjp(x, w, g, 1e-6, None, None, "llama", 0.0)
    assert counts == (4, 4)
    assert_grads(want, grads, "26 rows, column 5 all -0.0")
