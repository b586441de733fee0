"""bi_jax: batch-invariant RMSNorm for JAX, a Pallas kernel bitwise equal to bridge.reference."""

from .ops import dtype_name, rms_norm

__all__ = ["dtype_name", "rms_norm"]
