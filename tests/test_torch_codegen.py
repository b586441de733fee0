"""Code-generation guards for the Triton kernel, compiled for sm_90 without a GPU.

Triton 3.6 once gave the pairwise tree a layout holding the whole row in every thread (each
thread squared and summed all 4096 elements: 400x slower on an H100, 150 s compiles). The
squares per thread in the PTX must stay near the elements each thread owns. Long rows, read
twice, depend on L2 eviction hints for their second read (BENCHMARKS.md): the PTX must carry them.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from bi_torch import triton_kernel  # noqa: E402
from bi_torch.launch import fp8_constexprs  # noqa: E402
from bridge.numerics import tiling  # noqa: E402

pytestmark = pytest.mark.codegen


def _ptx(dtype: str, chunk: int, warps: int, num_chunks: int = 1, residual: bool = False, quant: str = "none",
         group: int = 1) -> str:
    """The forward kernel's PTX; quant "static"/"group": FP8 output (through a uint8 out_ptr)."""
    signature = {name: f"*{dtype}" for name in ("x_ptr", "r_ptr", "w_ptr", "out_ptr", "new_r_ptr")}
    signature.update({"out_ptr": f"*{dtype}" if quant == "none" else "*u8", "scale_ptr": "*fp32",
                      "scales_ptr": "*fp32"})
    signature.update({name: "i32" for name in ("x_stride", "r_stride", "out_stride", "new_r_stride", "scales_stride",
                                                "n_rows", "n_cols")})
    signature.update({name: "fp32" for name in ("n_cols_f32", "eps", "weight_offset")})
    constexprs = {"HAS_RESIDUAL": residual, "HAS_OFFSET": False, "LLAMA": True, "ROWS": 1, "CHUNK": chunk,
                  "LOG2_CHUNK": chunk.bit_length() - 1, "NUM_CHUNKS": num_chunks,
                  "LOG2_NUM_CHUNKS": num_chunks.bit_length() - 1,
                  "LOG2_SPLIT": tiling.split_width(chunk, {"bf16": 2, "fp32": 4}[dtype]).bit_length() - 1,
                  "QUANT": quant, "GROUP": group, **fp8_constexprs()}
    return _compile(triton_kernel.rms_norm_kernel, signature, constexprs, warps)


def _compile(kernel, signature: dict, constexprs: dict, warps: int, attrs: dict | None = None) -> str:
    """The kernel's PTX for sm_90, compiled as the launcher compiles it (no FMA contraction)."""
    if _toolchain_missing():
        pytest.skip(f"triton cannot compile for sm_90 here: {_toolchain_missing()}")
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    # Past the toolchain check, a failure is the kernel's (a signature out of step, say): it fails.
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "enable_fp_fusion": False})
    return compiled.asm["ptx"]


@triton.jit
def _copy_kernel(src_ptr, dst_ptr):
    tl.store(dst_ptr, tl.load(src_ptr))


@functools.lru_cache(maxsize=None)
def _toolchain_missing() -> str:
    """Why this triton build cannot compile a trivial kernel for sm_90 ("" when it can)."""
    source = triton.compiler.ASTSource(fn=_copy_kernel, signature={"src_ptr": "*fp32", "dst_ptr": "*fp32"})
    try:
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, "enable_fp_fusion": False})
    except Exception as e:  # no CUDA toolchain in this triton build: nothing to inspect
        return f"{type(e).__name__}: {e}"
    return ""


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_each_thread_works_on_its_share_of_the_row(dtype: str) -> None:
    chunk, warps = 4096, 8
    per_thread = chunk // (32 * warps)
    ptx = _ptx(dtype, chunk, warps)
    muls = len(re.findall(r"\bmul\.rn\.f32\b", ptx))
    adds = len(re.findall(r"\badd\.rn\.f32\b", ptx))
    # v*v, v*inv and y*w per owned element, plus a few scalars.
    assert muls <= 3 * per_thread + 8, f"{muls} float32 multiplies per thread for {per_thread} elements"
    # The replicated tree summed the whole row in every thread: chunk - 1 adds (4095 here).
    # Distributed, a thread adds its own elements plus a few per level across threads (~100-150).
    assert adds < chunk // 4, f"{adds} float32 adds per thread: the row is replicated across threads"


