"""bi_torch: batch-invariant RMSNorm for PyTorch, a Triton kernel bitwise equal to bridge.reference."""

from . import autograd  # noqa: F401  registers the backward of the out-of-place custom ops
from .module import RMSNorm
from .ops import (dtype_name, from_numpy, fused_add_rms_norm_, rms_norm, rms_norm_batch_invariant, to_numpy,
                  torch_dtype)

__all__ = ["RMSNorm", "dtype_name", "from_numpy", "fused_add_rms_norm_", "rms_norm", "rms_norm_batch_invariant",
           "to_numpy", "torch_dtype"]
