"""bi_jax: batch-invariant RMSNorm for JAX, a Pallas kernel bitwise equal to bridge.reference."""

import importlib
from typing import Any, List

from .ops import dtype_name, rms_norm

__all__ = ["dtype_name", "rms_norm"]

# Names that need flax (or import it on use): imported on first access, so that `import bi_jax`
# works without flax. name -> (submodule, attribute there; None for the submodule itself).
_LAZY = {
    "RMSNorm": (".module", "RMSNorm"),
    "LinenRMSNorm": (".linen", "RMSNorm"),
    "linen": (".linen", None),
    "load_hf_weight": (".weights", "load_hf_weight"),
    "hf_weight_to_jax": (".weights", "hf_weight_to_jax"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name, __name__)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
