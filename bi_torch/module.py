"""bi_torch.RMSNorm: an nn.Module whose state dict matches HF-style RMSNorm (`weight`)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .ops import rms_norm


class RMSNorm(torch.nn.Module):
    """Batch-invariant RMSNorm (bi_torch.rms_norm): trains, with gradients w.r.t. the input, the
    weight and the residual as NUMERICS.md's backward defines them (batch-invariant grad_x,
    deterministic grad_weight); forward(x, residual) returns (out, new_residual), out of place.

    weight_offset=1.0 with zero-initialised weights gives Gemma's (1 + w) convention.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, mode: str = "llama", weight_offset: float = 0.0,
                 dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        self.hidden_size, self.eps, self.mode, self.weight_offset = hidden_size, eps, mode, weight_offset
        init = torch.zeros if weight_offset else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        return rms_norm(x, self.weight, self.eps, residual, mode=self.mode, weight_offset=self.weight_offset)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, mode={self.mode!r}, weight_offset={self.weight_offset}"
