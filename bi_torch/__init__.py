"""bi_torch: batch-invariant RMSNorm for PyTorch, a Triton kernel bitwise equal to bridge.reference."""

from . import autograd  # noqa: F401  registers the backward of the out-of-place custom ops
from .hf import PatchReport, patch_model
from .module import RMSNorm
from .ops import InterpreterWarning, from_numpy, fused_add_rms_norm_, rms_norm, rms_norm_batch_invariant, to_numpy
from .rows import dtype_name, torch_dtype
from .vllm_fp8 import fused_add_rms_norm_static_fp8_quant, rms_norm_per_block_quant, rms_norm_static_fp8_quant

__all__ = ["InterpreterWarning", "PatchReport", "RMSNorm", "dtype_name", "from_numpy", "fused_add_rms_norm_",
           "fused_add_rms_norm_static_fp8_quant", "patch_model", "rms_norm", "rms_norm_batch_invariant",
           "rms_norm_per_block_quant", "rms_norm_static_fp8_quant", "to_numpy", "torch_dtype"]
