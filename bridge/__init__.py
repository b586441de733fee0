"""bi-norm's framework-neutral core: the numerics contract, its numpy reference, the golden
corpus and the parity tooling. Importing it never imports torch or jax."""

from .contract import (CANONICAL_NAN_BITS, CONTRACT_VERSION, DTYPES, MODES, check_rms_norm_args,
                       check_rms_norm_backward_args)
from .reference import rms_norm, rms_norm_backward

__all__ = ["CANONICAL_NAN_BITS", "CONTRACT_VERSION", "DTYPES", "MODES", "check_rms_norm_args",
           "check_rms_norm_backward_args", "rms_norm", "rms_norm_backward"]
