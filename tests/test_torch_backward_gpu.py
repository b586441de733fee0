"""bi_torch's gradients on CUDA tensors: the compiled Triton backward (skipped without a CUDA GPU).

Every numeric assertion is bitwise: against the golden backward corpus and bridge.reference, and
between calls that must agree (a row in batches of 1..4096, 20 runs, launch configurations,
torch.compile and CUDA-graph replay vs eager, one call over 2^31 elements vs two smaller ones).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import bi_torch
import bi_torch.launch
from bridge import golden
from bridge.golden import backward as golden_backward
from torch_helpers import (BACKWARD_CONFIGS, assert_bits, bi_backward, int_view, patch_backward_config, ref_backward,
                           to_numpy, to_torch)

BACKWARD_CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["backward_cases"]]
TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEV = "cuda"


def _gen(*parts) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(zlib.crc32("|".join(str(p) for p in parts).encode()))


def cuda_rows(g: torch.Generator, shape, dtype: str) -> torch.Tensor:
    """Normal values with a per-row scale in [2**-4, 2**4], made on the GPU."""
    scale = torch.exp2(torch.rand(tuple(shape[:-1]) + (1,), generator=g, device=DEV) * 8 - 4)
    return (torch.randn(tuple(shape), generator=g, device=DEV) * scale).to(TD[dtype])


def cuda_inputs(g: torch.Generator, shape, dtype: str, res_dtype, with_gr: bool):
    """(x, weight, grad_out, residual or None, grad_new_residual or None) on the GPU."""
    x, grad_out = cuda_rows(g, shape, dtype), cuda_rows(g, shape, dtype)
    w = (1 + 0.25 * torch.randn(shape[-1], generator=g, device=DEV)).to(TD[dtype])
    r = None if res_dtype is None else cuda_rows(g, shape, res_dtype)
    return x, w, grad_out, r, cuda_rows(g, shape, res_dtype) if with_gr else None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(int_view(a), int_view(b))


def assert_all_bits(expected, actual, what: str) -> None:
    for name, e, a in zip(("grad_x", "grad_residual", "grad_weight"), expected, actual):
        assert (e is None) == (a is None), f"{what}: {name}"
        if e is not None and not (isinstance(e, torch.Tensor) and same_bits(e, a)):
            assert_bits(e, a, f"{what}: {name}")


def _numpy(args):
    return [None if a is None else to_numpy(a) for a in args]


# --------------------------------------------------------------------------------------------
# The golden backward corpus on the compiled kernel.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKWARD_CASE_NAMES)
def test_backward_corpus_case_cuda(backward_corpus, name):
    case = backward_corpus[name]
    args = [to_torch(a, DEV) for a in (case.x, case.weight, case.grad_out, case.residual, case.grad_new_residual)]
    for (mode, offset), expected in case.expected.items():
        got = bi_backward(*args[:3], case.spec.eps, *args[3:], mode, offset)
        assert got[0].is_cuda
        names = golden_backward.output_names(case.residual is not None)
        for what, e, a in zip(names, expected, got if case.residual is not None else (got[0], got[2])):
            assert_bits(e, a, f"{name} {what} ({mode}, offset {offset})")


# --------------------------------------------------------------------------------------------
# grad_x batch invariance: batch sizes 1..4096 of one 4096-row input.
# --------------------------------------------------------------------------------------------

MAX_ROWS = 4096
BATCH_SIZES = sorted(set(range(1, 33)) | {63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 1023, 1024, 1025, 2047,
                                          2048, 2049, 4095, 4096})


@pytest.mark.gpu
@pytest.mark.parametrize("res_dtype", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("n", [128, 4096, 5120, 8192, 16384, 65536])
def test_grad_x_batch_invariance_cuda(n, dtype, res_dtype):
    """x[:B] and x[4096-B:] give, row for row, the grad_x (and grad_residual) of the full batch."""
    x, w, g, r, g_r = cuda_inputs(_gen("batch", n, dtype, res_dtype), (MAX_ROWS, n), dtype, res_dtype,
                                  res_dtype is not None)
    full = bi_backward(x, w, g, 1e-6, r, g_r)
    probe = [0, 1, 2, 15, 16, 17, MAX_ROWS // 2, MAX_ROWS - 2, MAX_ROWS - 1]
    xp, gp, rp, grp = _numpy([None if t is None else t[probe] for t in (x, g, r, g_r)])
    expected = ref_backward(xp, to_numpy(w), gp, 1e-6, rp, grp)
    assert_bits(expected[0], full[0][probe], f"n={n} {dtype}: 4096-row grad_x vs reference")
    if r is not None:
        assert_bits(expected[1], full[1][probe], f"n={n} {dtype}: 4096-row grad_residual vs reference")
    for b in BATCH_SIZES:
        for rows in (slice(0, b), slice(MAX_ROWS - b, MAX_ROWS)):
            got = bi_backward(x[rows], w, g[rows], 1e-6, None if r is None else r[rows],
                              None if g_r is None else g_r[rows])
            what = f"n={n} {dtype} residual={res_dtype}: batch of {b} (rows {rows.start}..{rows.stop - 1})"
            assert_all_bits((full[0][rows], None if r is None else full[1][rows]), got[:2], what)


# --------------------------------------------------------------------------------------------
# grad_weight: the reference's bits, 20 runs alike, any launch configuration.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n,rows,dtype,res_dtype", [(4096, 4096, "bfloat16", "float32"), (5120, 3000, "bfloat16", None),
                                                    (65536, 257, "float32", "float32"), (128, 100000, "float16", None)])
def test_grad_weight_runs_and_configurations_cuda(n, rows, dtype, res_dtype, monkeypatch):
    args = cuda_inputs(_gen("configs", n, rows), (rows, n), dtype, res_dtype, res_dtype is not None)
    x, w, g, r, g_r = args
    first = bi_backward(x, w, g, 1e-6, r, g_r, "fp32", 1.0)
    e = ref_backward(*_numpy(args[:3]), 1e-6, *_numpy(args[3:]), "fp32", 1.0)
    assert_all_bits(e, first, f"{rows}x{n} vs reference")
    for run in range(19):
        assert_all_bits(first, bi_backward(x, w, g, 1e-6, r, g_r, "fp32", 1.0), f"run {run + 2} vs run 1")
    used = []
    original = bi_torch.launch.backward_config
    monkeypatch.setattr(bi_torch.launch, "backward_config", lambda *a: used.append(original(*a)) or used[-1])
    for overrides in BACKWARD_CONFIGS:
        with monkeypatch.context() as patch:
            patch_backward_config(patch, overrides)
            assert_all_bits(first, bi_backward(x, w, g, 1e-6, r, g_r, "fp32", 1.0), f"config {overrides}")
    launches = {(c.rows, c.steps, c.blocks, c.chunk, c.num_chunks, c.tree_groups) for c in used}
    assert len(launches) == len(BACKWARD_CONFIGS), used


# --------------------------------------------------------------------------------------------
# torch.compile and CUDA-graph replay give eager's gradients.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("res_dtype", [None, "bfloat16", "float32"])
@pytest.mark.parametrize("n", [4096, 65536])
def test_compile_backward_cuda(n, res_dtype, fresh_dynamo):
    compiled = torch.compile(bi_torch.rms_norm, fullgraph=True)
    for rows in (1000, 7):
        x, w, g, r, g_r = cuda_inputs(_gen("compile", n, res_dtype, rows), (rows, n), "bfloat16", res_dtype,
                                      res_dtype == "float32")
        want = bi_backward(x, w, g, 1e-6, r, g_r, "llama", 1.0)
        assert_all_bits(want, bi_backward(x, w, g, 1e-6, r, g_r, "llama", 1.0, fn=compiled), f"compiled, {rows} rows")


@pytest.mark.gpu
@pytest.mark.parametrize("res_dtype", [None, "float32"])
@pytest.mark.parametrize("n", [4096, 65536])
def test_cuda_graph_replay_backward(n, res_dtype):
    """Forward and backward captured in one CUDA graph (no host sync in either), replayed on new inputs."""
    rows = 333
    static = [t if t is None else t.clone() for t in cuda_inputs(_gen("graph", n), (rows, n), "bfloat16", res_dtype,
                                                                  res_dtype is not None)]

    def step():
        return bi_backward(*static[:3], 1e-6, *static[3:], "llama", 0.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()  # warm-up outside the capture: compiles the kernels, fills the caching allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in range(3):
        fresh = cuda_inputs(_gen("graph-replay", n, seed), (rows, n), "bfloat16", res_dtype, res_dtype is not None)
        for dst, src in zip(static, fresh):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_all_bits(bi_backward(*fresh[:3], 1e-6, *fresh[3:], "llama", 0.0), captured, f"replay {seed} vs eager")


# --------------------------------------------------------------------------------------------
# Over 2^31 elements: the last row starts at element 2^31.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_over_two_to_the_31_elements():
    """32769 x 65536 bf16 with a float32 residual (about 50 GB in all). Rows are checked against the
    reference; grad_weight against its own tree split at the padded power of two (NUMERICS.md: an
    aligned 2^15-row block is a subtree): rows 0..32767 as one float32-D call, whose grad_weight is
    that subtree's float32 sum T_L (mode fp32: h = xhat whatever D is), and row 32768 alone (T = p),
    whose subtree in the big call is p + 0.0 (the padding). Then rnD(T_L + (p + 0.0))."""
    rows, n = 2**15 + 1, 2**16
    assert rows * n > 2**31
    x, w, g, r, g_r = cuda_inputs(_gen("huge"), (rows, n), "bfloat16", "float32", True)
    grad_x, grad_r, grad_w = bi_backward(x, w, g, 1e-6, r, g_r, "fp32", 0.0)
    probe = [0, 1, rows // 2, rows - 2, rows - 1]
    e_x, e_r, _ = ref_backward(*_numpy([x[probe], w, g[probe]]), 1e-6, *_numpy([r[probe], g_r[probe]]), "fp32")
    assert_bits(e_x, grad_x[probe], "grad_x rows vs reference")
    assert_bits(e_r, grad_r[probe], "grad_residual rows vs reference")
    probe_x = grad_x[probe].clone()
    del grad_x, grad_r
    again = bi_backward(x, w, g, 1e-6, r, g_r, "fp32", 0.0)
    assert_bits(grad_w, again[2], "grad_weight: two runs")
    assert_bits(probe_x, again[0][probe], "grad_x rows: two runs")
    del again
    with torch.no_grad():
        z = bi_torch.rms_norm(x, w, 1e-6, r)[1]  # the new residual: float32, what the big call normalised
    del x, r, g_r
    w32 = w.float()
    left = bi_backward(z[:2**15], w32, g[:2**15].float(), 1e-6, mode="fp32")[2]
    right = bi_backward(z[2**15:], w32, g[2**15:].float(), 1e-6, mode="fp32")[2]
    assert torch.isfinite(grad_w.float()).all()
    assert_bits((left + (right + 0.0)).to(torch.bfloat16), grad_w, "grad_weight vs its split tree")
