"""bi_torch's and bi_jax's gradients of the same inputs, compared bit for bit on the device
(`cross_check_backward`: torch autograd against jax.vjp, NUMERICS.md's backward)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from .device import best_device, first_output_difference
from .dlpack import to_jax

if TYPE_CHECKING:
    import jax
    import torch


def _bi_jax_backward(x: jax.Array, weight: jax.Array, grad_out: jax.Array, eps: float, residual: Optional[jax.Array],
                     grad_new_residual: Optional[jax.Array], mode: str, weight_offset: float) -> Tuple[jax.Array, ...]:
    """bi_jax's gradients by jax.vjp on x's device, in reference.rms_norm_backward's order.

    An absent grad_new_residual leaves the new residual out of the differentiated outputs, as
    torch autograd does when it is not among the outputs: JAX's symbolic zero, which B6 adds as +0.0.
    """
    import jax

    import bi_jax

    (device,) = x.devices()
    placed = contextlib.nullcontext() if device == jax.devices()[0] else jax.default_device(device)

    def norm(*args):
        result = bi_jax.rms_norm(args[0], args[1], eps, args[2] if residual is not None else None, mode=mode,
                                 weight_offset=weight_offset, interpret=device.platform != "gpu")
        return result[0] if residual is not None and grad_new_residual is None else result

    primals = (x, weight) if residual is None else (x, weight, residual)
    with placed:
        _, vjp = jax.vjp(norm, *primals)
        grads = vjp(grad_out if residual is None or grad_new_residual is None else (grad_out, grad_new_residual))
    return tuple(grads) if residual is None else (grads[0], grads[2], grads[1])


def _bi_torch_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor], grad_new_residual: Optional[torch.Tensor], mode: str,
                       weight_offset: float) -> Tuple[torch.Tensor, ...]:
    """bi_torch's gradients by torch autograd, in reference.rms_norm_backward's order."""
    import torch

    import bi_torch

    inputs = [t.detach().requires_grad_() for t in (x, weight, residual) if t is not None]
    with torch.enable_grad():
        result = bi_torch.rms_norm(inputs[0], inputs[1], eps, inputs[2] if residual is not None else None, mode=mode,
                                   weight_offset=weight_offset)
    outputs, cotangents = [result if residual is None else result[0]], [grad_out]
    if grad_new_residual is not None:
        outputs.append(result[1])
        cotangents.append(grad_new_residual)
    grads = torch.autograd.grad(outputs, inputs, cotangents)
    return tuple(grads) if residual is None else (grads[0], grads[2], grads[1])


def cross_check_backward(
    x_np: np.ndarray,
    weight_np: np.ndarray,
    grad_out_np: np.ndarray,
    eps: float,
    residual_np: Optional[np.ndarray],
    grad_new_residual_np: Optional[np.ndarray],
    mode: str,
    weight_offset: float,
    *,
    device: Optional[str] = None,
) -> Optional[str]:
    """bi_torch's and bi_jax's gradients of the same inputs, compared bit for bit: None if equal.

    Both frameworks differentiate the very same device memory (torch tensors on `device`, default
    `best_device()`, and their DLPack views in JAX); torch's gradients go to JAX zero-copy and are
    compared there. grad_new_residual None is absent in both. Otherwise a one-line description:
    which gradient, how many elements differ, the first differing index and both values.
    """
    import bi_torch

    device = device or best_device()
    tensors = [None if a is None else bi_torch.from_numpy(a, device)
               for a in (x_np, weight_np, grad_out_np, residual_np, grad_new_residual_np)]
    by_torch = _bi_torch_backward(*tensors[:3], eps, *tensors[3:], mode, weight_offset)
    views = [None if t is None else to_jax(t) for t in tensors]
    by_jax = _bi_jax_backward(*views[:3], eps, *views[3:], mode, weight_offset)
    names = ("grad_x", "grad_weight") if residual_np is None else ("grad_x", "grad_residual", "grad_weight")
    return first_output_difference(names, by_torch, by_jax, to_jax)
