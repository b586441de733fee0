"""The peers `bi-norm bench` times in its FP8 passes (BENCHMARKS.md): a norm, then a separate quantization.

Imported by bridge.bench.fp8 on a GPU run only: it needs torch and triton (through
bridge.bench.peers, whose norms and streaming copy it reuses); jax and vLLM are imported inside
the functions that use them. A factory raises bridge.bench.plan.Skip when its peer cannot run on
this machine at all.

torch: `make(weight, eps, residual, scale, group_size)` returns fn(x, residual); JAX:
`make(eps, residual, scale, group_size)` returns op(x, residual, weight). scale is the static
pass's float32 scale (a tensor or array of shape (), None per group), group_size the grouped
pass's (None static). Each returns what bi_torch / bi_jax return: static out or (out,
new_residual), per group (out, scales) or (out, scales, new_residual), out in float8_e4m3fn.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch

from bridge.numerics.contract import FP8_FORMATS, GROUP_AMAX_FLOOR

from . import peers
from .peers import sm_copy  # noqa: F401  the FP8 passes' copy ceiling, for bridge.bench.fp8
from .plan import FP8_FORMAT, VLLM_MISSING, Skip

_MAX = FP8_FORMATS[FP8_FORMAT].max
_FP8 = torch.float8_e4m3fn


def _result(out: tuple, new_residual: Optional[object]):
    """bi_torch's / bi_jax's return shape: out alone, or a tuple with the new residual last."""
    out = out + (() if new_residual is None else (new_residual,))
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# torch: HF Llama's norm, then quantization (eager, and both under torch.compile)
# ---------------------------------------------------------------------------------------------

def quantize_static(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (y.float() * (1 / scale)).clamp(-_MAX, _MAX).to(_FP8)


def quantize_groups(y: torch.Tensor, group_size: int):
    """Per token and group: amax, its scale (floored as vLLM's per_token_group_quant_fp8), divide, clamp, cast."""
    groups = y.float().unflatten(-1, (-1, group_size))
    s = groups.abs().amax(-1, keepdim=True).clamp(min=GROUP_AMAX_FLOOR) / _MAX
    return (groups / s).clamp(-_MAX, _MAX).to(_FP8).flatten(-2), s.squeeze(-1)


def _hf_fp8(x, r, weight, eps, scale, group_size):
    if r is None:
        y, new_residual = peers._llama_rms_norm(x, weight, eps), None
    else:
        y, new_residual = peers._llama_add_rms_norm(x, r, weight, eps)
    out = quantize_groups(y, group_size) if group_size else (quantize_static(y, scale),)
    return _result(out, new_residual)


def hf_eager(weight: torch.Tensor, eps: float, residual: bool, scale, group_size) -> Callable:
    return lambda x, r: _hf_fp8(x, r, weight, eps, scale, group_size)


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable:
    peers.raise_recompile_limit()
    return torch.compile(_hf_fp8)


def hf_compiled(weight: torch.Tensor, eps: float, residual: bool, scale, group_size) -> Callable:
    fn = _compiled()
    mark = torch._dynamo.maybe_mark_dynamic

    def call(x, r):
        for t in (x, r):
            if t is not None:
                mark(t, 0)
        return fn(x, r, weight, eps, scale, group_size)
    return call


# ---------------------------------------------------------------------------------------------
# torch: vLLM's fused RMSNorm + FP8 kernels (vLLM is not in the GPU image: skipped there)
# ---------------------------------------------------------------------------------------------

def vllm_ops():
    """(torch.ops._C, vllm._custom_ops): the static kernels and rms_norm_per_block_quant."""
    try:
        import vllm._custom_ops as custom_ops
    except ImportError as e:
        raise Skip(f"{VLLM_MISSING} ({e})") from None
    return torch.ops._C, custom_ops


def vllm_with(static_ops, block_ops) -> Callable:
    """The vllm-fp8 factory over ops of vLLM's signatures (bi_torch.vllm_fp8's drop-ins have them
    too, which the CPU tests use). With a residual they update it in place, as vLLM does."""
    def make(weight: torch.Tensor, eps: float, residual: bool, scale, group_size) -> Callable:
        if group_size:
            def per_block(x, r):
                out, scales = block_ops.rms_norm_per_block_quant(x, weight, eps, _FP8, [1, group_size],
                                                                 scale_ub=None, residual=r)
                return _result((out, scales), r)
            return per_block
        scale1 = scale.reshape(1)

        def static(x, r):
            out = torch.empty(x.shape, dtype=_FP8, device=x.device)
            if r is None:
                static_ops.rms_norm_static_fp8_quant(out, x, weight, scale1, eps)
            else:
                static_ops.fused_add_rms_norm_static_fp8_quant(out, x, r, weight, scale1, eps)
            return _result((out,), r)
        return static
    return make


def vllm_fp8(weight: torch.Tensor, eps: float, residual: bool, scale, group_size) -> Callable:
    return vllm_with(*vllm_ops())(weight, eps, residual, scale, group_size)


TORCH_FP8: Dict[str, Callable[..., Callable]] = {
    "hf-eager": hf_eager,
    "hf-compiled": hf_compiled,
    "vllm-fp8": vllm_fp8,
}


# ---------------------------------------------------------------------------------------------
# JAX: the xla peer's norm, then quantization, in one jit
# ---------------------------------------------------------------------------------------------

def xla_fp8(eps: float, residual: bool, scale, group_size) -> Callable:
    import jax.numpy as jnp

    norm = peers.xla(eps, residual)

    def quantize(y):
        v = y.astype(jnp.float32)
        if not group_size:
            return (jnp.clip(v * (1 / scale), -_MAX, _MAX).astype(jnp.float8_e4m3fn),)
        groups = v.reshape(v.shape[:-1] + (-1, group_size))
        s = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1, keepdims=True), GROUP_AMAX_FLOOR) / _MAX
        return jnp.clip(groups / s, -_MAX, _MAX).astype(jnp.float8_e4m3fn).reshape(v.shape), s[..., 0]

    def op(x, r, w):
        y, new_residual = norm(x, r, w) if residual else (norm(x, r, w), None)
        return _result(quantize(y), new_residual)
    return op


JAX_FP8: Dict[str, Callable[..., Callable]] = {
    "xla": xla_fp8,
}
