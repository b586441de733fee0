"""bi_jax.RMSNorm: the flax.nnx twin of bi_torch.RMSNorm, same parameters and the same `weight`.

A model ported between PyTorch and JAX loads one checkpoint array into either module and gets the
same output bits (NUMERICS.md), so the module adds nothing to bi_jax.rms_norm but the parameter.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from .ops import rms_norm


class RMSNorm(nnx.Module):
    """Batch-invariant RMSNorm with an HF-style `weight` of shape (hidden_size,).

    weight_offset=1.0 with zero-initialised weights gives Gemma's (1 + w) convention, as in
    bi_torch.RMSNorm. Load a checkpoint with `norm.weight.set_value(array)` (or `.value = array`
    on older flax); the array must have `dtype`, which is checked when the module is called.
    `rngs` is accepted because nnx modules conventionally take it; the init is deterministic.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, mode: str = "llama", weight_offset: float = 0.0,
                 dtype: Any = jnp.float32, rngs: Optional[nnx.Rngs] = None) -> None:
        del rngs  # ones (or zeros with an offset): nothing random to draw
        self.hidden_size, self.eps, self.mode, self.weight_offset = hidden_size, eps, mode, weight_offset
        init = jnp.zeros if weight_offset else jnp.ones
        self.weight = nnx.Param(init((hidden_size,), dtype))

    def __call__(self, x: jax.Array, residual: Optional[jax.Array] = None
                 ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
        """out, or (out, new_residual) when a residual is given, exactly as bi_jax.rms_norm."""
        return rms_norm(x, self.weight[...], self.eps, residual, mode=self.mode, weight_offset=self.weight_offset)
