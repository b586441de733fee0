"""bi_torch: batch-invariant RMSNorm for PyTorch, a Triton kernel bitwise equal to bridge.reference."""

from . import autograd  # noqa: F401  registers the backward of the out-of-place custom ops
from .hf import PatchReport, patch_model
from .module import RMSNorm
from .ops import (InterpreterWarning, dtype_name, from_numpy, fused_add_rms_norm_, rms_norm, rms_norm_batch_invariant,
                  to_numpy, torch_dtype)

__all__ = ["InterpreterWarning", "PatchReport", "RMSNorm", "dtype_name", "from_numpy", "fused_add_rms_norm_",
           "patch_model", "rms_norm", "rms_norm_batch_invariant", "to_numpy", "torch_dtype"]
