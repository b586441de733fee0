"""Autograd for bi_torch's out-of-place ops: NUMERICS.md's backward (B1-B7) as a custom op.

`bi_norm::rms_norm` and `bi_norm::add_rms_norm` get a formula through `torch.library.register_autograd`
whose backward is one more opaque custom op, `bi_norm::rms_norm_backward` (with a fake), so
AOTAutograd traces forward and backward under torch.compile(fullgraph=True) without a graph break.
Nothing here reads a value on the host (no .item(), no data-dependent shape): the backward can be
captured in a CUDA graph. The in-place `bi_norm::fused_add_rms_norm_` has no backward (bi_torch.ops).

Saved for the backward: what the forward normalised (x, or the new residual with a residual) and
the weight, never a float32 copy; inv and c are recomputed from them (the same bits, B-steps).
Only first-order gradients: the backward op itself has no backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops  # noqa: F401  defines bi_norm::rms_norm and add_rms_norm, whose autograd is registered below
from .launch import launch_backward
from .rows import as_rows


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, n) with the last dimension contiguous: a view when one exists, else a contiguous copy.

    Output gradients come with whatever strides the loss gave them (expand: stride 0, a transposed
    loss: columns apart); copying them changes no bit, and the kernel needs one row stride.
    """
    try:
        return as_rows(t, "grad")
    except ValueError:
        return t.contiguous().view(-1, t.shape[-1])


def _separate_residual_grad(z: torch.Tensor, weight: torch.Tensor, has_residual: bool) -> bool:
    """Whether grad_residual needs a buffer of its own: only for a residual of another dtype than x's.
    With a same-dtype residual grad_residual = rnR(dz) = rnD(dz) = grad_x bit for bit (B6), so the
    kernel writes both into one buffer and autograd hands that tensor to x and the residual (as for
    a + b: torch.autograd.grad returns it twice; .grad fields get their own copies)."""
    return has_residual and z.dtype != weight.dtype


def _grad_buffers(z: torch.Tensor, weight: torch.Tensor, has_residual: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x in D, grad_residual in R or an empty placeholder, grad_weight (n,) in D); the fake too."""
    like = dict(dtype=weight.dtype, device=z.device)
    grad_x = torch.empty(z.shape, **like)
    shape = z.shape if _separate_residual_grad(z, weight, has_residual) else (0,)
    grad_residual = torch.empty(shape, dtype=z.dtype, device=z.device)
    return grad_x, grad_residual, torch.empty((z.shape[-1],), **like)


@torch.library.custom_op("bi_norm::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(z: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor,
                          grad_new_residual: Optional[torch.Tensor], eps: float, norm_mode: str,
                          weight_offset: float, has_residual: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_residual, grad_weight). z: x, or the new residual when has_residual. grad_residual
    is a buffer of its own only for a residual of another dtype than x's; otherwise an empty
    placeholder, and grad_x is the residual's gradient too."""
    n = z.shape[-1]
    grad_x, grad_residual, grad_weight = _grad_buffers(z, weight, has_residual)
    dx_rows = grad_x.view(-1, n)
    if not has_residual:
        dr_rows = None
    elif _separate_residual_grad(z, weight, has_residual):
        dr_rows = grad_residual.view(-1, n)
    else:
        dr_rows = dx_rows  # the kernel stores the same bits to both pointers
    launch_backward(_row_view(z), weight.contiguous(), _row_view(grad_out),
                    None if grad_new_residual is None else _row_view(grad_new_residual),
                    dx_rows, dr_rows, grad_weight, eps, norm_mode, weight_offset)
    return grad_x, grad_residual, grad_weight


@_rms_norm_backward_op.register_fake
def _(z, weight, grad_out, grad_new_residual, eps, norm_mode, weight_offset, has_residual):
    return _grad_buffers(z, weight, has_residual)


def _save(ctx, z: torch.Tensor, weight: torch.Tensor, eps: float, norm_mode: str, weight_offset: float) -> None:
    ctx.save_for_backward(z, weight)
    ctx.eps, ctx.norm_mode, ctx.weight_offset = eps, norm_mode, weight_offset
    # Unused outputs arrive as None: an absent new-residual gradient goes to the kernel as None
    # (+0.0 by B6, the same bits as zeros) and no zero tensor is allocated for it.
    ctx.set_materialize_grads(False)


def _grads(ctx, grad_out: Optional[torch.Tensor], grad_new_residual: Optional[torch.Tensor], has_residual: bool
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z, weight = ctx.saved_tensors
    if grad_out is None:
        # Only the new residual is used: out's gradient is g = 0 in the contract, zeros of D.
        grad_out = torch.zeros(z.shape, dtype=weight.dtype, device=z.device)
    return torch.ops.bi_norm.rms_norm_backward(z, weight, grad_out, grad_new_residual, ctx.eps, ctx.norm_mode,
                                               ctx.weight_offset, has_residual)


def _setup_rms_norm(ctx, inputs, output) -> None:
    x, weight, eps, norm_mode, weight_offset = inputs
    _save(ctx, x, weight, eps, norm_mode, weight_offset)


def _backward_rms_norm(ctx, grad_out):
    grad_x, _, grad_weight = _grads(ctx, grad_out, None, has_residual=False)
    need_x, need_w = ctx.needs_input_grad[:2]
    return grad_x if need_x else None, grad_weight if need_w else None, None, None, None


def _setup_add_rms_norm(ctx, inputs, output) -> None:
    x, residual, weight, eps, norm_mode, weight_offset = inputs
    _save(ctx, output[1], weight, eps, norm_mode, weight_offset)


def _backward_add_rms_norm(ctx, grad_out, grad_new_residual):
    grad_x, grad_residual, grad_weight = _grads(ctx, grad_out, grad_new_residual, has_residual=True)
    z, weight = ctx.saved_tensors
    if not _separate_residual_grad(z, weight, True):
        grad_residual = grad_x
    need_x, need_r, need_w = ctx.needs_input_grad[:3]
    return (grad_x if need_x else None, grad_residual if need_r else None, grad_weight if need_w else None,
            None, None, None)


torch.library.register_autograd("bi_norm::rms_norm", _backward_rms_norm, setup_context=_setup_rms_norm)
torch.library.register_autograd("bi_norm::add_rms_norm", _backward_add_rms_norm, setup_context=_setup_add_rms_norm)
