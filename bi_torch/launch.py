"""Launching the Triton kernels: the compiled copies for CUDA tensors, the interpreted ones for CPU.

The launch configuration comes from bridge.numerics.tiling (shared with bi_jax); a row's bits never
depend on it (NUMERICS.md, "batch invariance").
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from types import ModuleType

import numpy as np
import torch

from bridge.numerics.contract import CANONICAL_NAN_BITS, FP8_FORMATS, as_float32
from bridge.numerics.tiling import backward_config, column_tree_width, launch_config

from . import triton_backward, triton_fp8, triton_kernel


def _load_interpreted(module: ModuleType, name: str) -> ModuleType:
    """A kernel module loaded a second time with the Triton interpreter on, for CPU tensors;
    registered under `name` so that another interpreted module can import its helpers."""
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(loaded)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return loaded


def device_kind(device: torch.device) -> str:
    """The GPU's name, which picks the launch rule's per-device knob; "" under the interpreter."""
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else ""


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def interpreted_fp8_kernels() -> ModuleType:
    """triton_fp8.py under the interpreter."""
    return _load_interpreted(triton_fp8, "bi_torch._triton_fp8_interpreted")


@functools.lru_cache(maxsize=None)
def interpreted_kernels() -> ModuleType:
    """triton_kernel.py under the interpreter, with the interpreted FP8 helpers."""
    interpreted_fp8_kernels()
    return _load_interpreted(triton_kernel, "bi_torch._triton_kernel_interpreted")


@functools.lru_cache(maxsize=None)
def interpreted_backward_kernels() -> ModuleType:
    """triton_backward.py under the interpreter, with the interpreted forward's helpers."""
    interpreted_kernels()
    return _load_interpreted(triton_backward, "bi_torch._triton_backward_interpreted")


