"""Each framework's kernel on the other framework's arrays, and a bitwise cross-check on the device.

`torch_rms_norm_on_jax` runs bi_torch's Triton kernel on JAX arrays and `jax_rms_norm_on_torch`
runs bi_jax's Pallas kernel on torch tensors: inputs and results cross through `bridge.interop.dlpack`
without a copy or a host round trip, and come back in the caller's framework. `cross_check` runs
both kernels on the same device memory and compares their bits there, in JAX; `cross_check_backward`
(`bridge.interop.backward`, importable from here too) does the same for the gradients (torch
autograd against jax.vjp, NUMERICS.md's backward), and `bridge.interop.fp8.cross_check_fp8` for the
FP8 output (contract v1.2): out's codes, the scales, the new residual. What the checks share
(probe, best_device, first_bit_difference, first_output_difference): `bridge.interop.device`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple, Union

import numpy as np

from .backward import cross_check_backward  # noqa: F401 (the README documents it here)
from .device import _bi_jax, best_device, first_output_difference
from .dlpack import to_jax, to_torch
from .fp8 import _any_to_jax, _any_to_torch, _jax_quantization, _torch_quantization

if TYPE_CHECKING:
    import jax
    import torch


def _map(result, convert):
    """convert applied to a result that is one array or a tuple of them, keeping its shape."""
    return tuple(convert(a) for a in result) if isinstance(result, (tuple, list)) else convert(result)


def torch_rms_norm_on_jax(
    x: jax.Array,
    weight: jax.Array,
    eps: float = 1e-6,
    residual: Optional[jax.Array] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype=None,
    scale=None,
    group_size: Optional[int] = None,
) -> Union[jax.Array, Tuple[jax.Array, ...]]:
    """bi_torch.rms_norm on JAX arrays: out, or (out, new_residual), as JAX arrays on x's device.

    FP8 (contract v1.2): out_dtype jnp.float8_e4m3fn (or its name), a JAX or Python scale or a
    group_size; the result is bi_torch's tuple (out[, scales][, new_residual]) in JAX.
    """
    import bi_torch

    result = bi_torch.rms_norm(to_torch(x), to_torch(weight), eps, None if residual is None else to_torch(residual),
                               mode=mode, weight_offset=weight_offset,
                               **_torch_quantization(out_dtype, scale, group_size))
    return _map(result, _any_to_jax)


def jax_rms_norm_on_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    *,
    mode: str = "llama",
    weight_offset: float = 0.0,
    out_dtype=None,
    scale=None,
    group_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """bi_jax.rms_norm on torch tensors: out, or (out, new_residual), as torch tensors on x's device.

    The compiled Pallas kernel runs on a GPU, interpret mode on the CPU: chosen by the tensors'
    device, not by JAX's default backend (CPU tensors on a GPU machine stay on the CPU).
    FP8 (contract v1.2): out_dtype torch.float8_e4m3fn (or its name), a torch or Python scale or a
    group_size; the result is bi_jax's tuple (out[, scales][, new_residual]) in torch.
    """
    result = _bi_jax(to_jax(x), to_jax(weight), eps, None if residual is None else to_jax(residual), mode,
                     weight_offset, **_jax_quantization(out_dtype, scale, group_size))
    return _map(result, _any_to_torch)


def cross_check(
    x_np: np.ndarray,
    weight_np: np.ndarray,
    eps: float,
    residual_np: Optional[np.ndarray],
    mode: str,
    weight_offset: float,
    *,
    device: Optional[str] = None,
) -> Optional[str]:
    """bi_torch and bi_jax on the same inputs, compared bit for bit on the device: None if equal.

    bi_torch runs on torch tensors on `device` ("cuda" or "cpu"; default `best_device()`), its
    results go to JAX zero-copy; bi_jax runs on the very same input memory (to_jax of the torch
    inputs) on JAX's matching device. Otherwise a one-line description: which output, how many
    elements differ, the first differing index and both values.
    """
    import bi_torch

    device = device or best_device()
    x, weight, residual = (None if a is None else bi_torch.from_numpy(a, device)
                           for a in (x_np, weight_np, residual_np))
    by_torch = bi_torch.rms_norm(x, weight, eps, residual, mode=mode, weight_offset=weight_offset)
    by_jax = _bi_jax(to_jax(x), to_jax(weight), eps, None if residual is None else to_jax(residual), mode,
                     weight_offset)
    if residual is None:
        by_torch, by_jax = (by_torch,), (by_jax,)
    return first_output_difference(("out", "new_residual"), by_torch, by_jax, to_jax)
