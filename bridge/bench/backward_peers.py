"""What `bi-norm bench` times in the backward and fwd+bwd passes: ours and the peers (BENCHMARKS.md).

Imported by bridge.bench.backward on a GPU run only: it needs torch and triton (through
bridge.bench.peers, whose forwards and streaming copy it reuses); jax, tokamax and liger_kernel
are imported inside the functions that use them. A factory raises bridge.bench.plan.Skip when
its implementation cannot run on this machine at all.

torch: `make(weight, eps, residual, xs, rs)` does, once per input set, what the backward needs
from the forward (bi-torch: the new residual; autograd: the graph; Liger: its saved tensors) and
returns a TorchBackward whose fn(i, grad_out, grad_new_residual) gives set i's (grad_x,
grad_residual, grad_weight); grad_residual None: grad_x is the residual's gradient too. The
fwd+bwd factories run the forward inside fn. JAX: `make(eps, residual)` returns a pure
grads(z, g, gr, w) -> the same triple, z being what the forward normalised (x or the new residual).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import peers
from .peers import sm_copy  # noqa: F401  the backward's copy ceiling, for bridge.bench.backward
from .plan import Skip

Grads = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]
Sets = Sequence[Optional[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class TorchBackward:
    fn: Callable[[int, torch.Tensor, Optional[torch.Tensor]], Grads]
    overwrites_grad_out: bool = False  # Liger writes grad_x over grad_out: it gets a fresh copy per call


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _autograd(forward: Callable, weight: torch.Tensor, eps: float, x: torch.Tensor, r: Optional[torch.Tensor]):
    """(outputs, inputs) of forward(weight, eps, residual)(x, r), x, r and the weight leaves that require grad."""
    w, x = _leaf(weight), _leaf(x)
    r = None if r is None else _leaf(r)
    with torch.enable_grad():
        outs = forward(w, eps, r is not None)(x, r)
    return outs, (x, w) if r is None else (x, r, w)


def _grad(outs, inputs: tuple, g: torch.Tensor, gr: Optional[torch.Tensor], retain: bool) -> Grads:
    grads = torch.autograd.grad(outs, inputs, (g,) if gr is None else (g, gr), retain_graph=retain)
    return grads[0], grads[1] if len(inputs) == 3 else None, grads[-1]


def _backward_by_autograd(forward: Callable) -> Callable:
    """A backward factory: each set's forward graph built once, differentiated again at every call."""
    def make(weight: torch.Tensor, eps: float, residual: bool, xs: Sets, rs: Sets) -> TorchBackward:
        graphs = [_autograd(forward, weight, eps, x, r) for x, r in zip(xs, rs)]
        return TorchBackward(lambda i, g, gr: _grad(*graphs[i], g, gr, retain=True))
    return make


def _fwd_bwd_by_autograd(forward: Callable, overwrites_without_residual: bool = False) -> Callable:
    """A fwd+bwd factory: the forward and its backward, both inside every call."""
    def make(weight: torch.Tensor, eps: float, residual: bool, xs: Sets, rs: Sets) -> TorchBackward:
        def fn(i: int, g: torch.Tensor, gr: Optional[torch.Tensor]) -> Grads:
            return _grad(*_autograd(forward, weight, eps, xs[i], rs[i]), g, gr, retain=False)
        return TorchBackward(fn, overwrites_without_residual and not residual)
    return make


# ---------------------------------------------------------------------------------------------
# torch forwards (fn(x, r) for a weight), differentiated by autograd
# ---------------------------------------------------------------------------------------------

def _bi_torch(weight: torch.Tensor, eps: float, residual: bool) -> Callable:
    import bi_torch

    return lambda x, r: bi_torch.rms_norm(x, weight, eps, r)


def _hf_eager(weight: torch.Tensor, eps: float, residual: bool) -> Callable:
    if residual:
        return lambda x, r: peers._llama_add_rms_norm(x, r, weight, eps)
    return lambda x, r: peers._llama_rms_norm(x, weight, eps)


def _hf_compiled(weight: torch.Tensor, eps: float, residual: bool) -> Callable:
    import torch._functorch.config as functorch_config

    # Donated buffers (on by default) free the saved tensors in the first backward, which then
    # refuses retain_graph: the bench differentiates each graph many times.
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return peers.hf_compiled(weight, eps, residual)


# ---------------------------------------------------------------------------------------------
# torch: the backward on its own
# ---------------------------------------------------------------------------------------------

def bi_torch_backward(weight: torch.Tensor, eps: float, residual: bool, xs: Sets, rs: Sets) -> TorchBackward:
    """bi_norm::rms_norm_backward, the op bi_torch's autograd calls, on x or the new residual."""
    import bi_torch

    zs = [bi_torch.rms_norm(x, weight, eps, r)[1] if residual else x for x, r in zip(xs, rs)]

    def fn(i: int, g: torch.Tensor, gr: Optional[torch.Tensor]) -> Grads:
        # A residual in x's dtype: the op's grad_residual is an empty placeholder, grad_x its gradient.
        grad_x, _, grad_weight = torch.ops.bi_norm.rms_norm_backward(zs[i], weight, g, gr, eps, "llama", 0.0,
                                                                     residual)
        return grad_x, None, grad_weight
    return TorchBackward(fn)


