"""bi_torch's FP8 output (contract v1.2) on CUDA tensors, the compiled Triton kernel, bit for bit
(skipped, with the reason, without a CUDA GPU): rnFP8 alone over float32 patterns (the bit-pattern
encoder against the reference; the hardware conversion against it on all 2**32), the FP8 golden
corpus, random and special rows against bridge.reference (more rows, larger n than on the CPU),
the compiled kernel against the interpreter, batch invariance of out and scales over many batch
sizes (the launch configuration changes with them), torch.compile, CUDA-graph capture with a scale
on the GPU (replayed after the scale's value changes: nothing read it on the host), and the vLLM
drop-ins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import bi_torch
from bi_torch import launch, triton_fp8
from bridge.numerics.tiling import launch_config
from bridge.numerics import reference_fp8
from fp8_helpers import FP8_CASE_NAMES, QUOTIENT_SCALES
from torch_fp8_helpers import (DTYPE_RESIDUALS, FP8, QUANTS, TORCH_FP8, assert_fp8_bits, bi_fp8,
                               check_fp8, check_fp8_corpus_case, fp8_inputs, fp8_patterns, ref_fp8, scale_array)
from torch_helpers import assert_bits, to_numpy, to_torch, warm_up

DEV = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]


def _cuda(*arrays):
    return tuple(to_torch(a, DEV) for a in arrays)


def _quant_kwargs(scale, group, device=DEV):
    return dict(scale=None if scale is None else torch.tensor(scale, dtype=torch.float32, device=device),
                group_size=group)


def _to_cpu(result):
    return tuple(None if t is None else t.cpu() for t in result)


@triton.jit
def _encode_kernel(c_ptr, q_ptr, n, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                   EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = triton_fp8.clamp_fp8(tl.load(c_ptr + offs, mask=offs < n, other=0.0), FP8_MAX)
    tl.store(q_ptr + offs, triton_fp8.encode_fp8(c, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8), mask=offs < n)


def test_encode_fp8_compiled_matches_reference():
    """The compiled encode_fp8 over the CPU test's patterns plus a stride-257 sweep of all 2**32."""
    sweep = np.arange(0, 2**32, 257, dtype=np.uint64).astype(np.uint32).view(np.float32)
    c = np.concatenate([fp8_patterns(), sweep])
    q = torch.empty(c.size, dtype=torch.uint8, device=DEV)
    block = 1024
    _encode_kernel[(-(-c.size // block),)](torch.from_numpy(c).to(DEV), q, c.size, BLOCK=block,
                                           **launch.fp8_constexprs(FP8), enable_fp_fusion=False)
    with np.errstate(all="ignore"):
        expected = reference_fp8.encode_fp8(reference_fp8.clamp(c, FP8), FP8)
    assert_fp8_bits(expected, q.cpu().numpy().view(reference_fp8.fp8_numpy_dtype(FP8)),
                    "compiled encode_fp8(clamp_fp8(c)) vs reference")


@triton.jit
def _hardware_vs_bits_kernel(start, differ_ptr, first_ptr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                             MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    bits = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = bits.to(tl.uint32).to(tl.float32, bitcast=True)
    hardware = triton_fp8.to_fp8(t, FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    by_bits = triton_fp8.encode_fp8(triton_fp8.clamp_fp8(t, FP8_MAX), MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
    wrong = hardware != by_bits
    tl.store(differ_ptr + tl.program_id(0), tl.sum(wrong.to(tl.int32), 0))
    tl.store(first_ptr + tl.program_id(0), tl.min(tl.where(wrong, bits, 1 << 40), 0))


def test_to_fp8_compiled_equals_bit_pattern_on_every_float32():
    """The compiled kernels' Q3-Q4 (to_fp8: cvt.rn.satfinite.e4m3x2.f32, no clamp, no NaN select)
    against encode_fp8(clamp_fp8(t)), the contract's form, on all 2**32 float32 patterns t:
    infinities, out-of-range values, every NaN, subnormals and both zeros included."""
    block, span = 4096, 1 << 30
    differ = torch.empty(span // block, dtype=torch.int32, device=DEV)
    first = torch.empty(span // block, dtype=torch.int64, device=DEV)
    for start in range(0, 1 << 32, span):
        _hardware_vs_bits_kernel[(span // block,)](start, differ, first, BLOCK=block, **launch.fp8_constexprs(FP8),
                                                   enable_fp_fusion=False)
        count = int(differ.sum())
        assert count == 0, (f"{count} codes differ in 0x{start:08x}-0x{start + span - 1:08x}; first pattern "
                            f"0x{int(first[first < (1 << 40)].min()):08x}")


@triton.jit
def _quotient_vs_division_kernel(scales_ptr, u_start, differ_ptr, first_ptr, SPAN: tl.constexpr,
                                 BLOCK: tl.constexpr, CODES: tl.constexpr, FP8_MAX: tl.constexpr,
                                 MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    """Program (i, j): scale i against the SPAN patterns u_start + j * SPAN + k, the kernel's
    quotient against IEEE division: their float32 bits, or (CODES) their FP8 codes."""
    s = tl.load(scales_ptr + tl.program_id(0) + tl.zeros([1], tl.int32))
    lanes = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], tl.int32)
    first = tl.full([BLOCK], 0xFFFFFFFF, tl.uint32)
    for k in range(0, SPAN, BLOCK):
        bits = (u_start + tl.program_id(1).to(tl.int64) * SPAN + k + lanes).to(tl.uint32)
        u = bits.to(tl.float32, bitcast=True)
        got, want = triton_fp8.quotient(u, s), triton_fp8.div_rn(u, s)
        if CODES:
            # Q2 meets |u| <= amax and s = rn(max(amax, floor) / 448) only: |u / s| <= 448 (1 + 2**-24)
            # (or NaN). Kept: |u| * 2**-9 <= s (exact; an infinite u only at s = inf).
            wrong = (~(tl.abs(u) * 0.001953125 > s)
                     & (triton_fp8.to_fp8(got, FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)
                        != triton_fp8.to_fp8(want, FP8_MAX, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8)))
        else:
            wrong = got.to(tl.uint32, bitcast=True) != want.to(tl.uint32, bitcast=True)
        count += wrong.to(tl.int32)
        first = tl.minimum(first, tl.where(wrong, bits, 0xFFFFFFFF))
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(differ_ptr + program, tl.sum(count, 0))
    tl.store(first_ptr + program, tl.min(first, 0))


def _quotient_mismatches(scales: np.ndarray, u_start: int, span: int, splits: int, codes: bool):
    """(count, [(scale, a differing u pattern)]) of the quotient against division over (scales x u)."""
    s = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).to(DEV)
    differ = torch.empty(s.numel() * splits, dtype=torch.int32, device=DEV)
    first = torch.empty(s.numel() * splits, dtype=torch.int32, device=DEV)
    _quotient_vs_division_kernel[(s.numel(), splits)](s, u_start, differ, first, SPAN=span, BLOCK=2048, CODES=codes,
                                                      **launch.fp8_constexprs(FP8), num_warps=8, enable_fp_fusion=False)
    differ, first = differ.view(s.numel(), splits).cpu(), first.view(s.numel(), splits).cpu()
    bad = torch.nonzero(differ.sum(1)).flatten().tolist()[:3]
    return int(differ.sum()), [(float(scales[i]), f"0x{int(first[i][differ[i] > 0][0]) & 0xFFFFFFFF:08x}")
                               for i in bad]


def test_group_quotient_equals_division_on_every_pair_of_significands():
    """The compiled kernel's per-group u / s (quotient: rn(u * rn(1/s)) corrected by one residual)
    equals IEEE division, bit for bit, for every pair of float32 significands: all 2**23 scales
    in [1, 2) against all 2**23 u in [1, 2) (quotients in (1/2, 2)). Every float operation in it is
    one rounding and scales exactly by powers of two while no value leaves the normal range, so this
    covers every s of Q2 (2**-43 < s < 2**120) and every u with |u / s| >= 2**-11: there the
    reciprocal, q0, u, and the residual (a nonzero multiple of ulp(q0) * ulp(s) >= 2**-100) are
    normal. Below 2**-11 both FP8 codes are zeros of u's sign: test_group_quotient_fp8_codes_over_every_u."""
    for base in range(0, 1 << 23, 1 << 20):
        scales = (np.uint32(0x3F800000) + np.arange(base, base + (1 << 20), dtype=np.uint32)).view(np.float32)
        count, first = _quotient_mismatches(scales, 0x3F800000, 1 << 23, 1, codes=False)
        assert count == 0, f"{count} quotients differ from division; (scale, u): {first}"


def test_group_quotient_fp8_codes_over_every_u():
    """For scales across Q2's whole domain (fp8_helpers.QUOTIENT_SCALES), the FP8 code of the
    kernel's quotient equals that of IEEE division for every float32 pattern u the kernel can meet
    with that scale (|u| <= amax and s = rn(max(amax, floor) / 448): |u / s| <= 448 (1 + 2**-24); the
    test keeps every u with |u| <= 512 s, and NaNs) out of all 2**32: zeros of both signs,
    subnormals, tiny quotients and, at s = inf, infinities included. (Far beyond, rn(u * rn(1 / s))
    can overflow where u / s saturates to 448.)"""
    count, first = _quotient_mismatches(QUOTIENT_SCALES, 0, 1 << 22, 1 << 10, codes=True)
    assert count == 0, f"{count} FP8 codes differ from division's; (scale, u): {first}"


@pytest.mark.parametrize("name", FP8_CASE_NAMES)
def test_fp8_corpus_case_cuda(fp8_cases, name):
    check_fp8_corpus_case(fp8_cases[name], name, DEV)


@pytest.mark.parametrize("n", [128, 4096, 5120, 16384, 20480, 65536])
@pytest.mark.parametrize("quant,scale,group", QUANTS, ids=[q[0] for q in QUANTS])
@pytest.mark.parametrize("dtype,res_kind", DTYPE_RESIDUALS)
def test_matches_reference_cuda(dtype, res_kind, quant, scale, group, n):
    rows = 64 if n <= 16384 else 8
    xn, wn, rn = fp8_inputs("ref-cuda", rows, n, dtype, res_kind)
    x, w, r = _cuda(xn, wn, rn)
    for mode, offset in (("llama", 0.0), ("fp32", 1.0), ("llama", 1.0), ("fp32", 0.0)):
        got = bi_fp8(x, w, 1e-6, r, mode, offset, **_quant_kwargs(scale, group))
        expected = ref_fp8(xn, wn, 1e-6, rn, mode, offset, scale=scale_array(scale), group_size=group)
        check_fp8(expected, _to_cpu(got), f"n {n} {dtype} res {res_kind} {quant} {mode} offset {offset}")
        # The interpreter (CPU tensors) gives the same bits as the compiled kernel.
        if n <= 5120 and mode == "llama" and offset == 0.0:
            cpu = bi_fp8(x[:4].cpu(), w.cpu(), 1e-6, None if r is None else r[:4].cpu(), mode, offset,
                         **_quant_kwargs(scale, group, "cpu"))
            check_fp8(tuple(None if t is None else to_numpy(t[:4]) for t in got), cpu, "interpreter vs compiled")


@pytest.mark.parametrize("scale", [1e-4, 100.0, 3.7, 1e-40, 3e38])
def test_static_scales_cuda(scale):
    """Saturation, FP8 subnormals, a float32-subnormal scale (rn(1/scale) = inf) and a huge one
    (rn(1/scale) subnormal): the GPU keeps float32 subnormals."""
    xn, wn, _ = fp8_inputs("static-cuda", 64, 1024, "bfloat16", "none")
    x, w = _cuda(xn, wn)
    for mode in ("llama", "fp32"):
        got = bi_fp8(x, w, 1e-6, None, mode, scale=torch.tensor([scale], device=DEV))
        check_fp8(ref_fp8(xn, wn, 1e-6, None, mode, scale=scale_array(scale, (1,))), _to_cpu(got), f"{scale} {mode}")


MAX_ROWS = 4096
BATCH_SIZES = (1, 2, 7, 64, 127, 128, 129, 255, 256, 300, 1000, 2048, 4095, 4096)


def test_group_rule_keeps_bits_cuda():
    """Per group without a residual, rows of 8192 on a full grid take their own warps
    (tiling.GROUP_FP8_WARPS); a small batch the default: the same bits, and the reference's."""
    rows, n = 1024, 8192
    assert (launch_config(n, rows, 2, 0, launch.device_kind(torch.device(DEV)), quant="group")
            != launch_config(n, 1, 2, 0, launch.device_kind(torch.device(DEV)), quant="group"))
    xn, wn, _ = fp8_inputs("group-rule-cuda", rows, n, "bfloat16", "none", special=False)
    x, w = _cuda(xn, wn)
    full = bi_fp8(x, w, 1e-6, None, group_size=128)
    probe = [0, 1, rows - 1]
    expected = ref_fp8(xn[probe], wn, 1e-6, None, group_size=128)
    check_fp8(expected, _to_cpu(tuple(None if t is None else t[probe] for t in full)), "full batch vs reference")
    for sl in (slice(0, 1), slice(rows - 64, rows)):
        got = bi_fp8(x[sl], w, 1e-6, None, group_size=128)
        for name, a, e in zip(("out", "scales"), got, full):
            (assert_fp8_bits if name == "out" else assert_bits)(e[sl], a, f"rows {sl} {name} vs the full batch")


@pytest.mark.parametrize("n", [128, 4096, 20480])
@pytest.mark.parametrize("quant,scale,group", QUANTS, ids=[q[0] for q in QUANTS])
def test_batch_invariance_cuda(quant, scale, group, n):
    """Every batch x[:B] and x[4096-B:] gives, row for row, the FP8 bits and scales of the full batch."""
    rows = MAX_ROWS if n <= 4096 else 512
    xn, wn, rn = fp8_inputs("inv-cuda", rows, n, "bfloat16", "float32", special=False)
    x, w, r = _cuda(xn, wn, rn)
    kw = _quant_kwargs(scale, group)
    full = bi_fp8(x, w, 1e-6, r, **kw)
    probe = [0, 1, 17, rows // 2, rows - 1]
    expected = ref_fp8(xn[probe], wn, 1e-6, rn[probe], scale=scale_array(scale), group_size=group)
    check_fp8(expected, _to_cpu(tuple(None if t is None else t[probe] for t in full)), "full batch vs reference")
    for b in (b for b in BATCH_SIZES if b <= rows):
        for sl in (slice(0, b), slice(rows - b, rows)):
            got = bi_fp8(x[sl], w, 1e-6, r[sl], **kw)
            for name, a, e in zip(("out", "scales", "new_residual"), got, full):
                if e is not None:
                    what = f"n {n} {quant}: batch of {b} (rows {sl.start}..{sl.stop - 1}) {name} vs the full batch"
                    (assert_fp8_bits if name == "out" else assert_bits)(e[sl], a, what)


def test_scale_on_another_device_raises():
    x, w = _cuda(*fp8_inputs("device", 2, 128, "bfloat16", "none", special=False)[:2])
    with pytest.raises(ValueError, match=r"^scale: expected a tensor on cuda"):
        bi_torch.rms_norm(x, w, out_dtype=TORCH_FP8, scale=torch.tensor(1.0))


def test_compile_cuda(fresh_dynamo):
    xn, wn, rn = fp8_inputs("compile-cuda", 33, 4096, "bfloat16", "float32")
    x, w, r = _cuda(xn, wn, rn)
    scale = torch.tensor([0.02], device=DEV)

    def f(x, w, r, scale):
        return (bi_torch.rms_norm(x, w, 1e-6, r, out_dtype=TORCH_FP8, scale=scale),
                bi_torch.rms_norm(x, w, 1e-6, out_dtype=TORCH_FP8, scale=0.5, mode="fp32"),
                bi_torch.rms_norm(x, w, 1e-6, r, out_dtype=TORCH_FP8, group_size=128))

    got, want = torch.utils._pytree.tree_leaves(torch.compile(f, fullgraph=True)(x, w, r, scale)), \
        torch.utils._pytree.tree_leaves(f(x, w, r, scale))
    for i, (a, e) in enumerate(zip(got, want)):
        (assert_fp8_bits if e.dtype == TORCH_FP8 else assert_bits)(e, a, f"compiled output {i} vs eager")


@pytest.mark.parametrize("n", [4096, 20480])
def test_cuda_graph_static_scale_on_the_gpu(n):
    """The static path and the vLLM drop-ins captured with a device scale; the scale's value and the
    inputs change between replays, and every replay equals eager: the scale is read on the GPU only."""
    rows = 37
    xn, wn, _ = fp8_inputs("graph", rows, n, "bfloat16", "none", special=False)
    w = to_torch(wn, DEV)
    static_x = torch.zeros(rows, n, dtype=torch.bfloat16, device=DEV)
    static_r = torch.zeros(rows, n, dtype=torch.float32, device=DEV)
    static_r2 = torch.zeros(rows, n, dtype=torch.bfloat16, device=DEV)
    scale = torch.ones(1, device=DEV)
    result = torch.empty(rows, n, dtype=TORCH_FP8, device=DEV)

    def calls():
        a = bi_torch.rms_norm(static_x, w, 1e-6, out_dtype=TORCH_FP8, scale=scale)
        b = bi_torch.rms_norm(static_x, w, 1e-6, static_r, out_dtype=TORCH_FP8, scale=scale)
        c = bi_torch.rms_norm(static_x, w, 1e-6, out_dtype=TORCH_FP8, group_size=128)
        bi_torch.fused_add_rms_norm_static_fp8_quant(result, static_x, static_r2, w, scale, 1e-6)
        return a, b, c

    warm_up(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_a, (static_b, static_new_r), (static_c, static_scales) = calls()
    for trial, value in enumerate((0.02, 1e-4, 3.7)):
        new = fp8_inputs(f"graph{trial}", rows, n, "bfloat16", "float32")
        new_x, new_r = _cuda(new[0], new[2])
        new_r2 = new_r.to(torch.bfloat16)
        static_x.copy_(new_x), static_r.copy_(new_r), static_r2.copy_(new_r2)
        scale.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        s = torch.tensor([value], device=DEV)
        assert_fp8_bits(bi_torch.rms_norm(new_x, w, 1e-6, out_dtype=TORCH_FP8, scale=s), static_a,
                        f"replay {trial}: static out vs eager")
        want_b, want_r = bi_torch.rms_norm(new_x, w, 1e-6, new_r, out_dtype=TORCH_FP8, scale=s)
        assert_fp8_bits(want_b, static_b, f"replay {trial}: static out with residual vs eager")
        assert_bits(want_r, static_new_r, f"replay {trial}: new residual vs eager")
        want_c, want_scales = bi_torch.rms_norm(new_x, w, 1e-6, out_dtype=TORCH_FP8, group_size=128)
        assert_fp8_bits(want_c, static_c, f"replay {trial}: group out vs eager")
        assert_bits(want_scales, static_scales, f"replay {trial}: scales vs eager")
        e_out, _, e_res = ref_fp8(to_numpy(new_x[:2]), wn, 1e-6, to_numpy(new_r2[:2]), scale=scale_array(value))
        assert_fp8_bits(e_out, result[:2], f"replay {trial}: drop-in result vs reference")
        assert_bits(e_res, static_r2[:2], f"replay {trial}: drop-in residual vs reference")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_vllm_drop_ins_cuda(dtype, transposed):
    xn, wn, rn = fp8_inputs("vllm-cuda", 300, 4096, dtype, "same")
    x, w, r = _cuda(xn, wn, rn)
    sa = scale_array(0.0123, (1,))
    result = torch.empty(x.shape, dtype=TORCH_FP8, device=DEV)
    bi_torch.rms_norm_static_fp8_quant(result, x, w, torch.from_numpy(sa).to(DEV), 1e-6)
    assert_fp8_bits(ref_fp8(xn, wn, 1e-6, scale=sa)[0], result, "rms_norm_static_fp8_quant")
    bi_torch.fused_add_rms_norm_static_fp8_quant(result, x, r, w, torch.from_numpy(sa).to(DEV), 1e-6)
    e_out, _, e_res = ref_fp8(xn, wn, 1e-6, rn, scale=sa)
    assert_fp8_bits(e_out, result, "fused_add_rms_norm_static_fp8_quant result")
    assert_bits(e_res, r, "fused_add_rms_norm_static_fp8_quant residual")
    assert_bits(xn, x, "fused_add_rms_norm_static_fp8_quant modified its input")
    r = to_torch(rn, DEV)
    out, scales = bi_torch.rms_norm_per_block_quant(x, w, 1e-6, TORCH_FP8, [1, 128], None, r, transposed)
    e_out, e_scales, e_res = ref_fp8(xn, wn, 1e-6, rn, group_size=128)
    assert_fp8_bits(e_out, out, "rms_norm_per_block_quant out")
    assert_bits(e_scales, scales.cpu(), "rms_norm_per_block_quant scales")
    assert_bits(e_res, r, "rms_norm_per_block_quant residual")
