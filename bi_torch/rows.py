"""What bi_torch's calls share about tensors: the contract's dtype names, and rows as (rows, n) views.

ops.py (the calls), fp8.py (the FP8 output), autograd.py and vllm_fp8.py all build on these; the
module imports none of them, so that they import one way.
"""

from __future__ import annotations

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The contract's name for a torch dtype, else torch's own name (which the contract rejects)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def torch_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in DTYPE_NAMES.items()}[name]


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """A (rows, n) view sharing t's memory: the last dimension contiguous, one stride between rows."""
    n = t.shape[-1]
    if t.numel() == 0:
        return t.new_empty((0, n))
    if n > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1); got strides {tuple(t.stride())}."
                         f" Pass {name}.contiguous() to copy it.")
    try:
        return t.view(-1, n)
    except RuntimeError:
        raise ValueError(f"{name}: its rows cannot be addressed with a single row stride (shape {tuple(t.shape)},"
                         f" strides {tuple(t.stride())}); pass {name}.contiguous() to copy it.") from None


def rows_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two (rows, n) views share a byte: exact for equal row strides, else by address span."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a_len, b_len = a.shape[1] * a.element_size(), b.shape[1] * b.element_size()
    a_stride, b_stride = a.stride(0) * a.element_size(), b.stride(0) * b.element_size()
    delta = b.data_ptr() - a.data_ptr()  # b's row j starts delta + (j - i) * stride after a's row i
    if a_stride == b_stride and a.shape[0] == b.shape[0] and a_stride > 0:
        # Rows i of a and j of b overlap iff -b_len < delta + k * stride < a_len for k = j - i.
        lo, hi = -(-(-b_len - delta + 1) // a_stride), (a_len - delta - 1) // a_stride
        return max(lo, 1 - a.shape[0]) <= min(hi, a.shape[0] - 1)
    a_end = a.data_ptr() + (a.shape[0] - 1) * a_stride + a_len
    b_end = b.data_ptr() + (b.shape[0] - 1) * b_stride + b_len
    return a.data_ptr() < b_end and b.data_ptr() < a_end
