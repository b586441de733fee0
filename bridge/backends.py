"""The backends `bi-norm verify` can run, each behind one numpy-in, numpy-out function.

Frameworks are imported lazily, inside each backend, so that `import bridge` stays free of
torch and jax and a missing framework only makes its backends unavailable.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import numpy as np

from . import reference

# (x, weight, eps, residual, mode, weight_offset) -> out, or (out, new_residual) with a residual.
RunFn = Callable[..., object]


@dataclasses.dataclass
class Backend:
    name: str
    description: str
    probe: Callable[[], Optional[str]]  # None when usable, else why not
    make_runner: Callable[[], RunFn]


def _torch_probe(device: str) -> Optional[str]:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        return f"needs torch and triton ({e.name} not installed)"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import bi_torch  # noqa: F401
    except ImportError as e:
        return f"bi_torch failed to import: {e}"
    return None


def _torch_runner(device: str) -> RunFn:
    import bi_torch

    def to_torch(a: Optional[np.ndarray]):
        return None if a is None else bi_torch.from_numpy(a, device)

    def run(x, weight, eps, residual, mode, weight_offset):
        result = bi_torch.rms_norm(to_torch(x), to_torch(weight), eps, to_torch(residual), mode=mode,
                                   weight_offset=weight_offset)
        if residual is None:
            return bi_torch.to_numpy(result)
        return bi_torch.to_numpy(result[0]), bi_torch.to_numpy(result[1])

    return run


def _jax_probe(interpret: bool) -> Optional[str]:
    try:
        import jax
    except ImportError as e:
        return f"needs jax ({e.name} not installed)"
    if not interpret and jax.default_backend() != "gpu":
        return "no GPU visible to JAX"
    try:
        import bi_jax  # noqa: F401
    except ImportError as e:
        return f"bi_jax failed to import: {e}"
    return None


def _jax_runner(interpret: bool) -> RunFn:
    import jax
    import jax.numpy as jnp

    import bi_jax

    device = jax.devices("cpu")[0] if interpret else jax.devices()[0]

    def to_jax(a: Optional[np.ndarray]):
        return None if a is None else jax.device_put(jnp.asarray(a), device)

    def run(x, weight, eps, residual, mode, weight_offset):
        result = bi_jax.rms_norm(to_jax(x), to_jax(weight), eps, to_jax(residual), mode=mode,
                                 weight_offset=weight_offset, interpret=interpret)
        if residual is None:
            return np.asarray(result)
        return np.asarray(result[0]), np.asarray(result[1])

    return run


BACKENDS: List[Backend] = [
    Backend("reference", "numpy float32 reference (bridge.reference)", lambda: None,
            lambda: lambda x, w, eps, r, mode, off: reference.rms_norm(x, w, eps, r, mode=mode, weight_offset=off)),
    Backend("triton-interpret", "bi_torch on CPU tensors (Triton interpreter)",
            lambda: _torch_probe("cpu"), lambda: _torch_runner("cpu")),
    Backend("triton-gpu", "bi_torch on CUDA tensors (compiled Triton)",
            lambda: _torch_probe("cuda"), lambda: _torch_runner("cuda")),
    Backend("pallas-interpret", "bi_jax with interpret=True on CPU",
            lambda: _jax_probe(True), lambda: _jax_runner(True)),
    Backend("pallas-gpu", "bi_jax compiled Pallas (Triton lowering) on GPU",
            lambda: _jax_probe(False), lambda: _jax_runner(False)),
]