@pytest.mark.parametrize("residual", [False, True])
def test_only_two_pass_rows_carry_eviction_hints(residual: bool) -> None:
    whole = _ptx("bf16", 4096, 8, residual=residual)
    two_pass = _ptx("bf16", tiling.MAX_WHOLE_ROW, 16, num_chunks=4, residual=residual)
    assert "createpolicy" not in whole, "a one-pass row got an L2 eviction policy"
    # Kept in L2: what the second pass reads again, x as it is loaded or the new residual as it is stored.
    # Streamed: every other load and the output.
    expected = [("st" if residual else "ld", "evict_last"), ("ld", "evict_first"), ("st", "evict_first")]
    for op, policy in expected:
        assert re.search(rf"\b{op}\.global\.L1::{policy}\.L2::cache_hint", two_pass), f"no {op} with {policy} in the PTX"


def _backward_ptx(chunk: int, warps: int, rows: int, steps: int, num_chunks: int = 1, residual: bool = True,
                  aligned: bool = False, dtype: str = "bf16") -> str:
    """The backward kernel's PTX; aligned: pointers, strides and n_cols divisible by 16, as Triton
    specialises them at launch for aligned tensors (vector loads)."""
    from bi_torch import triton_backward

    signature = {name: f"*{dtype}" for name in ("z_ptr", "g_ptr", "gr_ptr", "w_ptr", "dx_ptr", "dr_ptr", "dw_ptr")}
    signature.update({name: "*fp32" for name in ("stats_ptr", "partial_ptr")})
    signature.update({name: "i32" for name in ("z_stride", "g_stride", "gr_stride", "dx_stride", "dr_stride",
                                                "n_rows", "n_cols")})
    signature.update({name: "fp32" for name in ("n_cols_f32", "eps", "weight_offset")})
    log2 = lambda v: v.bit_length() - 1  # noqa: E731
    constexprs = {"HAS_RESIDUAL": residual, "HAS_GRAD_RESIDUAL": residual, "HAS_OFFSET": False, "LLAMA": True,
                  "ROWS": rows, "LOG2_ROWS": log2(rows), "STEPS": steps, "LEVELS": max(1, log2(steps)), "CHUNK": chunk,
                  "LOG2_CHUNK": log2(chunk), "NUM_CHUNKS": num_chunks,
                  "LOG2_SPLIT": log2(tiling.split_width(chunk, {"bf16": 2, "fp32": 4}[dtype])), "FINAL": False}
    kernel = triton_backward.rms_norm_backward_kernel
    divisible = [name for name in signature if name.endswith(("_ptr", "_stride")) or name == "n_cols"]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible} if aligned else None
    return _compile(kernel, signature, constexprs, warps, attrs)


