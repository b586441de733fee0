"""bi_jax.linen.RMSNorm: the flax.linen twin of bi_jax.RMSNorm (nnx) and bi_torch.RMSNorm.

Same fields and the same parameter, `weight` of shape (hidden_size,), so one HF checkpoint
array loads into any of them (bi_jax.load_hf_weight) and gives the same output and gradient bits
(NUMERICS.md): the module adds nothing to bi_jax.rms_norm, whose custom_vjp gives the backward.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from .ops import rms_norm


class RMSNorm(nn.Module):
    """Batch-invariant RMSNorm with an HF-style `weight` param of shape (hidden_size,) and `dtype`.

    weight_offset=1.0 with zero-initialised weights gives Gemma's (1 + w) convention, as in
    bi_torch.RMSNorm; otherwise the weight starts at ones. `dtype` is the weight's dtype (it must
    be x's, or float32 for the contract's fp32 weights), not a computation dtype: the contract
    fixes the arithmetic.
    """

    hidden_size: int
    eps: float = 1e-6
    mode: str = "llama"
    weight_offset: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: Optional[jax.Array] = None
                 ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
        """out, or (out, new_residual) when a residual is given, exactly as bi_jax.rms_norm."""
        init = nn.initializers.zeros if self.weight_offset else nn.initializers.ones
        weight = self.param("weight", init, (self.hidden_size,), self.dtype)
        return rms_norm(x, weight, self.eps, residual, mode=self.mode, weight_offset=self.weight_offset)
