"""bi_jax: batch-invariant RMSNorm for JAX, a Pallas kernel bitwise equal to bridge.reference."""

from typing import Any, List

from .ops import dtype_name, rms_norm

__all__ = ["dtype_name", "rms_norm"]


def __getattr__(name: str) -> Any:
    # RMSNorm needs flax; import it on first use so that `import bi_jax` works without flax.
    if name == "RMSNorm":
        from .module import RMSNorm

        return RMSNorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | {"RMSNorm"})