def liger_backward(weight: torch.Tensor, eps: float, residual: bool, xs: Sets, rs: Sets) -> TorchBackward:
    """Liger 0.8.5's backward functions, which its autograd Functions call, on their forwards' saved tensors."""
    try:
        from liger_kernel.ops.fused_add_rms_norm import fused_add_rms_norm_backward, fused_add_rms_norm_forward
        from liger_kernel.ops.rms_norm import rms_norm_backward, rms_norm_forward
    except ImportError as e:
        raise Skip(f"liger_kernel not importable ({e}); install the wheel from .whl (benchmarks/METHOD.md)") from None
    if not residual:
        # (X, RSTD, BLOCK_SIZE, num_warps, casting_mode): offset 0, casting mode "llama", no row mode
        saved = [rms_norm_forward(x, weight, eps, 0.0, "llama", None)[1:] for x in xs]

        def fn(i: int, g: torch.Tensor, gr: Optional[torch.Tensor]) -> Grads:
            x, rstd, block, warps, mode = saved[i]
            # in_place=True, LigerRMSNormFunction's default: grad_x is written over g.
            grad_x, grad_weight = rms_norm_backward(g, x, weight, rstd, 0.0, mode, block, warps, True, None)
            return grad_x, None, grad_weight
        return TorchBackward(fn, overwrites_grad_out=True)
    # (S, RSTD, BLOCK_SIZE, num_warps, num_stages, casting_mode)
    saved = [fused_add_rms_norm_forward(x, r, weight, eps, 0.0, "llama")[1:] for x, r in zip(xs, rs)]

    def fused_fn(i: int, g: torch.Tensor, gr: Optional[torch.Tensor]) -> Grads:
        s, rstd, block, warps, stages, mode = saved[i]
        # in_place=False, LigerFusedAddRMSNormFunction's default; it returns grad_x as grad_residual.
        grad_x, _, grad_weight = fused_add_rms_norm_backward(g, gr, s, weight, rstd, 0.0, mode, block, warps,
                                                             stages, False)
        return grad_x, None, grad_weight
    return TorchBackward(fused_fn)


TORCH_BACKWARD: Dict[str, Callable[..., TorchBackward]] = {
    "bi-torch": bi_torch_backward,
    "torch-eager": _backward_by_autograd(peers.torch_eager),
    "hf-eager": _backward_by_autograd(_hf_eager),
    "hf-compiled": _backward_by_autograd(_hf_compiled),
    "liger": liger_backward,
}

# Liger's RMSNorm Function writes grad_x over the output gradient (its in_place default); its fused
# add-RMSNorm Function does not (in_place=False by default).
TORCH_FWD_BWD: Dict[str, Callable[..., TorchBackward]] = {
    "bi-torch": _fwd_bwd_by_autograd(_bi_torch),
    "torch-eager": _fwd_bwd_by_autograd(peers.torch_eager),
    "hf-eager": _fwd_bwd_by_autograd(_hf_eager),
    "hf-compiled": _fwd_bwd_by_autograd(_hf_compiled),
    "liger": _fwd_bwd_by_autograd(peers.liger, overwrites_without_residual=True),
}


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------

def bi_jax_backward(eps: float, residual: bool) -> Callable:
    """bi_jax.backward.backward_fn, what bi_jax.rms_norm's custom_vjp calls (below 2**31 elements),
    with the kernel bi_jax.rms_norm would pick (bi_jax.selection: Mosaic GPU on Hopper)."""
    from bi_jax.backward import backward_fn
    from bi_jax.ops import default_interpret
    from bi_jax.selection import backward_kernel

    interpret = default_interpret()

    def grads(z, g, gr, w):
        fn = backward_fn(eps, "llama", 0.0, interpret, residual, residual,
                         kernel=backward_kernel(None, z.shape[-1], interpret))
        result = fn(z, w, g, *(() if gr is None else (gr,)))
        return result[0], result[1] if residual else None, result[-1]
    return grads


def _vjp(norm: Callable) -> Callable:
    """grads of norm(z, w) by jax.vjp (inside the caller's jit: XLA recomputes what the forward would have saved);
    the new residual's gradient is added to z's, which is x's and the residual's."""
    import jax

    def grads(z, g, gr, w):
        _, pullback = jax.vjp(norm, z, w)
        grad_z, grad_weight = pullback(g)
        return (grad_z if gr is None else grad_z + gr), None, grad_weight
    return grads


def xla_backward(eps: float, residual: bool) -> Callable:
    norm = peers.xla(eps, False)
    return _vjp(lambda z, w: norm(z, None, w))


def tokamax_backward(eps: float, residual: bool) -> Callable:
    try:
        import tokamax
    except ModuleNotFoundError as e:
        if e.name == "tokamax":
            raise Skip("tokamax not installed") from None
        raise Skip(f"tokamax does not import: {e}") from None
    except ImportError as e:
        raise Skip(f"tokamax does not import: {e}") from None
    # RMSNorm is its layer_norm without the mean; its default implementations: Triton, else XLA.
    return _vjp(lambda z, w: tokamax.layer_norm(z, w, None, epsilon=eps, subtract_mean=False))


JAX_BACKWARD: Dict[str, Callable[[float, bool], Callable]] = {
    "bi-jax": bi_jax_backward,
    "xla": xla_backward,
    "tokamax": tokamax_backward,
}
