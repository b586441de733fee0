"""What the cross-framework checks share: whether both kernels can run here, the device both
frameworks see, bi_jax run on its arrays' device, and the first bit difference of two arrays
(and of a call's outputs, by name), found on the device.

The checks themselves: `bridge.interop.crossframework` (forward), `bridge.interop.backward` (the
gradients) and `bridge.interop.fp8` (the FP8 output).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import jax


def probe() -> Optional[str]:
    """None when both kernels can run here, else why not (as `bridge.verify.backends` probes say it)."""
    try:
        import bi_jax  # noqa: F401
        import bi_torch  # noqa: F401
    except ImportError as e:
        return f"needs torch, triton and jax ({e.name} not importable)"
    return None


def best_device() -> str:
    """"cuda" when both torch and JAX see a GPU, else "cpu"."""
    import jax
    import torch

    return "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"


def _bi_jax(x: jax.Array, weight: jax.Array, eps: float, residual: Optional[jax.Array], mode: str,
            weight_offset: float, **fp8) -> Union[jax.Array, Tuple[jax.Array, ...]]:
    """bi_jax.rms_norm on x's device: compiled on a GPU, interpret mode on the CPU; fp8: its FP8
    keyword arguments (out_dtype, scale or group_size), if any."""
    import jax

    import bi_jax

    (device,) = x.devices()
    # JAX's default device is part of jit's cache key: set it only where it differs (CPU arrays on
    # a GPU machine), or every call here would recompile kernels the caller has compiled already.
    placed = contextlib.nullcontext() if device == jax.devices()[0] else jax.default_device(device)
    with placed:
        return bi_jax.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset,
                               interpret=device.platform != "gpu", **fp8)


def first_output_difference(names, by_torch, by_jax, torch_to_jax: Callable) -> Optional[str]:
    """The first output, in `names` order, whose torch result (moved to JAX by torch_to_jax) and
    JAX result differ in bits: "name: difference"; None if all agree. Outputs torch gives as None
    (absent for this call) are skipped."""
    for what, t, j in zip(names, by_torch, by_jax):
        if t is None:
            continue
        problem = first_bit_difference(torch_to_jax(t), j, labels=("torch", "jax"))
        if problem:
            return f"{what}: {problem}"
    return None


def first_bit_difference(a: jax.Array, b: jax.Array, labels: Tuple[str, str] = ("a", "b")) -> Optional[str]:
    """None if float arrays a and b have the same shape, dtype and bits; else the first difference.

    The comparison runs where the arrays are (integer views, on the device); only a few scalars
    come back to the host.
    """
    import jax.numpy as jnp
    from jax import lax

    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{labels[0]} is {a.dtype}{list(a.shape)}, {labels[1]} is {b.dtype}{list(b.shape)}"
    count, i = (int(v) for v in _count_and_first_difference()(a, b))
    if count == 0:
        return None
    where = tuple(int(k) for k in np.unravel_index(i, a.shape))
    uint = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
    width = 2 * a.dtype.itemsize

    def show(label: str, v: jax.Array) -> str:
        value = v.ravel()[i]
        return f"{label} {value.item()!r} (0x{int(lax.bitcast_convert_type(value, uint)):0{width}x})"

    return (f"{count} of {a.size} elements differ; first at index {where}: "
            f"{show(labels[0], a)}, {show(labels[1], b)}")


@functools.lru_cache(maxsize=None)
def _count_and_first_difference() -> Callable:
    """One compiled program (per shape and dtype): how many elements differ in bits, and the first."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.jit
    def run(a: jax.Array, b: jax.Array) -> Tuple[jax.Array, jax.Array]:
        uint = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
        differs = (lax.bitcast_convert_type(a, uint) != lax.bitcast_convert_type(b, uint)).ravel()
        return jnp.sum(differs), jnp.argmax(differs)

    return run
