"""A call above MAX_ELEMENTS split into pieces of rows (bi_jax.ops' docstring says why and how).

Rows are independent, so out, the new residual, grad_x and grad_residual keep their bits piece by
piece. For grad_weight each piece gives its float32 tree root and combine_roots adds them by the
pairwise tree: aligned power-of-two blocks are subtrees of B7's tree over all rows (NUMERICS.md),
so grad_weight has the bits of one call on all rows.
"""

from __future__ import annotations

from typing import Callable, List

import jax
import jax.numpy as jnp

from bridge.numerics.contract import next_power_of_two

from .backward import backward_rows, combine_roots


def _pieces(a: jax.Array, piece: int) -> List[jax.Array]:
    return [a[i:i + piece] for i in range(0, a.shape[0], piece)]


def split_forward(forward: Callable, has_residual: bool, piece: int) -> Callable:
    """forward over `piece`-row slices, results concatenated: each row's bits are its own.

    The operands after the residual (an FP8 scale) are shared by every piece.
    """
    def run(x2, weight, *rest):
        residual2, shared = rest[:has_residual], rest[has_residual:]
        slices = zip(_pieces(x2, piece), *(_pieces(a, piece) for a in residual2))
        results = [forward(x, weight, *r, *shared) for x, *r in slices]
        return tuple(map(jnp.concatenate, zip(*results))) if isinstance(results[0], tuple) else jnp.concatenate(results)
    return run


def split_backward(z2, weight, g, g_r, *, piece: int, **kwargs):
    """backward_rows per `piece`-row slice; grad_weight from the pieces' float32 roots (module docstring)."""
    g_rs = [None] * -(-z2.shape[0] // piece) if g_r is None else _pieces(g_r, piece)
    grads = [backward_rows(z, weight, gp, grp, root=True, **kwargs)
             for z, gp, grp in zip(_pieces(z2, piece), _pieces(g, piece), g_rs)]
    roots = [grad[2] for grad in grads]
    last = z2.shape[0] % piece
    if last and next_power_of_two(last) < piece:
        # In the tree over all rows the short last piece's root is added to its +0.0 padding
        # rows' subtree up to `piece` rows, which turns a -0.0 root into +0.0.
        roots[-1] = jnp.where(roots[-1] == 0, jnp.float32(0.0), roots[-1])
    grad_weight = combine_roots(jnp.stack(roots), weight.dtype)
    grad_residual = jnp.concatenate([grad[1] for grad in grads]) if kwargs["has_residual"] else None
    return jnp.concatenate([grad[0] for grad in grads]), grad_residual, grad_weight
