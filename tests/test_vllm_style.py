"""bi_torch as vLLM's batch-invariant RMSNorm: the properties vLLM's own determinism tests check
(tests/v1/determinism/test_rms_norm_batch_invariant.py), written here for bi_torch's drop-ins.

vLLM's tolerances against its float32 reference formula (x * rsqrt(mean(x^2) + eps) * w, in
float32, rounded once): rtol = atol = 1e-1 for bfloat16, 1e-2 for float16 and float32, 2e-1 for
its extreme-value cases, 1e-4 for the float32 formula check. bi_torch meets them by far: its
mode "fp32" is that formula with the contract's tree sum and IEEE sqrt/division, so 16-bit outputs
are within 1 ulp of the formula (asserted too). Batch invariance and determinism are bitwise.
CPU sizes are modest (the Triton interpreter); the full grid is a GPU test.
"""

from __future__ import annotations

import pytest
import torch

import bi_torch
from torch_helpers import assert_bits, ref, to_numpy

TOLERANCE = {torch.bfloat16: 1e-1, torch.float16: 1e-2, torch.float32: 1e-2}  # vLLM's rtol = atol
# Rows per hidden size on CPU: vLLM's batch sizes where the interpreter is quick enough.
DTYPES = [torch.float16, torch.bfloat16]
CPU_CASES = [(b, 512) for b in (1, 4, 64, 300)] + [(1, 4096), (4, 4096), (1, 16384), (4, 16384)]


