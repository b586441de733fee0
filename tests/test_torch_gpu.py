"""bi_torch on CUDA tensors: the compiled Triton kernel (skipped, with the reason, without a CUDA GPU).

Every numeric assertion is bitwise: against the golden corpus and bridge.reference, and between
calls that must agree (batch sizes 1..4096, compiled vs eager, CUDA-graph replay vs eager,
interpreter vs compiled kernel).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import bi_torch
from bridge import golden
from torch_helpers import (DTYPES, assert_bits, bi, int_view, random_rows, random_weight, ref, to_numpy, to_torch,
                           warm_up)

CASE_NAMES = [entry["name"] for entry in golden.load_manifest()["cases"]]
TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEV = "cuda"


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _gen(*parts) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(_seed(*parts))


def cuda_rows(g: torch.Generator, shape, dtype: str) -> torch.Tensor:
    """Normal values with a per-row scale in [2**-4, 2**4], made on the GPU."""
    shape = tuple(shape)
    scale = torch.exp2(torch.rand(shape[:-1] + (1,), generator=g, device=DEV) * 8 - 4)
    return (torch.randn(shape, generator=g, device=DEV) * scale).to(TD[dtype])


def cuda_weight(g: torch.Generator, n: int, dtype: str) -> torch.Tensor:
    return (1 + 0.25 * torch.randn(n, generator=g, device=DEV)).to(TD[dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(int_view(a), int_view(b))


# --------------------------------------------------------------------------------------------
# The golden corpus on the compiled kernel.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASE_NAMES)
def test_corpus_case_cuda(cases_by_name, name):
    case = cases_by_name[name]
    x, w, r = to_torch(case.x, DEV), to_torch(case.weight, DEV), to_torch(case.residual, DEV)
    for (mode, offset), expected in case.out.items():
        out, new_res = bi(x, w, case.spec.eps, r, mode, offset)
        assert out.is_cuda
        assert_bits(expected, out, f"{name} out ({mode}, offset {offset})")
        if r is not None:
            assert_bits(case.new_residual, new_res, f"{name} new_residual ({mode}, offset {offset})")
            xi, ri = x.clone(), r.clone()
            bi_torch.fused_add_rms_norm_(xi, ri, w, case.spec.eps, mode=mode, weight_offset=offset)
            assert_bits(expected, xi, f"{name} in place x ({mode}, offset {offset})")
            assert_bits(case.new_residual, ri, f"{name} in place residual ({mode}, offset {offset})")
    assert_bits(case.x, x, f"{name}: x was modified")
    if r is not None:
        assert_bits(case.residual, r, f"{name}: residual was modified")


# --------------------------------------------------------------------------------------------
# Batch invariance: batch sizes 1..4096 on one 4096-row input.
# --------------------------------------------------------------------------------------------

MAX_ROWS = 4096
BATCH_SIZES = sorted(set(range(1, 65)) | {127, 128, 129, 255, 256, 257, 1000, 1023, 1024, 1025, 2047, 2048, 2049,
                                          4095, 4096})


@pytest.mark.gpu
@pytest.mark.parametrize("res_dtype", [None, "float32"], ids=["nores", "res_f32"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("n", [128, 4096, 5120, 8192, 16384, 65536])
def test_batch_invariance_cuda(n, dtype, res_dtype):
    """Every batch x[:B] and x[4096-B:] gives, row for row, the bits of the full 4096-row batch."""
    g = _gen("batch", n, dtype, res_dtype)
    x = cuda_rows(g, (MAX_ROWS, n), dtype)
    w = cuda_weight(g, n, dtype)
    r = None if res_dtype is None else cuda_rows(g, (MAX_ROWS, n), res_dtype)
    full_out, full_res = bi(x, w, 1e-6, r)
    # The full batch follows the contract (a few rows checked against the CPU reference).
    probe = [0, 1, 2, 15, 16, 17, MAX_ROWS // 2, MAX_ROWS - 2, MAX_ROWS - 1]
    e_out, e_res = ref(to_numpy(x[probe]), to_numpy(w), 1e-6, None if r is None else to_numpy(r[probe]))
    assert_bits(e_out, full_out[probe], f"n={n} {dtype}: 4096-row batch vs reference")
    if r is not None:
        assert_bits(e_res, full_res[probe], f"n={n} {dtype}: 4096-row batch new_residual vs reference")
    for b in BATCH_SIZES:
        for rows in (slice(0, b), slice(MAX_ROWS - b, MAX_ROWS)):
            out, new_res = bi(x[rows], w, 1e-6, None if r is None else r[rows])
            what = f"n={n} {dtype} residual={res_dtype}: batch of {b} (rows {rows.start}..{rows.stop - 1})"
            if not same_bits(full_out[rows], out):
                assert_bits(full_out[rows], out, f"{what} out vs 4096-row batch")
            if r is not None and not same_bits(full_res[rows], new_res):
                assert_bits(full_res[rows], new_res, f"{what} new_residual vs 4096-row batch")


# --------------------------------------------------------------------------------------------
# Strided views and the in-place variant on CUDA.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [7, 1000, 4096, 20000])
def test_strided_views_cuda(n):
    g = _gen("strided", n)
    rows = 37
    big = cuda_rows(g, (rows, n + 3), "bfloat16")
    rbig = cuda_rows(g, (rows, n + 3), "float32")
    w = cuda_weight(g, n, "bfloat16")
    x, r = big[:, :n], rbig[:, :n]
    want_out, want_res = bi(x.contiguous(), w, 1e-6, r.contiguous())
    out, new_res = bi(x, w, 1e-6, r)
    assert_bits(want_out, out, "strided out vs contiguous")
    assert_bits(want_res, new_res, "strided new_residual vs contiguous")
    pad_before, rpad_before = big[:, n:].clone(), rbig[:, n:].clone()
    bi_torch.fused_add_rms_norm_(x, r, w, 1e-6)
    assert_bits(want_out, x, "in place strided x")
    assert_bits(want_res, r, "in place strided residual")
    assert_bits(pad_before, big[:, n:], "in place wrote x's padding")
    assert_bits(rpad_before, rbig[:, n:], "in place wrote the residual's padding")


# --------------------------------------------------------------------------------------------
# torch.compile (inductor) and CUDA-graph replay give eager's bits.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 65536])
def test_compile_cuda(n, fresh_dynamo):
    g = _gen("compile", n)
    x, r = cuda_rows(g, (33, n), "bfloat16"), cuda_rows(g, (33, n), "float32")
    w = cuda_weight(g, n, "bfloat16")

    def f(x, w, r):
        out, new_res = bi_torch.rms_norm(x, w, 1e-6, r)
        return bi_torch.rms_norm(x, w, 1e-5), bi_torch.rms_norm(x, w, 1e-5, mode="fp32", weight_offset=1.0), out, \
            new_res

    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(x, w, r), f(x, w, r)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bits(b, a, f"compiled output {i} vs eager")


@pytest.mark.gpu
def test_compile_inplace_cuda(fresh_dynamo):
    g = _gen("compile-inplace")
    x, r = cuda_rows(g, (33, 4096), "bfloat16"), cuda_rows(g, (33, 4096), "float32")
    w = cuda_weight(g, 4096, "bfloat16")
    xe, re_ = x.clone(), r.clone()
    bi_torch.fused_add_rms_norm_(xe, re_, w, 1e-6)

    def f(x, r, w):
        bi_torch.fused_add_rms_norm_(x, r, w, 1e-6)
        return x.float().sum()

    torch.compile(f, fullgraph=True)(x, r, w)
    assert_bits(xe, x, "compiled in place x vs eager")
    assert_bits(re_, r, "compiled in place residual vs eager")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 65536])
def test_cuda_graph_replay(n):
    g = _gen("graph", n)
    rows = 37
    w = cuda_weight(g, n, "bfloat16")
    static_x = torch.zeros(rows, n, dtype=torch.bfloat16, device=DEV)
    static_r = torch.zeros(rows, n, dtype=torch.float32, device=DEV)
    warm_up(lambda: (bi_torch.rms_norm(static_x, w, 1e-6), bi_torch.rms_norm(static_x, w, 1e-6, static_r)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = bi_torch.rms_norm(static_x, w, 1e-6)
        static_out2, static_new_res = bi_torch.rms_norm(static_x, w, 1e-6, static_r)
    for trial in range(3):
        new_x, new_r = cuda_rows(g, (rows, n), "bfloat16"), cuda_rows(g, (rows, n), "float32")
        static_x.copy_(new_x)
        static_r.copy_(new_r)
        graph.replay()
        torch.cuda.synchronize()
        want_out, _ = bi(new_x, w, 1e-6)
        want_out2, want_res = bi(new_x, w, 1e-6, new_r)
        assert_bits(want_out, static_out, f"replay {trial}: out vs eager")
        assert_bits(want_out2, static_out2, f"replay {trial}: add out vs eager")
        assert_bits(want_res, static_new_res, f"replay {trial}: new_residual vs eager")
        assert_bits(ref(to_numpy(new_x[:2]), to_numpy(w))[0], static_out[:2], f"replay {trial}: vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 65536])
def test_cuda_graph_replay_inplace(n):
    g = _gen("graph-inplace", n)
    rows = 37
    w = cuda_weight(g, n, "bfloat16")
    static_x = torch.zeros(rows, n, dtype=torch.bfloat16, device=DEV)
    static_r = torch.zeros(rows, n, dtype=torch.float32, device=DEV)
    warm_up(lambda: bi_torch.fused_add_rms_norm_(static_x, static_r, w, 1e-6))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bi_torch.fused_add_rms_norm_(static_x, static_r, w, 1e-6)
    for trial in range(3):
        new_x, new_r = cuda_rows(g, (rows, n), "bfloat16"), cuda_rows(g, (rows, n), "float32")
        static_x.copy_(new_x)
        static_r.copy_(new_r)
        graph.replay()
        torch.cuda.synchronize()
        want_x, want_r = new_x.clone(), new_r.clone()
        bi_torch.fused_add_rms_norm_(want_x, want_r, w, 1e-6)
        assert_bits(want_x, static_x, f"replay {trial}: x vs eager in place")
        assert_bits(want_r, static_r, f"replay {trial}: residual vs eager in place")
        e_out, e_res = ref(to_numpy(new_x[-2:]), to_numpy(w), 1e-6, to_numpy(new_r[-2:]))
        assert_bits(e_out, static_x[-2:], f"replay {trial}: x vs reference")
        assert_bits(e_res, static_r[-2:], f"replay {trial}: residual vs reference")


# --------------------------------------------------------------------------------------------
# More than 2**31 elements: 64-bit row offsets.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_more_than_2_31_elements():
    n = 4096
    rows = 2**31 // n + 8  # the last 8 rows start past element 2**31
    need = 24 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory; {free / 2**30:.1f} GiB free")
    g = _gen("huge")
    x = torch.empty(rows, n, dtype=torch.bfloat16, device=DEV)
    x.normal_(generator=g)
    w = cuda_weight(g, n, "bfloat16")
    wn = to_numpy(w)
    assert x.numel() > 2**31
    probe = [0, 1, rows // 2] + list(range(2**31 // n - 2, rows))
    out = bi_torch.rms_norm(x, w, 1e-6)
    assert_bits(ref(to_numpy(x[probe]), wn, 1e-6)[0], out[probe], "rows past 2**31 elements: out vs reference")
    # The last rows computed alone give the same bits (no wrapped offsets in the big launch).
    assert_bits(bi_torch.rms_norm(x[-8:].clone(), w, 1e-6), out[-8:], "last rows alone vs in the huge batch")
    del out
    # In place with a residual of x's dtype: residual and output offsets past 2**31 too.
    r = torch.empty_like(x)
    r.normal_(generator=g)
    x_probe, r_probe = to_numpy(x[probe]), to_numpy(r[probe])
    bi_torch.fused_add_rms_norm_(x, r, w, 1e-6)
    e_out, e_res = ref(x_probe, wn, 1e-6, r_probe)
    assert_bits(e_out, x[probe], "in place, rows past 2**31 elements: x vs reference")
    assert_bits(e_res, r[probe], "in place, rows past 2**31 elements: residual vs reference")
    del x, r
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# The interpreter (CPU tensors) and the compiled kernel (CUDA tensors) agree.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 5120, 16384, 20000, 65536])
def test_interpreter_matches_compiled(n, dtype):
    rng = np.random.default_rng(_seed("interp", n, dtype))
    rows = 2 if n >= 16384 else 19
    xn = random_rows(rng, (rows, n), dtype, specials=True)
    wn = random_weight(rng, n, dtype)
    for res_dtype, mode, offset in ((None, "llama", 0.0), (dtype, "fp32", 1.0), ("float32", "llama", -0.5)):
        rn = None if res_dtype is None else random_rows(rng, (rows, n), res_dtype, specials=True)
        cpu_out, cpu_res = bi(to_torch(xn), to_torch(wn), 1e-5, to_torch(rn), mode, offset)
        gpu_out, gpu_res = bi(to_torch(xn, DEV), to_torch(wn, DEV), 1e-5, to_torch(rn, DEV), mode, offset)
        what = f"n={n} {dtype} residual={res_dtype} {mode} offset={offset}"
        assert_bits(cpu_out, gpu_out, f"{what}: interpreter vs compiled out")
        e_out, e_res = ref(xn, wn, 1e-5, rn, mode, offset)
        assert_bits(e_out, gpu_out, f"{what}: compiled vs reference")
        if rn is not None:
            assert_bits(cpu_res, gpu_res, f"{what}: interpreter vs compiled new_residual")
            assert_bits(e_res, gpu_res, f"{what}: compiled new_residual vs reference")
