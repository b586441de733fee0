"""The marks of the bi_jax GPU test files: `gpu`, and skipped unless JAX's default backend is a GPU."""

from __future__ import annotations

import jax
import pytest


def jax_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


JAX_GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not jax_gpu(), reason="JAX's default backend is not a GPU (no CUDA jaxlib or no device)"),
]
