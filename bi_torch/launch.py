"""Launching the Triton kernel: the compiled copy for CUDA tensors, the interpreted one for CPU.

The launch configuration comes from bridge.tiling (shared with bi_jax); a row's bits never
depend on it (NUMERICS.md, "batch invariance").
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from types import ModuleType

import numpy as np
import torch

from bridge.contract import as_float32
from bridge.tiling import launch_config

from . import triton_kernel


@functools.lru_cache(maxsize=None)
def interpreted_kernels() -> ModuleType:
    """triton_kernel.py loaded a second time with the Triton interpreter on, for CPU tensors."""
    spec = importlib.util.spec_from_file_location("bi_torch._triton_kernel_interpreted", triton_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    new_residual: torch.Tensor | None,
    mode: str,
    weight_offset: float,
) -> None:
    """Run the kernel on 2-D row views (last dimension contiguous). Inputs already validated."""
    n_rows, n = x.shape
    if n_rows == 0:
        return
    cfg = launch_config(n, n_rows, x.element_size(), 0 if residual is None else residual.element_size())
    kernels = triton_kernel if x.is_cuda else interpreted_kernels()
    res = residual if residual is not None else x
    new_res = new_residual if new_residual is not None else out
    # The interpreter runs on numpy, which warns on the inf/NaN arithmetic the contract defines.
    with contextlib.nullcontext() if x.is_cuda else np.errstate(all="ignore"):
        kernels.rms_norm_kernel[(-(-n_rows // cfg.rows),)](
            x, x.stride(0), res, res.stride(0), weight, out, out.stride(0), new_res, new_res.stride(0),
            n_rows, n, float(n), as_float32(eps), as_float32(weight_offset),
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=as_float32(weight_offset) != 0, LLAMA=mode == "llama",
            ROWS=cfg.rows, CHUNK=cfg.chunk, LOG2_CHUNK=cfg.chunk.bit_length() - 1,
            NUM_CHUNKS=cfg.num_chunks, LOG2_NUM_CHUNKS=cfg.num_chunks.bit_length() - 1,
            LOG2_SPLIT=cfg.split.bit_length() - 1,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )
