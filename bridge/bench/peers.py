"""The peers `bi-norm bench` times our kernels against (benchmarks/METHOD.md says how each is configured).

Imported by bridge.bench.measuring on a GPU run only: it needs torch and triton (the status-quo
kernel is defined here), and imports jax and liger_kernel inside the functions that use them. Each
factory returns a callable over one input set: torch peers `fn(x, residual)`, JAX peers
`op(x, residual, weight)`, returning out or (out, new_residual) like bi_torch / bi_jax. A factory
raises bridge.bench.plan.Skip when its peer cannot run on this machine at all.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .plan import Skip

TorchFn = Callable[[torch.Tensor, Optional[torch.Tensor]], object]


# ---------------------------------------------------------------------------------------------
# torch: F.rms_norm eager
# ---------------------------------------------------------------------------------------------

def torch_eager(weight: torch.Tensor, eps: float, residual: bool) -> TorchFn:
    shape = (weight.shape[0],)
    if not residual:
        return lambda x, r: F.rms_norm(x, shape, weight, eps)

    def add_then_norm(x, r):  # no fused variant in torch: two kernels
        s = x + r
        return F.rms_norm(s, shape, weight, eps), s
    return add_then_norm


# ---------------------------------------------------------------------------------------------
# torch: HF LlamaRMSNorm under torch.compile
# ---------------------------------------------------------------------------------------------

def _llama_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm.forward, with the module's weight and eps as arguments.
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _llama_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    # The decoder layer's `hidden_states = residual + hidden_states`, then the norm: one graph.
    hidden_states = residual + x
    return _llama_rms_norm(hidden_states, weight, eps), hidden_states


def raise_recompile_limit() -> None:
    """One graph per (hidden, dtype, residual) with the token count dynamic, as a server compiles
    it; the default limit of 8 recompiles per function is smaller than the plan's variety."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)


@functools.lru_cache(maxsize=None)
def _compiled(residual: bool) -> Callable:
    raise_recompile_limit()
    return torch.compile(_llama_add_rms_norm if residual else _llama_rms_norm)


def hf_compiled(weight: torch.Tensor, eps: float, residual: bool) -> TorchFn:
    fn = _compiled(residual)
    mark = torch._dynamo.maybe_mark_dynamic
    if not residual:
        def norm(x, r):
            mark(x, 0)
            return fn(x, weight, eps)
        return norm

    def add_norm(x, r):
        mark(x, 0)
        mark(r, 0)
        return fn(x, r, weight, eps)
    return add_norm


# ---------------------------------------------------------------------------------------------
# torch: Liger-Kernel (a carried wheel on the GPU machine)
# ---------------------------------------------------------------------------------------------

def liger(weight: torch.Tensor, eps: float, residual: bool) -> TorchFn:
    try:
        # The submodules: Liger's default Triton kernels, not a backend its dispatcher may pick.
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError as e:
        raise Skip(f"liger_kernel not importable ({e}); install the wheel from .whl (benchmarks/METHOD.md)") from None
    if not residual:
        # offset 0, casting mode "llama": HF Llama's numerics, as ours (mode "llama").
        return lambda x, r: LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama")
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except ImportError as e:
        raise Skip(f"this liger_kernel has no fused add RMSNorm (0.6.1 or later has): {e}") from None
    return lambda x, r: LigerFusedAddRMSNormFunction.apply(x, r, weight, eps, 0.0, "llama")


# ---------------------------------------------------------------------------------------------
# torch: the status-quo batch-invariant kernel (vLLM's Triton rms_norm_batch_invariant path)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rowwise_rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, out_row_stride, n_cols, eps,
                             BLOCK: tl.constexpr):
    # One program per row; the sum of squares is a running total of per-chunk tl.sum, so its
    # order is fixed by BLOCK alone (batch invariant), and the row is read twice.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    total = tl.zeros((), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        total += tl.sum(v * v)
    inv = 1.0 / tl.sqrt(total / n_cols + eps)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (v * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rowwise_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(x2)
    # vLLM's launch: 1024-wide chunks, Triton's default num_warps (4).
    _rowwise_rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), x2.shape[1], eps,
                                             BLOCK=1024)
    return out.view(x.shape)


def vllm_bi(weight: torch.Tensor, eps: float, residual: bool) -> TorchFn:
    if not residual:
        return lambda x, r: _rowwise_rms_norm(x, weight, eps)

    def add_then_norm(x, r):  # vLLM's batch-invariant mode adds the residual separately
        s = x + r
        return _rowwise_rms_norm(s, weight, eps), s
    return add_then_norm


TORCH_PEERS: Dict[str, Callable[[torch.Tensor, float, bool], TorchFn]] = {
    "torch-eager": torch_eager,
    "hf-compiled": hf_compiled,
    "liger": liger,
    "vllm-bi": vllm_bi,
}


# ---------------------------------------------------------------------------------------------
# The ceiling's second candidate: a streaming copy on the SMs
# ---------------------------------------------------------------------------------------------

@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


def sm_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst <- src (contiguous, same size) by a Triton kernel: a memcpy captured in a CUDA graph may
    run on a copy engine, slower than the SMs for large buffers."""
    n = src.numel()
    _copy_kernel[(triton.cdiv(n, 4096),)](src, dst, n, BLOCK=4096, num_warps=8)


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------

def xla(eps: float, residual: bool) -> Callable:
    import jax.numpy as jnp
    from jax import lax

    def norm(x, w):  # the usual float32 RMSNorm; XLA fuses it into one kernel
        v = x.astype(jnp.float32)
        inv = lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
        return (v * inv * w.astype(jnp.float32)).astype(x.dtype)

    if not residual:
        return lambda x, r, w: norm(x, w)

    def add_norm(x, r, w):
        s = x + r
        return norm(s, w), s
    return add_norm


def pallas_example(eps: float, residual: bool) -> Callable:
    try:
        from jax.experimental.pallas.ops.gpu.rms_norm import rms_norm
    except ImportError as e:
        raise Skip(f"jax.experimental.pallas.ops.gpu.rms_norm does not import: {e}") from None
    import jax.numpy as jnp

    def norm(x, w):  # forward only; it wants (batch, seq, hidden) and a bias (zeros here)
        out = rms_norm(x[None], w, jnp.zeros_like(w), eps=eps)
        return out[0]

    if not residual:
        return lambda x, r, w: norm(x, w)

    def add_then_norm(x, r, w):  # the add is an XLA kernel of its own before the Pallas call
        s = x + r
        return norm(s, w), s
    return add_then_norm


JAX_PEERS: Dict[str, Callable[[float, bool], Callable]] = {
    "xla": xla,
    "pallas-example": pallas_example,
}
