"""bi_torch.RMSNorm on CPU tensors: constructor defaults, loading an HF LlamaRMSNorm state dict (same bits as
bi_torch.rms_norm, within 2 bf16 ulps of HF's own forward), grad mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bi_torch
from torch_helpers import assert_bits, random_rows, ref, to_numpy, to_torch

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# --------------------------------------------------------------------------------------------
# bi_torch.RMSNorm
# --------------------------------------------------------------------------------------------


class LlamaRMSNorm(torch.nn.Module):
    """HF transformers' LlamaRMSNorm, as written there."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _ulp_distance_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bfloat16 units in the last place (sign-magnitude bits mapped to a monotone integer line)."""
    def line(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (line(a) - line(b)).abs()


def test_rmsnorm_constructor():
    m = bi_torch.RMSNorm(64)
    assert (m.hidden_size, m.eps, m.mode, m.weight_offset) == (64, 1e-6, "llama", 0.0)
    assert m.weight.shape == (64,) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    assert torch.equal(m.weight.detach(), torch.ones(64))
    assert list(m.state_dict()) == ["weight"]
    g = bi_torch.RMSNorm(48, 1e-5, mode="fp32", weight_offset=1.0, dtype=torch.bfloat16, device="cpu")
    assert (g.hidden_size, g.eps, g.mode, g.weight_offset) == (48, 1e-5, "fp32", 1.0)
    assert g.weight.dtype == torch.bfloat16 and g.weight.shape == (48,)
    assert torch.equal(g.weight.detach(), torch.zeros(48, dtype=torch.bfloat16))  # Gemma: (1 + w), w = 0
    assert "48" in repr(g) and "fp32" in repr(g)
    # The Gemma convention: zero weights with offset 1 give the same bits as unit weights without offset.
    x = to_torch(random_rows(np.random.default_rng(4), (3, 48), "bfloat16"))
    with torch.no_grad():
        assert_bits(bi_torch.rms_norm(x, torch.ones(48, dtype=torch.bfloat16), 1e-5, mode="fp32"), g(x), "gemma")


@pytest.mark.parametrize("n", [64, 5120])
def test_rmsnorm_loads_hf_state_dict(n):
    torch.manual_seed(n)
    eps = 1e-5
    hf = LlamaRMSNorm(n, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_((1 + 0.3 * torch.randn(n)).to(torch.bfloat16))
    m = bi_torch.RMSNorm(n, eps=eps, dtype=torch.bfloat16)
    m.load_state_dict(hf.state_dict())  # strict: same keys, same shapes
    assert_bits(hf.weight.detach(), m.weight.detach(), "loaded weight")
    x = (torch.randn(33, n) * 3).to(torch.bfloat16)
    r = torch.randn(33, n)
    with torch.no_grad():
        out = m(x)
        expected = bi_torch.rms_norm(x, hf.weight, eps)
        assert_bits(expected, out, "module vs rms_norm")
        assert_bits(ref(to_numpy(x), to_numpy(hf.weight), eps)[0], out, "module vs reference")
        hf_out = hf(x)
        assert hf_out.dtype == torch.bfloat16
        dist = _ulp_distance_bf16(out, hf_out)
        assert int(dist.max()) <= 2, f"bi_torch vs HF LlamaRMSNorm: {int(dist.max())} bf16 ulps apart"
        assert float((dist == 0).float().mean()) > 0.9
        # forward(x, residual) returns (out, new_residual).
        result = m(x, r)
        assert isinstance(result, tuple) and len(result) == 2
        e_out, e_res = bi_torch.rms_norm(x, hf.weight, eps, r)
        assert_bits(e_out, result[0], "module(x, residual) out")
        assert_bits(e_res, result[1], "module(x, residual) new_residual")
        assert_bits(ref(to_numpy(x), to_numpy(hf.weight), eps, to_numpy(r))[1], result[1], "new_residual vs ref")


def test_rmsnorm_grad_mode():
    """With grad on, the module's output requires grad and has the no_grad bits (its gradients:
    test_torch_autograd_cpu.py)."""
    m = bi_torch.RMSNorm(32, dtype=torch.bfloat16)
    assert m.weight.requires_grad
    x = torch.randn(2, 32).to(torch.bfloat16)
    out = m(x)
    assert out.requires_grad
    with torch.no_grad():
        assert_bits(bi_torch.rms_norm(x, torch.ones(32, dtype=torch.bfloat16)), m(x), "no_grad module")
        assert_bits(m(x), out.detach(), "grad mode vs no_grad")