def test_backward_rounds_every_step_and_keeps_rows_distributed() -> None:
    chunk, warps, rows, steps = 4096, 8, 2, 4
    ptx = _backward_ptx(chunk, warps, rows, steps)
    # Every step of B1-B7 is one rounding: no contraction into FMA, IEEE division and square root.
    assert not re.search(r"\bfma\.", ptx), "a multiply was fused into an add (FMA) in the backward"
    assert re.search(r"\bdiv\.rn\.f32\b", ptx) and re.search(r"\bsqrt\.rn\.f32\b", ptx)
    # Per owned element: v*v, xhat, a, g*h, a*xhat, xhat*c, inv*(...): 7 multiplies, plus scalars.
    per_thread = rows * chunk // (32 * warps)
    muls = len(re.findall(r"\bmul\.rn\.f32\b", ptx))
    assert muls <= 7 * per_thread + 16, f"{muls} float32 multiplies per thread for {per_thread} elements"
    adds = len(re.findall(r"\badd\.rn\.f32\b", ptx))
    assert adds < rows * chunk // 4, f"{adds} float32 adds per thread: the rows are replicated across threads"


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) of the PTX's kernel, by Triton's own ptxas for sm_90a."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = (get_ptxas(90) if inspect.signature(get_ptxas).parameters else get_ptxas()).path
    except Exception as e:  # this triton build names its ptxas otherwise: nothing to assemble with
        pytest.skip(f"no ptxas from triton here: {type(e).__name__}: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                              text=True)
    used = re.search(r"Used (\d+) registers", done.stderr)
    if done.returncode or not used:
        pytest.skip(f"ptxas could not assemble the PTX: {done.stderr.strip()[-300:]}")
    spilled = re.search(r"(\d+) bytes spill stores", done.stderr)
    return int(used.group(1)), int(spilled.group(1)) if spilled else 0


@pytest.mark.parametrize("n,residual,dtype", [(4096, False, "bf16"), (16384, False, "bf16"), (65536, True, "bf16"),
                                             (8192, True, "fp32"), (65536, False, "fp32")])
def test_backward_tile_fits_in_registers(n: int, residual: bool, dtype: str) -> None:
    """The shipped backward tile (16384 rows) compiles without spills: each spilled float goes
    through local memory once per step (bf16 4 x 4096 on 16 warps spilled 336 bytes per thread).
    Not asserted: 4-8 bytes at n = 4096 with a bf16 residual or in float32, 12 at bf16 n = 8192,
    84-88 there with a residual (benchmarks/kernel-resources-sm90a.txt)."""
    cfg = tiling.backward_config(n, 16384, {"bf16": 2, "fp32": 4}[dtype])
    ptx = _backward_ptx(cfg.chunk, cfg.num_warps, cfg.rows, cfg.steps, cfg.num_chunks, residual, aligned=True,
                        dtype=dtype)
    registers, spilled = _ptxas_usage(ptx)
    assert spilled == 0, f"{cfg}: {registers} registers per thread, {spilled} bytes of spill stores"


@pytest.mark.parametrize("quant,group", [("static", 1), ("group", 128), ("group", 64)])
def test_fp8_output_uses_the_packed_hardware_conversion(quant: str, group: int) -> None:
    """The FP8 paths keep every step one rounding (no contracted FMA, IEEE division) and convert with
    the hardware's cvt.rn.satfinite.e4m3x2.f32, two elements per instruction (to_fp8; its equality
    with the contract's clamp and rnFP8 is a GPU test over all 2**32 patterns); the bit-pattern
    encoder (variable shifts for subnormals) is the interpreter's only. Per group the only FMAs are
    the quotient's two per element (triton_fp8.quotient, equal to division: GPU tests)."""
    ptx = _ptx("bf16", 4096, 8, quant=quant, group=group)
    per_thread = 4096 // (32 * 8)
    fmas = len(re.findall(r"\bfma\.", ptx))
    assert fmas == (0 if quant == "static" else 2 * per_thread), f"{fmas} FMAs: a multiply fused into an add"
    assert len(re.findall(r"\bcvt\.rn\.satfinite\.e4m3x2\.f32\b", ptx)) == per_thread // 2, "not one cvt per pair"
    assert not re.search(r"\bshr\.u32\s+%r\d+, %r\d+, %r\d+;", ptx), "the bit-pattern encoder is compiled in"
    divs = len(re.findall(r"\bdiv\.rn\.f32\b", ptx))
    # static: mean, 1/r and 1/scale; per group the scales and their reciprocals (as many copies as
    # the group's layout spreads over a thread's registers), no division per element past those.
    assert divs == 3 if quant == "static" else 2 < divs <= 2 + 2 * per_thread
    assert "st.global.b8" in ptx or re.search(r"st\.global\.v\d\.b8", ptx) or "st.global.u8" in ptx


def test_fp8_long_rows_compile() -> None:
    """The two-pass path (rows past 16384) with per-group scales in its second pass."""
    ptx = _ptx("bf16", tiling.MAX_WHOLE_ROW, 16, num_chunks=4, quant="group", group=128)
    assert len(re.findall(r"\bfma\.", ptx)) == 2 * tiling.MAX_WHOLE_ROW // (32 * 16), "FMAs past the quotient's"
    assert re.search(r"\bcvt\.rn\.satfinite\.e4m3x2\.f32\b", ptx)