def fp8_constexprs(fmt_name: str = "float8_e4m3fn") -> dict:
    """The FP8 format's fields (bridge.numerics.contract.FP8_FORMATS) as the forward kernel's constexprs."""
    fmt = FP8_FORMATS[fmt_name]
    return {"FP8_MAX": fmt.max, "MANTISSA_BITS": fmt.mantissa_bits, "EXPONENT_BIAS": fmt.exponent_bias,
            "NAN_FP8": CANONICAL_NAN_BITS[fmt_name]}


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    new_residual: torch.Tensor | None,
    mode: str,
    weight_offset: float,
    *,
    fp8: str | None = None,
    scale: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    group_size: int = 0,
) -> None:
    """Run the kernel on 2-D row views (last dimension contiguous). Inputs already validated.

    FP8 output (fp8: the format's name): out is a uint8 view of the FP8 rows; either `scale`, the
    float32 static scale (one element), or `scales`, a contiguous float32 (rows, n // group_size).
    """
    n_rows, n = x.shape
    if n_rows == 0:
        return
    quant = "none" if fp8 is None else "static" if scale is not None else "group"
    cfg = launch_config(n, n_rows, x.element_size(), 0 if residual is None else residual.element_size(),
                        device_kind(x.device), quant=quant)
    kernels = triton_kernel if x.is_cuda else interpreted_kernels()
    res = residual if residual is not None else x
    new_res = new_residual if new_residual is not None else out
    if quant == "group" and (cfg.chunk % group_size or scales.shape != (n_rows, n // group_size)
                             or not scales.is_contiguous()):
        raise AssertionError(f"group_size {group_size}: chunk {cfg.chunk}, scales {tuple(scales.shape)}")
    # The interpreter runs on numpy, which warns on the inf/NaN arithmetic the contract defines.
    with contextlib.nullcontext() if x.is_cuda else np.errstate(all="ignore"):
        kernels.rms_norm_kernel[(-(-n_rows // cfg.rows),)](
            x, x.stride(0), res, res.stride(0), weight, out, out.stride(0), new_res, new_res.stride(0),
            scale if scale is not None else x, scales if scales is not None else x,
            scales.stride(0) if scales is not None else 0,
            n_rows, n, float(n), as_float32(eps), as_float32(weight_offset),
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=as_float32(weight_offset) != 0, LLAMA=mode == "llama",
            ROWS=cfg.rows, CHUNK=cfg.chunk, LOG2_CHUNK=cfg.chunk.bit_length() - 1,
            NUM_CHUNKS=cfg.num_chunks, LOG2_NUM_CHUNKS=cfg.num_chunks.bit_length() - 1,
            LOG2_SPLIT=cfg.split.bit_length() - 1,
            QUANT=quant, GROUP=group_size if quant == "group" else 1, **fp8_constexprs(fp8 or "float8_e4m3fn"),
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )


def launch_backward(
    z: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    grad_new_residual: torch.Tensor | None,
    grad_x: torch.Tensor,
    grad_residual: torch.Tensor | None,
    grad_weight: torch.Tensor,
    eps: float,
    mode: str,
    weight_offset: float,
) -> None:
    """Run the backward on 2-D row views (last dimension contiguous): z is what the forward
    normalised (x, or the new residual); grad_residual is None without a residual."""
    n_rows, n = z.shape
    cfg = backward_config(n, n_rows, z.element_size())
    kernels = triton_backward if z.is_cuda else interpreted_backward_kernels()
    f32 = dict(dtype=torch.float32, device=z.device)
    stats = torch.empty((n_rows, 2) if cfg.num_chunks > 1 else (1,), **f32)
    final = cfg.blocks == 1
    partials = torch.empty((1,) if final else (cfg.blocks, n), **f32)
    g_r = grad_new_residual if grad_new_residual is not None else grad_out
    d_r = grad_residual if grad_residual is not None else grad_x
    eps32, offset32 = as_float32(eps), as_float32(weight_offset)
    log2 = lambda v: v.bit_length() - 1  # noqa: E731
    with contextlib.nullcontext() if z.is_cuda else np.errstate(all="ignore"):
        if n_rows and cfg.num_chunks > 1:
            kernels.row_stats_kernel[(n_rows,)](
                z, z.stride(0), grad_out, grad_out.stride(0), weight, stats, n_rows, n, float(n), eps32, offset32,
                HAS_OFFSET=offset32 != 0, CHUNK=cfg.stats_chunk, LOG2_CHUNK=log2(cfg.stats_chunk),
                NUM_CHUNKS=cfg.stats_chunks, LOG2_NUM_CHUNKS=log2(cfg.stats_chunks), LOG2_SPLIT=log2(cfg.split),
                num_warps=cfg.num_warps, enable_fp_fusion=False)
        kernels.rms_norm_backward_kernel[(cfg.blocks, cfg.num_chunks)](
            z, z.stride(0), grad_out, grad_out.stride(0), g_r, g_r.stride(0), weight, grad_x, grad_x.stride(0),
            d_r, d_r.stride(0), stats, partials, grad_weight, n_rows, n, float(n), eps32, offset32,
            HAS_RESIDUAL=grad_residual is not None, HAS_GRAD_RESIDUAL=grad_new_residual is not None,
            HAS_OFFSET=offset32 != 0, LLAMA=mode == "llama", ROWS=cfg.rows, LOG2_ROWS=log2(cfg.rows),
            STEPS=cfg.steps, LEVELS=cfg.counter_levels, CHUNK=cfg.chunk, LOG2_CHUNK=log2(cfg.chunk),
            NUM_CHUNKS=cfg.num_chunks, LOG2_SPLIT=log2(cfg.split), FINAL=final,
            num_warps=cfg.num_warps, enable_fp_fusion=False)
        # The tree's upper levels: each level sums aligned groups of the previous level's rows.
        n_src, src = cfg.blocks, partials
        for group in cfg.tree_groups:
            n_dst = -(-n_src // group)
            dst = grad_weight if n_dst == 1 else torch.empty((n_dst, n), **f32)
            width = column_tree_width(group, n)
            kernels.column_tree_kernel[(-(-n // width), n_dst)](
                src, dst, n_src, n, GROUP=group, LOG2_GROUP=log2(group), WIDTH=width, FINAL=n_dst == 1,
                num_warps=4, enable_fp_fusion=False)
            n_src, src = n_dst, dst