def _formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's reference, mode "fp32": float32 throughout, one rounding at the end."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _llama_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's CUDA fused_add_rms_norm rounding, mode "llama": (scalar_t)(x * inv) * weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in ulps between same-signed or zero elements (sign-magnitude bits)."""
    def ordered(t):
        i = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)
    return int((ordered(a) - ordered(b)).abs().max())


def _inputs(seed: int, rows: int, n: int, dtype: torch.dtype, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen).to(dtype)
    return x.to(device), torch.randn(n, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,hidden", CPU_CASES)
def test_vs_reference(batch, hidden, dtype, eps):
    x, w = _inputs(batch * hidden, batch, hidden, dtype)
    out = bi_torch.rms_norm_batch_invariant(x, w, eps=eps)
    expected = _formula(x, w, eps)
    torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert _ulps(out, expected) <= 1
    assert_bits(ref(to_numpy(x), to_numpy(w), eps, mode="fp32")[0], out, "the contract's bits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden,n_extra", [(512, 3), (512, 299), (4096, 3)])  # 4096 x 299: test_gpu_sweep
def test_residual_path(hidden, dtype, n_extra):
    """The in-place residual path: residual <- x + residual exactly, a row's outputs the same bits
    alone as first of a batch, and the same tensors returned (vLLM's convention)."""
    x1, w = _inputs(hidden + n_extra, 1, hidden, dtype)
    r1, _ = _inputs(hidden + n_extra + 1, 1, hidden, dtype)
    extra_x, _ = _inputs(7, n_extra, hidden, dtype)
    extra_r, _ = _inputs(8, n_extra, hidden, dtype)
    xb, rb = torch.cat([x1, extra_x]), torch.cat([r1, extra_r])
    merged = x1 + r1  # torch's 16-bit add rounds once from float32: the contract's step 1

    out1, res1 = x1.clone(), r1.clone()
    returned = bi_torch.rms_norm_batch_invariant(out1, w, 1e-6, res1)
    assert returned[0] is out1 and returned[1] is res1
    outb, resb = bi_torch.rms_norm_batch_invariant(xb.clone(), w, 1e-6, rb.clone())
    assert_bits(merged, res1, "residual out == x + residual")
    assert_bits(res1, resb[:1], "residual out: alone vs in a batch")
    assert_bits(out1, outb[:1], "out: alone vs in a batch")
    torch.testing.assert_close(out1, _formula(merged, w, 1e-6), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert _ulps(out1, _formula(merged, w, 1e-6)) <= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama_mode_residual_path_rounds_like_vllms_cuda_kernel(dtype):
    """vLLM routes a residual to its CUDA fused_add_rms_norm, which rounds before the weight:
    fused_add_rms_norm_(mode="llama") has that rounding (a flipped intermediate times |w| < 4:
    at most 2 ulps from the formula's rsqrt), and the default mode "fp32" is farther in ~1/4 of
    the elements."""
    x, w = _inputs(11, 64, 512, dtype)
    r, _ = _inputs(12, 64, 512, dtype)
    expected = _llama_formula(x + r, w, 1e-6)
    llama_out, _ = bi_torch.fused_add_rms_norm_(x.clone(), r.clone(), w, 1e-6, mode="llama")
    fp32_out, _ = bi_torch.rms_norm_batch_invariant(x.clone(), w, 1e-6, r.clone())
    assert _ulps(llama_out, expected) <= 2
    assert (llama_out != expected).float().mean() < 0.01 < (fp32_out != expected).float().mean()


@pytest.mark.parametrize("batch,seq,hidden", [(1, 1, 2048), (2, 7, 2048), (3, 5, 4096)])
def test_3d_input(batch, seq, hidden):
    x, w = _inputs(batch * seq, batch * seq, hidden, torch.bfloat16)
    x3 = x.reshape(batch, seq, hidden)
    out = bi_torch.rms_norm_batch_invariant(x3, w, eps=1e-6)
    assert out.shape == x3.shape
    torch.testing.assert_close(out, _formula(x3, w, 1e-6), rtol=1e-1, atol=1e-1)
    assert_bits(bi_torch.rms_norm_batch_invariant(x, w, eps=1e-6).reshape(x3.shape), out, "3-D vs its rows in 2-D")


def test_extreme_values():
    """vLLM's stability cases (float16, hidden 2048: 1e-5, 1e4, randn * 100, randn * 1e-6) plus
    zeros and a bfloat16 row whose float32 sum of squares overflows (NUMERICS.md: signed zeros)."""
    gen = torch.Generator().manual_seed(0)
    n = 2048
    cases = [torch.full((4, n), 1e-5), torch.full((4, n), 1e4), torch.randn(4, n, generator=gen) * 100,
             torch.randn(4, n, generator=gen) * 1e-6]
    w = torch.ones(n, dtype=torch.float16)
    for i, case in enumerate(cases):
        x = case.half()
        out = bi_torch.rms_norm_batch_invariant(x, w, eps=1e-6)
        assert torch.isfinite(out).all(), f"case {i}"
        torch.testing.assert_close(out, _formula(x, w, 1e-6), rtol=2e-1, atol=2e-1, msg=f"case {i}")
    zeros = torch.tensor([[0.0, -0.0] * (n // 2)], dtype=torch.float16)
    assert_bits(zeros, bi_torch.rms_norm_batch_invariant(zeros, w, eps=1e-6), "zeros keep their signs")
    huge = torch.full((2, 64), 1e30, dtype=torch.bfloat16) * torch.tensor([1.0, -1.0]).repeat(32).bfloat16()
    out = bi_torch.rms_norm_batch_invariant(huge, torch.ones(64, dtype=torch.bfloat16), eps=1e-6)
    assert_bits(huge * 0, out, "squares overflow: inv = 0, signed zeros")


def test_formula_float32():
    x, w = _inputs(42, 8, 1024, torch.float32)
    expected = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(bi_torch.rms_norm_batch_invariant(x, w, eps=1e-6), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hidden", [128, 1024, 4096, 16384])
def test_hidden_sizes(hidden):
    """Sizes on both sides of vLLM's BLOCK_SIZE (1024) and of bi_torch's chunking."""
    x, w = _inputs(hidden, 16, hidden, torch.bfloat16)
    out = bi_torch.rms_norm_batch_invariant(x, w, eps=1e-6)
    torch.testing.assert_close(out, _formula(x, w, 1e-6), rtol=1e-1, atol=1e-1)
    assert_bits(ref(to_numpy(x), to_numpy(w), 1e-6, mode="fp32")[0], out)


def test_determinism():
    x, w = _inputs(42, 32, 4096, torch.bfloat16)
    first = bi_torch.rms_norm_batch_invariant(x.clone(), w, eps=1e-6)
    for run in range(4):
        assert_bits(first, bi_torch.rms_norm_batch_invariant(x.clone(), w, eps=1e-6), f"run {run + 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_invariance(dtype):
    """A row alone vs at index 4 of 8 random rows: the same bits."""
    batch, w = _inputs(42, 8, 2048, dtype)
    row = batch[4:5].clone()
    assert_bits(bi_torch.rms_norm_batch_invariant(row, w, eps=1e-6)[0],
                bi_torch.rms_norm_batch_invariant(batch, w, eps=1e-6)[4], "row 4")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [512, 2048, 4096, 8192, 16384])
def test_gpu_sweep(hidden, dtype):
    """vLLM's full grid on the GPU: batch 1/4/64/300, both eps, 4 seeds; every output the contract's
    bits, within vLLM's tolerance of its formula, and each batch's first row equal to that row alone;
    the residual path with 3 and 299 extra rows."""
    for seed in range(4):
        for batch in (1, 4, 64, 300):
            for eps in (1e-6, 1e-5):
                x, w = _inputs(seed * 7919 + batch, batch, hidden, dtype, "cuda")
                out = bi_torch.rms_norm_batch_invariant(x, w, eps=eps)
                torch.testing.assert_close(out, _formula(x, w, eps), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
                assert_bits(ref(to_numpy(x), to_numpy(w), eps, mode="fp32")[0], out, f"{batch}x{hidden} seed {seed}")
                assert_bits(bi_torch.rms_norm_batch_invariant(x[:1].clone(), w, eps=eps), out[:1], "row 0 alone")
        for n_extra in (3, 299):
            x, w = _inputs(seed, 1 + n_extra, hidden, dtype, "cuda")
            r, _ = _inputs(seed + 1, 1 + n_extra, hidden, dtype, "cuda")
            out1, res1 = bi_torch.rms_norm_batch_invariant(x[:1].clone(), w, 1e-6, r[:1].clone())
            outb, resb = bi_torch.rms_norm_batch_invariant(x.clone(), w, 1e-6, r.clone())
            assert_bits(x[:1] + r[:1], res1, "residual out")
            assert_bits(res1, resb[:1], "residual alone vs batch")
            assert_bits(out1, outb[:1], "out alone vs batch")
