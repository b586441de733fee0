"""bi-norm's framework-neutral core: the numerics contract, its numpy reference, the golden
corpus and the parity tooling. Importing it never imports torch or jax.

Its wings, each importing only the ones before it: numerics (the contract and the reference),
golden (the corpus), interop (DLPack and the cross-framework checks), verify and bench (the
tools); cli.py (the `bi-norm` command) on top.
"""

from types import ModuleType

from .numerics import reference
from .numerics.contract import (CANONICAL_NAN_BITS, CONTRACT_VERSION, DTYPES, MODES, check_rms_norm_args,
                                check_rms_norm_backward_args)
from .numerics.reference import rms_norm, rms_norm_backward

__all__ = ["CANONICAL_NAN_BITS", "CONTRACT_VERSION", "DTYPES", "MODES", "check_rms_norm_args",
           "check_rms_norm_backward_args", "reference", "rms_norm", "rms_norm_backward"]


def __getattr__(name: str) -> ModuleType:
    # `from bridge import dlpack` (README): imported on first use only, since importing it sets
    # JAX's GPU memory policy, which `import bridge` alone must not.
    if name == "dlpack":
        from .interop import dlpack

        return dlpack
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
